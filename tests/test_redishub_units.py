"""The Redis hub's pure parts without Redis: stream ids, repeat and loss accounting, the registry
mirror, and the publisher's bound (its queue when Redis does not answer)."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from hub import CallInfo
from redishub.entries import END, MSG, START, Entry, SegmentTracker, id_before, parse_id
from redishub.registry import Change, Registry


@given(st.integers(0, 2**40), st.integers(0, 2**64 - 1))
def test_id_before_is_the_largest_id_below(ms, seq):
    entry_id = f"{ms}-{seq}"
    before = id_before(entry_id)
    if (ms, seq) == (0, 0):
        assert before == "0-0"
    else:
        assert parse_id(before) < parse_id(entry_id)
        b_ms, b_seq = parse_id(before)
        assert (b_ms, b_seq + 1) == (ms, seq) or (b_seq == 2**64 - 1 and b_ms + 1 == ms and seq == 0)


@st.composite
def published_stream(draw):
    """What a stream holds after a publisher sent entries 0..n-1 of one segment: some never
    published (REDIS_BUFFER full, or lost by Redis), batches whose reply was lost sent again."""
    n = draw(st.integers(1, 120))
    dropped = draw(st.sets(st.integers(0, n - 1)))
    kept = [i for i in range(n) if i not in dropped]
    stream, i = [], 0
    while i < len(kept):
        size = draw(st.integers(1, 10))
        batch = kept[i:i + size]
        if draw(st.booleans()):  # the reply was lost after Redis applied part of the batch: all of it again
            stream += batch[:draw(st.integers(0, len(batch)))]
        stream += batch
        i += size
    return kept, stream


@given(published_stream())
def test_a_reader_delivers_each_entry_once_in_order_and_counts_exactly_what_never_arrived(case):
    kept, stream = case
    tracker = SegmentTracker()
    delivered = [n for n in stream if tracker.accept(Entry("1-0", "A", 1, n, MSG, ""))]
    assert delivered == kept
    assert tracker.missed == (kept[-1] - kept[0] + 1 - len(kept) if kept else 0)
    assert tracker.repeats == len(stream) - len(kept)


def test_segments_are_counted_apart():
    tracker = SegmentTracker()
    for origin, segment, n in [("A", 1, 0), ("B", 1, 0), ("A", 1, 1), ("A", 2, 0), ("B", 1, 3)]:
        assert tracker.accept(Entry("1-1", origin, segment, n, MSG, ""))
    assert tracker.missed == 2 and tracker.repeats == 0


def started(sid: str, stream_sid: str = "MZ1", when: str = "2026-01-01T00:00:00.000+00:00") -> str:
    return CallInfo(sid, stream_sid, "AC1", ("inbound",), {}, when).event()


def lifecycle(kind: str, sid: str, origin: str, segment: int = 1, public: bool = True, entry: str = "5-0") -> dict:
    data = started(sid) if kind == START else json.dumps({"type": "call_ended", "callSid": sid})
    return {"k": kind, "c": sid, "o": origin, "g": str(segment), "p": "1" if public else "0", "i": entry, "d": data}


def test_registry_follows_segments_and_keeps_ended_calls_for_the_history_window():
    r = Registry("me", history_seconds=60, dead_after=3)
    assert r.lifecycle(lifecycle(START, "CA1", "A", entry="7-0"), now=0) == [Change("segment", "CA1", ("A", 1), "7-0")]
    assert r.lifecycle(lifecycle(START, "CA1", "A", entry="7-0"), now=0) == []  # a repeat changes nothing
    assert r.lifecycle(lifecycle(START, "CA1", "B", public=False, entry="9-0"), now=1)[0].owner == ("B", 1)
    assert set(r.remote_owners("CA1")) == {("A", 1), ("B", 1)}
    assert r.lifecycle(lifecycle(END, "CA1", "A", public=False), now=2) == []
    assert set(r.remote_owners("CA1")) == {("B", 1)}
    assert r.lifecycle(lifecycle(END, "CA1", "B"), now=3) == [Change("ended", "CA1")]
    assert "CA1" not in r.calls
    assert r.ended_call("CA1", now=62)[0] == started("CA1")
    assert r.ended_call("CA1", now=64) is None


def owned(sid: str, segment: int = 1, entry: str = "5-0") -> dict[str, str]:
    return {sid: json.dumps({"g": segment, "i": entry, "d": started(sid)})}


def test_snapshots_add_what_lifecycle_entries_missed_and_drop_dead_instances_after_the_grace():
    r = Registry("me", history_seconds=60, dead_after=3)
    r.grace(now=0)
    changes = r.snapshot([("A", True, owned("CA1")), ("B", True, owned("CA2")), ("me", True, {})], now=0)
    assert sorted(c.call_sid for c in changes) == ["CA1", "CA2"]
    # B stops answering: nothing is declared gone during the grace after a reconnect...
    assert r.snapshot([("A", True, owned("CA1")), ("B", False, owned("CA2"))], now=2) == []
    assert r.dead_instances(now=2) == []
    # ...then it is, at the first snapshot that finds its key gone.
    assert r.snapshot([("A", True, owned("CA1")), ("B", False, owned("CA2"))], now=3.5) == [Change("vanished", "CA2")]
    assert r.dead_instances(now=3.5) == ["B"]
    # A live instance that no longer lists a segment (a restarted Redis lost the end): gone too.
    assert r.snapshot([("A", True, {})], now=4) == [Change("vanished", "CA1")]
    assert r.calls == {}


def test_own_segments_are_not_remote_and_never_vanish():
    r = Registry("me", history_seconds=60, dead_after=3)
    r.lifecycle(lifecycle(START, "CA1", "me"), now=0)
    assert r.remote_owners("CA1") == {}
    assert r.snapshot([], now=10) == []
    assert "CA1" in r.calls


async def test_the_publisher_queue_is_bounded_and_counts_what_it_could_not_keep():
    import metrics
    from redis.asyncio import Redis

    from redishub.entries import Keys
    from redishub.publisher import Publisher

    client = Redis.from_url("redis://127.0.0.1:9/0")  # never contacted: nothing runs the queue here
    publisher = Publisher(client, Keys(), "me", buffer=3, history_messages=10, history_seconds=1, heartbeat=1,
                          location="redis://127.0.0.1:9/0")
    dropped = metrics.redis_publish_dropped_total.labels("add")
    before = dropped._value.get()
    publisher.open("CA1", 1, started("CA1"), True)
    for n in range(1, 6):
        publisher.message("CA1", 1, n, MSG, "{}")
    assert len(publisher.queue) == 3 and dropped._value.get() - before == 3
    publisher.close("CA1", 1, 6, "{}", True)  # starts and ends may use twice the bound
    assert len(publisher.queue) == 4 and [op[0] for op in publisher.queue] == ["open", "add", "add", "close"]
    await client.aclose()


async def test_entries_not_written_by_this_code_are_skipped_counted_and_the_rest_delivered(tmp_path):
    """Two hubs in one process against a real redis-server; junk lands in a call's stream."""
    import asyncio

    import metrics
    from cluster import RedisServer
    from config import Settings
    from hub import Subscriber
    from redishub import RedisHub

    redis = RedisServer(tmp_path).start()
    try:
        settings = Settings(redis_url=redis.url, redis_heartbeat_seconds=0.3)
        a, b = RedisHub(settings, instance="A"), RedisHub(settings, instance="B")
        await a.start()
        await b.start()
        a.open_call(CallInfo("CA1", "MZ1", "AC1", ("inbound",), {}, "2026-01-01T00:00:00.000+00:00"))
        for _ in range(100):
            if b.has_call("CA1"):
                break
            await asyncio.sleep(0.02)
        sub = Subscriber("CA1", json_mode=False, max_queue=100)
        assert b.subscribe(sub)
        await asyncio.sleep(0.3)  # its stream position is known
        bad = metrics.redis_errors_total.labels("bad_entry")
        before = bad._value.get()
        a.publish("CA1", '{"n":1}')
        await asyncio.sleep(0.1)
        await a.redis.xadd(a.keys.call("CA1"), {"not": "ours"})
        await a.redis.xadd(a.keys.call("CA1"), {"o": "Z", "g": "x", "n": "1", "k": "msg", "d": "{}"})
        a.publish("CA1", '{"n":2}')
        a.close_call("CA1", {})
        for _ in range(100):
            if sub.pending and sub._outbox[-1] is None:
                break
            await asyncio.sleep(0.02)
        assert [sub.take() for _ in range(sub.pending)] == ['{"n":1}', '{"n":2}', None]
        assert bad._value.get() - before == 2
        await a.aclose()
        await b.aclose()
    finally:
        redis.stop()
