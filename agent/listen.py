"""Hearing the caller: voice activity (for barge-in) and utterances (for turns).

Two questions are asked of the caller's audio, with different needs:

* "Has the caller started speaking?" drives `UserStartedSpeaking`, on which the Twilio side
  clears the agent's audio (barge-in). It must be answered within a few tens of milliseconds,
  for every call, on the event loop. `VoiceActivity` answers it 20 ms frame by 20 ms frame:
  a `FrameClassifier` says whether one frame is speech and a `SpeechGate` turns those votes
  into start and stop events (a few voiced frames in a row to start, so a click does not
  interrupt the agent; a longer run of unvoiced ones to stop).
* "What did the caller say?" is the recogniser's job, through the `engine.EngineFactory`
  contract (one engine per connection, channel 0): the project's engine (Whisper, whisper_stt/)
  cuts utterances with its own voice-activity detector and emits
  one final `Segment` with `speech_final` at each utterance's end. `Listener` gathers those
  into `Utterance`s.

The live classifier is WebRTC's VAD (`webrtcvad-wheels`, MIT): the standard per-call detector
for telephone audio, a small C library that takes 8 kHz frames as they are and decides one in
a few microseconds, with no model to load. Silero VAD (which the recogniser uses) is more robust
to noise but costs a neural-network inference per 32 ms window; for the barge-in signal the
cheaper detector is enough, and the recogniser's own detector still decides where turns end.

For tests, `EnergyClassifier` and `ChecksumEngine` make listening reproducible: speech is any
frame louder than a threshold, and an utterance is "recognised" as its channel, time range and
checksum, like `local_stt.DeterministicEngine`.
"""

from __future__ import annotations

import bisect
import collections
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Protocol

import numpy as np
import webrtcvad

import codec
from engine import BYTES_PER_SECOND, Emit, Engine, EngineFactory, Segment
from local_stt import deterministic_transcript

FRAME_BYTES = 160  # 20 ms of 8 kHz mu-law: Twilio's frame, and a frame size WebRTC's VAD takes
FRAME_SECONDS = FRAME_BYTES / BYTES_PER_SECOND


# --- Is this frame speech? ----------------------------------------------------------------


class FrameClassifier(Protocol):
    def is_speech(self, pcm: bytes) -> bool:
        """One 20 ms frame of 8 kHz PCM16 (320 bytes)."""


class WebRtcClassifier:
    """WebRTC's VAD; `aggressiveness` 0-3, higher rejects more non-speech (3: telephone noise)."""

    def __init__(self, aggressiveness: int = 3) -> None:
        self._vad = webrtcvad.Vad(aggressiveness)

    def is_speech(self, pcm: bytes) -> bool:
        return self._vad.is_speech(pcm, BYTES_PER_SECOND)


class EnergyClassifier:
    """Speech is a frame whose mean absolute amplitude exceeds `threshold` (int16 units).

    Reproducible by construction, for tests and the deterministic mode: mu-law silence (0xFF)
    decodes to 0 and a full-scale tone to thousands.
    """

    def __init__(self, threshold: float = 500.0) -> None:
        self.threshold = threshold

    def is_speech(self, pcm: bytes) -> bool:
        return float(np.abs(np.frombuffer(pcm, dtype=np.int16).astype(np.int32)).mean()) > self.threshold


# --- From frame votes to speech start and stop --------------------------------------------


Transition = Literal["start", "stop"]


@dataclass
class SpeechGate:
    """Turns per-frame speech votes into start and stop events (pure bookkeeping).

    `onset_frames` voiced frames in a row start speech, `hangover_frames` unvoiced frames in a
    row stop it. Events alternate, beginning with "start".
    """

    onset_frames: int = 3
    hangover_frames: int = 15
    in_speech: bool = False
    _run: int = 0  # frames in a row that disagree with `in_speech`

    def step(self, voiced: bool) -> Transition | None:
        if voiced != self.in_speech:
            self._run += 1
        else:
            self._run = 0
        needed = self.hangover_frames if self.in_speech else self.onset_frames
        if self._run < needed:
            return None
        self.in_speech, self._run = not self.in_speech, 0
        return "start" if self.in_speech else "stop"


@dataclass(frozen=True)
class SpeechEvent:
    """`frame`: index of the first voiced frame (start) or of the first frame after speech (stop)."""

    kind: Transition
    frame: int


class VoiceActivity:
    """Speech start/stop events for a stream of mu-law bytes fed in chunks of any size.

    Frames are cut at fixed 160-byte boundaries from the start of the stream, so the events do
    not depend on how the audio was chunked on the way.
    """

    def __init__(self, classifier: FrameClassifier, gate: SpeechGate) -> None:
        self._classifier = classifier
        self._gate = gate
        self._carry = b""  # the start of an incomplete frame
        self._frames = 0  # frames classified so far

    @property
    def in_speech(self) -> bool:
        return self._gate.in_speech

    def feed(self, mulaw: bytes) -> list[SpeechEvent]:
        data = self._carry + mulaw if self._carry else mulaw
        whole = len(data) - len(data) % FRAME_BYTES
        self._carry = data[whole:]
        if not whole:
            return []
        pcm = codec.ulaw_to_pcm16(data[:whole]).tobytes()  # one table lookup for the chunk
        events = []
        step = FRAME_BYTES * 2
        for offset in range(0, len(pcm), step):  # one C call per 20 ms frame
            kind = self._gate.step(self._classifier.is_speech(pcm[offset : offset + step]))
            self._frames += 1
            if kind == "start":
                events.append(SpeechEvent(kind, self._frames - self._gate.onset_frames))
            elif kind == "stop":
                events.append(SpeechEvent(kind, self._frames - self._gate.hangover_frames))
        return events


# --- The deterministic "recogniser" --------------------------------------------------------


class ChecksumEngine:
    """An `engine.Engine` that cuts utterances by energy and names them by checksum.

    Each utterance (from its first voiced frame to its last) becomes one final, `speech_final`
    segment whose transcript is `local_stt.deterministic_transcript` of exactly those bytes,
    so a test can tell from the text alone which audio the agent heard.
    """

    def __init__(
        self, channel: int, emit: Emit, *, interim_results: bool = False,
        threshold: float = 500.0, hangover_frames: int = 15, max_utterance_seconds: float = 15.0,
    ) -> None:
        self._channel = channel
        self._emit = emit
        self._gate = SpeechGate(hangover_frames=hangover_frames)
        self._vad = VoiceActivity(EnergyClassifier(threshold), self._gate)
        self._audio = bytearray()  # the channel from byte `_base` on
        self._base = 0
        self._start: int | None = None  # byte offset of the utterance in progress
        self._max_bytes = round(max_utterance_seconds * BYTES_PER_SECOND)

    def feed(self, mulaw: bytes) -> None:
        self._audio += mulaw
        for event in self._vad.feed(mulaw):
            at = event.frame * FRAME_BYTES
            if event.kind == "start":
                self._start = at
            else:
                self._cut_long(at)
                self._finish(at, speech_final=True, from_finalize=False)
        self._cut_long(self._base + len(self._audio))
        self._trim()

    def _cut_long(self, until: int) -> None:
        """Speech longer than the limit goes out in pieces (not `speech_final`), as a recogniser's would."""
        while self._start is not None and until - self._start > self._max_bytes:
            cut = self._start + self._max_bytes
            self._finish(cut, speech_final=False, from_finalize=False)
            self._start = cut

    def _finish(self, end: int, *, speech_final: bool, from_finalize: bool) -> None:
        assert self._start is not None
        start, self._start = self._start, None
        chunk = bytes(self._audio[start - self._base : end - self._base])
        self._emit(Segment(
            start=start / BYTES_PER_SECOND,
            duration=len(chunk) / BYTES_PER_SECOND,
            transcript=deterministic_transcript(self._channel, start, chunk),
            is_final=True,
            speech_final=speech_final,
            from_finalize=from_finalize,
        ))

    def _trim(self) -> None:
        """Keep only what a future utterance can still include: a start lies at most one onset back."""
        keep_from = self._start if self._start is not None else (
            self._base + len(self._audio) - (self._gate.onset_frames + 1) * FRAME_BYTES
        )
        drop = keep_from - self._base
        if drop > 0:
            del self._audio[:drop]
            self._base += drop

    async def finalize(self) -> None:
        if self._start is not None:
            self._finish(self._base + len(self._audio), speech_final=True, from_finalize=True)

    async def aclose(self) -> None:
        self._audio.clear()
        self._start = None


# --- A connection's ears -------------------------------------------------------------------


@dataclass(frozen=True)
class Utterance:
    """What the caller said in one turn, and when.

    `ended_at` is the monotonic time at which the last audio of the utterance arrived, so
    `recognised_at - ended_at` is the recogniser's share of the reply's latency.
    """

    text: str
    ended_at: float
    recognised_at: float


@dataclass
class Arrivals:
    """When each stretch of the stream arrived: (end byte offset, monotonic time) per chunk."""

    limit: int = 3000  # ~60 s of 20 ms frames
    ends: collections.deque[int] = field(default_factory=collections.deque)
    times: collections.deque[float] = field(default_factory=collections.deque)
    total: int = 0
    forgotten: int = 0  # bytes before this offset are no longer kept

    def add(self, nbytes: int, when: float) -> None:
        self.total += nbytes
        self.ends.append(self.total)
        self.times.append(when)
        if len(self.ends) > self.limit:
            self.forgotten = self.ends.popleft()
            self.times.popleft()

    def time_of(self, end: int) -> float | None:
        """When the byte just before offset `end` arrived; None if not received or forgotten."""
        i = bisect.bisect_left(self.ends, end)
        if i >= len(self.ends) or end <= self.forgotten:
            return None
        return self.times[i]


class Listener:
    """Feeds one caller's audio to a voice-activity detector and to a recogniser engine.

    `on_speech_started()` is called as soon as the detector hears speech; `on_utterance(u)`
    when the engine has finished an utterance with words in it. Both on the event loop.
    """

    def __init__(
        self,
        engine_factory: EngineFactory,
        classifier: FrameClassifier,
        gate: SpeechGate,
        on_speech_started: Callable[[], None],
        on_utterance: Callable[[Utterance], None],
    ) -> None:
        self._vad = VoiceActivity(classifier, gate)
        self._on_speech_started = on_speech_started
        self._on_utterance = on_utterance
        self._arrivals = Arrivals()
        self._words: list[str] = []  # final transcripts of the utterance in progress
        self._engine: Engine = engine_factory(0, self._on_segment, interim_results=False)

    @property
    def in_speech(self) -> bool:
        return self._vad.in_speech

    def feed(self, mulaw: bytes) -> None:
        self._arrivals.add(len(mulaw), time.monotonic())
        for event in self._vad.feed(mulaw):
            if event.kind == "start":
                self._on_speech_started()
        self._engine.feed(mulaw)

    def _on_segment(self, segment: Segment) -> None:
        if not segment.is_final:
            return
        if segment.transcript.strip():
            self._words.append(segment.transcript.strip())
        if not segment.speech_final or not self._words:
            return
        text, self._words = " ".join(self._words), []
        end = round((segment.start + segment.duration) * BYTES_PER_SECOND)
        now = time.monotonic()
        self._on_utterance(Utterance(text, self._arrivals.time_of(end) or now, now))

    async def finalize(self) -> None:
        """End the utterance in progress now (`ForceEndTurn`)."""
        await self._engine.finalize()

    async def aclose(self) -> None:
        await self._engine.aclose()
