"""Agent audio on its way to the caller: fixed 20 ms frames, and the playback ledger.

Pure code: no sockets and no clock. Every method that depends on time takes `now` (seconds, any
monotonic origin), so the arithmetic is tested with hypothesis rather than with sleeps.

Why a ledger. On a `<Connect><Stream>` Twilio queues the `media` we send and plays it in order
(protocols.md A.3), and providers produce audio faster than real time, so what we have *sent* is
well ahead of what the caller has *heard*. After each chunk we send a named `mark`; Twilio
echoes it once everything before it has played. A `clear` drops Twilio's queue and echoes every
pending mark at once: those echoes mean "discarded", not "played" (A.7). The ledger keeps, per
call, a single byte stream of what was sent, where each mark sits in it, and which provider
*segment* (a reply, or a provider's audio item) each byte belongs to, so that it can answer:

- how much of segment X the caller has heard at time t: the position of the last echoed mark,
  plus the time since that echo (or since playback started from an idle queue) at real-time
  speed, never beyond what was sent, and never more than the provider generated for X (the end
  of a reply is padded to a whole frame). OpenAI's `conversation.item.truncate` needs exactly
  this (issue 13); subscribers get it as the words the caller heard of a cut reply;
- what a `clear` discarded, and which later mark echoes are stale;
- whether anything is still playing (the goodbye before `end_call` hangs up).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

FRAME_BYTES = 160  # 20 ms of 8 kHz mu-law: what Twilio itself sends, and plays smoothly
BYTES_PER_SECOND = 8000
SILENCE = 0xFF  # mu-law silence (0x00 is a loud click)
MAX_STALE_NAMES = 10_000  # cleared marks remembered until Twilio echoes them


class Framer:
    """Re-frames provider audio of any chunk size into whole 160-byte frames.

    `push()` returns the whole frames now available (possibly b"") and keeps the remainder for
    the next chunk; at the end of a reply `flush()` returns the remainder padded with silence to
    one frame, so nothing the provider generated is lost and every message Twilio gets is a
    multiple of 20 ms.
    """

    def __init__(self) -> None:
        self._rest = b""

    @property
    def pending(self) -> int:
        """Bytes held back, waiting to complete a frame."""
        return len(self._rest)

    def push(self, audio: bytes) -> bytes:
        if not self._rest and len(audio) % FRAME_BYTES == 0:
            return bytes(audio)  # the common case: nothing to join or cut
        data = self._rest + audio
        cut = len(data) - len(data) % FRAME_BYTES
        self._rest = data[cut:]
        return data[:cut]

    def flush(self) -> bytes:
        """The remainder padded with silence to a whole frame (b"" if there is none)."""
        rest, self._rest = self._rest, b""
        if not rest:
            return b""
        return rest + bytes([SILENCE]) * (FRAME_BYTES - len(rest))

    def discard(self) -> int:
        """Drop the remainder (barge-in); returns how many bytes were dropped."""
        dropped, self._rest = len(self._rest), b""
        return dropped


@dataclass
class Segment:
    """One provider segment's bookkeeping, in bytes of 8 kHz mu-law."""

    id: str
    generated: int = 0  # produced by the provider (padding excluded)
    sent: int = 0  # written to Twilio (padding included)
    heard: int = 0  # played: confirmed by an echoed mark, or estimated heard when a clear cut it
    discarded: int = 0  # sent, then dropped from Twilio's queue by a clear
    done: bool = False  # the provider said this segment's audio is complete
    interrupted: bool = False  # a clear cut it before it had all played

    @property
    def heard_capped(self) -> int:
        """`heard` never counts the padding at the end of a reply."""
        return min(self.heard, self.generated)


@dataclass(frozen=True)
class Mark:
    name: str
    segment: str
    position: int  # stream position (bytes sent before the mark)


@dataclass(frozen=True)
class Cut:
    """What a `clear` did: the segment being heard, how much of it, and what was discarded."""

    segment: str | None  # the segment at the playback position (None: nothing was playing)
    heard: int  # bytes of that segment heard (capped at what it generated)
    generated: int  # bytes the provider generated for it so far
    discarded: int  # bytes sent but not played, all segments
    marks: int  # pending marks that became stale


@dataclass
class LedgerStats:
    sent: int = 0
    heard: int = 0
    discarded: int = 0
    marks_sent: int = 0
    marks_played: int = 0
    stale_echoes: int = 0  # echoes of marks discarded by a clear
    unknown_echoes: int = 0  # echoes of names never sent (or echoed twice)
    clears: int = 0


@dataclass
class _Piece:
    """A run of bytes of one segment in the sent stream, not yet known to be played."""

    segment: Segment
    start: int
    length: int


class PlaybackLedger:
    """One call's record of agent audio: sent, played, discarded (see the module docstring).

    Positions are byte offsets in the stream of everything sent to Twilio on this call. After a
    `clear` the stream goes on from where it was: the discarded bytes stay counted in `sent`.
    """

    def __init__(self) -> None:
        self.stats = LedgerStats()
        self.segments: dict[str, Segment] = {}
        self._sent = 0  # stream position of the next byte sent
        self._confirmed = 0  # everything before this position has been played (or cleared)
        self._anchor: tuple[int, float] | None = None  # (position, time) playback ran from; None: idle
        self._pieces: deque[_Piece] = deque()  # sent, beyond `_confirmed`
        self._marks: deque[Mark] = deque()  # sent, not yet echoed, in order
        self._stale: dict[str, None] = {}  # names of marks a clear discarded (ordered, bounded)
        self._mark_count = 0

    # --- what the provider produced and what went out ------------------------------------

    def segment(self, segment_id: str) -> Segment:
        seg = self.segments.get(segment_id)
        if seg is None:
            seg = self.segments[segment_id] = Segment(segment_id)
        return seg

    def generated(self, segment_id: str, nbytes: int) -> None:
        self.segment(segment_id).generated += nbytes

    def done(self, segment_id: str) -> None:
        self.segment(segment_id).done = True

    def sent(self, segment_id: str, nbytes: int, now: float) -> None:
        """`nbytes` of the segment were written to Twilio at `now`."""
        if nbytes <= 0:
            return
        if self._anchor is None or self.position(now) >= self._sent:
            self._anchor = (self._sent, now)  # Twilio's queue had run dry: this plays from now
        seg = self.segment(segment_id)
        last = self._pieces[-1] if self._pieces else None
        if last is not None and last.segment is seg and last.start + last.length == self._sent:
            last.length += nbytes
        else:
            self._pieces.append(_Piece(seg, self._sent, nbytes))
        self._sent += nbytes
        seg.sent += nbytes
        self.stats.sent += nbytes

    def next_mark_name(self, segment_id: str) -> str:
        self._mark_count += 1
        return f"{segment_id}/{self._mark_count}"

    def marked(self, name: str, segment_id: str) -> Mark:
        """A mark was written to Twilio right after everything sent so far."""
        mark = Mark(name, segment_id, self._sent)
        self._marks.append(mark)
        self.stats.marks_sent += 1
        return mark

    # --- what Twilio tells us ------------------------------------------------------------

    def echoed(self, name: str, now: float) -> Mark | None:
        """Twilio echoed a mark: played up to it. None for a stale or unknown name."""
        if name in self._stale:
            del self._stale[name]
            self.stats.stale_echoes += 1
            return None
        if not any(m.name == name for m in self._marks):
            self.stats.unknown_echoes += 1
            return None
        while True:  # Twilio plays in order: an echo implies every earlier mark played
            mark = self._marks.popleft()
            self.stats.marks_played += 1
            if mark.name == name:
                break
        self._confirm(mark.position)
        self._anchor = (mark.position, now) if mark.position < self._sent else None
        return mark

    def clear(self, now: float) -> Cut:
        """We sent `clear`: everything not yet played is discarded, pending marks go stale."""
        position = self.position(now)
        current = self._segment_at(position)
        discarded = self._sent - position
        while self._pieces and self._pieces[-1].start + self._pieces[-1].length > position:
            piece = self._pieces[-1]
            cut = min(piece.length, piece.start + piece.length - position)
            piece.length -= cut
            piece.segment.discarded += cut
            piece.segment.interrupted = True
            if piece.length == 0:
                self._pieces.pop()
        self._confirm(position)
        self._confirmed = self._sent  # nothing is queued at Twilio any more
        self._anchor = None
        for mark in self._marks:
            self._stale[mark.name] = None
        while len(self._stale) > MAX_STALE_NAMES:
            del self._stale[next(iter(self._stale))]
        marks = len(self._marks)
        self._marks.clear()
        self.stats.discarded += discarded
        self.stats.clears += 1
        if current is None:
            return Cut(None, 0, 0, discarded, marks)
        return Cut(current.id, current.heard_capped, current.generated, discarded, marks)

    # --- questions -----------------------------------------------------------------------

    def position(self, now: float) -> int:
        """Estimated playback position: the last echo plus real time since, within what was sent."""
        if self._anchor is None:
            return self._confirmed
        start, since = self._anchor
        estimate = start + int(max(0.0, now - since) * BYTES_PER_SECOND + 1e-6)  # floor, float-safe
        return max(self._confirmed, min(self._sent, estimate))

    def heard(self, segment_id: str, now: float) -> int:
        """Bytes of the segment the caller has heard by `now` (never more than it generated)."""
        seg = self.segments.get(segment_id)
        if seg is None:
            return 0
        position = self.position(now)
        extra = sum(max(0, min(p.length, position - p.start)) for p in self._pieces if p.segment is seg)
        return min(seg.heard + extra, seg.generated)

    def playing(self, now: float) -> bool:
        """Whether Twilio may still be playing something we sent (marks pending, or by the clock)."""
        return bool(self._marks) or self.position(now) < self._sent

    def finished(self, segment_id: str) -> bool:
        """The provider is done with the segment and all of it was played or discarded."""
        seg = self.segments.get(segment_id)
        if seg is None or not seg.done:
            return False
        return not any(p.segment is seg for p in self._pieces) and not any(
            m.segment == segment_id for m in self._marks)

    @property
    def pending_marks(self) -> int:
        return len(self._marks)

    @property
    def unplayed(self) -> int:
        """Bytes sent but not confirmed played (Twilio's queue, as far as marks tell)."""
        return self._sent - self._confirmed

    def _segment_at(self, position: int) -> Segment | None:
        """The segment of the byte playing at `position` (the last one sent, if all has played)."""
        for piece in self._pieces:  # in stream order, contiguous from `_confirmed` on
            if position < piece.start + piece.length:
                return piece.segment
        return self._pieces[-1].segment if self._pieces else None

    def _confirm(self, position: int) -> None:
        """Everything before `position` has played: fold those pieces into their segments."""
        self._confirmed = max(self._confirmed, position)
        while self._pieces and self._pieces[0].start < position:
            piece = self._pieces[0]
            played = min(piece.length, position - piece.start)
            piece.segment.heard += played
            self.stats.heard += played
            if played == piece.length:
                self._pieces.popleft()
            else:
                piece.start += played
                piece.length -= played
                break


def heard_words(text: str, heard: int, generated: int) -> str:
    """The words of `text` the caller heard, estimated from the heard share of its audio.

    Speech is spread roughly evenly over a reply's audio, so the first share of the words is
    what was heard. Rounded down: a word is only claimed when its share of the audio played.
    """
    words = text.split()
    if generated <= 0:
        return ""
    if heard >= generated:
        return " ".join(words)
    return " ".join(words[: len(words) * heard // generated])
