"""Several server processes and one Redis (README "Scaling out"), all real: Debian's redis-server,
`python server.py` processes configured by environment variables, websocat and Python clients.

A call goes to one instance; subscribers connect to another. What the Deepgram-compatible
server sent for the call is compared with what each subscriber received, message for message.
"""

from __future__ import annotations

import asyncio
import json
import subprocess

import pytest
from websockets.asyncio.client import connect

from cluster import Cluster
from conftest import Listener, expected_channels, wait_for, websocat_path
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
        websocat = subprocess.Popen([websocat_path(), b.url("/client")], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
        websocat.stdin.write(stream.call_sid + "\n")
        websocat.stdin.flush()
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
