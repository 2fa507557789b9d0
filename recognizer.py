"""The embedded offline recogniser: pocketsphinx behind the `engine.Engine` contract.

When the proxy has no Deepgram key, `local_stt.py` transcribes in-process and creates one engine
per channel through `engine_factory`. Reading order:

1. Settings and counters (`RecognizerSettings`, `RecognizerStats`).
2. The worker side: a process pool, one `pocketsphinx.Decoder` per worker process, and the
   function that decodes one utterance there.
3. The engine: `PocketsphinxEngine` cuts a channel's audio into utterances in-process with
   pocketsphinx's `Endpointer` (a cheap C voice-activity detector), submits each utterance to
   the pool, and emits the results in time order.

Choices, measured with `bench/recognizer_bench.py` and reported there:

- Audio is upsampled from 8 kHz to 16 kHz for the shipped 16 kHz en-us model. Decoding at 8 kHz
  with a narrowed filterbank (`samprate=8000`, `nfft=256`, `upperf` <= 3800) changes the
  cepstra the model was trained on and loses nearly every word (WER ~95%), upsampling gives
  ~55-80% on the synthetic fixtures.
- A faint deterministic noise floor is added after upsampling: the empty 4-8 kHz band and the
  exact digital silence of mu-law 0xFF otherwise give the log filterbank extreme values (this is
  what sphinx's own `-dither` is for); it cut espeak-ng WER from ~79% to ~56%.
- Recognition is CPU-bound, so it runs in worker processes, never on the event loop, and whole
  utterances are decoded at once (batch cepstral mean normalisation, as the model expects).
- The pool's backlog is bounded. When it is full, the utterance is not decoded: the engine emits
  a final segment with an empty transcript for that stretch, counts it and logs (rate-limited).
  Live audio can't be slowed down, and a growing queue would both use memory and deliver
  transcripts later and later; an explicit empty segment keeps the channel's timeline whole so
  the client sees where the gap is.
- Interim results are not produced: with a stateless shared decoder each partial would be a
  re-decode of the utterance so far, doubling the load the bound protects against.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import multiprocessing
import os
import re
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import numpy as np
from pocketsphinx import Decoder, Endpointer, Vad

import codec
from engine import BYTES_PER_SECOND, Emit, Segment, Word
from throttle import Throttle

log = logging.getLogger(__name__)

MODEL_RATE = 16000  # the shipped en-us acoustic model is trained on 16 kHz audio
FRAMES_PER_SECOND = 100  # pocketsphinx word segmentations are counted in 10 ms frames
NOISE_FLOOR_STDDEV = 4.0  # int16 units, about -78 dBFS: far below speech, above digital zero
WORKERS = os.cpu_count() or 1
OVERLOAD_LOG_INTERVAL = 5.0  # seconds between overload warnings


@dataclass(frozen=True)
class RecognizerSettings:
    """Tunables; `engine_factory` uses the module-level `settings`, tests pass their own."""

    max_utterance_seconds: float = 10.0  # longer speech is cut into pieces of this length
    max_pending_per_worker: int = 4  # decodes queued or running, per pool process
    vad_mode: int = Vad.MEDIUM_STRICT  # best of modes 0-3 on the fixtures
    vad_window: float = 0.3  # seconds of frames the endpointer decides over
    vad_ratio: float = 0.9  # fraction of that window that must agree to switch

    @property
    def max_pending(self) -> int:
        return self.max_pending_per_worker * WORKERS


settings = RecognizerSettings()


@dataclass
class RecognizerStats:
    """Process-wide counters, so an operator can see whether the pool keeps up."""

    utterances_decoded: int = 0
    audio_seconds_decoded: float = 0.0
    decode_cpu_seconds: float = 0.0
    pending: int = 0  # submitted to the pool and not finished
    peak_pending: int = 0
    skipped_utterances: int = 0  # not decoded because the pool was full
    skipped_seconds: float = 0.0


stats = RecognizerStats()
# `pending` goes down in the pool's result thread and up on the event loop.
_stats_lock = threading.Lock()


# --- The worker side --------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodedWord:
    """A recognised word, times in seconds from the start of its utterance."""

    word: str
    start: float
    end: float
    confidence: float


@dataclass(frozen=True)
class Decoded:
    """What a worker sends back for one utterance."""

    words: list[DecodedWord]
    cpu_seconds: float


_decoder: Decoder | None = None  # in a worker process: its one decoder
_ALTERNATE_PRONUNCIATION = re.compile(r"\(\d+\)$")


def _init_worker() -> None:
    """Pool initializer: load the model once per worker (it takes ~0.3 s and ~40 MB)."""
    global _decoder
    _decoder = Decoder(loglevel="FATAL")


def _to_model_input(pcm8: np.ndarray) -> np.ndarray:
    """8 kHz int16 -> 16 kHz int16 plus a faint noise floor (see the module docstring).

    The noise is seeded per call, so the same audio always decodes to the same words.
    """
    upsampled = codec.resample(pcm8, BYTES_PER_SECOND, MODEL_RATE)
    noise = np.random.default_rng(0).normal(0.0, NOISE_FLOOR_STDDEV, len(upsampled))
    return np.clip(upsampled + np.round(noise), -32768, 32767).astype(np.int16)


def _is_filler(word: str) -> bool:
    """`<s>`, `</s>`, `<sil>`, `[NOISE]`, `[SPEECH]` and the like are not words."""
    return word.startswith(("<", "[", "+"))


def decode_utterance(pcm8: bytes) -> Decoded:
    """Recognise one utterance of 8 kHz PCM16 audio (runs in a worker process)."""
    assert _decoder is not None, "decode_utterance runs in a pool worker set up by _init_worker"
    started = time.process_time()
    audio = _to_model_input(np.frombuffer(pcm8, dtype=np.int16))
    _decoder.start_utt()
    _decoder.process_raw(audio.tobytes(), False, True)
    _decoder.end_utt()
    words = [
        DecodedWord(
            word=_ALTERNATE_PRONUNCIATION.sub("", seg.word).lower(),
            start=seg.start_frame / FRAMES_PER_SECOND,
            end=(seg.end_frame + 1) / FRAMES_PER_SECOND,  # end_frame is inclusive
            confidence=seg.prob,  # posterior probability from the lattice (bestpath is on)
        )
        for seg in _decoder.seg()
        if not _is_filler(seg.word)
    ]
    return Decoded(words=words, cpu_seconds=time.process_time() - started)


_pool: ProcessPoolExecutor | None = None


def _get_pool() -> ProcessPoolExecutor:
    """The shared pool, started on first use: engines that never hear speech cost nothing.

    `spawn` rather than `fork`: the server has an event loop and threads, which a forked child
    would inherit in an unknown state.
    """
    global _pool
    if _pool is None:
        _pool = ProcessPoolExecutor(
            max_workers=WORKERS,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
        )
    return _pool


def shutdown() -> None:
    """Stop the worker processes (queued decodes are cancelled); the next use starts anew."""
    global _pool
    if _pool is not None:
        _pool.shutdown(wait=True, cancel_futures=True)
        _pool = None


def _submit_to_pool(pcm8: bytes) -> Future:
    """Queue a decode; a pool broken by a dead worker is replaced once, not left for good."""
    global _pool
    try:
        return _get_pool().submit(decode_utterance, pcm8)
    except BrokenProcessPool:
        log.error("recogniser pool broken (a worker died); starting a new one")
        _pool = None
        return _get_pool().submit(decode_utterance, pcm8)


def _count_finished(future: Future, audio_seconds: float) -> None:
    """Pool result thread: one decode left the pool, successfully or not."""
    with _stats_lock:
        stats.pending -= 1
        if not future.cancelled() and future.exception() is None:
            stats.utterances_decoded += 1
            stats.audio_seconds_decoded += audio_seconds
            stats.decode_cpu_seconds += future.result().cpu_seconds


_overload_throttle = Throttle(OVERLOAD_LOG_INTERVAL)


def _log_overload() -> None:
    """At most one warning per interval, saying how many utterances were skipped since the last."""
    count = _overload_throttle.hit()
    if count:
        log.warning(
            "recogniser overloaded: %d utterance(s) skipped (pool full, %d pending); "
            "totals: %d skipped, %.1f s of audio",
            count, stats.pending, stats.skipped_utterances, stats.skipped_seconds,
        )




# --- The engine -------------------------------------------------------------------------------


@dataclass
class _Slot:
    """One utterance of a channel, in time order: being decoded, or already a segment."""

    start: float
    duration: float
    speech_final: bool
    from_finalize: bool
    future: Future | None = None  # None when skipped: `segment` is set instead
    decoded: asyncio.Future | None = None  # `future` seen from the event loop
    segment: Segment | None = None

    @property
    def ready(self) -> bool:
        return self.segment is not None or (self.future is not None and self.future.done())


@dataclass
class _Utterance:
    """Speech collected so far for the utterance in progress (8 kHz PCM16 frames)."""

    start: float
    frames: list[bytes] = field(default_factory=list)
    nbytes: int = 0

    @property
    def duration(self) -> float:
        return self.nbytes / 2 / BYTES_PER_SECOND


class PocketsphinxEngine:
    """One channel's recogniser (`engine.Engine`).

    `feed` only converts mu-law to PCM16 and runs the endpointer over 30 ms frames (~0.1 ms of
    CPU per second of audio); decoding happens in the pool. Finished utterances wait in
    `_slots` until every earlier one is done, so `emit` sees them in time order.
    """

    def __init__(
        self, channel: int, emit: Emit, *, interim_results: bool = False, config: RecognizerSettings = settings
    ) -> None:
        self.channel = channel
        self._emit = emit
        self._config = config
        self._endpointer = self._new_endpointer()
        self._endpointer_offset = 0.0  # channel time at which `_endpointer` started
        self._unframed = b""  # PCM16 shorter than one endpointer frame
        self._fed_bytes = 0
        self._utterance: _Utterance | None = None
        self._slots: collections.deque[_Slot] = collections.deque()
        self._closed = False

    def _new_endpointer(self) -> Endpointer:
        return Endpointer(
            window=self._config.vad_window,
            ratio=self._config.vad_ratio,
            vad_mode=self._config.vad_mode,
            sample_rate=BYTES_PER_SECOND,
        )

    def feed(self, mulaw: bytes) -> None:
        if self._closed:
            return
        self._fed_bytes += len(mulaw)
        pcm = self._unframed + codec.ulaw_to_pcm16(mulaw).tobytes()
        size = self._endpointer.frame_bytes
        usable = len(pcm) // size * size
        for offset in range(0, usable, size):  # one C call per 30 ms frame
            self._vad_frame(pcm[offset : offset + size])
        self._unframed = pcm[usable:]

    def _vad_frame(self, frame: bytes) -> None:
        was_in_speech = self._endpointer.in_speech
        speech = self._endpointer.process(frame)
        if speech is None:
            return
        if not was_in_speech:  # the endpointer hands back its look-back window with the start
            self._utterance = _Utterance(start=self._endpointer_offset + self._endpointer.speech_start)
        self._add_speech(speech)
        if not self._endpointer.in_speech:
            self._submit(speech_final=True, from_finalize=False)

    def _add_speech(self, speech: bytes) -> None:
        assert self._utterance is not None
        self._utterance.frames.append(speech)
        self._utterance.nbytes += len(speech)
        if self._utterance.duration >= self._config.max_utterance_seconds and self._endpointer.in_speech:
            cut_at = self._utterance.start + self._utterance.duration
            self._submit(speech_final=False, from_finalize=False)
            self._utterance = _Utterance(start=cut_at)

    def _submit(self, *, speech_final: bool, from_finalize: bool) -> None:
        """Send the utterance in progress to the pool, or skip it if the pool is full."""
        utterance, self._utterance = self._utterance, None
        if utterance is None or utterance.nbytes == 0:
            return
        slot = _Slot(utterance.start, utterance.duration, speech_final, from_finalize)
        with _stats_lock:
            full = stats.pending >= self._config.max_pending
            if full:
                stats.skipped_utterances += 1
                stats.skipped_seconds += utterance.duration
            else:
                stats.pending += 1
                stats.peak_pending = max(stats.peak_pending, stats.pending)
        if full:
            slot.segment = self._segment(slot, [])
            _log_overload()
        else:
            slot.future = _submit_to_pool(b"".join(utterance.frames))
            slot.future.add_done_callback(lambda f, seconds=utterance.duration: _count_finished(f, seconds))
            slot.decoded = asyncio.wrap_future(slot.future)
            slot.decoded.add_done_callback(self._on_decoded)
        self._slots.append(slot)
        self._flush()

    def _on_decoded(self, decoded: asyncio.Future) -> None:
        if not decoded.cancelled():
            decoded.exception()  # retrieved here; `_words` logs a failure at its place in time
        self._flush()

    def _flush(self) -> None:
        """Emit every finished utterance that has no unfinished one before it."""
        while self._slots and self._slots[0].ready and not self._closed:
            slot = self._slots.popleft()
            if slot.segment is None:
                assert slot.future is not None
                slot.segment = self._segment(slot, self._words(slot))
            self._emit(slot.segment)

    def _words(self, slot: _Slot) -> list[Word]:
        assert slot.future is not None
        if slot.future.cancelled():
            return []
        error = slot.future.exception()
        if error is not None:  # a crashed worker: say so, keep the timeline
            log.error("channel %d: decoding %.2f s at %.2f s failed: %r", self.channel, slot.duration, slot.start, error)
            return []
        end = slot.start + slot.duration
        return [
            Word(
                word=w.word,
                start=round(slot.start + w.start, 3),
                end=round(min(slot.start + w.end, end), 3),
                confidence=w.confidence,
            )
            for w in slot.future.result().words
        ]

    def _segment(self, slot: _Slot, words: list[Word]) -> Segment:
        return Segment(
            start=round(slot.start, 3),
            duration=round(slot.duration, 3),
            transcript=" ".join(w.word for w in words),
            words=words,
            confidence=float(np.mean([w.confidence for w in words])) if words else 0.0,
            is_final=True,
            speech_final=slot.speech_final,
            from_finalize=slot.from_finalize,
        )

    async def finalize(self) -> None:
        """Cut the utterance in progress, wait for every decode, emit them all, return."""
        if self._closed:
            return
        if self._endpointer.in_speech:
            # The endpointer still holds up to a window of speech. `end_stream` wants at least
            # one sample: a padding sample stands in when the audio ended on a frame boundary.
            padding = b"" if self._unframed else b"\0\0"
            rest = self._endpointer.end_stream(self._unframed or padding)
            if rest is not None:
                self._add_speech(rest[: len(rest) - len(padding)])
        self._submit(speech_final=True, from_finalize=True)
        # The endpointer is done with its stream: start a new one where the audio continues.
        self._endpointer = self._new_endpointer()
        self._endpointer_offset = self._fed_bytes / BYTES_PER_SECOND
        self._unframed = b""
        waiting = [s.decoded for s in self._slots if s.decoded is not None]
        if waiting:
            await asyncio.wait(waiting)
        self._flush()

    async def aclose(self) -> None:
        """Emit nothing more; cancel queued decodes and wait out the running ones.

        Waiting (at most one utterance's decode per worker) means that when this returns the
        pool holds no work of this engine, so `stats.pending` is exact.
        """
        self._closed = True
        slots = [s for s in self._slots if s.future is not None]
        self._slots.clear()
        self._utterance = None
        for slot in slots:
            slot.future.cancel()  # refused by a decode already running in a worker
        if slots:
            await asyncio.wait([s.decoded for s in slots])


def engine_factory(channel: int, emit: Emit, *, interim_results: bool = False) -> PocketsphinxEngine:
    """`engine.EngineFactory` for `local_stt.py`: one recogniser per channel."""
    return PocketsphinxEngine(channel, emit, interim_results=interim_results, config=settings)
