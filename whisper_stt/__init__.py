"""The embedded offline recogniser: Whisper (CTranslate2) with live interim results.

Without a Deepgram key, `local_stt.py` serves the Deepgram protocol in-process and creates one
engine per channel through `engine_factory` (the `engine.EngineFactory` contract); the embedded
voice agent uses the same factory. Reading order:

- `model.py`: which model, and its pinned SHA-256 check (nothing is downloaded, ever).
- `decoder.py`: the worker side, one utterance of audio in, words with timings out.
- `pool.py`: the worker processes and the bounded, two-level admission (interims yield first).
- `segmenter.py`: utterance boundaries from voice-activity probabilities (pure).
- `stream.py`: the engine, Silero VAD on the event loop and results in time order.

Use: `start(local_model)` once at start-up (checks the model, loads it in every worker), then
`engine_factory` per channel, `shutdown()` at the end.
"""

from __future__ import annotations

import logging

from . import pool
from .model import ModelError, resolve
from .pool import stats
from .stream import EngineSettings, WhisperEngine, engine_factory

__all__ = ["EngineSettings", "ModelError", "WhisperEngine", "engine_factory", "shutdown", "start", "started", "stats"]

log = logging.getLogger(__name__)


def start(local_model: str | None = None, *, workers: int = pool.WORKERS) -> str:
    """Check the model (ModelError if unusable), start the pool with it loaded; return a
    description for the start-up log."""
    model_dir, description = resolve(local_model)
    try:
        pool.start(model_dir, workers=workers)
    except Exception as exc:  # CTranslate2 or tokenizers refusing the files, in a worker
        pool.shutdown()
        raise ModelError(f"cannot load the model in {model_dir}: {exc}") from exc
    return description


def started() -> bool:
    """Whether `start()` has run (transcription and the embedded agent share one pool)."""
    return pool.started()


def shutdown() -> None:
    pool.shutdown()
