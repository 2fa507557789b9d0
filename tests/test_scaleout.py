"""Several server processes and one Redis (README "Scaling out"), all real: Debian's redis-server,
`python server.py` processes configured by environment variables, websocat and Python clients.

A call goes to one instance; subscribers connect to another. What the Deepgram-compatible
server sent for the call is compared with what each subscriber received, message for message.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest
from websockets.asyncio.client import connect

from cluster import Cluster
from conftest import Listener, expected_channels, wait_for, websocat_subscriber
from simulate import Chunk, TwilioStream
from test_integration import until_closed

pytestmark = pytest.mark.slow


@pytest.fixture
async def cluster(tmp_path):
    c = await Cluster(tmp_path).start()
    yield c
    await c.close()


def media(stream: TwilioStream, first_tick: int, ticks: int, tracks=("inbound", "outbound"),
          seed: int = 0) -> list[tuple[str, Chunk]]:
    """Both legs' 20 ms chunks for ticks [first, first + ticks): (message, chunk) pairs, distinct
    bytes per tick; the inbound leg's first byte is `seed` + 1 (record_for() finds the call by it)."""
    out = []
    for k in range(first_tick, first_tick + ticks):
        for i, track in enumerate(tracks):
            payload = bytes([(seed + k * 7 + i * 101) % 250 + 1]) * 160
            chunk = Chunk(track, k + 1, 20 * k, payload)
            out.append((stream.media(track, chunk.timestamp, payload, chunk.chunk), chunk))
    return out


async def play(ws, messages: list[tuple[str, Chunk]], per_second: float = 0) -> list[Chunk]:
    """Send the messages, paced to `per_second` ticks of both legs (0: as fast as possible)."""
    for i, (text, _) in enumerate(messages):
        await ws.send(text)
        if per_second and i % 2 == 1:
            await asyncio.sleep(1 / per_second)
    return [chunk for _, chunk in messages]


def transcripts(messages: list[str], call_sid: str) -> list[dict]:
    return [m["data"] for m in map(json.loads, messages) if m["type"] == "transcript" and m["callSid"] == call_sid]


def kinds(messages: list[str], call_sid: str) -> list[str]:
    return [m["type"] for m in map(json.loads, messages) if m["callSid"] == call_sid]


async def test_a_call_on_one_instance_reaches_raw_and_json_subscribers_on_another_byte_exact(cluster):
    a, b = await cluster.server("a"), await cluster.server("b")
    stream = TwilioStream(tracks=["inbound", "outbound"], custom_parameters={"tenant": "acme"})
    async with connect(a.url("/twilio")) as twilio:
        await twilio.send(stream.connected())
        await twilio.send(stream.start())
        await b.wait_listed(stream.call_sid)
        websocat = websocat_subscriber(b.url("/client"), stream.call_sid)
        raw = await Listener(b.url("/client"), stream.call_sid).start()
        js = await Listener(b.url("/client"), json.dumps({"type": "subscribe", "callSid": stream.call_sid})).start()
        await wait_for_subscribers(b, 3)
        sent = await play(twilio, media(stream, 0, 250), per_second=200)  # 5 s of audio at 4x real time
        await twilio.send(stream.stop())
    await raw.finished()
    await js.finished()
    out, _ = await asyncio.to_thread(websocat.communicate, timeout=30)

    record = cluster.stt.connections[-1]
    assert (bytes(record.audio[0]), bytes(record.audio[1])) == expected_channels(sent)
    deepgram = cluster.messages(record)
    assert len(deepgram) > 50 and json.loads(deepgram[-1])["type"] == "Metadata"
    assert raw.greeting == [stream.call_sid] and raw.messages == deepgram and raw.close_code == 1000
    lines = out.splitlines()
    assert stream.call_sid in json.loads(lines[0]) and lines[1:] == deepgram and websocat.returncode == 0
    events = [json.loads(m) for m in js.messages]
    assert events[0]["type"] == "call_started" and events[0]["streamSid"] == stream.stream_sid
    assert events[0]["customParameters"] == {"tenant": "acme"} and events[0]["tracks"] == ["inbound", "outbound"]
    assert [e["data"] for e in events[1:-1]] == [json.loads(m) for m in deepgram]
    assert events[-1]["type"] == "call_ended" and events[-1]["endOfCall"] == "complete"
    assert js.close_code == 1000
    metrics = await b.metrics()
    assert metrics["redis_missed_total"] == 0 and metrics["redis_connected"] == 1


async def wait_for_subscribers(server, count: int) -> None:
    """Until the server counts `count` subscribers, plus a moment for their streams' positions."""
    for _ in range(200):
        if (await server.metrics())["subscribers_active"] >= count:
            await asyncio.sleep(0.3)
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{server.name}: fewer than {count} subscribers")


async def test_wildcard_on_one_instance_sees_calls_of_both_and_unknown_calls_are_refused_everywhere(cluster):
    a, b = await cluster.server("a"), await cluster.server("b")
    everything = await Listener(b.url("/client"), '{"type":"subscribe","callSid":"*"}').start()
    await wait_for_subscribers(b, 1)
    on_a, on_b = TwilioStream(tracks=["inbound"]), TwilioStream(tracks=["inbound"])
    async with connect(a.url("/twilio")) as ta, connect(b.url("/twilio")) as tb:
        await ta.send(on_a.start())
        await tb.send(on_b.start())
        for server in (a, b):
            await server.wait_listed(on_a.call_sid)
            await server.wait_listed(on_b.call_sid)
        await asyncio.gather(play(ta, media(on_a, 0, 100, ("inbound",), seed=10), 200),
                             play(tb, media(on_b, 0, 100, ("inbound",), seed=20), 200))
        await ta.send(on_a.stop())
        await tb.send(on_b.stop())
    for server in (a, b):
        await server.wait_listed(on_a.call_sid, listed=False)
        await server.wait_listed(on_b.call_sid, listed=False)
    deepgram = {on_a.call_sid: record_for(cluster, 10), on_b.call_sid: record_for(cluster, 20)}
    await wait_for(lambda: sum(json.loads(m)["type"] == "call_ended" for m in everything.messages) == 2,
                   what="both calls ended on the wildcard subscriber")
    for call_sid in (on_a.call_sid, on_b.call_sid):
        sent = cluster.messages(deepgram[call_sid])
        assert kinds(everything.messages, call_sid) == ["call_started"] + ["transcript"] * len(sent) + ["call_ended"]
        assert transcripts(everything.messages, call_sid) == [json.loads(m) for m in sent]
    assert not everything.task.done()  # a wildcard subscription stays open between calls
    for server in (a, b):
        async with connect(server.url("/client")) as ws:
            assert json.loads(await ws.recv()) == []
            await ws.send(on_a.call_sid)  # ended: no longer a call in progress
            await until_closed(ws)
        assert ws.close_code == 4404


def record_for(cluster: Cluster, seed: int):
    """The recogniser connection of the call played with media(..., seed=seed)."""
    return next(r for r in cluster.stt.connections if r.audio[0][:1] == bytes([seed + 1]))


async def test_recent_lists_the_calls_ended_on_every_instance_oldest_first_then_health(cluster):
    """The dashboard's subscription ("recent", "health"; README "Dashboard") on both instances:
    a call that ended on A and one that ended later on B, as call_started and call_ended."""
    a, b = await cluster.server("a"), await cluster.server("b")
    first = TwilioStream(tracks=["inbound"], custom_parameters={"on": "a"})
    second = TwilioStream(tracks=["inbound"], custom_parameters={"on": "b"})
    for server, stream in ((a, first), (b, second)):
        async with connect(server.url("/twilio")) as twilio:
            await twilio.send(stream.start())
            await play(twilio, media(stream, 0, 10, tracks=("inbound",)))
            await twilio.send(stream.stop())
        for other in (a, b):
            await other.wait_listed(stream.call_sid, listed=False)
    subscription = json.dumps({"type": "subscribe", "callSid": "*", "recent": True, "health": True})
    for server in (a, b):
        listener = await Listener(server.url("/client"), subscription).start()
        await wait_for(lambda: len(listener.messages) >= 5, what=f"recent calls and health on {server.name}")
        events = [json.loads(m) for m in listener.messages]
        assert [(e["type"], e["callSid"]) for e in events[:4]] == [
            ("call_started", first.call_sid), ("call_ended", first.call_sid),
            ("call_started", second.call_sid), ("call_ended", second.call_sid)], server.name
        assert events[0]["customParameters"] == {"on": "a"} and events[3]["endOfCall"] == "complete"
        assert events[4]["type"] == "health" and events[4]["subscribersActive"] >= 1


async def test_late_joiners_with_history_get_the_whole_call_with_no_gap_or_repeat_on_either_instance(cluster):
    a, b = await cluster.server("a", HISTORY_SECONDS=4), await cluster.server("b", HISTORY_SECONDS=4)
    stream = TwilioStream(tracks=["inbound", "outbound"])
    subscribe = json.dumps({"type": "subscribe", "callSid": stream.call_sid, "history": True})
    joiners = []
    async with connect(a.url("/twilio")) as twilio:
        await twilio.send(stream.start())
        await b.wait_listed(stream.call_sid)
        for part in range(5):  # join on both instances while transcripts are flowing: the seam moves
            joiners += [await Listener(a.url("/client"), subscribe).start(),
                        await Listener(b.url("/client"), subscribe).start()]
            await play(twilio, media(stream, 50 * part, 50), per_second=250)
        await twilio.send(stream.stop())
    for listener in joiners:
        await listener.finished()
    deepgram = [json.loads(m) for m in cluster.messages(cluster.stt.connections[-1])]
    assert len(deepgram) > 100
    for listener in joiners:
        assert kinds(listener.messages, stream.call_sid) == ["call_started"] + ["transcript"] * len(deepgram) + ["call_ended"]
        assert transcripts(listener.messages, stream.call_sid) == deepgram
        assert listener.close_code == 1000
    # After the call: its whole story, on either instance, for HISTORY_SECONDS.
    for server in (a, b):
        replay = await Listener(server.url("/client"), subscribe).start()
        await replay.finished()
        assert replay.messages == joiners[0].messages and replay.close_code == 1000
    await asyncio.sleep(4.5)
    for server in (a, b):
        late = await Listener(server.url("/client"), subscribe).start()
        await late.finished()
        assert late.messages == [] and late.close_code == 4404


async def test_redis_restarted_mid_call_the_call_goes_on_delivery_resumes_and_losses_are_counted_exactly(cluster):
    a = await cluster.server("a", REDIS_BUFFER=20, REDIS_HEARTBEAT_SECONDS=0.5)
    b = await cluster.server("b", REDIS_HEARTBEAT_SECONDS=0.5)
    stream = TwilioStream(tracks=["inbound", "outbound"])
    async with connect(a.url("/twilio")) as twilio:
        await twilio.send(stream.start())
        await b.wait_listed(stream.call_sid)
        local = await Listener(a.url("/client"), stream.call_sid).start()
        remote = await Listener(b.url("/client"), json.dumps({"type": "subscribe", "callSid": stream.call_sid})).start()
        await wait_for_subscribers(b, 1)
        sent = await play(twilio, media(stream, 0, 100), per_second=200)
        cluster.redis.kill()  # a crash: Redis forgets every stream, key and registration
        sent += await play(twilio, media(stream, 100, 150), per_second=100)  # 1.5 s without Redis
        during = len(local.messages)
        cluster.redis.start()  # same port, empty
        await wait_for_metric(a, "redis_connected", 1)
        sent += await play(twilio, media(stream, 250, 100), per_second=200)
        await twilio.send(stream.stop())
    await local.finished()
    await remote.finished()

    record = cluster.stt.connections[-1]
    assert (bytes(record.audio[0]), bytes(record.audio[1])) == expected_channels(sent)  # the call went on
    deepgram = cluster.messages(record)
    assert local.messages == deepgram and local.close_code == 1000  # served locally throughout
    assert during > 0
    got = transcripts(remote.messages, stream.call_sid)
    assert kinds(remote.messages, stream.call_sid)[0] == "call_started"
    assert json.loads(remote.messages[-1])["type"] == "call_ended" and remote.close_code == 1000
    assert is_subsequence(got, [json.loads(m) for m in deepgram])  # in order, nothing twice
    assert got[-1] == json.loads(deepgram[-1])  # delivery resumed after the restart
    missing = len(deepgram) - len(got)
    metrics_a, metrics_b = await a.metrics(), await b.metrics()
    assert missing > 0 and metrics_b["redis_missed_total"] == missing
    dropped = metrics_a['redis_publish_dropped_total{kind="add"}']
    assert 0 < dropped <= missing
    assert metrics_a['redis_errors_total{task="publish"}'] > 0
    print(f"{len(deepgram)} messages, {missing} missed on b, {dropped:.0f} not published by a")
    assert "Redis at redis://127.0.0.1:" in a.log_text() and "unreachable" in a.log_text()
    assert "reachable again" in a.log_text()


def is_subsequence(part: list, whole: list) -> bool:
    items = iter(whole)
    return all(any(x == y for y in items) for x in part)


async def wait_for_metric(server, name: str, value: float, timeout: float = 15.0) -> None:
    for _ in range(int(timeout / 0.1)):
        if (await server.metrics()).get(name) == value:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{server.name}: {name} never became {value}")


async def one_call(server, stream: TwilioStream, ticks: int, seed: int, subscribe_on=None) -> Listener | None:
    """Play a short one-legged call on `server`; with `subscribe_on`, a JSON subscriber there first."""
    listener = None
    async with connect(server.url("/twilio")) as twilio:
        await twilio.send(stream.start())
        if subscribe_on is not None:
            await subscribe_on.wait_listed(stream.call_sid)
            listener = await Listener(subscribe_on.url("/client"),
                                      json.dumps({"type": "subscribe", "callSid": stream.call_sid})).start()
            await wait_for_subscribers(subscribe_on, 1)
        await play(twilio, media(stream, 0, ticks, ("inbound",), seed=seed), per_second=250)
        await twilio.send(stream.stop())
    if listener is not None:
        await listener.finished()
    return listener


async def test_redis_absent_at_start_up_serves_local_calls_then_joins_the_cluster_when_redis_appears(cluster, tmp_path):
    from cluster import RedisServer

    redis = RedisServer(tmp_path, password="s3cret-redis-pass-1")  # not running yet
    try:
        a = await cluster.server("a", redis=False, REDIS_URL=redis.url, LOG_LEVEL="DEBUG")
        assert (await a.metrics())["redis_connected"] == 0
        first = TwilioStream(tracks=["inbound"])
        local = await one_call(a, first, 50, seed=30, subscribe_on=a)  # served, Redis or not
        assert transcripts(local.messages, first.call_sid) == [
            json.loads(m) for m in cluster.messages(record_for(cluster, 30))]
        assert kinds(local.messages, first.call_sid)[-1] == "call_ended" and local.close_code == 1000

        redis.start()
        await wait_for_metric(a, "redis_connected", 1)
        b = await cluster.server("b", redis=False, REDIS_URL=redis.url, LOG_LEVEL="DEBUG")
        second = TwilioStream(tracks=["inbound"])
        remote = await one_call(a, second, 50, seed=40, subscribe_on=b)
        assert transcripts(remote.messages, second.call_sid) == [
            json.loads(m) for m in cluster.messages(record_for(cluster, 40))]
        assert kinds(remote.messages, second.call_sid)[-1] == "call_ended" and remote.close_code == 1000
        log = a.log_text()
        assert "unreachable" in log and "serving" not in log.split("unreachable")[0][-200:]
        assert "reachable again" in log
        for text in (log, b.log_text()):
            assert "s3cret-redis-pass-1" not in text
    finally:
        redis.stop()


async def test_an_instance_killed_with_sigkill_disappears_from_every_list_within_the_heartbeat_window(cluster):
    a, b = await cluster.server("a"), await cluster.server("b")  # heartbeat 0.3 s
    stream = TwilioStream(tracks=["inbound"])
    twilio = await connect(a.url("/twilio"))
    await twilio.send(stream.start())
    await play(twilio, media(stream, 0, 20, ("inbound",)))
    await b.wait_listed(stream.call_sid)
    js = await Listener(b.url("/client"), json.dumps({"type": "subscribe", "callSid": stream.call_sid})).start()
    raw = await Listener(b.url("/client"), stream.call_sid).start()
    await wait_for_subscribers(b, 2)
    a.kill()
    took = await b.wait_listed(stream.call_sid, listed=False, timeout=5)
    assert took <= 4 * 0.3 + 0.8  # three heartbeats for its key to lapse, one for the next snapshot, scheduling
    await js.finished()
    await raw.finished()
    ended = json.loads(js.messages[-1])
    assert ended["type"] == "call_ended" and ended["endOfCall"] == "lost" and js.close_code == 4410
    assert raw.close_code == 4410
    await until_closed(twilio)
    assert "vanished" in b.log_text()


async def test_workers_2_serve_calls_on_both_workers_metrics_sum_them_and_sigterm_drains_both(cluster):
    import re

    server = await cluster.server("w", WORKERS=2)
    everything = await Listener(server.url("/client"), '{"type":"subscribe","callSid":"*"}').start()
    calls = []
    while len(calls) < 30:  # SO_REUSEPORT spreads connections by hash: play calls until both workers had one
        stream = TwilioStream(tracks=["inbound"])
        await one_call(server, stream, 20, seed=len(calls))
        calls.append(stream.call_sid)
        workers = set(re.findall(r"INFO (worker-\d) calls: call started", server.log_text()))
        if len(calls) >= 4 and workers == {"worker-1", "worker-2"}:
            break
    assert workers == {"worker-1", "worker-2"}
    await wait_for(lambda: sum('"call_ended"' in m for m in everything.messages) == len(calls), timeout=20,
                   what="the wildcard subscriber to see every call end")
    for call_sid in calls:  # whichever worker carried the call, the subscriber's worker delivered it
        assert kinds(everything.messages, call_sid)[0] == "call_started"
        assert kinds(everything.messages, call_sid)[-1] == "call_ended"
    await asyncio.sleep(1.5)  # the other worker's figures are flushed every second
    for _ in range(6):  # each scrape may be answered by either worker: each shows the whole server
        metrics = await server.metrics()
        assert metrics["calls_total"] == len(calls) and metrics["media_frames_total"] == 20 * len(calls)
        assert metrics["calls_active"] == 0

    # A worker that dies is started again; what it counted stays counted.
    worker = worker_pids(server.process.pid)[0]
    os.kill(worker, signal.SIGKILL)
    await wait_for(lambda: "starting it again" in server.log_text(), what="the worker to be restarted")
    await wait_for(lambda: len(worker_pids(server.process.pid)) == 2 and worker not in worker_pids(server.process.pid),
                   what="two workers again")
    await asyncio.sleep(1.5)
    for _ in range(4):
        metrics = await server.metrics()
        assert metrics["calls_total"] == len(calls) and metrics["media_frames_total"] == 20 * len(calls)

    # SIGTERM with a call in flight: both workers finish their calls and exit.
    stream = TwilioStream(tracks=["inbound"])
    twilio = await connect(server.url("/twilio"))
    await twilio.send(stream.start())
    await server.wait_listed(stream.call_sid)
    listener = await Listener(server.url("/client"), stream.call_sid).start()
    await wait_for_subscribers(server, 1)  # (the wildcard subscriber went if its worker was the one killed)
    await play(twilio, media(stream, 0, 60, ("inbound",)))
    code = await server.terminate()
    await listener.finished()
    await until_closed(twilio)
    assert code == 0 and twilio.close_code == 1001
    assert json.loads(listener.messages[-1])["type"] == "Metadata" and listener.close_code == 1000
    log = server.log_text()
    assert "worker-1 server: stopped" in log and "worker-2 server: stopped" in log and "all workers stopped" in log


async def test_a_handover_to_another_instance_continues_the_transcript_under_the_same_callsid(cluster):
    a, b = await cluster.server("a"), await cluster.server("b")
    first = TwilioStream(tracks=["inbound", "outbound"])
    second = TwilioStream(call_sid=first.call_sid, account_sid=first.account_sid, tracks=["inbound", "outbound"])
    subscribe = json.dumps({"type": "subscribe", "callSid": first.call_sid})
    everything = await Listener(b.url("/client"), '{"type":"subscribe","callSid":"*"}').start()
    ta = await connect(a.url("/twilio"))
    await ta.send(first.start())
    await b.wait_listed(first.call_sid)
    on_a, on_b = await Listener(a.url("/client"), subscribe).start(), await Listener(b.url("/client"), subscribe).start()
    raw_b = await Listener(b.url("/client"), first.call_sid).start()
    await wait_for_subscribers(b, 3)
    await play(ta, media(first, 0, 100, seed=50), per_second=200)
    tb = await connect(b.url("/twilio"))  # Twilio's second socket for the call lands on the other instance
    await tb.send(second.start())
    await wait_for(lambda: len(cluster.stt.connections) == 2, what="the second instance's recogniser connection")
    await ta.close()  # the first socket goes; the call goes on at b
    await play(tb, media(second, 0, 100, seed=60), per_second=200)
    await tb.send(second.stop())
    await tb.close()
    for listener in (on_a, on_b, raw_b):
        await listener.finished()
    part_a = cluster.messages(record_for(cluster, 50))
    part_b = cluster.messages(record_for(cluster, 60))
    assert json.loads(part_a[-1])["type"] == "Metadata" and json.loads(part_b[-1])["type"] == "Metadata"
    await wait_for(lambda: any('"call_ended"' in m for m in everything.messages), what="call_ended on *")
    for listener in (on_a, on_b, everything):
        assert kinds(listener.messages, first.call_sid) == (
            ["call_started"] + ["transcript"] * (len(part_a) + len(part_b)) + ["call_ended"])
        got = [json.dumps(t) for t in transcripts(listener.messages, first.call_sid)]
        assert_merge_of(got, [json.dumps(json.loads(m)) for m in part_a], [json.dumps(json.loads(m)) for m in part_b])
        assert json.loads(listener.messages[0])["streamSid"] == first.stream_sid  # the call's first stream
    assert_merge_of(raw_b.messages, part_a, part_b)
    assert (on_a.close_code, on_b.close_code, raw_b.close_code) == (1000, 1000, 1000)
    for server in (a, b):
        await server.wait_listed(first.call_sid, listed=False)


def worker_pids(supervisor: int) -> list[int]:
    with open(f"/proc/{supervisor}/task/{supervisor}/children") as f:
        return [int(pid) for pid in f.read().split()]


def assert_merge_of(got: list[str], first: list[str], second: list[str]) -> None:
    """`got` is both lists interleaved, each complete and in its own order, nothing twice."""
    assert len(got) == len(first) + len(second)
    assert is_subsequence(first, got) and is_subsequence(second, got)
    assert sorted(got) == sorted(first + second)
