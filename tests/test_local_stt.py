"""The local Deepgram stand-in, over real sockets on 127.0.0.1.

Every message the server sends goes through `receive_all`, which validates it strictly against
the official deepgram-sdk models, so the fake cannot drift from the real API.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import time
import uuid
import zlib
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pydantic
import pytest
from deepgram.listen.v1.types import (
    ListenV1Metadata,
    ListenV1Results,
    ListenV1SpeechStarted,
    ListenV1UtteranceEnd,
)
from hypothesis import given
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidStatus

import codec
from engine import BYTES_PER_SECOND, Emit, Segment, Word
import local_stt
from local_stt import (
    ConnectionRecord,
    DeterministicEngine,
    Faults,
    ListenParams,
    LocalSTT,
    deterministic_transcript,
    parse_deterministic,
)

ROOT = Path(__file__).resolve().parent.parent
KEY = "test-key"
AUTH = {"Authorization": f"Token {KEY}"}
STEREO = {"channels": "2", "multichannel": "true"}

SERVER_MESSAGES: dict[str, type[pydantic.BaseModel]] = {
    "Results": ListenV1Results,
    "Metadata": ListenV1Metadata,
    "UtteranceEnd": ListenV1UtteranceEnd,
    "SpeechStarted": ListenV1SpeechStarted,
}


# --- helpers --------------------------------------------------------------------------------


def assert_no_extra(model: pydantic.BaseModel) -> None:
    """The SDK models allow unknown fields; we don't, at any depth."""
    assert not model.model_extra, f"{type(model).__name__} has extra fields {model.model_extra}"
    for name in type(model).model_fields:
        value = getattr(model, name)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, pydantic.BaseModel):
                assert_no_extra(item)


def validate(text: str) -> pydantic.BaseModel:
    data = json.loads(text)
    model = SERVER_MESSAGES[data["type"]].model_validate(data, strict=True)
    assert_no_extra(model)
    return model


def listen_url(stt: LocalSTT, **params: str) -> str:
    query = {"encoding": "mulaw", "sample_rate": "8000", **params}
    return f"{stt.url}?{urlencode(query)}"


async def receive_all(ws: ClientConnection) -> list[pydantic.BaseModel]:
    """Every message until the server closes, validated; the close code is on `ws`."""
    messages = []
    try:
        async for text in ws:
            assert isinstance(text, str), "server sent a binary frame"
            messages.append(validate(text))
    except ConnectionClosed:
        pass
    return messages


def interleave(*channels: bytes) -> bytes:
    return np.stack([np.frombuffer(c, dtype=np.uint8) for c in channels], axis=1).tobytes()


def audio(seconds: float, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, round(seconds * BYTES_PER_SECOND), dtype=np.uint8).tobytes()


async def send_in_frames(ws: ClientConnection, data: bytes, sizes: list[int]) -> None:
    """Send `data` in frames whose sizes cycle through `sizes`."""
    position, i = 0, 0
    while position < len(data):
        size = sizes[i % len(sizes)]
        await ws.send(data[position : position + size])
        position += size
        i += 1


def finals_by_channel(messages: list[pydantic.BaseModel]) -> dict[int, list[ListenV1Results]]:
    finals: dict[int, list[ListenV1Results]] = {}
    for m in messages:
        if isinstance(m, ListenV1Results) and m.is_final:
            finals.setdefault(m.channel_index[0], []).append(m)
    return finals


def assert_covers_exactly(results: list[ListenV1Results], channel: int, data: bytes) -> None:
    """Contiguous windows from 0 to the end of `data`, each checksum matching its bytes."""
    position = 0
    for result in results:
        transcript = result.channel.alternatives[0].transcript
        parsed = parse_deterministic(transcript)
        assert parsed.channel == channel
        assert parsed.start_byte == position, f"gap or overlap at {transcript}"
        assert parsed.crc == zlib.crc32(data[parsed.start_byte : parsed.end_byte]), transcript
        assert result.start == pytest.approx(parsed.start_ms / 1000)
        assert result.duration == pytest.approx((parsed.end_ms - parsed.start_ms) / 1000)
        position = parsed.end_byte
    assert position == len(data)


# --- handshake ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers, error",
    [
        ({}, "missing"),
        ({"Authorization": "Token wrong"}, "invalid"),
        ({"Authorization": KEY}, "missing"),
    ],
)
async def test_bad_credentials_get_401_with_dg_headers(headers: dict[str, str], error: str) -> None:
    async with LocalSTT(api_key=KEY) as stt:
        with pytest.raises(InvalidStatus) as caught:
            async with connect(listen_url(stt), additional_headers=headers):
                pass
    response = caught.value.response
    assert response.status_code == 401
    assert error in response.headers["dg-error"]
    assert uuid.UUID(response.headers["dg-request-id"]).version == 4
    assert not stt.connections


async def test_without_api_key_any_token_is_accepted() -> None:
    async with LocalSTT(api_key=None) as stt:
        async with connect(listen_url(stt), additional_headers={"Authorization": "Token any"}):
            pass
        with pytest.raises(InvalidStatus) as caught:
            async with connect(listen_url(stt)):
                pass
    assert caught.value.response.status_code == 401
    assert len(stt.connections) == 1


@pytest.mark.parametrize(
    "query, parameter",
    [
        ({"sample_rate": "8000"}, "encoding"),
        ({"encoding": "linear16", "sample_rate": "8000"}, "unsupported by this server"),
        ({"encoding": "mulaw"}, "sample_rate"),
        ({"encoding": "mulaw", "sample_rate": "16000"}, "unsupported by this server"),
        ({"encoding": "mulaw", "sample_rate": "8000", "channels": "0"}, "channels"),
        ({"encoding": "mulaw", "sample_rate": "8000", "channels": "two"}, "channels"),
        ({"encoding": "mulaw", "sample_rate": "8000", "multichannel": "yes"}, "multichannel"),
    ],
)
async def test_bad_query_gets_400_naming_the_parameter(
    query: dict[str, str], parameter: str
) -> None:
    async with LocalSTT(api_key=KEY) as stt:
        with pytest.raises(InvalidStatus) as caught:
            async with connect(f"{stt.url}?{urlencode(query)}", additional_headers=AUTH):
                pass
    assert caught.value.response.status_code == 400
    assert parameter in caught.value.response.headers["dg-error"]
    assert "dg-request-id" in caught.value.response.headers


async def test_unknown_path_gets_404() -> None:
    async with LocalSTT(api_key=KEY) as stt:
        with pytest.raises(InvalidStatus) as caught:
            wrong_path = listen_url(stt).replace("/v1/listen", "/v2/listen")
            async with connect(wrong_path, additional_headers=AUTH):
                pass
    assert caught.value.response.status_code == 404
    assert "dg-error" in caught.value.response.headers


# --- recording ------------------------------------------------------------------------------


@given(
    channels=st.integers(1, 4),
    data=st.binary(max_size=200),
    cuts=st.lists(st.integers(0, 200), max_size=10),
)
def test_record_deinterleaves_whatever_the_frame_sizes(
    channels: int, data: bytes, cuts: list[int]
) -> None:
    record = ConnectionRecord("id", {}, Headers(), ListenParams(channels, True, False))
    bounds = [0, *sorted(c for c in cuts if c <= len(data)), len(data)]
    returned = [bytearray() for _ in range(channels)]
    for start, end in zip(bounds, bounds[1:]):
        for mine, chunk in zip(returned, record.add_audio(data[start:end])):
            mine += chunk
    whole = len(data) - len(data) % channels
    assert bytes(record.raw) == data
    for c in range(channels):
        assert record.audio[c] == data[c:whole:channels]
        assert returned[c] == data[c:whole:channels]


async def test_stereo_recording_is_byte_exact_per_channel_with_unaligned_frames() -> None:
    inbound, outbound = audio(1.3, seed=1), audio(1.3, seed=2)
    stream = interleave(inbound, outbound)
    async with LocalSTT(api_key=KEY) as stt:
        async with connect(listen_url(stt, **STEREO, tag="t1"), additional_headers=AUTH) as ws:
            await send_in_frames(ws, stream, [161, 1600, 3, 1000])
            await ws.send(json.dumps({"type": "CloseStream"}))
            await receive_all(ws)
    record = stt.connections[0]
    assert bytes(record.raw) == stream
    assert record.audio[0] == inbound and record.audio[1] == outbound
    assert sum(n for _, n in record.arrivals) == len(stream)
    assert [t for t, _ in record.arrivals] == sorted(t for t, _ in record.arrivals)
    assert record.controls == [{"type": "CloseStream"}]
    assert record.param("tag") == "t1" and record.query["channels"] == ["2"]
    assert record.headers["Authorization"] == f"Token {KEY}"
    assert record.opened < record.closed
    assert (record.close_code, record.close_reason) == (1000, "")


async def test_a_server_that_does_not_record_keeps_no_audio_and_few_records(monkeypatch) -> None:
    """The embedded recogniser runs for months: it must not keep every call's audio (record=False),
    yet its Metadata is the same, and it keeps only the last KEPT_CONNECTIONS records."""
    monkeypatch.setattr(local_stt, "KEPT_CONNECTIONS", 2)
    inbound, outbound = audio(1.5, seed=5), audio(1.5, seed=6)
    stream = interleave(inbound, outbound)
    async with LocalSTT(api_key=KEY, record=False) as stt:
        for _ in range(3):
            async with connect(listen_url(stt, **STEREO), additional_headers=AUTH) as ws:
                await send_in_frames(ws, stream, [1600, 777])
                await ws.send(json.dumps({"type": "CloseStream"}))
                messages = await receive_all(ws)
    *results, metadata = messages
    assert isinstance(metadata, ListenV1Metadata)
    assert metadata.sha256 == hashlib.sha256(stream).hexdigest() and metadata.duration == 1.5
    finals = finals_by_channel(results)
    assert_covers_exactly(finals[0], 0, inbound)
    assert_covers_exactly(finals[1], 1, outbound)
    assert len(stt.connections) == 2
    record = stt.connections[-1]
    assert record.bytes_received == len(stream) and record.messages_sent == len(messages)
    assert not record.raw and not any(record.audio) and not record.arrivals and not record.sent
    assert not record.controls


# --- transcripts and the end of a stream ----------------------------------------------------


async def test_close_stream_sends_remaining_results_then_metadata_then_closes_1000() -> None:
    inbound, outbound = audio(2.5, seed=3), audio(2.5, seed=4)
    stream = interleave(inbound, outbound)
    async with LocalSTT(api_key=KEY) as stt:
        async with connect(listen_url(stt, **STEREO), additional_headers=AUTH) as ws:
            await send_in_frames(ws, stream, [1600, 777])
            await ws.send(json.dumps({"type": "CloseStream"}))
            messages = await receive_all(ws)
        request_id = ws.response.headers["dg-request-id"]
    assert (ws.close_code, ws.close_reason) == (1000, "")
    *results, metadata = messages
    assert all(isinstance(m, ListenV1Results) for m in results)
    assert isinstance(metadata, ListenV1Metadata)
    finals = finals_by_channel(results)
    assert_covers_exactly(finals[0], 0, inbound)
    assert_covers_exactly(finals[1], 1, outbound)
    for channel in (0, 1):
        *windows, last = finals[channel]
        assert [w.duration for w in windows] == [1.0, 1.0]
        assert all(w.speech_final and not w.from_finalize for w in windows)
        assert last.from_finalize and last.duration == 0.5
        assert all(r.channel_index == [channel, 2] for r in finals[channel])
    first = results[0]
    assert first.metadata.request_id == request_id == metadata.request_id
    words = first.channel.alternatives[0].words
    assert [w.word for w in words] == first.channel.alternatives[0].transcript.split(" ")
    assert words[0].start == first.start and words[-1].end == first.start + first.duration
    assert metadata.sha256 == hashlib.sha256(stream).hexdigest()
    assert metadata.duration == 2.5 and metadata.channels == 2
    assert metadata.transaction_key == "deprecated"
    created = datetime.fromisoformat(metadata.created)
    assert abs(created - datetime.now(timezone.utc)) < timedelta(minutes=1)
    assert stt.connections[0].request_id == request_id
    sent = [json.loads(text) for _, text in stt.connections[0].sent]
    assert sent == [json.loads(m.model_dump_json(exclude_unset=True)) for m in messages]


async def test_interim_results_come_at_each_window_midpoint_before_its_final() -> None:
    mono = audio(2.0, seed=5)
    async with LocalSTT(api_key=KEY) as stt:
        async with connect(listen_url(stt, interim_results="true"), additional_headers=AUTH) as ws:
            await send_in_frames(ws, mono, [800])
            await ws.send(json.dumps({"type": "CloseStream"}))
            messages = await receive_all(ws)
    ranges = [
        (m.is_final, parse_deterministic(m.channel.alternatives[0].transcript)[1:3])
        for m in messages
        if isinstance(m, ListenV1Results)
    ]
    assert ranges == [
        (False, (0, 500)),
        (True, (0, 1000)),
        (False, (1000, 1500)),
        (True, (1000, 2000)),
    ]
    assert all(m.channel_index == [0, 1] for m in messages if isinstance(m, ListenV1Results))


async def test_finalize_flushes_one_channel_or_all() -> None:
    inbound, outbound = audio(1.25, seed=6), audio(1.25, seed=7)
    async with LocalSTT(api_key=KEY) as stt:
        async with connect(listen_url(stt, **STEREO), additional_headers=AUTH) as ws:
            await ws.send(interleave(inbound, outbound))
            await ws.send(json.dumps({"type": "Finalize", "channel": 1}))
            first_three = [validate(await ws.recv()) for _ in range(3)]
            await ws.send(json.dumps({"type": "Finalize"}))
            fourth = validate(await ws.recv())
            await ws.send(json.dumps({"type": "CloseStream"}))
            rest = await receive_all(ws)
    flushed = [m for m in first_three if m.from_finalize]
    assert [(m.channel_index, m.start, m.duration) for m in flushed] == [([1, 2], 1.0, 0.25)]
    assert fourth.from_finalize and fourth.channel_index == [0, 2] and fourth.duration == 0.25
    assert [type(m) for m in rest] == [ListenV1Metadata], "nothing left after both Finalizes"


async def test_mono_mix_when_multichannel_is_false() -> None:
    inbound, outbound = audio(1.0, seed=8), audio(1.0, seed=9)
    mix = (codec.ulaw_to_pcm16(inbound).astype(np.int32) + codec.ulaw_to_pcm16(outbound)) // 2
    async with LocalSTT(api_key=KEY) as stt:
        async with connect(listen_url(stt, channels="2"), additional_headers=AUTH) as ws:
            await send_in_frames(ws, interleave(inbound, outbound), [321])
            await ws.send(json.dumps({"type": "CloseStream"}))
            messages = await receive_all(ws)
    results = [m for m in messages if isinstance(m, ListenV1Results)]
    assert [m.channel_index for m in results] == [[0, 1]]
    assert_covers_exactly(results, 0, codec.pcm16_to_ulaw(mix))
    assert stt.connections[0].audio[1] == outbound


# --- keepalive, idle, bad data --------------------------------------------------------------


async def test_keepalive_after_audio_holds_the_connection_without_a_reply() -> None:
    async with LocalSTT(api_key=KEY, faults=Faults(idle_timeout=0.3)) as stt:
        async with connect(listen_url(stt), additional_headers=AUTH) as ws:
            await ws.send(audio(0.1, seed=10))
            for _ in range(8):
                await asyncio.sleep(0.1)
                await ws.send(json.dumps({"type": "KeepAlive"}))
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ws.recv(), 0.1)  # still open, and no reply
            closed = await receive_all(ws)
    assert closed == []
    assert (ws.close_code, ws.close_reason) == (1011, "NET-0001")
    record = stt.connections[0]
    assert record.controls == [{"type": "KeepAlive"}] * 8
    assert record.closed - record.opened > 0.9


async def test_keepalive_alone_does_not_hold_a_fresh_connection() -> None:
    async with LocalSTT(api_key=KEY, faults=Faults(idle_timeout=0.3)) as stt:
        async with connect(listen_url(stt), additional_headers=AUTH) as ws:
            with pytest.raises(ConnectionClosed):
                for _ in range(10):
                    await ws.send(json.dumps({"type": "KeepAlive"}))
                    await asyncio.sleep(0.1)
    assert (ws.close_code, ws.close_reason) == (1011, "NET-0001")
    record = stt.connections[0]
    assert 0.3 <= record.closed - record.opened < 0.9
    assert record.controls[:3] == [{"type": "KeepAlive"}] * 3


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"RIFF\x24\x00\x00\x00WAVEfmt ",
        b"OggS\x00\x02",
        b"ID3\x04\x00",
        b"fLaC\x00\x00",
        "hello",
        '["KeepAlive"]',
        '{"type": "Configure"}',
        '{"type": "Finalize", "channel": 2}',
    ],
)
async def test_data_that_is_not_audio_closes_1008(frame: bytes | str) -> None:
    async with LocalSTT(api_key=KEY) as stt:
        async with connect(listen_url(stt, **STEREO), additional_headers=AUTH) as ws:
            await ws.send(frame)
            assert await receive_all(ws) == []
    assert (ws.close_code, ws.close_reason) == (1008, "DATA-0000")
    assert stt.connections[0].close_reason == "DATA-0000"


async def test_container_magic_is_audio_after_the_first_frame() -> None:
    async with LocalSTT(api_key=KEY) as stt:
        async with connect(listen_url(stt), additional_headers=AUTH) as ws:
            await ws.send(b"\xff" * 160)
            await ws.send(b"RIFF" + b"\xff" * 156)
            await ws.send(json.dumps({"type": "CloseStream"}))
            await receive_all(ws)
    assert ws.close_code == 1000
    assert len(stt.connections[0].raw) == 320


# --- faults ---------------------------------------------------------------------------------


async def test_drop_after_closes_1011_net_0000() -> None:
    async with LocalSTT(api_key=KEY, faults=Faults(drop_after=0.2)) as stt:
        async with connect(listen_url(stt), additional_headers=AUTH) as ws:
            await ws.send(audio(0.1, seed=11))
            await receive_all(ws)
    assert (ws.close_code, ws.close_reason) == (1011, "NET-0000")
    assert 0.2 <= stt.connections[0].closed - stt.connections[0].opened < 1.0


async def test_drop_abort_cuts_tcp_without_a_close_frame() -> None:
    async with LocalSTT(api_key=KEY, faults=Faults(drop_after=0.2, drop_abort=True)) as stt:
        async with connect(listen_url(stt), additional_headers=AUTH) as ws:
            with pytest.raises(ConnectionClosed) as caught:
                while True:
                    await ws.send(audio(0.02, seed=12))
                    await asyncio.sleep(0.02)
    assert caught.value.rcvd is None
    assert ws.close_code == 1006
    assert stt.connections[0].close_code == 1006


async def test_delay_holds_every_message() -> None:
    async with LocalSTT(api_key=KEY, faults=Faults(delay=0.3)) as stt:
        async with connect(listen_url(stt), additional_headers=AUTH) as ws:
            await ws.send(audio(1.0, seed=13))
            sent_audio = time.monotonic()
            first = validate(await ws.recv())
            assert time.monotonic() - sent_audio >= 0.3
            await ws.send(json.dumps({"type": "CloseStream"}))
            rest = await receive_all(ws)
    assert isinstance(first, ListenV1Results)
    assert [type(m) for m in rest] == [ListenV1Metadata]
    record = stt.connections[0]
    assert record.sent[0][0] - record.arrivals[0][0] >= 0.3


async def test_refuse_first_answers_503_then_accepts() -> None:
    async with LocalSTT(api_key=KEY, faults=Faults(refuse_first=2)) as stt:
        for _ in range(2):
            with pytest.raises(InvalidStatus) as caught:
                async with connect(listen_url(stt), additional_headers=AUTH):
                    pass
            assert caught.value.response.status_code == 503
            assert "dg-error" in caught.value.response.headers
        async with connect(listen_url(stt), additional_headers=AUTH):
            pass
    assert len(stt.connections) == 1


async def test_reject_status_answers_every_upgrade() -> None:
    async with LocalSTT(api_key=KEY, faults=Faults(reject_status=429)) as stt:
        for _ in range(2):
            with pytest.raises(InvalidStatus) as caught:
                async with connect(listen_url(stt), additional_headers=AUTH):
                    pass
            assert caught.value.response.status_code == 429
            assert caught.value.response.headers["dg-error"] == "too many requests"
    assert not stt.connections


# --- engines --------------------------------------------------------------------------------


class RecordingEngine:
    """A stand-in recogniser: keeps what it was fed and says one fixed segment on finalize."""

    def __init__(self, channel: int, emit: Emit) -> None:
        self.channel, self.emit, self.fed, self.closed = channel, emit, bytearray(), False

    def feed(self, mulaw: bytes) -> None:
        self.fed += mulaw

    async def finalize(self) -> None:
        word = Word("Hello", 0.1, 0.4, confidence=0.9)
        transcript = f"hello {self.channel}"
        self.emit(Segment(0.0, 0.5, transcript, [word], confidence=0.8, from_finalize=True))

    async def aclose(self) -> None:
        self.closed = True


async def test_plugged_in_engine_gets_its_channel_and_segments_become_results() -> None:
    engines: list[RecordingEngine] = []

    def factory(channel: int, emit: Emit, *, interim_results: bool) -> RecordingEngine:
        engines.append(RecordingEngine(channel, emit))
        return engines[-1]

    inbound, outbound = audio(0.2, seed=14), audio(0.2, seed=15)
    async with LocalSTT(api_key=KEY, engine_factory=factory) as stt:
        async with connect(listen_url(stt, **STEREO), additional_headers=AUTH) as ws:
            await send_in_frames(ws, interleave(inbound, outbound), [99])
            await ws.send(json.dumps({"type": "CloseStream"}))
            messages = await receive_all(ws)
    assert [e.fed for e in engines] == [inbound, outbound]
    assert all(e.closed for e in engines)
    results = [m for m in messages if isinstance(m, ListenV1Results)]
    assert [r.channel.alternatives[0].transcript for r in results] == ["hello 0", "hello 1"]
    word = results[0].channel.alternatives[0].words[0]
    assert (word.word, word.start, word.end, word.confidence, word.punctuated_word) == (
        "Hello", 0.1, 0.4, 0.9, None
    )
    assert results[0].channel.alternatives[0].confidence == 0.8


def test_deterministic_transcript_round_trips_fractional_milliseconds() -> None:
    text = deterministic_transcript(3, 8001, b"abc")
    assert text == f"ch3 1000.125-1000.5 {zlib.crc32(b'abc'):08x}"
    parsed = parse_deterministic(text)
    assert (parsed.channel, parsed.start_byte, parsed.end_byte) == (3, 8001, 8004)
    with pytest.raises(ValueError):
        parse_deterministic("hello there")


async def test_deterministic_window_is_configurable() -> None:
    emitted: list[Segment] = []
    engine = DeterministicEngine(0, emitted.append, interim_results=False, window=0.25)
    engine.feed(audio(0.6, seed=16))
    await engine.finalize()
    assert [(s.start, s.duration, s.from_finalize) for s in emitted] == [
        (0.0, 0.25, False),
        (0.25, 0.25, False),
        (0.5, 0.1, True),
    ]


# --- command line ---------------------------------------------------------------------------


def next_log_line(process: subprocess.Popen[str], containing: str) -> str:
    """The next line of the server's log with `containing` (websockets logs lines too)."""
    for line in process.stderr:
        if containing in line:
            return line
    raise AssertionError(f"server log ended without {containing!r}")


def test_cli_serves_and_logs_connections() -> None:
    process = subprocess.Popen(
        [sys.executable, "local_stt.py", "--port", "0", "--api-key", KEY, "--window-ms", "500"],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = next_log_line(process, "listening on ws://").split("listening on ")[1].strip()

        async def talk() -> list[pydantic.BaseModel]:
            query = urlencode({"encoding": "mulaw", "sample_rate": "8000"})
            async with connect(f"{url}?{query}", additional_headers=AUTH) as ws:
                await ws.send(audio(0.5, seed=17))
                await ws.send(json.dumps({"type": "CloseStream"}))
                return await receive_all(ws)

        messages = asyncio.run(talk())
        assert isinstance(messages[0], ListenV1Results) and messages[0].duration == 0.5
        opened = next_log_line(process, "/v1/listen?")
        closed = next_log_line(process, "code=")
        assert " open " in opened and " close " in closed and "code=1000" in closed
    finally:
        process.terminate()
        process.wait(5)


def test_cli_exits_2_when_the_whisper_engine_is_missing() -> None:
    hide_whisper = "import sys; sys.modules['whisper_stt'] = None; import local_stt; local_stt.main()"
    result = subprocess.run(
        [sys.executable, "-c", hide_whisper, "--engine", "whisper"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "--engine whisper needs" in result.stderr


def test_cli_exits_2_when_the_model_directory_is_not_a_model(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "local_stt.py", "--engine", "whisper", "--model", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"{tmp_path / 'model.bin'} is missing" in result.stderr
