"""The stereo mixer: two Twilio legs in, interleaved 2-channel mu-law frames out.

Pure and socket-free. Deepgram transcribes each channel of a multichannel stream separately, so
the two legs must stay aligned in time: byte `i` of each channel is the same instant of the call.

How it works
- Both legs are anchored to *stream time*: a chunk with `timestamp` t (ms since the stream
  began) belongs at byte `8 * t` of its channel. Everything emitted so far ends at `position`.
- Each leg keeps the bytes it holds beyond `position` in a buffer. When both buffers hold at
  least a frame (`frame_ms`, 100 ms by default), frames are interleaved and emitted
  (inbound = channel 0, outbound = channel 1).
- A gap in a leg's timestamps (lost packets) is padded with mu-law silence (0xFF).
- A leg that has not started, or has gone quiet, is padded with silence once the other leg runs
  more than `max_lag_ms` ahead, so one-legged streams and late-starting legs never stall the call.
  A leg absent from the stream's `tracks` is padded at once (lag 0).
- The tail: `flush()` pads the shorter leg to the longer one and emits the rest, short frame
  included.

Policy for chunks that do not simply extend their leg (each counted in `MixerStats`):
- *reordered*: it lands, wholly or partly, where the leg was padded and not yet emitted; the real
  audio replaces the padding.
- *duplicate*: it lands entirely on audio the leg already has; the first copy wins.
- *late*: it lands before `position` (already sent to Deepgram); the part before `position` is
  dropped, any part after it is kept.
- *jump*: a timestamp more than `max_gap_ms` beyond everything seen so far (a corrupt or
  re-based clock) would make us buffer and send that much silence; instead the whole mixer's
  clock is shifted so the chunk lands `max_gap_ms` after the current end. Both legs share the
  shift, so a hold that pauses both legs keeps them aligned.

Invariant (tested with hypothesis): each channel of the output equals its leg's accepted audio
placed at its timestamps, with 0xFF exactly where nothing arrived; nothing accepted is lost.
"""

from __future__ import annotations

from dataclasses import dataclass

SILENCE = 0xFF
BYTES_PER_MS = 8  # 8 kHz, one mu-law byte per sample
TRACKS = ("inbound", "outbound")  # channel 0, channel 1


@dataclass
class MixerStats:
    chunks: int = 0
    bytes_in: int = 0
    frames_out: int = 0
    bytes_out: int = 0  # interleaved bytes, both channels
    gaps: int = 0  # gaps in a leg's timestamps, padded
    gap_bytes: int = 0
    lag_pad_bytes: int = 0  # silence for a leg that was behind, quiet or absent
    reordered: int = 0
    duplicates: int = 0
    late: int = 0  # chunks that arrived (partly) after their place was sent
    late_bytes: int = 0
    jumps: int = 0

    def anomalies(self) -> dict[str, int]:
        return {
            "gaps": self.gaps,
            "reordered": self.reordered,
            "duplicates": self.duplicates,
            "late": self.late,
            "jumps": self.jumps,
        }


class _Leg:
    """One track's pending audio: bytes from the mixer's `position` up to `end`."""

    __slots__ = ("buf", "end", "holes", "max_lag", "started")

    def __init__(self, max_lag: int):
        self.buf = bytearray()
        self.end = 0  # absolute byte position just past what this leg holds
        self.holes: list[list[int]] = []  # [start, end) stretches padded with silence, not yet sent
        self.max_lag = max_lag
        self.started = False  # silence before a leg's first chunk is "not started yet", not a gap

    def pad_to(self, target: int, *, hole: bool = True) -> int:
        count = target - self.end
        if count <= 0:
            return 0
        if hole:
            if self.holes and self.holes[-1][1] == self.end:
                self.holes[-1][1] = target
            else:
                self.holes.append([self.end, target])
        self.buf += b"\xff" * count
        self.end = target
        return count


class StereoMixer:
    def __init__(
        self,
        *,
        frame_ms: int = 100,
        max_lag_ms: int = 200,
        max_gap_ms: int = 10_000,
        tracks: tuple[str, ...] = TRACKS,
    ):
        if frame_ms <= 0 or max_lag_ms < 0 or max_gap_ms < 0:
            raise ValueError("frame_ms must be positive, max_lag_ms and max_gap_ms non-negative")
        self.frame_bytes = frame_ms * BYTES_PER_MS
        self.max_gap = max_gap_ms * BYTES_PER_MS
        lag = max_lag_ms * BYTES_PER_MS
        self._legs = {t: _Leg(lag if t in tracks else 0) for t in TRACKS}
        self._inbound, self._outbound = self._legs["inbound"], self._legs["outbound"]
        self.position = 0  # bytes per channel already emitted
        self.shift = 0  # bytes subtracted from every timestamp after a jump
        self.stats = MixerStats()

    @property
    def frontier_ms(self) -> int:
        """The latest stream time (ms) this mixer holds audio for, in the timestamps' own clock."""
        return (self._lead() + self.shift) // BYTES_PER_MS

    def _lead(self) -> int:
        """The furthest byte position either leg holds (push() runs per 20 ms chunk: no generators)."""
        return max(self._inbound.end, self._outbound.end)

    def push(self, track: str, timestamp_ms: int, payload: bytes) -> list[bytes]:
        """Add one chunk; return the stereo frames that became complete (often none)."""
        leg = self._legs[track]
        stats = self.stats
        stats.chunks += 1
        stats.bytes_in += len(payload)
        if not payload:
            return []

        start = timestamp_ms * BYTES_PER_MS - self.shift
        frontier = self._lead()
        if start > frontier + self.max_gap:
            self.shift += start - (frontier + self.max_gap)
            start = frontier + self.max_gap
            stats.jumps += 1

        if start < self.position:
            stats.late += 1
            skipped = min(self.position - start, len(payload))
            stats.late_bytes += skipped
            payload = payload[skipped:]
            start = self.position
            if not payload:
                return []

        end = start + len(payload)
        first_chunk, leg.started = not leg.started, True
        if start >= leg.end:
            if start > leg.end and not first_chunk:
                stats.gaps += 1
                stats.gap_bytes += leg.pad_to(start)
            elif start > leg.end:
                stats.lag_pad_bytes += leg.pad_to(start)
            leg.buf += payload
            leg.end = end
        else:
            self._overlay(leg, start, payload)

        self._pad_lagging()
        return self._emit()

    def flush(self) -> list[bytes]:
        """End of call: pad every leg to the longest and emit everything, short frame included."""
        lead = self._lead()
        for leg in (self._inbound, self._outbound):
            self.stats.lag_pad_bytes += leg.pad_to(lead, hole=False)
        return self._emit(final=True)

    def _overlay(self, leg: _Leg, start: int, payload: bytes) -> None:
        """A chunk that overlaps what the leg already holds: fill padded holes, keep the rest."""
        end = start + len(payload)
        filled = 0
        kept: list[list[int]] = []
        for hole_start, hole_end in leg.holes:
            lo, hi = max(hole_start, start), min(hole_end, end)
            if lo >= hi:
                kept.append([hole_start, hole_end])
                continue
            leg.buf[lo - self.position : hi - self.position] = payload[lo - start : hi - start]
            filled += hi - lo
            if hole_start < lo:
                kept.append([hole_start, lo])
            if hi < hole_end:
                kept.append([hi, hole_end])
        leg.holes = kept
        extended = end > leg.end
        if extended:
            leg.buf += payload[leg.end - start :]
            leg.end = end
        if filled or extended:
            self.stats.reordered += 1
        else:
            self.stats.duplicates += 1

    def _pad_lagging(self) -> None:
        lead = self._lead()
        for leg in (self._inbound, self._outbound):
            if lead - leg.end > leg.max_lag:
                self.stats.lag_pad_bytes += leg.pad_to(lead - leg.max_lag)

    def _emit(self, final: bool = False) -> list[bytes]:
        inbound, outbound = self._inbound, self._outbound
        ready = min(inbound.end, outbound.end) - self.position
        if not final:
            ready -= ready % self.frame_bytes
        if ready <= 0:
            return []
        stereo = bytearray(2 * ready)
        stereo[0::2] = inbound.buf[:ready]
        stereo[1::2] = outbound.buf[:ready]
        del inbound.buf[:ready]
        del outbound.buf[:ready]
        self.position += ready
        for leg in (inbound, outbound):
            if leg.holes:
                leg.holes = [[max(s, self.position), e] for s, e in leg.holes if e > self.position]
        step = 2 * self.frame_bytes
        frames = [bytes(stereo[i : i + step]) for i in range(0, len(stereo), step)]
        self.stats.frames_out += len(frames)
        self.stats.bytes_out += len(stereo)
        return frames
