"""The decoder pool: worker processes sized to the cores, each with the model loaded once.

Decoding is CPU-bound and would stall every call if it ran on the event loop, so it runs here.
The pool is per process and shared by every engine (transcription and agents alike). Its
backlog is bounded and admission has two levels, so overload degrades in a fixed order:

1. an interim is decoded only when a worker is idle (it never waits behind anything, and a
   final waits behind at most one interim per worker);
2. a final is decoded while fewer than `max_pending` decodes are queued or running; beyond it
   the utterance is skipped: counted, logged (rate-limited) and emitted as an empty final so
   the timeline stays whole.

Memory and delay stay bounded whatever the load; `stats` and `/metrics` show which level hit.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import Counter, Gauge

import metrics
from throttle import Throttle

from .decoder import Decoded, Decoder

log = logging.getLogger(__name__)

WORKERS = os.cpu_count() or 1
MAX_PENDING_PER_WORKER = 3  # finals queued or running per worker before utterances are skipped
OVERLOAD_LOG_INTERVAL = 5.0  # seconds between overload warnings
START_TIMEOUT = 60.0  # for every worker to load the model

decoded_total = Counter(
    "embedded_stt_decodes", "Utterance decodes by the embedded recogniser, by kind", ["kind"],
    registry=metrics.REGISTRY,
)
skipped_total = Counter(
    "embedded_stt_skipped", "Decodes not done because the pool was busy: interims postponed, finals skipped",
    ["kind"], registry=metrics.REGISTRY,
)
decode_seconds_total = Counter(
    "embedded_stt_decode_cpu_seconds", "CPU seconds spent decoding, all workers", registry=metrics.REGISTRY
)
audio_seconds_total = Counter(
    "embedded_stt_decoded_audio_seconds", "Seconds of audio decoded as finals", registry=metrics.REGISTRY
)
pending_gauge = Gauge("embedded_stt_pending", "Decodes queued or running in the pool", registry=metrics.REGISTRY,
                      multiprocess_mode="livesum")


@dataclass
class PoolStats:
    """Process-wide counters, so tests, the benchmark and operators can see what happened."""

    finals_decoded: int = 0
    interims_decoded: int = 0
    audio_seconds_decoded: float = 0.0  # finals only: the real-time factor's denominator
    final_cpu_seconds: float = 0.0
    interim_cpu_seconds: float = 0.0
    pending: int = 0  # submitted and not finished
    peak_pending: int = 0
    interims_postponed: int = 0  # an interim was due but no worker was idle
    skipped_utterances: int = 0  # finals not decoded: the pool was full
    skipped_seconds: float = 0.0


stats = PoolStats()
_lock = threading.Lock()  # `pending` goes down in the pool's result thread, up on the event loop
_overload_throttle = Throttle(OVERLOAD_LOG_INTERVAL)

# --- Worker processes ------------------------------------------------------------------------

_decoder: Decoder | None = None  # in a worker: its one model


def _init_worker(model_dir: str) -> None:
    global _decoder
    _decoder = Decoder(model_dir)


def _decode(pcm8: bytes, final: bool) -> Decoded:
    assert _decoder is not None, "runs in a pool worker set up by _init_worker"
    return _decoder.decode(pcm8, final=final)


def _worker_pid(hold: float) -> int:
    """Which worker ran this; held a moment, so that the next warm-up task goes to another."""
    time.sleep(hold)
    return os.getpid()


# --- The pool ---------------------------------------------------------------------------------

_pool: ProcessPoolExecutor | None = None
_model_dir: Path | None = None
_workers = WORKERS


def _new_pool() -> ProcessPoolExecutor:
    """`spawn`, not `fork`: the server has an event loop and threads that a forked child would
    inherit in an unknown state."""
    return ProcessPoolExecutor(
        max_workers=_workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(str(_model_dir),),
    )


def start(model_dir: Path, *, workers: int = WORKERS) -> None:
    """Start the workers and wait until each has loaded the model, so no call pays for it.

    A model that CTranslate2 cannot read fails here, at start-up, not in the first call.
    """
    global _pool, _model_dir, _workers
    shutdown()
    _model_dir, _workers = Path(model_dir), workers
    _pool = _new_pool()
    # Each submit made while no worker is idle starts another worker, up to `workers`; warm-up
    # tasks go on until every worker has run one, i.e. has loaded the model.
    seen: set[int] = set()
    deadline = time.monotonic() + START_TIMEOUT
    while len(seen) < workers and time.monotonic() < deadline:
        seen.update(f.result() for f in [_pool.submit(_worker_pid, 0.2) for _ in range(workers)])
    if len(seen) < workers:
        raise RuntimeError(f"only {len(seen)} of {workers} recogniser workers started in {START_TIMEOUT:.0f} s")
    log.info("recogniser pool: %d worker(s) loaded %s", len(seen), model_dir)


def started() -> bool:
    return _pool is not None


def shutdown() -> None:
    """Stop the workers (queued decodes are cancelled)."""
    global _pool
    if _pool is not None:
        _pool.shutdown(wait=True, cancel_futures=True)
        _pool = None


def _submit(pcm8: bytes, final: bool) -> Future:
    """Queue a decode; a pool broken by a dead worker is replaced once, not left for good."""
    global _pool
    assert _pool is not None and _model_dir is not None, "whisper_stt.start() first"
    try:
        return _pool.submit(_decode, pcm8, final)
    except BrokenProcessPool:
        log.error("recogniser pool broken (a worker died); starting a new one")
        _pool = _new_pool()  # its workers load the model as they start
        return _pool.submit(_decode, pcm8, final)


def submit_final(pcm8: bytes, seconds: float, max_pending_per_worker: int = MAX_PENDING_PER_WORKER) -> Future | None:
    """Decode a final, or None when the pool is full (the utterance is skipped and counted)."""
    max_pending = max_pending_per_worker * _workers
    with _lock:
        if stats.pending >= max_pending:
            stats.skipped_utterances += 1
            stats.skipped_seconds += seconds
            full = True
        else:
            stats.pending += 1
            stats.peak_pending = max(stats.peak_pending, stats.pending)
            full = False
    if full:
        skipped_total.labels("final").inc()
        _log_overload()
        return None
    return _track(_submit(pcm8, True), seconds, final=True)


def submit_interim(pcm8: bytes) -> Future | None:
    """Decode an interim only if a worker is idle, else None (the engine tries again later)."""
    with _lock:
        idle = stats.pending < _workers
        if idle:
            stats.pending += 1
            stats.peak_pending = max(stats.peak_pending, stats.pending)
    if not idle:
        return None
    return _track(_submit(pcm8, False), 0.0, final=False)


def count_postponed_interim() -> None:
    """An interim was due and no worker was idle: the first sign of load, counted once per due interim."""
    with _lock:
        stats.interims_postponed += 1
    skipped_total.labels("interim").inc()


def _track(future: Future, seconds: float, *, final: bool) -> Future:
    pending_gauge.set(stats.pending)
    future.add_done_callback(lambda f: _finished(f, seconds, final))
    return future


def _finished(future: Future, seconds: float, final: bool) -> None:
    """In the pool's result thread: one decode left the pool, successfully or not."""
    with _lock:
        stats.pending -= 1
        ok = not future.cancelled() and future.exception() is None
        if ok:
            cpu = future.result().cpu_seconds
            if final:
                stats.finals_decoded += 1
                stats.audio_seconds_decoded += seconds
                stats.final_cpu_seconds += cpu
            else:
                stats.interims_decoded += 1
                stats.interim_cpu_seconds += cpu
    pending_gauge.set(stats.pending)
    if ok:
        decoded_total.labels("final" if final else "interim").inc()
        decode_seconds_total.inc(cpu)
        if final:
            audio_seconds_total.inc(seconds)


def _log_overload() -> None:
    count = _overload_throttle.hit()
    if count:
        log.warning(
            "recogniser overloaded: %d utterance(s) skipped (pool full, %d pending); totals: %d skipped, "
            "%.1f s of audio; %d interims postponed",
            count, stats.pending, stats.skipped_utterances, stats.skipped_seconds, stats.interims_postponed,
        )
