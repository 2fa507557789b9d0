"""The subscriber hub without sockets: routing, wrapping, bounds and the subscription parser."""

from __future__ import annotations

import json

import pytest

from hub import EVERY_CALL, BadSubscription, CallInfo, Hub, Subscriber, parse_subscription

INFO = CallInfo("CA1", "MZ1", "AC1", ("inbound", "outbound"), {"tenant": "acme"}, "2026-11-21T10:00:00.000+00:00")


def drain(sub: Subscriber) -> list[str | None]:
    out = []
    while sub.pending:
        out.append(sub._outbox.popleft())
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
    ("CA123", ("CA123", False)),
    ("  CA123 \n", ("CA123", False)),
    (b"CA123\n", ("CA123", False)),
    ('{"type":"subscribe","callSid":"CA9"}', ("CA9", True)),
    ('{"type":"subscribe","callSid":"*"}', ("*", True)),
])
def test_parse_subscription(message, expected):
    assert parse_subscription(message) == expected


@pytest.mark.parametrize("message", [
    "", "   ", "CA1 CA2", "x" * 65, b"\xff\xfe", "{nope", '{"type":"hello","callSid":"CA1"}',
    '{"type":"subscribe"}', '{"type":"subscribe","callSid":5}', "[1]", '{"type":"subscribe","callSid":" "}',
])
def test_bad_subscriptions(message):
    with pytest.raises(BadSubscription):
        parse_subscription(message)
