"""What the dashboard needs from /client, available to every JSON subscriber (README "Subscribing").

- `"recent": true` (with `"callSid":"*"`): the calls that ended within HISTORY_SECONDS first, each
  as its `call_started` and `call_ended`, oldest end first; then the calls in progress.
- `"health": true`: a `health` event at once and every few seconds, with the same numbers as
  /metrics (health.py reads the same registry).
- `call_ended` of a transcription call carries its `reconnects` and mixer `anomalies`.

Pure parts without sockets, the rest over real sockets with the in-process hub; the Redis hub's
side is in tests/test_scaleout.py.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from websockets.asyncio.client import connect

import health
from conftest import Listener, wait_for
from hub import EVERY_CALL, BadSubscription, CallInfo, Hub, Subscriber, parse_subscription
from local_stt import Faults
from simulate import CallOptions, TwilioStream, run_call
from test_integration import metric_values

AUDIO = bytes(range(1, 255)) * 10  # 0.3 s


def drain(sub: Subscriber) -> list[dict | None]:
    out = []
    while sub.pending:
        message = sub.take()
        out.append(None if message is None else json.loads(message))
    return out


# --- the subscription ---------------------------------------------------------------------------


def test_recent_and_health_are_optional_booleans_and_recent_needs_every_call():
    assert parse_subscription('{"type":"subscribe","callSid":"*","recent":true,"health":true}') == (
        EVERY_CALL, True, False, True, True)
    assert parse_subscription('{"type":"subscribe","callSid":"CA1","health":true}').health
    old = parse_subscription('{"type":"subscribe","callSid":"*","history":true}')
    assert (old.recent, old.health) == (False, False)  # nothing changes for existing subscribers
    for bad, why in [('{"type":"subscribe","callSid":"CA1","recent":true}', '"recent" goes with'),
                     ('{"type":"subscribe","callSid":"*","recent":1}', '"recent" must be'),
                     ('{"type":"subscribe","callSid":"*","health":"yes"}', '"health" must be')]:
        with pytest.raises(BadSubscription, match=why):
            parse_subscription(bad)


# --- recently ended calls, in the hub -------------------------------------------------------------


def info(sid: str) -> CallInfo:
    return CallInfo(sid, "MZ" + sid, "AC1", ("inbound",), {}, "2026-12-03T10:00:00.000+00:00")


def test_ended_calls_are_listed_oldest_end_first_until_history_seconds_have_passed(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    hub = Hub(history_messages=10, history_seconds=60)
    for sid in ("CA1", "CA2", "CA3"):
        hub.open_call(info(sid))
    hub.close_call("CA2", {"endOfCall": "complete"})
    now[0] += 30
    hub.close_call("CA1", {"endOfCall": "failed", "error": "401"})
    ended = [(json.loads(s)["callSid"], json.loads(e)["endOfCall"]) for s, e in hub.ended_calls()]
    assert ended == [("CA2", "complete"), ("CA1", "failed")]  # CA3 is in progress: not listed
    now[0] += 31  # CA2 ended 61 s ago
    assert [json.loads(s)["callSid"] for s, _ in hub.ended_calls()] == ["CA1"]
    hub.open_call(info("CA1"))  # the callSid again: a new call, in progress
    assert hub.ended_calls() == []


def test_without_history_no_ended_call_is_kept():
    hub = Hub(history_messages=0)
    hub.open_call(info("CA1"))
    hub.close_call("CA1", {})
    assert hub.ended_calls() == []


# --- health figures -------------------------------------------------------------------------------


def test_health_figures_sum_the_metrics_samples_they_name():
    samples = [
        health.Sample("calls_active", {}, 2), health.Sample("agent_calls_active", {}, 1),
        health.Sample("agent_provider_errors_total", {"provider": "deepgram", "fatal": "true"}, 3),
        health.Sample("agent_provider_errors_total", {"provider": "embedded", "fatal": "true"}, 1),
        health.Sample("agent_provider_errors_total", {"provider": "deepgram", "fatal": "false"}, 5),
        health.Sample("bad_frames_total", {"kind": "bad_json"}, 4), health.Sample("bad_frames_total", {"kind": "x"}, 1),
        health.Sample("subscribers_dropped_total", {}, 7), health.Sample("unrelated_total", {}, 99),
    ]
    figures = health.figures(samples)
    assert figures["callsActive"] == 3 and figures["agentErrors"] == 4 and figures["agentWarnings"] == 5
    assert figures["badFrames"] == 5 and figures["droppedSubscribers"] == 7
    assert figures["recogniserErrors"] == 0 and set(figures) == set(health.FIGURES)


# --- over sockets ---------------------------------------------------------------------------------


def subscribe(**flags) -> str:
    return json.dumps({"type": "subscribe", "callSid": "*", **flags})


async def test_recent_gives_calls_ended_lately_before_the_calls_in_progress(stacks):
    stack = await stacks()
    done = await run_call(stack.url("/twilio"), CallOptions(inbound=AUDIO, speed=0, params={"n": "1"}))
    stream = TwilioStream(tracks=["inbound"], custom_parameters={"n": "2"})
    async with connect(stack.url("/twilio")) as twilio:
        await twilio.send(stream.start())
        await stack.wait_for_call(stream.call_sid)
        for i in range(100):  # 2 s: the Deepgram-compatible server answers once a second
            await twilio.send(stream.media("inbound", 20 * i, b"\x42" * 160))
        await wait_for(lambda: len(stack.stt.connections) == 2 and stack.stt.connections[1].sent,
                       what="a message of the call in progress")
        recent = await Listener(stack.url("/client"), subscribe(history=True, recent=True)).start()
        plain = await Listener(stack.url("/client"), subscribe(history=True)).start()
        await wait_for(lambda: len(recent.messages) >= 4 and len(plain.messages) >= 2, what="replays")
        await twilio.send(stream.stop())
    events = [json.loads(m) for m in recent.messages]
    assert [(e["type"], e["callSid"]) for e in events[:3]] == [
        ("call_started", done.call_sid), ("call_ended", done.call_sid), ("call_started", stream.call_sid)]
    assert events[0]["customParameters"] == {"n": "1"} and events[1]["endOfCall"] == "complete"
    assert events[3]["type"] == "transcript" and events[3]["callSid"] == stream.call_sid
    # Without "recent", the same subscription starts with the call in progress, as before.
    assert [json.loads(m)["callSid"] for m in plain.messages] == [stream.call_sid] * len(plain.messages)


async def test_health_events_carry_the_numbers_of_metrics_and_follow_them(stacks):
    stack = await stacks()
    stack.proxy.health.interval = 0.2
    watcher = await Listener(stack.url("/client"), json.dumps(
        {"type": "subscribe", "callSid": "*", "health": True})).start()
    await wait_for(lambda: watcher.messages, what="the first health event")
    first = json.loads(watcher.messages[0])
    scraped = await metric_values(stack.port)
    assert first["type"] == "health" and set(first) == {"type", "time", *health.FIGURES}
    assert first["subscribersActive"] == scraped["subscribers_active"] == 1
    assert first["recogniserErrors"] == scraped.get("upstream_errors_total", 0)
    assert first["droppedSubscribers"] == scraped.get("subscribers_dropped_total", 0)
    stream = TwilioStream(tracks=["inbound"])
    async with connect(stack.url("/twilio")) as twilio:
        await twilio.send(stream.start())
        await stack.wait_for_call(stream.call_sid)
        await wait_for(lambda: any(json.loads(m).get("callsActive") == first["callsActive"] + 1
                                   for m in watcher.messages), what="a health event counting the call")
        await twilio.send(stream.stop())
    await wait_for(lambda: json.loads(watcher.messages[-1]).get("callsActive") == first["callsActive"],
                   what="the call gone from health")
    health_events = [m for m in map(json.loads, watcher.messages) if m["type"] == "health"]
    assert len(health_events) >= 3


async def test_a_failing_recogniser_shows_in_health_as_in_metrics(stacks):
    stack = await stacks(faults=Faults(reject_status=401), connect_timeout=1.0)
    stack.proxy.health.interval = 0.1
    watcher = await Listener(stack.url("/client"), subscribe(health=True)).start()
    await wait_for(lambda: watcher.messages, what="the first health event")
    before = json.loads(watcher.messages[0])["recogniserErrors"]
    result = await run_call(stack.url("/twilio"), CallOptions(inbound=AUDIO, speed=0))
    await wait_for(lambda: any(json.loads(m).get("type") == "call_ended" and json.loads(m).get("callSid") == result.call_sid
                               for m in watcher.messages), what="call_ended")
    await wait_for(lambda: json.loads(watcher.messages[-1]).get("recogniserErrors") == before + 1,
                   what="the error in health")
    scraped = await metric_values(stack.port)
    assert scraped["upstream_errors_total"] == before + 1


async def test_a_health_subscriber_whose_outbox_is_full_is_dropped_not_waited_for():
    """The feed never waits for a subscriber: one that does not read is dropped (the server then
    closes it with 4429, as for the hub's drops); the others go on being told."""
    feed = health.HealthFeed(interval=0.01)
    stalled = Subscriber(EVERY_CALL, json_mode=True, max_queue=3)
    reading = Subscriber(EVERY_CALL, json_mode=True, max_queue=3)
    feed.add(stalled)
    feed.add(reading)
    received = []
    while len(received) < 6:
        received.append(json.loads(await asyncio.wait_for(reading.next(), 5)))
    assert stalled.dropped and stalled.dropped_event.is_set() and feed.subscribers == {reading}
    assert all(event["type"] == "health" for event in received)
    feed.discard(reading)
    assert feed._task is None  # nobody listens: no task left


async def test_call_ended_carries_reconnects_and_mixer_anomalies(stacks):
    stack = await stacks()
    watcher = await Listener(stack.url("/client"), subscribe()).start()
    await stack.wait_for_subscribers(1)
    before = await metric_values(stack.port)
    result = await run_call(stack.url("/twilio"), CallOptions(inbound=AUDIO * 3, speed=0, loss=0.2, seed=7))
    await wait_for(lambda: any('"call_ended"' in m for m in watcher.messages), what="call_ended")
    ended = json.loads(watcher.messages[-1])
    after = await metric_values(stack.port)
    assert ended["reconnects"] == 0 and result.lost
    assert set(ended["anomalies"]) == {"gaps", "reordered", "duplicates", "late", "jumps"}
    for kind, count in ended["anomalies"].items():  # the call's share of /metrics' counters
        key = f'mixer_anomalies_total{{kind="{kind}"}}'
        assert count == after.get(key, 0) - before.get(key, 0)
    assert ended["anomalies"]["gaps"] > 0


async def test_call_ended_counts_the_recogniser_reconnects_as_metrics_does(stacks):
    stack = await stacks(faults=Faults(drop_after=0.4))
    watcher = await Listener(stack.url("/client"), subscribe()).start()
    await stack.wait_for_subscribers(1)
    before = await metric_values(stack.port)
    await run_call(stack.url("/twilio"), CallOptions(inbound=AUDIO * 4, speed=1))  # 1.2 s in real time
    await wait_for(lambda: any('"call_ended"' in m for m in watcher.messages), what="call_ended")
    ended = json.loads(watcher.messages[-1])
    after = await metric_values(stack.port)
    assert ended["reconnects"] >= 1
    assert ended["reconnects"] == after["upstream_reconnects_total"] - before.get("upstream_reconnects_total", 0)
