"""The subscriber hub: who listens to which call, and one bounded outbox per listener.

This is the "watch" pattern of the `websockets` tutorial with backpressure added: the hub never
awaits. Publishing a message hands the same `str` (encoded once) to each subscriber: written at
once when that subscriber's writer is idle and its socket keeps up (`Subscriber.send_now`, set
by `server.py`), else put in its outbox for its own writer task to send. A subscriber whose
outbox reaches its bound is dropped on the spot: the call and the other subscribers never wait.

Two kinds of subscription share the same machinery:
- *raw* (the tutorial's protocol): Deepgram's messages verbatim; the outbox ends after the call's
  last message and the socket is closed with 1000.
- *json* (for programs): messages wrapped as {"type":"transcript","callSid":…,"data":…}, plus
  `call_started` / `call_ended` events; a subscription to "*" receives every call, present and
  future, and stays open between calls.

All methods are plain functions called on the event loop, so no lock is needed anywhere.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Callable

log = logging.getLogger(__name__)

EVERY_CALL = "*"


@dataclass(frozen=True)
class CallInfo:
    """What a JSON subscriber learns in `call_started`."""

    callSid: str
    streamSid: str
    accountSid: str
    tracks: tuple[str, ...]
    customParameters: dict[str, str] = field(default_factory=dict)
    startTime: str = ""  # ISO 8601, UTC
    mode: str = "transcription"  # or "agent" (a voice agent on /agent)
    provider: str = ""  # an agent call's provider ("deepgram", "embedded", ...)

    def event(self) -> str:
        fields = asdict(self)
        if not fields["provider"]:
            del fields["provider"]
        return json.dumps({"type": "call_started", **fields})


class Subscriber:
    """One /client connection's subscription and its bounded outbox.

    `offer()` never blocks; `next()` is awaited by the connection's writer task and returns
    None once the subscription is over (call ended, server stopping, or dropped as too slow).
    """

    def __init__(self, call_sid: str, *, json_mode: bool, max_queue: int, peer: str = ""):
        self.call_sid = call_sid
        self.json_mode = json_mode
        self.peer = peer
        self.max_queue = max_queue
        self.dropped = False  # fell behind past max_queue
        self._outbox: deque[str | None] = deque()
        self._ready = asyncio.Event()
        self.dropped_event = asyncio.Event()  # lets the connection close at once, even mid-send
        # Set by the connection's writer while it waits for a message: writes one now if the
        # socket keeps up, returning False if not. Saves a task wake-up per message.
        self.send_now: Callable[[str], bool] | None = None

    def offer(self, message: str) -> bool:
        """Send or queue a message; False (and nothing queued) if the outbox is full."""
        if not self._outbox and self.send_now is not None and self.send_now(message):
            return True
        if len(self._outbox) >= self.max_queue:
            return False
        self._outbox.append(message)
        self._ready.set()
        return True

    def finish(self) -> None:
        """No more messages: `next()` returns None once the outbox is empty."""
        self._outbox.append(None)
        self._ready.set()

    def drop(self) -> None:
        """Too slow: discard what is queued and end the subscription now."""
        self.dropped = True
        self._outbox.clear()
        self.finish()
        self.dropped_event.set()

    async def next(self) -> str | None:
        while not self._outbox:
            self._ready.clear()
            await self._ready.wait()
        return self._outbox.popleft()

    @property
    def pending(self) -> int:
        return len(self._outbox)


class Hub:
    def __init__(self) -> None:
        self._calls: dict[str, CallInfo] = {}
        self._subscribers: dict[str, set[Subscriber]] = {}
        self._everything: set[Subscriber] = set()
        self.dropped_total = 0

    # --- calls ---------------------------------------------------------------------------

    def call_sids(self) -> list[str]:
        """Calls in progress, oldest first."""
        return list(self._calls)

    def has_call(self, call_sid: str) -> bool:
        return call_sid in self._calls

    def open_call(self, info: CallInfo) -> None:
        self._calls[info.callSid] = info
        self._subscribers.setdefault(info.callSid, set())
        self._deliver(list(self._everything), json_message=info.event())

    def publish(self, call_sid: str, message: str) -> int:
        """Deliver one upstream message (already-valid JSON text) to the call's subscribers.

        Returns how many subscribers it was queued for.
        """
        listeners = [*self._subscribers.get(call_sid, ()), *self._everything]
        if not listeners:
            return 0
        wrapped = None
        if any(s.json_mode for s in listeners):
            wrapped = '{"type":"transcript","callSid":%s,"data":%s}' % (json.dumps(call_sid), message)
        return self._deliver(listeners, raw_message=message, json_message=wrapped)

    def publish_event(self, call_sid: str, event: dict) -> int:
        """An event for JSON subscribers only (raw subscribers get Deepgram's messages alone)."""
        listeners = [*self._subscribers.get(call_sid, ()), *self._everything]
        event = {"type": event["type"], "callSid": call_sid, **event}
        return self._deliver(listeners, json_message=json.dumps(event))

    def close_call(self, call_sid: str, summary: dict) -> None:
        """The call is over and its last message was published: end its subscriptions."""
        self.publish_event(call_sid, {"type": "call_ended", **summary})
        self._calls.pop(call_sid, None)
        for sub in self._subscribers.pop(call_sid, set()):
            sub.finish()

    # --- subscribers ---------------------------------------------------------------------

    def subscribe(self, sub: Subscriber) -> bool:
        """Add a subscriber; False if it asked for a call that is not in progress."""
        if sub.call_sid == EVERY_CALL:
            self._everything.add(sub)
            for info in self._calls.values():
                sub.offer(info.event())
            return True
        if sub.call_sid not in self._calls:
            return False
        self._subscribers[sub.call_sid].add(sub)
        if sub.json_mode:
            sub.offer(self._calls[sub.call_sid].event())
        return True

    def unsubscribe(self, sub: Subscriber) -> None:
        self._everything.discard(sub)
        subs = self._subscribers.get(sub.call_sid)
        if subs is not None:
            subs.discard(sub)

    def subscriber_count(self, call_sid: str | None = None) -> int:
        """All subscribers, or those of one call (wildcard subscribers not included)."""
        if call_sid is not None:
            return len(self._subscribers.get(call_sid, ()))
        return len(self._everything) + sum(len(s) for s in self._subscribers.values())

    def shutdown(self) -> None:
        """Server stopping: end every remaining subscription once its outbox is drained."""
        for sub in [*self._everything, *(s for subs in self._subscribers.values() for s in subs)]:
            sub.finish()
        self._everything.clear()
        self._subscribers.clear()

    def _deliver(self, listeners: list[Subscriber], *, raw_message: str | None = None,
                 json_message: str | None = None) -> int:
        queued = 0
        for sub in listeners:
            message = json_message if sub.json_mode else raw_message
            if message is None:
                continue
            if sub.offer(message):
                queued += 1
            else:
                self.dropped_total += 1
                log.warning(
                    "subscriber %s to %s dropped: %d messages queued and not read",
                    sub.peer, sub.call_sid, sub.max_queue,
                )
                self.unsubscribe(sub)
                sub.drop()
        return queued


class BadSubscription(ValueError):
    pass


def parse_subscription(message: str | bytes) -> tuple[str, bool]:
    """A subscriber's first message -> (callSid or "*", json_mode).

    Raw mode (the tutorial's protocol): the message is a callSid, whitespace trimmed.
    JSON mode: {"type":"subscribe","callSid":"CA…"} or {"type":"subscribe","callSid":"*"}.
    """
    if isinstance(message, bytes):
        try:
            message = message.decode("utf-8")
        except UnicodeDecodeError:
            raise BadSubscription("subscription is not UTF-8 text") from None
    text = message.strip()
    if not text.startswith(("{", "[")):
        if not text or len(text) > 64 or any(c.isspace() for c in text):
            raise BadSubscription("send one callSid, or a JSON subscribe message")
        return text, False
    try:
        request = json.loads(text)
    except ValueError:
        raise BadSubscription("subscribe message is not valid JSON") from None
    if not isinstance(request, dict):
        raise BadSubscription('expected {"type":"subscribe","callSid":"CA…" or "*"}')
    call_sid = request.get("callSid")
    if request.get("type") != "subscribe" or not isinstance(call_sid, str) or not call_sid.strip():
        raise BadSubscription('expected {"type":"subscribe","callSid":"CA…" or "*"}')
    return call_sid.strip(), True
