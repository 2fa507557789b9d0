"""Twilio Media Streams messages, parsed into typed events (protocols.md A.2).

Pure functions, no sockets: `parse_event(text)` returns one of the dataclasses below or raises
`BadEvent`, whose `kind` is a short label used as a counter name ("malformed_json",
"missing_field", "bad_base64", ...). The caller counts it, logs it and carries on with the call.

Twilio sends numbers as strings (`sequenceNumber`, `chunk`, `timestamp`); we accept both strings
and integers, because being strict about that would drop audio for no gain.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass, field

import orjson

TRACKS = ("inbound", "outbound")

# A call longer than a day is not a call; such a timestamp is corrupt input.
MAX_TIMESTAMP_MS = 24 * 3600 * 1000


class BadEvent(ValueError):
    """A message we cannot use. `kind` names the problem for counters; str() explains it."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


@dataclass(frozen=True)
class Connected:
    protocol: str
    version: str


@dataclass(frozen=True)
class MediaFormat:
    encoding: str
    sampleRate: int
    channels: int


@dataclass(frozen=True)
class Start:
    sequenceNumber: int
    streamSid: str
    accountSid: str
    callSid: str
    tracks: tuple[str, ...]
    customParameters: dict[str, str] = field(default_factory=dict)
    mediaFormat: MediaFormat | None = None


@dataclass(slots=True)  # not frozen: one is built per 20 ms chunk per leg, and frozen __init__ costs 4x
class Media:
    sequenceNumber: int
    streamSid: str
    track: str
    chunk: int
    timestamp: int
    payload: bytes


@dataclass(frozen=True)
class Stop:
    sequenceNumber: int
    streamSid: str
    accountSid: str
    callSid: str


@dataclass(frozen=True)
class Mark:
    sequenceNumber: int
    streamSid: str
    name: str


@dataclass(frozen=True)
class Dtmf:
    sequenceNumber: int
    streamSid: str
    track: str
    digit: str


@dataclass(frozen=True)
class Unknown:
    """An event name we do not handle; Twilio may add new ones, so it is not an error."""

    event: str


Event = Connected | Start | Media | Stop | Mark | Dtmf | Unknown


def _object(parent: dict, key: str) -> dict:
    value = parent.get(key)
    if not isinstance(value, dict):
        raise BadEvent("missing_field" if value is None else "wrong_type", f"'{key}' must be an object")
    return value


def _string(parent: dict, key: str) -> str:
    value = parent.get(key)
    if not isinstance(value, str):
        raise BadEvent("missing_field" if value is None else "wrong_type", f"'{key}' must be a string")
    return value


def _integer(parent: dict, key: str) -> int:
    """A non-negative integer sent as a string ("42") or, leniently, as a JSON number."""
    value = parent.get(key)
    if value is None:
        raise BadEvent("missing_field", f"'{key}' is missing")
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise BadEvent("bad_number", f"'{key}' must be a non-negative integer, got {value!r:.40}")


def _parse_start(message: dict) -> Start:
    start = _object(message, "start")
    tracks = start.get("tracks", ["inbound"])
    if not isinstance(tracks, list) or not tracks or any(t not in TRACKS for t in tracks):
        raise BadEvent("bad_track", f"'start.tracks' must list 'inbound'/'outbound', got {tracks!r:.80}")
    params = start.get("customParameters")
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise BadEvent("wrong_type", "'start.customParameters' must be an object")
    media_format = None
    fmt = start.get("mediaFormat")
    if isinstance(fmt, dict):
        encoding = fmt.get("encoding", "audio/x-mulaw")
        rate = fmt.get("sampleRate", 8000)
        channels = fmt.get("channels", 1)
        if encoding != "audio/x-mulaw" or rate != 8000 or channels != 1:
            raise BadEvent(
                "bad_media_format",
                f"only 8 kHz mono mu-law is supported, got {encoding!r} {rate!r} Hz x{channels!r}",
            )
        media_format = MediaFormat(encoding, rate, channels)
    return Start(
        sequenceNumber=_integer(message, "sequenceNumber"),
        streamSid=_string(start, "streamSid") if "streamSid" in start else _string(message, "streamSid"),
        accountSid=_string(start, "accountSid"),
        callSid=_string(start, "callSid"),
        tracks=tuple(dict.fromkeys(tracks)),
        customParameters={str(k): str(v) for k, v in params.items()},
        mediaFormat=media_format,
    )


def _parse_media(message: dict) -> Media:
    media = _object(message, "media")
    track = media.get("track")
    if track not in TRACKS:
        raise BadEvent("bad_track", f"'media.track' must be 'inbound' or 'outbound', got {track!r:.40}")
    timestamp = _integer(media, "timestamp")
    if timestamp > MAX_TIMESTAMP_MS:
        raise BadEvent("bad_timestamp", f"'media.timestamp' {timestamp} is beyond a day")
    payload = _string(media, "payload")
    try:
        audio = binascii.a2b_base64(payload, strict_mode=True)
    except ValueError as exc:  # binascii.Error, or non-ASCII text
        raise BadEvent("bad_base64", f"'media.payload' is not base64: {exc}") from None
    return Media(
        sequenceNumber=_integer(message, "sequenceNumber"),
        streamSid=_string(message, "streamSid"),
        track=track,
        chunk=_integer(media, "chunk"),
        timestamp=timestamp,
        payload=audio,
    )


def _parse_stop(message: dict) -> Stop:
    stop = message.get("stop")
    stop = stop if isinstance(stop, dict) else {}
    return Stop(
        sequenceNumber=_integer(message, "sequenceNumber"),
        streamSid=_string(message, "streamSid"),
        accountSid=str(stop.get("accountSid", "")),
        callSid=str(stop.get("callSid", "")),
    )


def _parse_mark(message: dict) -> Mark:
    return Mark(
        sequenceNumber=_integer(message, "sequenceNumber"),
        streamSid=_string(message, "streamSid"),
        name=_string(_object(message, "mark"), "name"),
    )


def _parse_dtmf(message: dict) -> Dtmf:
    dtmf = _object(message, "dtmf")
    return Dtmf(
        sequenceNumber=_integer(message, "sequenceNumber"),
        streamSid=_string(message, "streamSid"),
        track=_string(dtmf, "track"),
        digit=_string(dtmf, "digit"),
    )


def parse_event(text: str | bytes) -> Event:
    """Parse one Twilio websocket message. Raises `BadEvent` for anything unusable."""
    try:
        message = orjson.loads(text)  # about 3x faster than json.loads on a media message
    except ValueError as exc:  # orjson.JSONDecodeError, including text that is not UTF-8
        raise BadEvent("malformed_json", f"not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise BadEvent("not_object", "a Twilio message must be a JSON object")
    event = message.get("event")
    if event == "media":  # by far the most frequent: test it first
        return _parse_media(message)
    if event == "start":
        return _parse_start(message)
    if event == "stop":
        return _parse_stop(message)
    if event == "connected":
        return Connected(protocol=str(message.get("protocol", "")), version=str(message.get("version", "")))
    if event == "mark":
        return _parse_mark(message)
    if event == "dtmf":
        return _parse_dtmf(message)
    if isinstance(event, str):
        return Unknown(event=event[:64])
    raise BadEvent("missing_field", "'event' must be a string")
