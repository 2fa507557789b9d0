"""Where utterances begin and end, from a voice-activity detector's speech probabilities.

Pure bookkeeping, no audio and no I/O: the engine feeds one probability per VAD window (32 ms)
in order, and gets back a `Cut` whenever an utterance is complete. Positions are sample indices
in the channel (8 kHz), so a cut slices the channel's audio exactly.

The rules follow Silero VAD's own `get_speech_timestamps`: speech starts at a window at or above
`threshold` and goes on until the probability stays below `neg_threshold` for `min_silence`
seconds; `pad` seconds of audio are kept on each side so word edges are not clipped. Speech
longer than `max_utterance` is cut where it is quietest in its last `cut_search` seconds, which
is almost always a gap between words, so no word is split across two finals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True)
class SegmenterSettings:
    threshold: float = 0.5  # a window at or above this starts speech
    neg_threshold: float = 0.35  # speech goes on while windows stay at or above this
    min_silence: float = 0.5  # seconds below neg_threshold that end an utterance
    pad: float = 0.2  # seconds of audio kept before and after the speech
    max_utterance: float = 15.0  # longer speech is cut into pieces of at most this
    cut_search: float = 2.0  # ... at the quietest window of its last seconds
    max_onset: float = 1.0  # speech starts at most this long before it reaches `threshold`


class Cut(NamedTuple):
    """One utterance: samples [start, end) of the channel."""

    start: int
    end: int
    speech_final: bool  # False when speech goes on past the cut (`max_utterance`)


class Segmenter:
    """Utterance boundaries for one channel; `push` one probability per window, in order."""

    def __init__(self, settings: SegmenterSettings = SegmenterSettings(), *, window: int = 256, rate: int = 8000):
        self.settings = settings
        self.window = window
        self._pad = round(settings.pad * rate)
        self._min_silence = round(settings.min_silence * rate)
        self._max_utterance = round(settings.max_utterance * rate)
        self._cut_search = max(1, round(settings.cut_search * rate / window))
        self._max_onset = round(settings.max_onset * rate)
        self.position = 0  # samples covered by the windows pushed so far
        self.start: int | None = None  # of the utterance in progress
        self._speech_end = 0  # end of the last window at or above neg_threshold
        self._previous_end = 0  # utterances never overlap
        self._rising: int | None = None  # out of speech: where the current run >= neg_threshold began
        self._probabilities: list[float] = []  # of the utterance in progress, for max-length cuts

    @property
    def in_speech(self) -> bool:
        return self.start is not None

    def push(self, probability: float) -> Cut | None:
        window_start, self.position = self.position, self.position + self.window
        s = self.settings
        if self.start is None:
            if probability < s.neg_threshold:
                self._rising = None
            else:
                onset_limit = self.position - self._max_onset
                self._rising = window_start if self._rising is None else max(self._rising, onset_limit)
            if probability >= s.threshold:
                self.start = max(self._previous_end, self._rising - self._pad)
                self._speech_end = self.position
                self._probabilities = [probability]
            return None
        self._probabilities.append(probability)
        if probability >= s.neg_threshold:
            self._speech_end = self.position
        elif self.position - self._speech_end >= self._min_silence:
            return self._cut(min(self.position, self._speech_end + self._pad), speech_final=True)
        if self.position - self.start >= self._max_utterance:
            return self._cut(self._quietest_boundary(), speech_final=False)
        return None

    @property
    def speech_so_far(self) -> int:
        """Where the utterance in progress would end if the speaker stopped now: an interim
        covers no more than this, so its final always covers at least what it did."""
        return min(self.position, self._speech_end + self._pad)

    @property
    def keep_from(self) -> int:
        """The earliest sample a coming cut can start at: older audio may be let go."""
        if self.start is not None:
            return self.start
        onset = self.position if self._rising is None else self._rising
        return max(self._previous_end, onset - self._pad)

    def flush(self, end: int) -> Cut | None:
        """The stream stops at sample `end` (Finalize, CloseStream): the utterance in progress,
        or speech that was only beginning, ends there."""
        if self.start is None and self._rising is not None:
            self.start = max(self._previous_end, self._rising - self._pad)
        cut = self._cut(end, speech_final=True) if self.start is not None and end > self.start else None
        self.start = self._rising = None
        self.position = max(self.position, end)
        self._previous_end = max(self._previous_end, end)
        return cut

    def _quietest_boundary(self) -> int:
        """The middle of the least speech-like window among the last `cut_search` ones."""
        recent = self._probabilities[-self._cut_search :]
        index = min(range(len(recent)), key=recent.__getitem__)
        return self.position - (len(recent) - index) * self.window + self.window // 2

    def _cut(self, end: int, *, speech_final: bool) -> Cut:
        assert self.start is not None
        cut = Cut(self.start, end, speech_final)
        self._previous_end = end
        self._rising = None
        if speech_final:
            self.start = None
            self._probabilities = []
        else:  # speech goes on from the cut
            self.start = end
            kept = (self.position - end) // self.window
            self._probabilities = self._probabilities[len(self._probabilities) - kept :] if kept else []
        return cut
