"""The mixer's properties, checked with hypothesis on generated calls (no sockets)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from audio import SILENCE, StereoMixer

CHUNK = 160  # 20 ms
NOT_SILENCE = bytes.maketrans(b"\xff", b"\xfe")  # generated audio never looks like padding


def expected_channels(chunks: list[tuple[str, int, bytes]]) -> tuple[bytes, bytes]:
    """What Deepgram should receive: each leg's chunks at 8*timestamp, 0xFF elsewhere."""
    length = max((ts * 8 + len(p) for _, ts, p in chunks), default=0)
    channels = {"inbound": bytearray([SILENCE]) * length, "outbound": bytearray([SILENCE]) * length}
    for track, ts, payload in chunks:
        channels[track][ts * 8 : ts * 8 + len(payload)] = payload
    return bytes(channels["inbound"]), bytes(channels["outbound"])


def run(mixer: StereoMixer, arrivals: list[tuple[str, int, bytes]]) -> tuple[list[bytes], bytes, bytes]:
    frames = []
    for track, ts, payload in arrivals:
        frames += mixer.push(track, ts, payload)
    frames += mixer.flush()
    stereo = b"".join(frames)
    return frames, stereo[0::2], stereo[1::2]


def leg(track: str, count: int, start_ms: int, lost: set[int], seed: int) -> list[tuple[str, int, bytes]]:
    """A leg of `count` 20 ms chunks of distinctive (never 0xFF) bytes, minus the lost ones."""
    rng = random.Random(seed)
    return [
        (track, start_ms + 20 * i, rng.randbytes(CHUNK).translate(NOT_SILENCE))
        for i in range(count)
        if i not in lost
    ]


@st.composite
def calls(draw, *, both_legs=True):
    n_in = draw(st.integers(0, 120))
    n_out = draw(st.integers(0, 120)) if both_legs else 0
    lost_in = draw(st.sets(st.integers(0, max(n_in - 1, 0)), max_size=n_in // 3 + 1))
    lost_out = draw(st.sets(st.integers(0, max(n_out - 1, 0)), max_size=n_out // 3 + 1))
    out_start = draw(st.integers(0, 100)) * 20  # the outbound leg may start up to 2 s late
    seed = draw(st.integers(0, 2**16))
    chunks = leg("inbound", n_in, 0, lost_in, seed) + leg("outbound", n_out, out_start, lost_out, seed + 1)
    # Arrival order: each leg in order, the outbound leg up to 100 ms ahead of or behind the
    # inbound one (within the 200 ms lag bound).
    skew = draw(st.integers(-100, 100))
    arrivals = sorted(chunks, key=lambda c: (c[1] + (skew if c[0] == "outbound" else 0), c[0]))
    return chunks, arrivals


@settings(max_examples=150, deadline=None)
@given(calls(), st.sampled_from([20, 100, 250]))
def test_each_channel_is_its_leg_with_silence_exactly_where_chunks_are_missing(call, frame_ms):
    chunks, arrivals = call
    mixer = StereoMixer(frame_ms=frame_ms, max_lag_ms=200)
    frames, inbound, outbound = run(mixer, arrivals)
    assert (inbound, outbound) == expected_channels(chunks)
    assert mixer.stats.late == mixer.stats.duplicates == mixer.stats.jumps == 0
    # Every frame is full-size except possibly the tail.
    assert all(len(f) == 2 * frame_ms * 8 for f in frames[:-1])
    assert sum(map(len, frames)) == mixer.stats.bytes_out


@settings(max_examples=100, deadline=None)
@given(calls(), st.integers(0, 2**16), st.floats(0, 0.3), st.floats(0, 0.3))
def test_duplicates_and_reordering_never_corrupt_audio(call, seed, dup_rate, swap_rate):
    chunks, arrivals = call
    rng = random.Random(seed)
    noisy = []
    for chunk in arrivals:
        noisy.append(chunk)
        if rng.random() < dup_rate:
            noisy.append(chunk)
    for i in range(len(noisy) - 1):
        if rng.random() < swap_rate:
            noisy[i], noisy[i + 1] = noisy[i + 1], noisy[i]
    mixer = StereoMixer(frame_ms=100, max_lag_ms=200)
    _, inbound, outbound = run(mixer, noisy)
    want_in, want_out = expected_channels(chunks)
    assert len(inbound) == len(want_in) and len(outbound) == len(want_out)
    # Each byte is the leg's audio, or silence where a chunk came too late to be placed.
    for got, want in ((inbound, want_in), (outbound, want_out)):
        assert all(g == w or g == SILENCE for g, w in zip(got, want))
    if mixer.stats.late == 0:
        assert (inbound, outbound) == (want_in, want_out)
    # A second copy is counted: as a duplicate, or as late if its place was already sent.
    copies = len(noisy) - len(chunks)
    assert mixer.stats.duplicates + mixer.stats.late >= copies


@settings(max_examples=50, deadline=None)
@given(calls(both_legs=False))
def test_one_legged_stream_is_sent_without_waiting_for_the_other_leg(call):
    chunks, arrivals = call
    mixer = StereoMixer(frame_ms=100, max_lag_ms=200, tracks=("inbound",))
    out = []
    for track, ts, payload in arrivals:
        out += mixer.push(track, ts, payload)
        # Nothing waits for the absent leg: less than one frame is held back.
        assert (ts * 8 + len(payload)) - sum(map(len, out)) // 2 < 800
    frames = b"".join(out + mixer.flush())
    want_in, want_out = expected_channels(chunks)
    assert frames[0::2] == want_in
    assert set(frames[1::2]) <= {SILENCE}


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 200), st.sampled_from([0, 60, 200, 500]))
def test_a_quiet_leg_holds_the_call_back_by_at_most_the_lag_bound(chunks, lag_ms):
    mixer = StereoMixer(frame_ms=20, max_lag_ms=lag_ms)
    emitted = 0
    for i in range(chunks):
        emitted += sum(map(len, mixer.push("inbound", 20 * i, b"\x01" * CHUNK))) // 2
        assert (20 * i + 20) * 8 - emitted <= lag_ms * 8 + 20 * 8
    assert mixer.stats.lag_pad_bytes >= (20 * chunks - lag_ms - 20) * 8


def test_tail_flush_pads_the_shorter_leg_and_emits_a_short_last_frame():
    mixer = StereoMixer(frame_ms=100)
    frames = mixer.push("inbound", 0, b"\x01" * 1000) + mixer.push("outbound", 0, b"\x02" * 300)
    assert frames == []  # 300 bytes of outbound: not a full frame yet, inbound within the lag
    frames = mixer.flush()
    stereo = b"".join(frames)
    assert [len(f) for f in frames] == [1600] * 1 + [400]
    assert stereo[0::2] == b"\x01" * 1000
    assert stereo[1::2] == b"\x02" * 300 + b"\xff" * 700
    assert mixer.flush() == []  # nothing twice


def test_a_gap_is_padded_and_counted():
    mixer = StereoMixer(frame_ms=20, tracks=("inbound",))
    out = mixer.push("inbound", 0, b"\x01" * CHUNK) + mixer.push("inbound", 60, b"\x02" * CHUNK)
    out += mixer.flush()
    channel = b"".join(out)[0::2]
    assert channel == b"\x01" * 160 + b"\xff" * 320 + b"\x02" * 160
    assert (mixer.stats.gaps, mixer.stats.gap_bytes) == (1, 320)


def test_late_chunk_after_its_place_was_sent_is_dropped_and_counted():
    mixer = StereoMixer(frame_ms=20, tracks=("inbound",))
    mixer.push("inbound", 0, b"\x01" * CHUNK)
    mixer.push("inbound", 40, b"\x03" * CHUNK)  # 20..40 padded and already sent
    assert mixer.push("inbound", 20, b"\x02" * CHUNK) == []
    assert (mixer.stats.late, mixer.stats.late_bytes) == (1, 160)


def test_reordered_chunk_fills_its_hole_before_it_is_sent():
    mixer = StereoMixer(frame_ms=100)
    out = []
    for ts in (0, 40, 20, 60, 80):  # chunk 20 arrives after 40
        out += mixer.push("inbound", ts, bytes([ts + 1]) * CHUNK)
        out += mixer.push("outbound", ts, bytes([ts + 2]) * CHUNK)
    out += mixer.flush()
    channel = b"".join(out)[0::2]
    assert channel == b"".join(bytes([ts + 1]) * CHUNK for ts in (0, 20, 40, 60, 80))
    assert mixer.stats.reordered == 2 and mixer.stats.gaps == 2  # chunk 20 of each leg


def test_huge_timestamp_jump_is_rebased_not_buffered():
    mixer = StereoMixer(frame_ms=100, max_gap_ms=1000)
    frames = mixer.push("inbound", 0, b"\x01" * CHUNK)
    frames += mixer.push("outbound", 0, b"\x02" * CHUNK)
    frames += mixer.push("inbound", 20_000_000, b"\x03" * CHUNK)
    frames += mixer.push("outbound", 20_000_000, b"\x04" * CHUNK)
    stereo = b"".join(frames + mixer.flush())
    assert mixer.stats.jumps == 1
    # 20 ms, then at most the 1 s gap, then the chunk: both legs stayed aligned.
    assert len(stereo) // 2 == 160 + 8000 + 160
    assert stereo[0::2][-160:] == b"\x03" * CHUNK and stereo[1::2][-160:] == b"\x04" * CHUNK


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["inbound", "outbound"]), st.integers(0, 10**8),
                          st.binary(max_size=400)), max_size=60))
def test_arbitrary_input_keeps_the_invariants(pushes):
    mixer = StereoMixer(frame_ms=100, max_lag_ms=200, max_gap_ms=2000)
    total = 0
    for track, ts, payload in pushes:
        for frame in mixer.push(track, ts, payload):
            assert len(frame) == 1600
            total += len(frame)
        for pending in mixer._legs.values():  # memory stays bounded whatever the input
            assert len(pending.buf) <= (200 + 2000 + 100) * 8 + 400
    total += sum(map(len, mixer.flush()))
    assert total == mixer.stats.bytes_out == 2 * mixer.position


@pytest.mark.parametrize("bad", [dict(frame_ms=0), dict(max_lag_ms=-1), dict(max_gap_ms=-5)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        StereoMixer(**bad)
