"""The framer and the playback ledger, checked with hypothesis against a model of Twilio's player.

The model is the truth the ledger estimates: Twilio plays what we send in order at real time,
starting at once when its queue was empty; a mark is echoed when the player reaches it; a clear
empties the queue and echoes the pending marks at once. With echoes arriving without delay the
ledger must know the playback position exactly; with delayed echoes it may only be behind the
truth, never ahead (a caller is never said to have heard what was cut).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.playback import FRAME_BYTES, SILENCE, Framer, PlaybackLedger, heard_words

# --- the framer ------------------------------------------------------------------------------


@given(st.lists(st.binary(max_size=700), max_size=30), st.booleans())
def test_framer_sends_whole_frames_and_loses_nothing(chunks, end_reply):
    framer = Framer()
    out = []
    for chunk in chunks:
        framed = framer.push(chunk)
        assert len(framed) % FRAME_BYTES == 0
        out.append(framed)
    audio = b"".join(chunks)
    if end_reply:
        tail = framer.flush()
        assert len(tail) in (0, FRAME_BYTES)
        sent = b"".join(out) + tail
        padding = len(sent) - len(audio)
        assert 0 <= padding < FRAME_BYTES
        assert sent == audio + bytes([SILENCE]) * padding  # in order, padded only at the end
        assert framer.pending == 0
    else:
        assert b"".join(out) + audio[len(b"".join(out)):] == audio
        assert framer.pending == len(audio) % FRAME_BYTES
        assert framer.discard() == len(audio) % FRAME_BYTES
        assert framer.flush() == b""


def test_framer_passes_whole_frames_through_and_holds_a_partial_one():
    framer = Framer()
    assert framer.push(b"\x01" * 320) == b"\x01" * 320
    assert framer.push(b"\x02" * 100) == b""
    assert framer.push(b"\x03" * 100) == b"\x02" * 100 + b"\x03" * 60
    assert framer.flush() == b"\x03" * 40 + b"\xff" * 120


# --- a model of Twilio's player --------------------------------------------------------------


@dataclass
class Player:
    """Twilio's side: plays at 8 bytes per ms from an in-order queue."""

    runs: list[list[float]] = field(default_factory=list)  # [start time, bytes, stream start]
    marks: list[tuple[str, int]] = field(default_factory=list)  # pending (name, stream position)
    sent: int = 0
    cleared_at: float = float("-inf")

    def end_time(self) -> float:
        if not self.runs:
            return self.cleared_at
        start, n, _ = self.runs[-1]
        return start + n / 8000

    def send(self, n: int, now: float) -> None:
        self.runs.append([max(now, self.end_time()), n, self.sent])
        self.sent += n

    def position(self, now: float) -> float:
        pos = 0.0
        for start, n, stream in self.runs:
            pos = stream + min(n, max(0.0, (now - start) * 8000))
            if now < start + n / 8000:
                break
        return pos if self.runs else self.sent

    def mark_time(self, position: int) -> float:
        """When the player reaches `position` (a mark after a send is reached when it ends)."""
        for start, n, stream in self.runs:
            if stream + n >= position:
                return start + (position - stream) / 8000
        return self.cleared_at

    def clear(self, now: float) -> float:
        pos = self.position(now)
        self.runs = []
        self.cleared_at = now
        self.sent_at_clear = self.sent
        return pos


steps = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.integers(0, 2), st.integers(1, 4000)),  # segment, bytes
        st.tuples(st.just("wait"), st.integers(0, 1500)),  # ms
        st.tuples(st.just("clear")),
        st.tuples(st.just("done"), st.integers(0, 2)),
    ),
    max_size=40,
)


def play(script, delay_ms: int):
    """Run a script against the ledger and the player; yield (ledger, player, now) after each step."""
    ledger, player = PlaybackLedger(), Player()
    now = 0.0
    echoes: list[tuple[float, str]] = []  # (arrival time, name), sorted
    for step in script:
        if step[0] == "send":
            seg = f"seg{step[1]}"
            ledger.generated(seg, step[2])
            ledger.sent(seg, step[2], now)
            player.send(step[2], now)
            name = ledger.next_mark_name(seg)
            mark = ledger.marked(name, seg)
            assert mark.position == player.sent
            echoes.append((player.mark_time(player.sent) + delay_ms / 1000, name))
            echoes.sort()
        elif step[0] == "wait":
            until = now + step[1] / 1000
            while echoes and echoes[0][0] <= until:
                at, name = echoes.pop(0)
                now = max(now, at)
                ledger.echoed(name, now)
                yield ledger, player, now
            now = until
        elif step[0] == "clear":
            truth = player.clear(now)
            cut = ledger.clear(now)
            # Every pending mark is echoed at once; those echoes are stale.
            echoes = [(now + delay_ms / 1000, name) for _, name in echoes]
            yield ledger, player, now, (cut, truth)
            continue
        else:
            ledger.done(f"seg{step[1]}")
        yield ledger, player, now


@settings(max_examples=300, deadline=None)
@given(steps)
def test_with_prompt_echoes_the_ledger_knows_the_playback_position(script):
    for state in play(script, delay_ms=0):
        ledger, player, now = state[:3]
        assert abs(ledger.position(now) - player.position(now)) <= 1
        if len(state) == 4:
            cut, truth = state[3]
            assert abs((ledger.stats.sent - cut.discarded) - truth) <= 1


@settings(max_examples=300, deadline=None)
@given(steps, st.integers(1, 400))
def test_with_late_echoes_the_ledger_is_never_ahead_of_the_caller(script, delay_ms):
    for state in play(script, delay_ms=delay_ms):
        ledger, player, now = state[:3]
        assert ledger.position(now) <= player.position(now) + 1
        for seg in ledger.segments.values():
            heard = ledger.heard(seg.id, now)
            assert 0 <= heard <= min(seg.generated, seg.sent)


@settings(max_examples=300, deadline=None)
@given(steps, st.integers(0, 400))
def test_every_byte_sent_is_heard_discarded_or_still_queued(script, delay_ms):
    for state in play(script, delay_ms=delay_ms):
        ledger = state[0]
        stats = ledger.stats
        assert stats.heard + stats.discarded + ledger.unplayed == stats.sent
        for seg in ledger.segments.values():
            queued = seg.sent - seg.heard - seg.discarded
            assert queued >= 0
        assert sum(s.sent for s in ledger.segments.values()) == stats.sent
        assert stats.marks_played + ledger.pending_marks <= stats.marks_sent


# --- examples a reader can follow ------------------------------------------------------------


def test_heard_share_counts_marks_then_real_time_and_a_clear_discards_the_rest():
    ledger = PlaybackLedger()
    ledger.generated("r1", 8000)  # one second of reply, sent at once at t = 10
    for part in range(5):
        ledger.sent("r1", 1600, 10.0)
        ledger.marked(ledger.next_mark_name("r1"), "r1")
    assert ledger.heard("r1", 10.0) == 0
    assert ledger.heard("r1", 10.25) == 2000  # 250 ms at real time, no echo yet
    assert ledger.echoed("r1/1", 10.3) is not None  # 200 ms played, confirmed 300 ms in
    assert ledger.heard("r1", 10.3) == 1600  # the echo corrects the estimate (playback started late)
    assert ledger.heard("r1", 10.4) == 2400
    cut = ledger.clear(10.4)
    assert (cut.segment, cut.heard, cut.generated, cut.discarded, cut.marks) == ("r1", 2400, 8000, 5600, 4)
    seg = ledger.segments["r1"]
    assert (seg.heard, seg.discarded, seg.interrupted) == (2400, 5600, True)
    # Twilio echoes the four pending marks right after the clear: not played.
    for n in (2, 3, 4, 5):
        assert ledger.echoed(f"r1/{n}", 10.41) is None
    assert ledger.stats.stale_echoes == 4 and ledger.stats.marks_played == 1
    assert ledger.heard("r1", 20.0) == 2400
    assert not ledger.playing(10.41)


def test_padding_at_the_end_of_a_reply_is_never_counted_as_heard():
    ledger = PlaybackLedger()
    ledger.generated("r1", 100)
    ledger.sent("r1", 160, 0.0)  # 100 bytes + 60 of padding
    ledger.done("r1")
    ledger.marked(ledger.next_mark_name("r1"), "r1")
    assert ledger.heard("r1", 0.019) == 100
    assert not ledger.finished("r1")
    ledger.echoed("r1/1", 0.02)
    assert ledger.finished("r1") and ledger.heard("r1", 1.0) == 100
    assert ledger.segments["r1"].heard_capped == 100


def test_a_reply_sent_after_the_queue_ran_dry_plays_from_when_it_was_sent():
    ledger = PlaybackLedger()
    ledger.generated("r1", 800)
    ledger.sent("r1", 800, 0.0)
    ledger.marked("a", "r1")
    ledger.echoed("a", 0.1)
    ledger.generated("r2", 800)
    ledger.sent("r2", 800, 5.0)  # nothing was playing between 0.1 and 5.0
    assert ledger.heard("r2", 5.05) == 400
    assert ledger.heard("r1", 5.05) == 800


def test_unknown_and_repeated_echoes_are_counted_not_played():
    ledger = PlaybackLedger()
    ledger.generated("r1", 160)
    ledger.sent("r1", 160, 0.0)
    ledger.marked("m", "r1")
    assert ledger.echoed("nope", 0.0) is None
    assert ledger.echoed("m", 0.02) is not None
    assert ledger.echoed("m", 0.03) is None
    assert ledger.stats.unknown_echoes == 2 and ledger.stats.marks_played == 1


def test_heard_words_are_the_heard_share_rounded_down():
    text = "one two three four five six seven eight nine ten"
    assert heard_words(text, 0, 8000) == ""
    assert heard_words(text, 3999, 8000) == "one two three four"
    assert heard_words(text, 4000, 8000) == "one two three four five"
    assert heard_words(text, 8000, 8000) == text
    assert heard_words(text, 0, 0) == ""
