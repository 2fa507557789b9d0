"""Faults on the Deepgram side and on the Twilio side, over real sockets: nothing lost, nothing
duplicated, and other calls unaffected. The Deepgram-compatible server injects the faults."""

from __future__ import annotations

import asyncio
import functools
import json
import socket
import time
import zlib

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

from conftest import Listener, expected_channels, wait_for
from local_stt import DeterministicEngine, Faults, parse_deterministic
from simulate import CallOptions, TwilioStream, run_call
from test_integration import _http_get, metric_values, until_closed

HALF_SECOND_WINDOWS = functools.partial(DeterministicEngine, window=0.5)


def leg_audio(seed: int, seconds: float) -> bytes:
    """Distinct, never-silent bytes so a misplaced byte shows up in a checksum."""
    import random

    return random.Random(seed).randbytes(int(seconds * 8000)).translate(bytes.maketrans(b"\xff", b"\xfe"))


async def stream_call(stack, stream: TwilioStream, inbound: bytes, outbound: bytes, *, speed: float,
                      listener_subscription: str | None = None) -> Listener | None:
    """Play both legs on one Twilio socket at `speed` x real time (0: as fast as possible)."""
    listener = None
    async with connect(stack.url("/twilio")) as twilio:
        await twilio.send(stream.start())
        await stack.wait_for_call(stream.call_sid)
        if listener_subscription is not None:
            listener = await Listener(stack.url("/client"), listener_subscription).start()
            await stack.wait_for_subscribers(1)
        started = time.monotonic()
        for i, offset in enumerate(range(0, len(inbound), 160)):
            await twilio.send(stream.media("inbound", 20 * i, inbound[offset:offset + 160]))
            await twilio.send(stream.media("outbound", 20 * i, outbound[offset:offset + 160]))
            if speed > 0 and i % 5 == 4:
                await asyncio.sleep(max(0.0, started + (i + 1) * 0.02 / speed - time.monotonic()))
        await twilio.send(stream.stop())
    return listener


def assert_finals_cover_the_call_exactly_once(messages: list[str], legs: tuple[bytes, bytes]) -> None:
    """Final results, in call time, tile each channel from 0 to the end with no gap and no
    overlap, and each window's checksum matches the call audio at the time it claims."""
    finals = [json.loads(m) for m in messages if json.loads(m).get("is_final")]
    for channel, audio in enumerate(legs):
        spans = []
        for result in (r for r in finals if r["channel_index"][0] == channel):
            start, duration = result["start"], result["duration"]
            text = parse_deterministic(result["channel"]["alternatives"][0]["transcript"])
            begin, end = round(start * 8000), round((start + duration) * 8000)
            assert zlib.crc32(audio[begin:end]) == text.crc, f"channel {channel} at {start}: wrong audio or time"
            spans.append((round(start, 3), round(start + duration, 3)))
        assert spans[0][0] == 0.0 and spans[-1][1] == len(audio) / 8000, spans
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), f"gap or duplicate in {spans}"


def uneven_windows(channel, emit, *, interim_results):
    """Channel 0 finalises every 0.5 s, channel 1 every 1 s: at a drop, channel 0 is ahead, so
    the replay re-transcribes audio channel 0 already delivered, which must not come twice."""
    return DeterministicEngine(channel, emit, interim_results=interim_results, window=0.5 if channel == 0 else 1.0)


@pytest.mark.parametrize("engine, faults", [
    pytest.param(HALF_SECOND_WINDOWS, Faults(drop_after=1.2), id="closed-1011-every-1.2s"),
    pytest.param(HALF_SECOND_WINDOWS, Faults(drop_after=1.2, drop_abort=True), id="tcp-reset-every-1.2s"),
    pytest.param(uneven_windows, Faults(drop_after=1.7), id="seam-inside-delivered-finals"),
])
async def test_deepgram_dropping_mid_call_is_reconnected_without_losing_or_duplicating_results(
        stacks, engine, faults):
    stack = await stacks(engine_factory=engine, faults=faults)
    before = await metric_values(stack.port)
    inbound, outbound = leg_audio(1, 4.0), leg_audio(2, 4.0)
    stream = TwilioStream(tracks=["inbound", "outbound"])
    listener = await stream_call(stack, stream, inbound, outbound, speed=1.0, listener_subscription=stream.call_sid)
    await listener.finished(timeout=30)

    assert len(stack.stt.connections) >= 2  # the connection was cut at least once
    assert json.loads(listener.messages[-1])["type"] == "Metadata" and listener.close_code == 1000
    assert_finals_cover_the_call_exactly_once(listener.messages, (inbound, outbound))
    after = await metric_values(stack.port)
    assert after["upstream_reconnects_total"] - before["upstream_reconnects_total"] == len(stack.stt.connections) - 1


async def test_deepgram_unavailable_at_call_start_is_retried_while_audio_waits(stacks):
    stack = await stacks(faults=Faults(reject_status=429))
    before = await metric_values(stack.port)
    inbound, outbound = leg_audio(5, 1.5), leg_audio(6, 1.5)
    stream = TwilioStream(tracks=["inbound", "outbound"])
    everything = await Listener(stack.url("/client"), '{"type":"subscribe","callSid":"*"}').start()
    await stack.wait_for_subscribers(1)
    call = asyncio.create_task(stream_call(stack, stream, inbound, outbound, speed=0))
    await wait_for(lambda: stack.stt.attempts >= 3, what="a few refused attempts")
    stack.stt.faults = Faults()  # Deepgram is back
    await call
    await wait_for(lambda: everything.messages and '"call_ended"' in everything.messages[-1], what="call_ended")

    [record] = stack.stt.connections
    assert (bytes(record.audio[0]), bytes(record.audio[1])) == (inbound, outbound)  # nothing lost meanwhile
    events = [json.loads(m) for m in everything.messages]
    assert events[-1]["endOfCall"] == "complete" and not any(e["type"] == "error" for e in events)
    after = await metric_values(stack.port)
    failures = 'upstream_connect_failures_total{kind="http_429"}'
    assert after[failures] - before.get(failures, 0) >= 3


async def test_503_at_start_is_retried(stacks):
    stack = await stacks(faults=Faults(refuse_first=2))
    result = await run_call(stack.url("/twilio"), CallOptions(inbound=leg_audio(7, 1.0), speed=0))
    await wait_for(lambda: stack.stt.connections and stack.stt.connections[-1].closed, what="end of call")
    assert stack.stt.attempts == 3
    assert bytes(stack.stt.connections[-1].audio[0]) == expected_channels(result.sent)[0]


async def test_a_refused_key_is_not_retried(stacks):
    stack = await stacks(deepgram_api_key="wrong-key")
    await run_call(stack.url("/twilio"), CallOptions(inbound=leg_audio(8, 1.0), speed=0, call_sid="CAkey"))
    await wait_for(lambda: not stack.proxy.hub.has_call("CAkey"), what="end of call")
    await asyncio.sleep(0.5)  # a retry loop would show up as more attempts
    assert stack.stt.attempts == 1 and not stack.stt.connections


async def test_a_backlog_is_replayed_no_faster_than_1_25x_real_time(stacks):
    stack = await stacks(faults=Faults(reject_status=503))
    inbound = leg_audio(9, 6.0)
    call = asyncio.create_task(stream_call(stack, TwilioStream(tracks=["inbound"]), inbound, inbound, speed=0))
    await wait_for(lambda: stack.stt.attempts >= 2, what="refused attempts")
    await call  # 6 s of audio is now waiting in the proxy
    stack.stt.faults = Faults()
    await wait_for(lambda: stack.stt.connections and stack.stt.connections[-1].closed, timeout=20, what="end")
    record = stack.stt.connections[-1]
    assert bytes(record.audio[0]) == inbound
    first = record.opened  # the proxy paces from the moment the connection is open
    received = 0
    for arrived, size in record.arrivals:
        received += size
        seconds_of_audio = received / 16000
        # 2 s may go at once; after that no faster than 1.25x (one frame of slack for timing).
        assert seconds_of_audio <= 2.0 + 1.25 * (arrived - first) + 0.1, (seconds_of_audio, arrived - first)
    assert record.arrivals[-1][0] - first >= (6.0 - 2.0) / 1.25 - 0.2


async def black_hole(port_holder: list[int]):
    """A websocket server that accepts the upgrade and then never reads: a stuck Deepgram."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # accepted sockets inherit it
    listener.bind(("127.0.0.1", 0))
    port_holder.append(listener.getsockname()[1])

    async def handler(ws):
        await ws.wait_closed()  # never reads a frame (max_queue=1 stops the reading at once)

    return serve(handler, sock=listener, max_queue=1, compression=None)


async def test_a_stuck_deepgram_socket_never_blocks_the_twilio_side(stacks):
    port: list[int] = []
    async with await black_hole(port):
        stack = await stacks(deepgram_url=f"ws://127.0.0.1:{port[0]}/v1/listen?encoding=mulaw&sample_rate=8000"
                                          "&channels=2&multichannel=true",
                             upstream_queue_seconds=2.0, close_timeout=1.0)
        before = await metric_values(stack.port)
        audio = leg_audio(10, 60.0)
        started = time.monotonic()
        result = await run_call(stack.url("/twilio"), CallOptions(inbound=audio, outbound=audio, speed=0,
                                                                   call_sid="CAstuck"))
        sending = time.monotonic() - started
        await wait_for(lambda: not stack.proxy.hub.has_call("CAstuck"), timeout=20, what="end of call")
        after = await metric_values(stack.port)
    assert result.close_code == 1000 and len(result.sent) == 6000
    assert sending < 10  # all of Twilio's media was read while Deepgram read nothing
    unsent = after["upstream_unsent_bytes_total"] - before["upstream_unsent_bytes_total"]
    sent = after["upstream_bytes_total"] - before["upstream_bytes_total"]
    assert unsent > 0 and sent + unsent == 60 * 16000  # every byte is accounted for: sent, or counted
    timeouts = 'end_of_call_total{outcome="timeout"}'
    assert after[timeouts] - before.get(timeouts, 0) == 1


async def test_a_socket_that_never_starts_is_closed_with_1008(stack):
    async with connect(stack.url("/twilio")) as ws:
        for _ in range(60):
            await ws.send('{"event":"hello"}')
        await until_closed(ws)
    assert ws.close_code == 1008 and "start" in ws.close_reason


async def test_subscribers_that_leave_come_back_or_send_junk_do_not_disturb_the_call(stack):
    before = await metric_values(stack.port)
    stream = TwilioStream(tracks=["inbound"])
    audio = leg_audio(11, 4.0)
    async with connect(stack.url("/twilio")) as twilio:
        await twilio.send(stream.start())
        await stack.wait_for_call(stream.call_sid)
        steady = await Listener(stack.url("/client"), stream.call_sid).start()
        async with connect(stack.url("/client")) as leaving:  # subscribes, then hangs up mid-call
            await leaving.recv()
            await leaving.send(stream.call_sid)
            await stack.wait_for_subscribers(2)
            for i in range(100):
                await twilio.send(stream.media("inbound", 20 * i, audio[160 * i:160 * (i + 1)]))
        junk = connect(stack.url("/client"))
        async with junk as chatty:  # comes back, and talks after subscribing
            await chatty.recv()
            await chatty.send(stream.call_sid)
            await wait_for(lambda: stack.proxy.hub.subscriber_count() == 2, what="resubscribed")
            for text in ("hello?", "CAother", '{"type":"subscribe","callSid":"*"}'):
                await chatty.send(text)
            for i in range(100, 200):
                await twilio.send(stream.media("inbound", 20 * i, audio[160 * i:160 * (i + 1)]))
            await twilio.send(stream.stop())
            rest = [m async for m in chatty]
        assert chatty.close_code == 1000 and json.loads(rest[-1])["type"] == "Metadata"
    await steady.finished()
    assert steady.messages == [text for _, text in stack.stt.connections[-1].sent]
    after = await metric_values(stack.port)
    assert after["subscriber_junk_messages_total"] - before["subscriber_junk_messages_total"] == 3
    assert after["subscribers_active"] == before["subscribers_active"]


async def test_readyz_says_not_ready_while_calls_finish_on_shutdown(stacks):
    stack = await stacks(faults=Faults(delay=1.5))  # Deepgram's last messages come slowly
    stream = TwilioStream(tracks=["inbound"])
    twilio = await connect(stack.url("/twilio"))
    await twilio.send(stream.start())
    await stack.wait_for_call(stream.call_sid)
    for i in range(50):
        await twilio.send(stream.media("inbound", 20 * i, b"\x12" * 160))
    proxy = stack.proxy
    proxy_task = asyncio.create_task(proxy.drain())  # what SIGTERM starts
    await wait_for(lambda: not proxy.ready, what="not ready")
    try:
        await asyncio.to_thread(_http_get, stack.port, "/readyz")
    except Exception as exc:  # urllib raises HTTPError for 503
        assert getattr(exc, "code", None) == 503
    else:
        raise AssertionError("/readyz answered 200 while shutting down")
    await proxy_task
    assert not proxy.hub.has_call(stream.call_sid)
    assert json.loads(stack.stt.connections[-1].sent[-1][1])["type"] == "Metadata"
