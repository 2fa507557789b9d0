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

Late join: a JSON subscription with `"history": true` first receives what JSON subscribers of
that call have received so far (kept per call, bounded by HISTORY_MESSAGES, and for
HISTORY_SECONDS after the call ended), then the live messages. Both happen in the same step on
the event loop, so nothing falls between them and nothing comes twice.

All methods are plain functions called on the event loop, so no lock is needed anywhere.

`FanOut` is the interface calls and the /client handler use. `Hub` is the in-process
implementation (one server process); `redishub.RedisHub` implements it across processes and
machines through Redis, and keeps a `Hub` inside for its own calls.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import zlib
from array import array
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from typing import Callable, NamedTuple, Protocol

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

    def __init__(self, call_sid: str, *, json_mode: bool, max_queue: int, peer: str = "",
                 history: bool = False):
        self.call_sid = call_sid
        self.json_mode = json_mode
        self.history = history  # JSON mode only: the call's messages so far come first
        self.peer = peer
        self.max_queue = max_queue
        self.dropped = False  # fell behind past max_queue
        self.lost = False  # the call vanished with the server carrying it (redishub)
        self._outbox: deque[str | None] = deque()
        self._backlog = 0  # history messages still at the front of the outbox (not counted in max_queue)
        # callSids whose call_started this subscriber has had (redishub: once, whichever path brings it)
        self.announced: set[str] = set()
        self._ready = asyncio.Event()
        self.dropped_event = asyncio.Event()  # lets the connection close at once, even mid-send
        # Set by the connection's writer while it waits for a message: writes one now if the
        # socket keeps up, returning False if not. Saves a task wake-up per message.
        self.send_now: Callable[[str], bool] | None = None

    def offer(self, message: str) -> bool:
        """Send or queue a message; False (and nothing queued) if the outbox is full."""
        if not self._outbox and self.send_now is not None and self.send_now(message):
            return True
        if len(self._outbox) - self._backlog >= self.max_queue:
            return False
        self._outbox.append(message)
        self._ready.set()
        return True

    def preload(self, messages: list[str]) -> None:
        """Queue a call's history: bounded by HISTORY_MESSAGES, so outside the live bound."""
        self._outbox.extend(messages)
        self._backlog += len(messages)
        self._ready.set()

    def finish(self) -> None:
        """No more messages: `next()` returns None once the outbox is empty."""
        self._outbox.append(None)
        self._ready.set()

    def drop(self) -> None:
        """Too slow: discard what is queued and end the subscription now."""
        self.dropped = True
        self._outbox.clear()
        self._backlog = 0
        self.finish()
        self.dropped_event.set()

    async def next(self) -> str | None:
        while not self._outbox:
            self._ready.clear()
            await self._ready.wait()
        return self.take()

    def take(self) -> str | None:
        """The next queued message (the outbox must not be empty)."""
        if self._backlog:
            self._backlog -= 1
        return self._outbox.popleft()

    @property
    def pending(self) -> int:
        return len(self._outbox)


class FanOut(Protocol):
    """What calls and the /client handler need from a hub; every method returns at once.

    Calls: `open_call` before the first message, `publish` for each upstream message (already
    valid JSON text), `publish_event` for events JSON subscribers alone receive, `close_call`
    after the last one. Subscribers: `subscribe` is False for an unknown call (or, with
    history, one that ended longer than HISTORY_SECONDS ago). `start`/`aclose` bracket the
    hub's life (connections, background tasks). Shutting down, once this process's calls have
    ended, `settle` waits (bounded) for the calls that other processes carry to this process's
    subscribers, and `shutdown` ends the subscriptions left.
    """

    def call_sids(self) -> list[str]: ...
    def ended_calls(self) -> list[tuple[str, str]]: ...
    def has_call(self, call_sid: str) -> bool: ...
    def open_call(self, info: CallInfo) -> None: ...
    def publish(self, call_sid: str, message: str) -> int: ...
    def publish_event(self, call_sid: str, event: dict) -> int: ...
    def close_call(self, call_sid: str, summary: dict) -> None: ...
    def subscribe(self, sub: Subscriber) -> bool: ...
    def unsubscribe(self, sub: Subscriber) -> None: ...
    def subscriber_count(self, call_sid: str | None = None) -> int: ...
    def shutdown(self) -> None: ...
    async def start(self) -> None: ...
    async def settle(self, timeout: float) -> None: ...
    async def aclose(self) -> None: ...


HISTORY_BLOCK = 16  # history messages compressed together
HISTORY_DICTIONARY = 4096  # bytes of a call's first messages that every block is compressed against
MAX_ENDED_HISTORIES = 1000  # ended calls whose history is kept (each for HISTORY_SECONDS at most)


class History:
    """One call's messages as JSON subscribers received them, for late joiners (bounded).

    Kept compressed: the newest messages as they are, older ones zlib-compressed in blocks of
    HISTORY_BLOCK, each block against a preset dictionary made of the call's first messages.
    Transcript messages repeat their field names and metadata, so a message costs about a tenth
    of its text, and small blocks keep the part held uncompressed small (README "Performance").
    The bound is exact: messages pushed out of the oldest block are skipped until the whole block
    can go.
    """

    def __init__(self, call_sid: str, started: str, max_messages: int):
        self.call_sid = call_sid
        self.started = started  # the call_started event
        self.max_messages = max_messages
        self.ended: str | None = None  # the call_ended event, once the call is over
        self.omitted = 0  # the oldest messages, pushed out by the bound
        # '{"type":"transcript","callSid":"CA…","data":' once per call, not per message
        self.transcript_prefix = transcript_prefix(call_sid)
        self._blocks: deque[tuple[bytes, array]] = deque()  # (compressed UTF-8, each message's length)
        self._skip = 0  # messages of the oldest block pushed out by the bound
        self._recent: list[str] = []  # the newest messages, not yet in a block
        self._count = 0  # messages kept
        self._dictionary: bytes | None = None  # set from the first block, then fixed for the call

    def add(self, json_message: str) -> None:
        self._recent.append(json_message)
        self._count += 1
        if len(self._recent) == HISTORY_BLOCK:
            encoded = [m.encode() for m in self._recent]
            if self._dictionary is None:
                self._dictionary = b"".join(encoded[:2])[:HISTORY_DICTIONARY]
            compressor = zlib.compressobj(6, zdict=self._dictionary)
            compressed = compressor.compress(b"".join(encoded)) + compressor.flush()
            self._blocks.append((compressed, array("I", map(len, encoded))))
            self._recent = []
        while self._count > self.max_messages:
            self._count -= 1
            self.omitted += 1
            if not self._blocks:
                del self._recent[0]
                continue
            self._skip += 1
            if self._skip == len(self._blocks[0][1]):
                self._blocks.popleft()
                self._skip = 0

    @property
    def messages(self) -> list[str]:
        """The messages kept, oldest first."""
        messages: list[str] = []
        for n, (compressed, lengths) in enumerate(self._blocks):
            decompressor = zlib.decompressobj(zdict=self._dictionary or b"")
            data, offset = decompressor.decompress(compressed) + decompressor.flush(), 0
            for i, length in enumerate(lengths):
                if n or i >= self._skip:
                    messages.append(data[offset:offset + length].decode())
                offset += length
        return messages + self._recent

    def replay(self) -> list[str]:
        """`call_started`, a note if the bound pushed messages out, the messages kept, `call_ended`."""
        head = [self.started]
        if self.omitted:
            head.append(json.dumps({"type": "history_truncated", "callSid": self.call_sid, "omitted": self.omitted}))
        return head + self.messages + ([self.ended] if self.ended else [])


def transcript_prefix(call_sid: str) -> str:
    """A JSON subscriber's transcript message is this + Deepgram's message + "}"."""
    return '{"type":"transcript","callSid":%s,"data":' % json.dumps(call_sid)


def event_json(call_sid: str, event: dict) -> str:
    return json.dumps({"type": event["type"], "callSid": call_sid, **event})


class Hub:
    """The in-process hub: calls and subscribers of one server process."""

    def __init__(self, history_messages: int = 1000, history_seconds: float = 300.0) -> None:
        self._calls: dict[str, CallInfo] = {}
        self._subscribers: dict[str, set[Subscriber]] = {}
        self._everything: set[Subscriber] = set()
        self.dropped_total = 0
        self.history_messages = history_messages
        self.history_seconds = history_seconds
        self._history: dict[str, History] = {}  # calls in progress, and ended ones still kept
        self._ended: OrderedDict[str, float] = OrderedDict()  # callSid -> when its history goes

    async def start(self) -> None:
        """Nothing to connect to."""

    async def settle(self, timeout: float) -> None:
        """Shutting down, this process's calls are over: nothing else to wait for."""

    async def aclose(self) -> None:
        """Nothing to disconnect from."""

    # --- calls ---------------------------------------------------------------------------

    def call_sids(self) -> list[str]:
        """Calls in progress, oldest first."""
        return list(self._calls)

    def ended_calls(self) -> list[tuple[str, str]]:
        """(call_started, call_ended) of each call that ended within HISTORY_SECONDS, oldest end
        first: what a `"recent": true` subscriber gets before the calls in progress."""
        self._forget_old_history()
        ended = (self._history.get(call_sid) for call_sid in self._ended)
        return [(history.started, history.ended) for history in ended if history is not None and history.ended]

    def has_call(self, call_sid: str) -> bool:
        return call_sid in self._calls

    def open_call(self, info: CallInfo) -> None:
        self._register_call(info, info.event())
        self._deliver(list(self._everything), json_message=info.event())

    def _register_call(self, info: CallInfo, started: str) -> None:
        self._forget_old_history()
        self._ended.pop(info.callSid, None)  # the same callSid again: a new call, a new history
        self._history.pop(info.callSid, None)
        self._calls[info.callSid] = info
        if self.history_messages:  # HISTORY_MESSAGES=0 turns history off
            self._history[info.callSid] = History(info.callSid, started, self.history_messages)
        self._subscribers.setdefault(info.callSid, set())

    def publish(self, call_sid: str, message: str) -> int:
        """Deliver one upstream message (already-valid JSON text) to the call's subscribers.

        Returns how many subscribers it was queued for.
        """
        history = self._history.get(call_sid)
        wrapped = None
        if history is not None:
            wrapped = history.transcript_prefix + message + "}"
            history.add(wrapped)
        listeners = [*self._subscribers.get(call_sid, ()), *self._everything]
        if not listeners:
            return 0
        if wrapped is None and any(s.json_mode for s in listeners):
            wrapped = transcript_prefix(call_sid) + message + "}"
        return self._deliver(listeners, raw_message=message, json_message=wrapped)

    def publish_event(self, call_sid: str, event: dict) -> int:
        """An event for JSON subscribers only (raw subscribers get Deepgram's messages alone)."""
        return self._publish_json(call_sid, event_json(call_sid, event))

    def _publish_json(self, call_sid: str, message: str) -> int:
        history = self._history.get(call_sid)
        if history is not None:
            history.add(message)
        return self._deliver([*self._subscribers.get(call_sid, ()), *self._everything], json_message=message)

    def close_call(self, call_sid: str, summary: dict) -> None:
        """The call is over and its last message was published: end its subscriptions."""
        self._end_call(call_sid, event_json(call_sid, {"type": "call_ended", **summary}))

    def _end_call(self, call_sid: str, call_ended: str) -> None:
        self._deliver([*self._subscribers.get(call_sid, ()), *self._everything], json_message=call_ended)
        self._calls.pop(call_sid, None)
        history = self._history.get(call_sid)
        if history is not None:
            history.ended = call_ended
            self._ended[call_sid] = time.monotonic() + self.history_seconds
            if len(self._ended) > MAX_ENDED_HISTORIES:  # a burst of short calls: the oldest go first
                self._history.pop(self._ended.popitem(last=False)[0], None)
        for sub in self._subscribers.pop(call_sid, set()):
            sub.finish()
        self._forget_old_history()

    def _forget_old_history(self) -> None:
        now = time.monotonic()
        while self._ended:
            call_sid, deadline = next(iter(self._ended.items()))
            if deadline > now:
                break
            del self._ended[call_sid]
            self._history.pop(call_sid, None)

    # --- subscribers ---------------------------------------------------------------------

    def subscribe(self, sub: Subscriber) -> bool:
        """Add a subscriber; False if it asked for a call that is not in progress (nor, with
        history, ended within HISTORY_SECONDS)."""
        self._forget_old_history()
        if sub.call_sid == EVERY_CALL:
            self._everything.add(sub)
            for call_sid, info in self._calls.items():
                self._greet(sub, info)
            return True
        info = self._calls.get(sub.call_sid)
        if info is None:
            history = self._history.get(sub.call_sid) if sub.history else None
            if history is None:
                return False
            sub.preload(history.replay())  # an ended call: its whole story, ending with call_ended
            sub.finish()
            return True
        self._subscribers[sub.call_sid].add(sub)
        if sub.json_mode:
            self._greet(sub, info)
        return True

    def _greet(self, sub: Subscriber, info: CallInfo) -> None:
        """A JSON subscriber joining a call in progress: `call_started`, or with history everything so far."""
        history = self._history.get(info.callSid)
        if sub.history and history is not None:
            sub.preload(history.replay())
        else:
            sub.offer(info.event())

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


class Subscription(NamedTuple):
    call_sid: str  # or "*"
    json_mode: bool
    history: bool = False
    recent: bool = False  # "*" only: calls ended within HISTORY_SECONDS first (call_started, call_ended)
    health: bool = False  # the server's health figures every few seconds (health.py)


def parse_subscription(message: str | bytes) -> Subscription:
    """A subscriber's first message -> Subscription(callSid or "*", json_mode, history).

    Raw mode (the tutorial's protocol): the message is a callSid, whitespace trimmed.
    JSON mode: {"type":"subscribe","callSid":"CA…"} or {"type":"subscribe","callSid":"*"},
    optionally with "history": true (the call's messages so far first), "health": true (health
    events), and with "*" "recent": true (the calls that ended lately, as call_started and call_ended).
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
        return Subscription(text, False)
    try:
        request = json.loads(text)
    except ValueError:
        raise BadSubscription("subscribe message is not valid JSON") from None
    if not isinstance(request, dict):
        raise BadSubscription('expected {"type":"subscribe","callSid":"CA…" or "*"}')
    call_sid = request.get("callSid")
    if request.get("type") != "subscribe" or not isinstance(call_sid, str) or not call_sid.strip():
        raise BadSubscription('expected {"type":"subscribe","callSid":"CA…" or "*"}')
    flags = {name: request.get(name, False) for name in ("history", "recent", "health")}
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise BadSubscription(f'"{name}" must be true or false')
    if flags["recent"] and call_sid.strip() != EVERY_CALL:
        raise BadSubscription('"recent" goes with "callSid":"*"')
    return Subscription(call_sid.strip(), True, **flags)
