"""The Twilio Media Streams simulator: message shapes (protocols.md A.2), calls, faults, CLI.

Calls run against a small `websockets` server started here on 127.0.0.1, port 0, which records
every message it receives, so each test compares what the server saw with `CallResult`.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import re
import socket
import ssl
import sys
import time
import wave
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

import codec
import simulate
from simulate import CallOptions, CallRefused, TwilioStream, plan_media, run_call, run_calls
from speech import SENTENCES, speak

REPO = Path(__file__).resolve().parent.parent
SID = {prefix: re.compile(rf"^{prefix}[0-9a-f]{{32}}$") for prefix in ("AC", "CA", "MZ")}


def tone(seconds: float, hz: float = 440.0) -> bytes:
    t = np.arange(int(seconds * 8000)) / 8000
    return codec.pcm16_to_ulaw((6000 * np.sin(2 * np.pi * hz * t)).astype(np.int16))


def ramp(length: int) -> bytes:
    """Audio whose every chunk is distinguishable, so payloads can be matched to chunk numbers."""
    return (np.arange(length) % 251).astype(np.uint8).tobytes()


# --------------------------------------------------------------------------------------------
# (a) The message builder and the plan, against protocols.md A.2 / A.5


def test_connected_has_only_protocol_and_version():
    assert json.loads(TwilioStream().connected()) == {"event": "connected", "protocol": "Call", "version": "1.0.0"}


def test_default_sids_look_like_twilio_ids():
    stream = TwilioStream()
    assert SID["AC"].match(stream.account_sid)
    assert SID["CA"].match(stream.call_sid)
    assert SID["MZ"].match(stream.stream_sid)
    assert TwilioStream().call_sid != stream.call_sid


def test_start_message_fields_and_types():
    stream = TwilioStream(
        account_sid="AC00aa", call_sid="CA00aa", stream_sid="MZ00aa",
        tracks=["inbound", "outbound"], custom_parameters={"tenant": "acme"},
    )
    stream.connected()
    start = json.loads(stream.start())
    assert start == {
        "event": "start",
        "sequenceNumber": "1",
        "streamSid": "MZ00aa",
        "start": {
            "accountSid": "AC00aa",
            "streamSid": "MZ00aa",
            "callSid": "CA00aa",
            "tracks": ["inbound", "outbound"],
            "customParameters": {"tenant": "acme"},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        },
    }
    media_format = start["start"]["mediaFormat"]
    assert type(media_format["sampleRate"]) is int and type(media_format["channels"]) is int


def test_media_counters_sequence_and_types():
    stream = TwilioStream(stream_sid="MZ00aa", tracks=["inbound", "outbound"])
    stream.start()
    messages = [
        json.loads(stream.media("inbound", 0, b"\x01" * 160)),
        json.loads(stream.media("outbound", 0, b"\x02" * 160)),
        json.loads(stream.media("inbound", 20, b"\x03" * 160)),
        json.loads(stream.media("inbound", 60, b"\x04" * 160, chunk=4)),  # chunk 3 was lost
        json.loads(stream.media("inbound", 80, b"\x05" * 80)),
    ]
    assert [m["sequenceNumber"] for m in messages] == ["2", "3", "4", "5", "6"]
    assert [(m["media"]["track"], m["media"]["chunk"], m["media"]["timestamp"]) for m in messages] == [
        ("inbound", "1", "0"),
        ("outbound", "1", "0"),
        ("inbound", "2", "20"),
        ("inbound", "4", "60"),
        ("inbound", "5", "80"),
    ]
    for m in messages:
        assert set(m) == {"event", "sequenceNumber", "streamSid", "media"}
        assert m["event"] == "media" and m["streamSid"] == "MZ00aa"
        assert set(m["media"]) == {"track", "chunk", "timestamp", "payload"}
        assert all(isinstance(m["media"][key], str) for key in ("chunk", "timestamp", "payload"))
    assert base64.b64decode(messages[3]["media"]["payload"]) == b"\x04" * 160


def test_stop_message_ends_the_sequence():
    stream = TwilioStream(account_sid="AC00aa", call_sid="CA00aa", stream_sid="MZ00aa")
    stream.start()
    stream.media("inbound", 0, b"\xff")
    assert json.loads(stream.stop()) == {
        "event": "stop",
        "sequenceNumber": "3",
        "streamSid": "MZ00aa",
        "stop": {"accountSid": "AC00aa", "callSid": "CA00aa"},
    }


def test_plan_cuts_160_byte_frames_every_20_ms():
    audio = ramp(160 * 10 + 40)
    plan, lost = plan_media(CallOptions(inbound=audio), random.Random(0))
    chunks = [send.chunk for send in plan]
    assert lost == []
    assert [len(c.payload) for c in chunks] == [160] * 10 + [40]
    assert [c.chunk for c in chunks] == list(range(1, 12))
    assert [c.timestamp for c in chunks] == list(range(0, 220, 20))
    assert b"".join(c.payload for c in chunks) == audio


def test_plan_with_other_frame_size():
    plan, _ = plan_media(CallOptions(inbound=ramp(800), frame_ms=50), random.Random(0))
    assert [(len(s.chunk.payload), s.chunk.timestamp) for s in plan] == [(400, 0), (400, 50)]


def test_lost_chunks_leave_gaps_in_chunk_and_timestamp():
    plan, lost = plan_media(CallOptions(inbound=ramp(160 * 200), loss=0.2), random.Random(3))
    assert 10 < len(lost) < 70
    kept = [send.chunk for send in plan]
    lost_numbers = {c.chunk for c in lost}
    assert lost_numbers.isdisjoint(c.chunk for c in kept)
    for before, after in zip(kept, kept[1:]):
        missing = after.chunk - before.chunk - 1
        assert missing == sum(n in lost_numbers for n in range(before.chunk + 1, after.chunk))
        assert after.timestamp - before.timestamp == 20 * (missing + 1)


def test_outbound_delay_shifts_outbound_timestamps_and_send_times():
    options = CallOptions(inbound=ramp(160 * 10), outbound=ramp(160 * 10), outbound_delay_ms=100)
    plan, _ = plan_media(options, random.Random(0))
    outbound = [s for s in plan if s.chunk.track == "outbound"]
    assert [s.chunk.timestamp for s in outbound] == list(range(100, 300, 20))
    assert outbound[0].chunk.chunk == 1
    order = [(s.chunk.track, s.chunk.timestamp) for s in plan]
    assert order.index(("outbound", 100)) == order.index(("inbound", 100)) + 1  # same tick, inbound first


def test_pause_keeps_chunk_numbers_and_jumps_timestamps():
    options = CallOptions(inbound=ramp(160 * 10), outbound=ramp(160 * 10), pause_at=0.1, pause_for=0.5)
    plan, lost = plan_media(options, random.Random(0))
    assert lost == []
    inbound = [s.chunk for s in plan if s.chunk.track == "inbound"]
    assert [c.chunk for c in inbound] == list(range(1, 11))
    assert [c.timestamp for c in inbound] == [0, 20, 40, 60, 80, 600, 620, 640, 660, 680]
    assert [s.at_ms for s in plan if s.chunk.track == "inbound"] == [c.timestamp for c in inbound]


def test_reorder_swaps_neighbours_and_dup_repeats_in_place():
    reordered, _ = plan_media(CallOptions(inbound=ramp(160 * 100), reorder=0.3), random.Random(1))
    numbers = [s.chunk.chunk for s in reordered]
    swaps = [i for i in range(99) if numbers[i] > numbers[i + 1]]
    assert 5 < len(swaps) < 40
    assert all(numbers[i : i + 2] == [i + 2, i + 1] for i in swaps)
    assert sorted(numbers) == list(range(1, 101))
    assert [s.at_ms for s in reordered] == [20 * i for i in range(100)]  # slots stay on the 20 ms grid

    duplicated, _ = plan_media(CallOptions(inbound=ramp(160 * 100), dup=0.3), random.Random(1))
    numbers = [s.chunk.chunk for s in duplicated]
    assert 100 + 5 < len(numbers) < 100 + 60
    assert numbers == sorted(numbers) and sorted(set(numbers)) == list(range(1, 101))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    loss=st.floats(0, 1),
    dup=st.floats(0, 1),
    reorder=st.floats(0, 1),
    jitter=st.sampled_from([0, 5, 40]),
)
def test_faults_only_drop_duplicate_or_move_chunks(seed, loss, dup, reorder, jitter):
    options = CallOptions(
        inbound=ramp(160 * 30), outbound=ramp(160 * 25), loss=loss, dup=dup, reorder=reorder, jitter_ms=jitter
    )
    plan, lost = plan_media(options, random.Random(seed))
    clean, _ = plan_media(CallOptions(inbound=options.inbound, outbound=options.outbound), random.Random(0))
    everything = {(s.chunk.track, s.chunk.chunk): s.chunk for s in clean}
    sent = [(s.chunk.track, s.chunk.chunk) for s in plan]
    # Every chunk keeps its content and numbers; it is lost, or sent once, or sent twice.
    assert all(everything[key] == s.chunk for key, s in zip(sent, plan))
    assert {(c.track, c.chunk) for c in lost}.isdisjoint(sent)
    assert {(c.track, c.chunk) for c in lost} | set(sent) == set(everything)
    assert all(sent.count(key) in (1, 2) for key in set(sent))
    assert [s.at_ms for s in plan] == sorted(s.at_ms for s in plan)
    again, _ = plan_media(options, random.Random(seed))
    assert again == plan


# --------------------------------------------------------------------------------------------
# (b) run_call against a recording server


@dataclass
class Connection:
    """What the test server saw on one WebSocket."""

    path: str
    headers: dict[str, str]
    messages: list[dict] = field(default_factory=list)
    close_code: int | None = None

    def events(self) -> list[str]:
        return [m["event"] for m in self.messages]

    def media(self) -> list[dict]:
        return [m["media"] for m in self.messages if m["event"] == "media"]


class Recorder:
    """A WebSocket server that records every message; `replies` messages are sent after `start`."""

    def __init__(self, replies: int = 0, close_after: int | None = None):
        self.replies = replies
        self.close_after = close_after  # close with 1008 after this many messages
        self.read_delay = 0.0  # seconds before reading anything, so the client's buffers fill up
        self.connections: list[Connection] = []
        self.finished = asyncio.Semaphore(0)

    async def handler(self, ws: ServerConnection) -> None:
        record = Connection(ws.request.path, dict(ws.request.headers))
        self.connections.append(record)
        await asyncio.sleep(self.read_delay)
        try:
            async for text in ws:
                record.messages.append(json.loads(text))
                if record.messages[-1]["event"] == "start":
                    for i in range(self.replies):
                        await ws.send(json.dumps({"event": "mark", "mark": {"name": str(i)}}))
                if len(record.messages) == self.close_after:
                    await ws.close(1008, "go away")
        except ConnectionClosed:
            pass
        record.close_code = ws.close_code
        self.finished.release()

    async def wait(self, count: int = 1) -> list[Connection]:
        """The first `count` connections, once their handlers have seen the socket close."""
        for _ in range(count):
            await asyncio.wait_for(self.finished.acquire(), 5)
        return self.connections


@pytest.fixture
async def server():
    """Start a Recorder on 127.0.0.1:0; yields (url, recorder)."""
    recorder = Recorder()
    async with serve(recorder.handler, "127.0.0.1", 0, compression=None) as ws_server:
        port = ws_server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}/twilio", recorder


def assert_arrived_as_sent(connection: Connection, result: simulate.CallResult) -> None:
    """The server got exactly `result.sent`, in order, with matching numbers and payloads."""
    arrived = [m for m in connection.messages if m["event"] == "media"]
    assert [
        (m["media"]["track"], int(m["media"]["chunk"]), int(m["media"]["timestamp"]),
         base64.b64decode(m["media"]["payload"]), int(m["sequenceNumber"]))
        for m in arrived
    ] == [(c.track, c.chunk, c.timestamp, c.payload, c.sequence) for c in result.sent]
    assert all(m["streamSid"] == result.stream_sid for m in connection.messages[1:])
    sequence = [int(m["sequenceNumber"]) for m in connection.messages[1:]]
    assert sequence == list(range(1, len(sequence) + 1))


async def test_two_legged_call_with_speech(server):
    url, recorder = server
    caller, agent = speak(SENTENCES[0], "espeak"), speak(SENTENCES[2], "flite")
    result = await run_call(url, CallOptions(inbound=caller, outbound=agent, speed=0))
    [connection] = await recorder.wait()

    assert connection.path == "/twilio"
    events = connection.events()
    assert events[:2] == ["connected", "start"] and events[-1] == "stop"
    assert set(events[2:-1]) == {"media"}
    start = connection.messages[1]["start"]
    assert start["tracks"] == ["inbound", "outbound"]
    assert (start["callSid"], start["streamSid"]) == (result.call_sid, result.stream_sid)
    assert connection.messages[-1]["stop"] == {"accountSid": start["accountSid"], "callSid": result.call_sid}
    assert_arrived_as_sent(connection, result)
    for track, audio in (("inbound", caller), ("outbound", agent)):
        media = [m for m in connection.media() if m["track"] == track]
        assert b"".join(base64.b64decode(m["payload"]) for m in media) == audio
        assert [int(m["chunk"]) for m in media] == list(range(1, len(media) + 1))
        assert [int(m["timestamp"]) for m in media] == [20 * i for i in range(len(media))]
        assert all(len(base64.b64decode(m["payload"])) == 160 for m in media[:-1])
    assert result.stop_sent and result.error is None
    assert (result.close_code, connection.close_code) == (1000, 1000)


@pytest.mark.parametrize("leg", ["inbound", "outbound"])
async def test_one_legged_call(server, leg):
    url, recorder = server
    result = await run_call(url, CallOptions(**{leg: tone(0.2)}, speed=0))
    [connection] = await recorder.wait()
    assert connection.messages[1]["start"]["tracks"] == [leg]
    assert {m["track"] for m in connection.media()} == {leg}
    assert len(result.sent) == 10
    assert_arrived_as_sent(connection, result)


async def test_outbound_delay(server):
    url, recorder = server
    options = CallOptions(inbound=tone(0.4), outbound=tone(0.2, 660), outbound_delay_ms=300, speed=0)
    result = await run_call(url, options)
    [connection] = await recorder.wait()
    media = connection.media()
    outbound = [int(m["timestamp"]) for m in media if m["track"] == "outbound"]
    assert outbound == list(range(300, 500, 20))
    first_outbound = next(i for i, m in enumerate(media) if m["track"] == "outbound")
    assert [(m["track"], m["timestamp"]) for m in media[first_outbound - 1 : first_outbound + 1]] == [
        ("inbound", "300"), ("outbound", "300")
    ]
    assert_arrived_as_sent(connection, result)


async def test_faults_arrive_exactly_as_reported(server):
    url, recorder = server
    options = CallOptions(
        inbound=ramp(160 * 150), outbound=ramp(160 * 150), speed=0,
        loss=0.1, dup=0.1, reorder=0.1, jitter_ms=30, seed=42,
    )
    result = await run_call(url, options)
    again = await run_call(url, options)
    first, second = await recorder.wait(2)

    assert_arrived_as_sent(first, result)
    assert result.lost and result.duplicates > 0
    arrived = {(m["track"], int(m["chunk"])) for m in first.media()}
    assert arrived.isdisjoint((c.track, c.chunk) for c in result.lost)
    for track in ("inbound", "outbound"):
        numbers = [int(m["chunk"]) for m in first.media() if m["track"] == track]
        assert numbers != sorted(numbers)  # reordered and duplicated
        timestamps = {int(m["chunk"]): int(m["timestamp"]) for m in first.media() if m["track"] == track}
        assert all(timestamps[n] == 20 * (n - 1) for n in timestamps)  # numbers survive the faults
    assert [(c.track, c.chunk) for c in again.sent] == [(c.track, c.chunk) for c in result.sent]
    assert second.media() != [] and result.call_sid != again.call_sid


async def test_hangup_closes_without_stop(server):
    url, recorder = server
    result = await run_call(url, CallOptions(inbound=tone(0.1), speed=0, hangup=True))
    [connection] = await recorder.wait()
    assert connection.events() == ["connected", "start"] + ["media"] * 5
    assert not result.stop_sent and result.error is None
    assert connection.close_code == 1000


async def test_abort_drops_the_connection_without_close_frame():
    # A slow reader with a tiny receive buffer, and ~10 MB sent at once, make the abort come
    # while asyncio still holds unsent bytes. They must be flushed first, or `result.sent`
    # would claim chunks that never left.
    recorder = Recorder()
    recorder.read_delay = 0.3
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    listener.bind(("127.0.0.1", 0))
    async with serve(recorder.handler, sock=listener, compression=None):
        url = f"ws://127.0.0.1:{listener.getsockname()[1]}/twilio"
        options = CallOptions(inbound=ramp(8_000_000), frame_ms=1000, speed=0, abort=True)
        result = await run_call(url, options)
        [connection] = await recorder.wait()
    assert "stop" not in connection.events()
    assert connection.close_code == 1006  # no close frame from the client
    assert result.close_code == 1006 and not result.stop_sent
    assert_arrived_as_sent(connection, result)  # everything sent before the drop still arrives


async def test_custom_parameters_ids_and_headers(server):
    url, recorder = server
    options = CallOptions(
        inbound=tone(0.04), speed=0, params={"tenant": "acme", "token": "s3cret"},
        call_sid="CA" + "1" * 32, stream_sid="MZ" + "2" * 32, account_sid="AC" + "3" * 32,
        additional_headers={"X-Twilio-Signature": "sig"},
    )
    result = await run_call(url, options)
    [connection] = await recorder.wait()
    start = connection.messages[1]
    assert start["streamSid"] == "MZ" + "2" * 32
    assert start["start"]["customParameters"] == {"tenant": "acme", "token": "s3cret"}
    assert start["start"]["callSid"] == result.call_sid == "CA" + "1" * 32
    assert start["start"]["accountSid"] == "AC" + "3" * 32
    assert connection.headers["x-twilio-signature"] == "sig"


async def test_pause_sends_nothing_then_resumes_with_a_timestamp_jump(server):
    url, recorder = server
    options = CallOptions(inbound=ramp(160 * 20), speed=0, pause_at=0.2, pause_for=1.0)
    result = await run_call(url, options)
    [connection] = await recorder.wait()
    media = connection.media()
    assert [int(m["chunk"]) for m in media] == list(range(1, 21))
    timestamps = [int(m["timestamp"]) for m in media]
    assert timestamps == list(range(0, 200, 20)) + list(range(1200, 1400, 20))
    assert b"".join(c.payload for c in result.sent) == ramp(160 * 20)


async def test_real_time_pacing_without_drift(server):
    url, recorder = server
    options = CallOptions(inbound=tone(0.3), outbound=tone(0.3, 660), speed=1.0, pause_at=0.1, pause_for=0.1)
    started = time.monotonic()
    result = await run_call(url, options)
    elapsed = time.monotonic() - started
    await recorder.wait()
    assert 0.35 <= elapsed < 1.5  # 0.3 s of audio (last chunk due at 0.28 s) plus 0.1 s on hold
    t0 = result.sent[0].sent_at
    for chunk in result.sent:
        assert chunk.sent_at - t0 >= chunk.timestamp / 1000 - 0.005  # never early
        assert chunk.sent_at - t0 <= chunk.timestamp / 1000 + 0.25  # loosely on time
    pairs = {}
    for chunk in result.sent:
        pairs.setdefault(chunk.timestamp, []).append(chunk.sent_at)
    assert all(max(times) - min(times) < 0.01 for times in pairs.values())  # one tick, both legs


async def test_speed_two_halves_the_duration(server):
    url, recorder = server
    started = time.monotonic()
    await run_call(url, CallOptions(inbound=tone(0.6), speed=2.0))
    elapsed = time.monotonic() - started
    await recorder.wait()
    assert 0.25 <= elapsed < 0.9


async def test_messages_from_the_server_are_read_and_counted(server):
    url, recorder = server
    recorder.replies = 25  # sent when `start` arrives, so the call must last a moment
    result = await run_call(url, CallOptions(inbound=tone(0.2), speed=1.0))
    await recorder.wait()
    assert result.received == 25


async def test_server_closing_mid_call_is_reported(server):
    url, recorder = server
    recorder.close_after = 5  # at real time the close arrives while media is still due
    result = await run_call(url, CallOptions(inbound=tone(2.0), speed=1.0))
    [connection] = await recorder.wait()
    assert len(connection.messages) == 5
    assert result.error is not None and "1008" in result.error
    assert (result.close_code, result.close_reason) == (1008, "go away")
    assert not result.stop_sent and len(result.sent) < 100


async def test_refused_upgrade_raises_call_refused():
    def forbid(connection, request):
        return connection.respond(HTTPStatus.FORBIDDEN, "no\n")

    async with serve(Recorder().handler, "127.0.0.1", 0, process_request=forbid) as ws_server:
        port = ws_server.sockets[0].getsockname()[1]
        with pytest.raises(CallRefused, match="HTTP 403"):
            await run_call(f"ws://127.0.0.1:{port}/twilio", CallOptions(inbound=tone(0.1), speed=0))


async def test_many_concurrent_calls(server):
    url, recorder = server
    options = [CallOptions(inbound=tone(0.2), outbound=tone(0.2), start_offset_ms=i, seed=i) for i in range(20)]
    started = time.monotonic()
    results = await run_calls(url, options)
    elapsed = time.monotonic() - started
    connections = await recorder.wait(20)
    assert elapsed < 1.5  # concurrent: about one 0.2 s call, not twenty
    assert len({r.call_sid for r in results}) == 20
    by_call = {c.messages[1]["start"]["callSid"]: c for c in connections}
    for result in results:
        assert_arrived_as_sent(by_call[result.call_sid], result)
        assert len(result.sent) == 20


# --------------------------------------------------------------------------------------------
# (c) The command line


async def run_cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(REPO / "simulate.py"), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 20)
    return process.returncode, stdout.decode(), stderr.decode()


def stereo_wav(left: np.ndarray, right: np.ndarray, rate: int) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.column_stack([left, right]).astype("<i2").tobytes())
    return out.getvalue()


async def test_cli_prints_call_sid_before_connecting():
    """The handshake is held until the test has read the first line: it must already be there."""
    release = asyncio.Event()
    recorder = Recorder()

    async def hold(connection, request):
        await release.wait()

    async with serve(recorder.handler, "127.0.0.1", 0, process_request=hold) as ws_server:
        port = ws_server.sockets[0].getsockname()[1]
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(REPO / "simulate.py"), f"ws://127.0.0.1:{port}/twilio", "--fast",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
        )
        first = (await asyncio.wait_for(process.stdout.readline(), 10)).decode().strip()
        assert SID["CA"].match(first)
        assert recorder.connections == []
        release.set()
        rest, stderr = await asyncio.wait_for(process.communicate(), 10)
        [connection] = await recorder.wait()
    assert process.returncode == 0, stderr
    assert connection.messages[1]["start"]["callSid"] == first
    # No audio given: the demo tones on both legs, 3 s each.
    assert connection.messages[1]["start"]["tracks"] == ["inbound", "outbound"]
    assert len(connection.media()) == 2 * 150
    [summary] = rest.decode().splitlines()
    assert summary.startswith(first) and "media=300" in summary and "ended=stop" in summary


async def test_cli_many_calls_print_all_sids_first(server, tmp_path):
    url, recorder = server
    audio = tmp_path / "caller.ulaw"
    audio.write_bytes(tone(0.1))
    code, stdout, stderr = await run_cli(url, str(audio), "--calls", "3", "--fast", "--param", "tenant=acme")
    connections = await recorder.wait(3)
    assert code == 0, stderr
    lines = stdout.splitlines()
    sids = lines[:3]
    assert all(SID["CA"].match(sid) for sid in sids) and len(set(sids)) == 3
    assert sorted(c.messages[1]["start"]["callSid"] for c in connections) == sorted(sids)
    assert all(c.messages[1]["start"]["customParameters"] == {"tenant": "acme"} for c in connections)
    assert all(c.messages[1]["start"]["tracks"] == ["inbound"] for c in connections)
    assert [line.split()[0] for line in lines[3:]] == sids


async def test_cli_stereo_wav_splits_into_two_legs(server, tmp_path):
    url, recorder = server
    t = np.arange(16000 // 2) / 16000  # 0.5 s at 16 kHz
    left = (8000 * np.sin(2 * np.pi * 300 * t)).astype(np.int16)
    right = (8000 * np.sin(2 * np.pi * 1200 * t)).astype(np.int16)
    data = stereo_wav(left, right, 16000)
    path = tmp_path / "call.wav"
    path.write_bytes(data)
    code, stdout, stderr = await run_cli(url, str(path), "--fast")
    [connection] = await recorder.wait()
    assert code == 0, stderr
    expected_in, expected_out = codec.wav_to_mulaw_8k(data)
    assert expected_in != expected_out
    for track, expected in (("inbound", expected_in), ("outbound", expected_out)):
        payload = b"".join(base64.b64decode(m["payload"]) for m in connection.media() if m["track"] == track)
        assert payload == expected
    assert stdout.splitlines()[0] == connection.messages[1]["start"]["callSid"]


async def test_cli_track_selects_one_leg_of_a_raw_file(server, tmp_path):
    url, recorder = server
    path = tmp_path / "agent.bin"
    path.write_bytes(ramp(800))
    code, _, stderr = await run_cli(url, str(path), "--raw", "--track", "outbound", "--fast", "--hangup")
    [connection] = await recorder.wait()
    assert code == 0, stderr
    assert connection.messages[1]["start"]["tracks"] == ["outbound"]
    assert b"".join(base64.b64decode(m["payload"]) for m in connection.media()) == ramp(800)
    assert "stop" not in connection.events()


async def test_cli_http_403_exits_1_with_one_line():
    def forbid(connection, request):
        return connection.respond(HTTPStatus.FORBIDDEN, "no\n")

    async with serve(Recorder().handler, "127.0.0.1", 0, process_request=forbid) as ws_server:
        port = ws_server.sockets[0].getsockname()[1]
        code, stdout, stderr = await run_cli(f"ws://127.0.0.1:{port}/twilio", "--fast")
    assert code == 1
    assert SID["CA"].match(stdout.splitlines()[0])
    assert stderr.count("\n") == 1 and "HTTP 403" in stderr and "Traceback" not in stderr


async def test_cli_nothing_listening_exits_1():
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, _, stderr = await run_cli(f"ws://127.0.0.1:{port}/twilio", "--fast")
    assert code == 1
    assert stderr.count("\n") == 1 and "connection refused" in stderr and "Traceback" not in stderr


@pytest.fixture
async def wss_server(test_certificate):
    """A Recorder behind TLS with a throwaway self-signed certificate for 127.0.0.1.

    Yields (url, recorder, path of the certificate to trust).
    """
    cert, key = test_certificate
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    recorder = Recorder()
    async with serve(recorder.handler, "127.0.0.1", 0, ssl=context) as ws_server:
        port = ws_server.sockets[0].getsockname()[1]
        yield f"wss://127.0.0.1:{port}/twilio", recorder, cert


async def test_wss_with_a_test_ca(wss_server):
    url, recorder, cert = wss_server
    options = CallOptions(inbound=tone(0.1), speed=0, ssl_context=ssl.create_default_context(cafile=cert))
    result = await run_call(url, options)
    [connection] = await recorder.wait()
    assert_arrived_as_sent(connection, result)


async def test_cli_wss_cafile_insecure_and_untrusted(wss_server):
    url, recorder, cert = wss_server
    code, _, stderr = await run_cli(url, "--fast", "--cafile", str(cert))
    assert code == 0, stderr
    code, _, stderr = await run_cli(url, "--fast", "--insecure")
    assert code == 0, stderr
    await recorder.wait(2)
    code, _, stderr = await run_cli(url, "--fast")  # self-signed, not trusted
    assert code == 1
    assert stderr.count("\n") == 1 and "TLS handshake failed" in stderr and "Traceback" not in stderr


async def test_cli_rejects_unknown_audio(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    code, _, stderr = await run_cli("ws://127.0.0.1:9/twilio", str(path))
    assert code == 2 and "--raw" in stderr
