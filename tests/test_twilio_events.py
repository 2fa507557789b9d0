"""Every Twilio event, and each kind of bad field (protocols.md A.2). No sockets."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twilio_events import (
    BadEvent, Connected, Dtmf, Mark, Media, Start, Stop, Unknown, parse_event,
)

START = {
    "event": "start", "sequenceNumber": "1", "streamSid": "MZ00aa",
    "start": {
        "accountSid": "AC00aa", "streamSid": "MZ00aa", "callSid": "CA00aa",
        "tracks": ["inbound", "outbound"], "customParameters": {"tenant": "acme"},
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    },
}


def media(**overrides) -> dict:
    body = {"track": "inbound", "chunk": "21", "timestamp": "400", "payload": "/////w=="}
    body.update(overrides)
    return {"event": "media", "sequenceNumber": "42", "streamSid": "MZ00aa", "media": body}


def test_connected():
    assert parse_event('{"event":"connected","protocol":"Call","version":"1.0.0"}') == Connected("Call", "1.0.0")


def test_start_with_string_numbers_tracks_and_custom_parameters():
    event = parse_event(json.dumps(START))
    assert isinstance(event, Start)
    assert (event.sequenceNumber, event.callSid, event.streamSid, event.accountSid) == (1, "CA00aa", "MZ00aa", "AC00aa")
    assert event.tracks == ("inbound", "outbound")
    assert event.customParameters == {"tenant": "acme"}
    assert event.mediaFormat.sampleRate == 8000


def test_one_legged_start_and_default_tracks():
    one = json.loads(json.dumps(START))
    one["start"]["tracks"] = ["outbound"]
    assert parse_event(json.dumps(one)).tracks == ("outbound",)
    del one["start"]["tracks"]
    assert parse_event(json.dumps(one)).tracks == ("inbound",)


def test_media_numbers_are_strings_and_payload_is_decoded():
    event = parse_event(json.dumps(media()))
    assert event == Media(42, "MZ00aa", "inbound", 21, 400, b"\xff\xff\xff\xff")


def test_media_accepts_json_integers_too():
    event = parse_event(json.dumps(media(chunk=3, timestamp=60)))
    assert (event.chunk, event.timestamp) == (3, 60)


def test_stop():
    event = parse_event('{"event":"stop","sequenceNumber":"913","streamSid":"MZ00aa",'
                        '"stop":{"accountSid":"AC00aa","callSid":"CA00aa"}}')
    assert event == Stop(913, "MZ00aa", "AC00aa", "CA00aa")


def test_mark_dtmf_and_unknown_events():
    assert parse_event('{"event":"mark","sequenceNumber":"5","streamSid":"MZ","mark":{"name":"m1"}}') == Mark(5, "MZ", "m1")
    assert parse_event('{"event":"dtmf","sequenceNumber":"77","streamSid":"MZ00aa",'
                       '"dtmf":{"track":"inbound_track","digit":"5"}}') == Dtmf(77, "MZ00aa", "inbound_track", "5")
    assert parse_event('{"event":"clear-all","streamSid":"MZ"}') == Unknown("clear-all")


@pytest.mark.parametrize("text, kind", [
    ("{not json", "malformed_json"),
    (b"\xff\xfe", "malformed_json"),
    ("[1, 2]", "not_object"),
    ('{"streamSid":"MZ"}', "missing_field"),
    ('{"event": 7}', "missing_field"),
    (json.dumps({"event": "media", "sequenceNumber": "1", "streamSid": "MZ"}), "missing_field"),
    (json.dumps({"event": "media", "sequenceNumber": "1", "streamSid": "MZ", "media": "x"}), "wrong_type"),
    (json.dumps(media(track="inbound_track")), "bad_track"),
    (json.dumps(media(track=None)), "bad_track"),
    (json.dumps(media(payload="not base64!")), "bad_base64"),
    (json.dumps(media(payload="/////w=")), "bad_base64"),
    (json.dumps(media(payload=12)), "wrong_type"),
    (json.dumps(media(timestamp="-20")), "bad_number"),
    (json.dumps(media(timestamp=-20)), "bad_number"),
    (json.dumps(media(timestamp="1e3")), "bad_number"),
    (json.dumps(media(timestamp=True)), "bad_number"),
    (json.dumps(media(timestamp=str(25 * 3600 * 1000))), "bad_timestamp"),
    (json.dumps(media(chunk="٣")), "bad_number"),  # a non-ASCII digit: int() would take it
    (json.dumps(media(timestamp=None)), "missing_field"),
    (json.dumps({**START, "start": {**START["start"], "tracks": ["both"]}}), "bad_track"),
    (json.dumps({**START, "start": {**START["start"], "tracks": "inbound"}}), "bad_track"),
    (json.dumps({**START, "start": {**START["start"], "callSid": 5}}), "wrong_type"),
    (json.dumps({**START, "start": {**START["start"], "customParameters": []}}), "wrong_type"),
    (json.dumps({**START, "start": {**START["start"], "mediaFormat": {"encoding": "audio/l16", "sampleRate": 16000}}}),
     "bad_media_format"),
    ('{"event":"mark","sequenceNumber":"5","streamSid":"MZ"}', "missing_field"),
])
def test_bad_messages_raise_bad_event_with_a_kind(text, kind):
    with pytest.raises(BadEvent) as caught:
        parse_event(text)
    assert caught.value.kind == kind
    assert str(caught.value)  # a human-readable reason for the log line


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.text(max_size=300),
    st.binary(max_size=300),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
        max_leaves=20,
    ).map(json.dumps),
))
def test_random_input_either_parses_or_raises_bad_event(text):
    try:
        parse_event(text)
    except BadEvent:
        pass


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(
    st.sampled_from(["track", "chunk", "timestamp", "payload", "extra"]),
    st.one_of(st.none(), st.integers(-5, 10**12), st.text(max_size=12), st.booleans(),
              st.binary(max_size=12).map(lambda b: base64.b64encode(b).decode())),
))
def test_mutated_media_fields_never_escape_as_other_exceptions(fields):
    try:
        event = parse_event(json.dumps(media(**fields)))
    except BadEvent:
        return
    assert isinstance(event, Media) and event.track in ("inbound", "outbound") and event.timestamp >= 0
