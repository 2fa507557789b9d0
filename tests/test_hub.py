"""The subscriber hub without sockets: routing, wrapping, bounds and the subscription parser."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hub as hub_module
from hub import EVERY_CALL, BadSubscription, CallInfo, History, Hub, Subscriber, parse_subscription

INFO = CallInfo("CA1", "MZ1", "AC1", ("inbound", "outbound"), {"tenant": "acme"}, "2026-11-21T10:00:00.000+00:00")


def drain(sub: Subscriber) -> list[str | None]:
    out = []
    while sub.pending:
        out.append(sub.take())
    return out


def test_raw_subscriber_gets_messages_verbatim_then_the_end():
    hub = Hub()
    hub.open_call(INFO)
    sub = Subscriber("CA1", json_mode=False, max_queue=10)
    assert hub.subscribe(sub)
    message = '{"type":"Results","channel_index":[0,2]}'
    assert hub.publish("CA1", message) == 1
    hub.close_call("CA1", {"duration": 1.0})
    assert drain(sub) == [message, None]
    assert hub.call_sids() == [] and hub.subscriber_count() == 0


def test_json_subscriber_gets_wrapped_messages_and_lifecycle_events():
    hub = Hub()
    hub.open_call(INFO)
    sub = Subscriber("CA1", json_mode=True, max_queue=10)
    hub.subscribe(sub)
    hub.publish("CA1", '{"type":"Results","x":1}')
    hub.close_call("CA1", {"duration": 2.5})
    started, transcript, ended, end = drain(sub)
    assert json.loads(started) == {"type": "call_started", "callSid": "CA1", "streamSid": "MZ1", "accountSid": "AC1",
                                   "tracks": ["inbound", "outbound"], "customParameters": {"tenant": "acme"},
                                   "startTime": "2026-11-21T10:00:00.000+00:00", "mode": "transcription"}
    assert json.loads(transcript) == {"type": "transcript", "callSid": "CA1", "data": {"type": "Results", "x": 1}}
    assert json.loads(ended) == {"type": "call_ended", "callSid": "CA1", "duration": 2.5}
    assert end is None


def test_wildcard_sees_calls_present_and_future_and_stays_open():
    hub = Hub()
    hub.open_call(INFO)
    everything = Subscriber(EVERY_CALL, json_mode=True, max_queue=10)
    assert hub.subscribe(everything)
    hub.open_call(CallInfo("CA2", "MZ2", "AC1", ("inbound",)))
    hub.publish("CA2", "{}")
    hub.close_call("CA2", {})
    kinds = [(json.loads(m)["type"], json.loads(m)["callSid"]) for m in drain(everything)]
    assert kinds == [("call_started", "CA1"), ("call_started", "CA2"), ("transcript", "CA2"), ("call_ended", "CA2")]
    assert not everything.dropped and hub.subscriber_count() == 1


def test_unknown_call_is_refused():
    hub = Hub()
    assert not hub.subscribe(Subscriber("CAnope", json_mode=False, max_queue=10))


def test_a_full_outbox_drops_only_that_subscriber():
    hub = Hub()
    hub.open_call(INFO)
    slow = Subscriber("CA1", json_mode=False, max_queue=3)
    fast = Subscriber("CA1", json_mode=False, max_queue=100)
    hub.subscribe(slow)
    hub.subscribe(fast)
    for i in range(10):
        hub.publish("CA1", f'{{"n":{i}}}')
        drain(fast)
    assert slow.dropped and slow.dropped_event.is_set()
    assert drain(slow) == [None]  # queued messages discarded, subscription over
    assert hub.dropped_total == 1 and hub.subscriber_count() == 1
    assert not fast.dropped


def test_messages_go_out_at_once_while_the_socket_keeps_up_and_queue_in_order_otherwise():
    hub = Hub()
    hub.open_call(INFO)
    sub = Subscriber("CA1", json_mode=False, max_queue=10)
    hub.subscribe(sub)
    written, keeping_up = [], [True]

    def send_now(message: str) -> bool:
        if keeping_up[0]:
            written.append(message)
        return keeping_up[0]

    sub.send_now = send_now
    hub.publish("CA1", "m1")
    keeping_up[0] = False
    hub.publish("CA1", "m2")
    keeping_up[0] = True
    hub.publish("CA1", "m3")  # m2 is still queued: m3 must not overtake it
    assert written == ["m1"]
    assert drain(sub) == ["m2", "m3"]


def test_publish_encodes_once_for_all_json_subscribers():
    hub = Hub()
    hub.open_call(INFO)
    subs = [Subscriber("CA1", json_mode=True, max_queue=10) for _ in range(3)]
    for sub in subs:
        hub.subscribe(sub)
        drain(sub)
    hub.publish("CA1", "{}")
    messages = [drain(sub)[0] for sub in subs]
    assert messages[0] is messages[1] is messages[2]  # the same str object: encoded once


@pytest.mark.parametrize("message, expected", [
    ("CA123", ("CA123", False, False)),
    ("  CA123 \n", ("CA123", False, False)),
    (b"CA123\n", ("CA123", False, False)),
    ('{"type":"subscribe","callSid":"CA9"}', ("CA9", True, False)),
    ('{"type":"subscribe","callSid":"*"}', ("*", True, False)),
    ('{"type":"subscribe","callSid":"CA9","history":true}', ("CA9", True, True)),
    ('{"type":"subscribe","callSid":"*","history":false}', ("*", True, False)),
])
def test_parse_subscription(message, expected):
    assert parse_subscription(message) == (*expected, False, False)  # neither "recent" nor "health"


@pytest.mark.parametrize("message", [
    "", "   ", "CA1 CA2", "x" * 65, b"\xff\xfe", "{nope", '{"type":"hello","callSid":"CA1"}',
    '{"type":"subscribe"}', '{"type":"subscribe","callSid":5}', "[1]", '{"type":"subscribe","callSid":" "}',
    '{"type":"subscribe","callSid":"CA1","history":"yes"}',
])
def test_bad_subscriptions(message):
    with pytest.raises(BadSubscription):
        parse_subscription(message)


# --- history and late join ----------------------------------------------------------------------


def json_sub(call_sid: str = "CA1", *, history: bool = True, max_queue: int = 10) -> Subscriber:
    return Subscriber(call_sid, json_mode=True, max_queue=max_queue, history=history)


def test_history_is_not_counted_against_the_live_bound():
    hub = Hub()
    hub.open_call(INFO)
    for i in range(5):
        hub.publish("CA1", f'{{"n":{i}}}')
    hub.publish_event("CA1", {"type": "error", "message": "upstream hiccup"})
    late = json_sub(max_queue=2)  # 7 messages of history, a live bound of 2
    assert hub.subscribe(late)
    hub.publish("CA1", '{"n":5}')
    hub.publish("CA1", '{"n":6}')
    assert not late.dropped
    messages = [json.loads(m) for m in drain(late)]
    assert [m["type"] for m in messages] == ["call_started"] + ["transcript"] * 5 + ["error"] + ["transcript"] * 2
    assert [m["data"]["n"] for m in messages if m["type"] == "transcript"] == list(range(7))
    hub.publish("CA1", '{"n":7}')
    hub.publish("CA1", '{"n":8}')
    hub.publish("CA1", '{"n":9}')  # now the live bound applies
    assert late.dropped


def test_history_replay_is_exactly_what_an_early_subscriber_received():
    hub = Hub()
    hub.open_call(INFO)
    early = json_sub(history=False, max_queue=1000)
    hub.subscribe(early)
    received_early = []
    late = None
    for i in range(50):
        hub.publish("CA1", f'{{"n":{i}}}')
        if i == 20:
            late = json_sub(max_queue=1000)
            hub.subscribe(late)
        received_early += drain(early)
    hub.close_call("CA1", {"duration": 1.0})
    received_early += drain(early)
    assert drain(late) == received_early  # same messages, same order, none twice, then the end
    assert received_early[-1] is None and json.loads(received_early[0])["type"] == "call_started"


def test_an_ended_call_can_be_replayed_within_the_window_and_not_after(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("hub.time.monotonic", lambda: clock[0])
    hub = Hub(history_seconds=60)
    hub.open_call(INFO)
    hub.publish("CA1", '{"n":1}')
    hub.close_call("CA1", {"duration": 1.0})
    assert not hub.has_call("CA1") and hub.call_sids() == []
    assert not hub.subscribe(json_sub(history=False))  # without history: not in progress, refused
    clock[0] += 59
    replay = json_sub()
    assert hub.subscribe(replay)
    kinds = [json.loads(m)["type"] if m else None for m in drain(replay)]
    assert kinds == ["call_started", "transcript", "call_ended", None]
    clock[0] += 2
    assert not hub.subscribe(json_sub())


def test_history_keeps_the_last_messages_and_says_how_many_it_left_out():
    hub = Hub(history_messages=3)
    hub.open_call(INFO)
    for i in range(10):
        hub.publish("CA1", f'{{"n":{i}}}')
    sub = json_sub()
    hub.subscribe(sub)
    messages = [json.loads(m) for m in drain(sub)]
    assert messages[0]["type"] == "call_started"
    assert messages[1] == {"type": "history_truncated", "callSid": "CA1", "omitted": 7}
    assert [m["data"]["n"] for m in messages[2:]] == [7, 8, 9]


def test_wildcard_with_history_gets_each_call_in_progress_from_its_start():
    hub = Hub()
    hub.open_call(INFO)
    hub.publish("CA1", '{"n":1}')
    hub.open_call(CallInfo("CA2", "MZ2", "AC1", ("inbound",)))
    hub.publish("CA2", '{"n":2}')
    everything = json_sub(EVERY_CALL)
    hub.subscribe(everything)
    got = [(json.loads(m)["type"], json.loads(m)["callSid"]) for m in drain(everything)]
    assert got == [("call_started", "CA1"), ("transcript", "CA1"), ("call_started", "CA2"), ("transcript", "CA2")]


def test_a_reused_callsid_starts_a_new_history():
    hub = Hub()
    hub.open_call(INFO)
    hub.publish("CA1", '{"n":"old"}')
    hub.close_call("CA1", {})
    hub.open_call(INFO)
    sub = json_sub()
    hub.subscribe(sub)
    assert [json.loads(m)["type"] for m in drain(sub)] == ["call_started"]


def test_history_off_with_zero_messages():
    hub = Hub(history_messages=0)
    hub.open_call(INFO)
    hub.publish("CA1", '{"n":1}')
    sub = json_sub()
    hub.subscribe(sub)
    assert [json.loads(m)["type"] for m in drain(sub)] == ["call_started"]
    hub.close_call("CA1", {})
    assert not hub.subscribe(json_sub())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=30), max_size=400), st.integers(1, 300))
def test_history_keeps_exactly_the_last_messages_whatever_the_blocks(texts, bound):
    """Compressed in blocks, trimmed one message at a time: what is kept is exactly the last `bound`."""
    history = History("CA1", '{"type":"call_started"}', bound)
    messages = [json.dumps({"n": i, "text": t}) for i, t in enumerate(texts)]
    for message in messages:
        history.add(message)
    assert history.messages == messages[-bound:]
    assert history.omitted == max(0, len(messages) - bound)


def test_a_burst_of_ended_calls_keeps_only_the_newest_histories(monkeypatch):
    monkeypatch.setattr(hub_module, "MAX_ENDED_HISTORIES", 3)
    hub = Hub()
    for i in range(5):
        hub.open_call(CallInfo(f"CA{i}", f"MZ{i}", "AC1", ("inbound",)))
        hub.publish(f"CA{i}", '{"n":1}')
        hub.close_call(f"CA{i}", {})
    assert [json.loads(started)["callSid"] for started, _ in hub.ended_calls()] == ["CA2", "CA3", "CA4"]
