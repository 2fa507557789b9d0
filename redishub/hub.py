"""The hub across processes and machines: every instance's calls meet every instance's subscribers.

RedisHub is the in-process `Hub` plus Redis. Rules, in the order a reader needs them:

1. This instance's own calls are served exactly as by `Hub`: its subscribers get each message
   the moment it is published, history comes from memory. Redis being slow or down changes
   nothing for them.
2. Everything this instance publishes is also appended to the call's Redis stream, through the
   `Publisher`'s bounded queue: no call ever waits for Redis.
3. Calls carried by other instances are read from their streams by one reader task (one
   blocking XREAD over the lifecycle stream and every stream a subscriber here needs) and
   delivered to this instance's subscribers. A stream is read from a position, so nothing
   falls between a late joiner's history (XREVRANGE up to the position) and the live entries
   (XREAD after it), and nothing comes twice.
4. A call handed over between instances (Twilio's second socket landed elsewhere) has a
   segment on each: a subscriber gets each instance's messages complete and in order, its own
   instance's from memory and the others' from Redis; `call_started` comes first and once,
   `call_ended` last and once, when the last segment ends (decided atomically in Redis).

The registry (which calls exist, on which instances, which ended lately) is a mirror kept by
the reader: see `registry.py`. `subscribe()` and `call_sids()` answer from it at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import socket
import time

from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

import metrics
from config import Settings, redis_location
from hub import EVERY_CALL, CallInfo, Hub, Subscriber, event_json, transcript_prefix
from redishub import scripts
from redishub.entries import END, EVENT, MSG, START, Entry, Keys, SegmentTracker, id_before, parse_id
from redishub.publisher import Publisher
from redishub.registry import Change, Registry
from throttle import Throttle

log = logging.getLogger(__name__)

BLOCK_MS = 100  # longest XREAD wait: a new subscription's stream joins the read within this
READ_COUNT = 1000  # entries per stream per XREAD
RETRY_SECONDS = 0.5
LIFECYCLE_SCAN = 10_000  # lifecycle entries read at start-up (calls that ended within the window)
FLUSH_SECONDS = 5.0  # at shutdown, time to write what is still queued


def instance_id() -> str:
    """Unique per process start: host, pid, and a random part (a pid can come back)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class Segment:
    """This instance's part of a call: its number here, and its entries' next number."""

    __slots__ = ("number", "n")

    def __init__(self, number: int):
        self.number, self.n = number, 0

    def next(self) -> int:
        self.n += 1
        return self.n


class Feed:
    """Another instance's call, read from its stream for subscribers here."""

    def __init__(self, call_sid: str, key: str, position: str | None = None):
        self.call_sid = call_sid
        self.key = key
        self.position = position  # id of the last entry read; None until the catch-up sets it
        self.tracker = SegmentTracker()
        self.joining: set[Subscriber] = set()  # not delivered to until their catch-up is done
        self.catching_up = False


class RedisHub(Hub):
    def __init__(self, settings: Settings, *, instance: str | None = None):
        super().__init__(settings.history_messages, settings.history_seconds)
        self.me = instance or instance_id()
        self.keys = Keys()
        self.location = redis_location(settings.redis_url)
        # No retries inside redis-py: the publisher and the reader have their own loops, and a
        # command must fail fast so they can say Redis is down.
        self.redis = Redis.from_url(settings.redis_url, decode_responses=True, socket_connect_timeout=2,
                                    socket_timeout=5, retry=Retry(NoBackoff(), 0))
        heartbeat = settings.redis_heartbeat_seconds
        self.heartbeat = heartbeat
        self.registry = Registry(self.me, history_seconds=settings.history_seconds, dead_after=3 * heartbeat)
        self.publisher = Publisher(self.redis, self.keys, self.me, buffer=settings.redis_buffer,
                                   history_messages=settings.history_messages,
                                   history_seconds=settings.history_seconds, heartbeat=heartbeat,
                                   location=self.location)
        self._snapshot = self.redis.register_script(scripts.SNAPSHOT)
        self._segments: dict[str, Segment] = {}
        self._segment_numbers = itertools.count(1)
        self._feeds: dict[str, Feed] = {}
        self._pending: dict[str, set[Subscriber]] = {}  # history subscribers waiting for their catch-up
        self._lifecycle_position: str | None = None
        self._tasks: set[asyncio.Task] = set()  # the reader, catch-ups (the publisher apart)
        self._publishing: asyncio.Task | None = None
        self._read_errors = Throttle(10.0)
        self._bad_entries = Throttle(10.0)

    # --- life --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect if Redis answers; if not, serve this instance's calls alone and keep trying."""
        try:
            async with asyncio.timeout(3):
                await self.publisher.beat(full=True)
        except (RedisError, OSError, TimeoutError) as exc:
            self.publisher.unreachable(exc)
        self._publishing = asyncio.create_task(self.publisher.run())
        self._spawn(self._read())

    async def aclose(self) -> None:
        """After the calls' last messages: write what is queued (bounded), then leave."""
        for task in list(self._tasks):
            task.cancel()
        if not await self.publisher.flush(FLUSH_SECONDS):
            log.warning("shutdown: %d entries could not be written to Redis", len(self.publisher.queue))
        if self._publishing is not None:
            self._publishing.cancel()
        await asyncio.gather(*self._tasks, *([self._publishing] if self._publishing else []), return_exceptions=True)
        try:
            async with asyncio.timeout(2):
                await self.publisher.unregister()
        except (RedisError, OSError, TimeoutError):
            pass
        await self.redis.aclose()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- calls of this instance ---------------------------------------------------------------

    def call_sids(self) -> list[str]:
        """Calls in progress on every instance, oldest first."""
        started = {sid: info.startTime for sid, info in self._calls.items()}
        for sid, call in self.registry.calls.items():
            started.setdefault(sid, call.start_time)
        return sorted(started, key=lambda sid: started[sid])

    def ended_calls(self) -> list[tuple[str, str]]:
        """Calls that ended within HISTORY_SECONDS on every instance, oldest end first: this
        instance's from memory at once, the others' as the lifecycle stream told them."""
        now = time.monotonic()
        self._forget_old_history()
        ended = self.registry.ended_calls(now)
        for call_sid, until in self._ended.items():
            history = self._history.get(call_sid)
            if history is not None and history.ended:
                ended[call_sid] = (until, history.started, history.ended)
        kept = sorted((found for sid, found in ended.items() if not self.has_call(sid)), key=lambda found: found[0])
        return [(started, call_ended) for _, started, call_ended in kept]

    def has_call(self, call_sid: str) -> bool:
        return call_sid in self._calls or call_sid in self.registry.calls

    def open_call(self, info: CallInfo) -> None:
        sid = info.callSid
        segment = self._segments[sid] = Segment(next(self._segment_numbers))
        known = self.registry.calls.get(sid)
        first = not self.registry.remote_owners(sid)
        if first:
            super().open_call(info)
            for sub in self._everything:
                sub.announced.add(sid)
        else:  # a handover from another instance: subscribers know the call already
            self._register_call(info, known.started)
        self.publisher.open(sid, segment.number, info.event(), first)

    def publish(self, call_sid: str, message: str) -> int:
        delivered = super().publish(call_sid, message)
        segment = self._segments.get(call_sid)
        if segment is not None:
            self.publisher.message(call_sid, segment.number, segment.next(), MSG, message)
        return delivered

    def publish_event(self, call_sid: str, event: dict) -> int:
        message = event_json(call_sid, event)
        delivered = self._publish_json(call_sid, message)
        segment = self._segments.get(call_sid)
        if segment is not None:
            self.publisher.message(call_sid, segment.number, segment.next(), EVENT, message)
        return delivered

    def close_call(self, call_sid: str, summary: dict) -> None:
        segment = self._segments.pop(call_sid, None)
        call_ended = event_json(call_sid, {"type": "call_ended", **summary})
        last = not self.registry.remote_owners(call_sid)
        if last:
            self._end_call(call_sid, call_ended)
            for sub in self._everything:
                sub.announced.discard(call_sid)
        else:  # this instance's part is over; the call and its subscribers here go on, fed from Redis
            self._calls.pop(call_sid, None)
            self._ensure_feed(call_sid)
        if segment is not None:
            self.publisher.close(call_sid, segment.number, segment.next(), call_ended, last)

    # --- subscribers -------------------------------------------------------------------------

    def subscribe(self, sub: Subscriber) -> bool:
        self._forget_old_history()
        sid = sub.call_sid
        if sid == EVERY_CALL:
            self._everything.add(sub)
            for call_sid in self.call_sids():
                if self.registry.remote_owners(call_sid):
                    self._join_remote(sub, call_sid)
                elif call_sid in self._calls:
                    self._greet(sub, self._calls[call_sid])
                    sub.announced.add(call_sid)
            return True
        if self.registry.remote_owners(sid):
            self._join_remote(sub, sid)
            return True
        if sid in self._calls or (sub.history and sid in self._history):
            super().subscribe(sub)
            sub.announced.add(sid)
            return True
        if sub.history and self.registry.ended_call(sid, time.monotonic()):
            self._join_remote(sub, sid)  # ended elsewhere within the window: its stream is its history
            return True
        return False

    def _join_remote(self, sub: Subscriber, call_sid: str) -> None:
        """A subscriber for a call (partly) carried elsewhere: live at once where possible, its
        history and its stream position through a catch-up."""
        feed = self._ensure_feed(call_sid, force=True)
        if sub.history:
            self._pending.setdefault(call_sid, set()).add(sub)
            feed.joining.add(sub)
        else:
            if sub.json_mode:
                self._announce(sub, call_sid)
            if sub.call_sid != EVERY_CALL:
                self._subscribers.setdefault(call_sid, set()).add(sub)  # this instance's segment, if any
            if feed.position is None:
                feed.joining.add(sub)
        self._catch_up_later(feed)

    def unsubscribe(self, sub: Subscriber) -> None:
        super().unsubscribe(sub)
        for waiting in self._pending.values():
            waiting.discard(sub)
        for feed in list(self._feeds.values()):
            feed.joining.discard(sub)
            if not self._wanted(feed.call_sid):
                del self._feeds[feed.call_sid]

    def subscriber_count(self, call_sid: str | None = None) -> int:
        pending = self._pending.get(call_sid, ()) if call_sid is not None else [
            s for subs in self._pending.values() for s in subs if s.call_sid != EVERY_CALL]
        return super().subscriber_count(call_sid) + len(pending)

    async def settle(self, timeout: float) -> None:
        """Shutting down: this instance's calls are over; give its subscribers of calls carried
        elsewhere their calls' last messages (those instances may be stopping too: WORKERS)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(
                subs for sid, subs in (*self._subscribers.items(), *self._pending.items()) if sid not in self._calls):
            await asyncio.sleep(0.05)

    def shutdown(self) -> None:
        for waiting in self._pending.values():
            for sub in waiting:
                sub.finish()
        self._pending.clear()
        self._feeds.clear()
        super().shutdown()

    def _wanted(self, call_sid: str) -> bool:
        return bool(self._everything or self._subscribers.get(call_sid) or self._pending.get(call_sid))

    def _ensure_feed(self, call_sid: str, *, force: bool = False, position: str | None = None) -> Feed | None:
        feed = self._feeds.get(call_sid)
        if feed is None and (force or self._wanted(call_sid)):
            feed = self._feeds[call_sid] = Feed(call_sid, self.keys.call(call_sid), position)
            self._catch_up_later(feed)
        return feed

    def _started(self, call_sid: str) -> str:
        known = self.registry.calls.get(call_sid)
        if known is not None:
            return known.started
        ended = self.registry.ended_call(call_sid, time.monotonic())
        if ended is not None:
            return ended[0]
        return self._calls[call_sid].event()

    def _announce(self, sub: Subscriber, call_sid: str) -> None:
        """`call_started` once per call per subscriber, whichever path brings it first."""
        if call_sid not in sub.announced:
            sub.announced.add(call_sid)
            sub.offer(self._started(call_sid))

    # --- catching up: history and stream positions --------------------------------------------

    def _catch_up_later(self, feed: Feed) -> None:
        if not feed.catching_up and (feed.position is None or feed.joining):
            feed.catching_up = True
            self._spawn(self._catch_up(feed))

    async def _catch_up(self, feed: Feed) -> None:
        try:
            while (feed.position is None or feed.joining) and self._feeds.get(feed.call_sid) is feed:
                history = any(sub.history for sub in feed.joining)
                count = max(self.history_messages * 2, 200) if history else 1
                try:
                    newest_first = await self.redis.xrevrange(feed.key, count=count)
                except (RedisError, OSError) as exc:
                    self._read_failed(exc, "catch_up")
                    await asyncio.sleep(RETRY_SECONDS)
                    continue
                self._caught_up(feed, self._parse_entries(feed.key, reversed(newest_first)))
        finally:
            feed.catching_up = False

    def _parse_entries(self, key: str, raw) -> list[Entry]:
        entries = []
        for entry_id, fields in raw:
            try:
                entries.append(Entry.parse(entry_id, fields))
            except (KeyError, ValueError):
                self._bad_entry(key, entry_id)
        return entries

    def _caught_up(self, feed: Feed, entries: list[Entry]) -> None:
        """Synchronous, so the feed's position cannot move while history is cut at it."""
        if feed.position is None:
            feed.position = entries[-1].id if entries else "0-0"
        cut = parse_id(feed.position)
        history = [e for e in entries if parse_id(e.id) <= cut]
        sid = feed.call_sid
        for sub in list(feed.joining):
            feed.joining.discard(sub)
            if sub.history:
                self._pending.get(sid, set()).discard(sub)
                self._replay(sub, sid, history)
        if not self.has_call(sid):  # over before its position was known: it will not be read
            ended = self.registry.ended_call(sid, time.monotonic())
            self._end_remote(sid, ended[1] if ended else None)

    def _replay(self, sub: Subscriber, call_sid: str, entries: list[Entry]) -> None:
        """History for a subscriber of a call carried (partly) elsewhere: `call_started`, this
        instance's messages from memory, the others' from the stream, then `call_ended` if over."""
        local = self._history.get(call_sid)
        messages = [self._started(call_sid)] + (local.messages if local else [])
        call_ended = local.ended if local else None
        prefix = transcript_prefix(call_sid)
        tracker = SegmentTracker()
        for e in entries:
            if not tracker.accept(e) or (e.origin == self.me and local is not None and (e.local or e.kind in (MSG, EVENT))):
                continue
            if e.kind == MSG:
                messages.append(prefix + e.data + "}")
            elif e.kind == EVENT:
                messages.append(e.data)
            elif e.kind == END and e.public:
                call_ended = e.data
        if call_ended is None and not self.has_call(call_sid):
            ended = self.registry.ended_call(call_sid, time.monotonic())
            call_ended = ended[1] if ended else None
        sub.announced.add(call_sid)
        if call_ended is not None:
            sub.preload(messages + [call_ended])
            if sub.call_sid == EVERY_CALL:
                sub.announced.discard(call_sid)
            else:
                sub.finish()
            return
        sub.preload(messages)
        if sub.call_sid != EVERY_CALL:
            self._subscribers.setdefault(call_sid, set()).add(sub)

    # --- the reader ----------------------------------------------------------------------------

    async def _read(self) -> None:
        """One task: the lifecycle stream, every feed's stream, and a snapshot every heartbeat."""
        connected, next_snapshot = False, 0.0
        while True:
            try:
                if self._lifecycle_position is None:
                    await self._load_lifecycle()
                if time.monotonic() >= next_snapshot:
                    await self._take_snapshot(regained=not connected)
                    next_snapshot = time.monotonic() + self.heartbeat
                    connected = True
                streams = {self.keys.lifecycle: self._lifecycle_position}
                streams.update({f.key: f.position for f in self._feeds.values() if f.position is not None})
                reply = await self.redis.xread(streams, count=READ_COUNT, block=BLOCK_MS)
                for key, entries in reply or ():
                    if key == self.keys.lifecycle:
                        self._lifecycle(entries)
                    else:
                        self._feed_entries(self._feeds.get(self.keys.call_sid(key)), entries)
            except (RedisError, OSError) as exc:
                connected = False
                self._read_failed(exc, "read")
                await asyncio.sleep(RETRY_SECONDS)
            except Exception:  # a bug must not end cross-instance delivery silently
                metrics.redis_errors_total.labels("read").inc()
                log.exception("reading from Redis: unexpected error; going on")
                await asyncio.sleep(RETRY_SECONDS)

    def _read_failed(self, exc: BaseException, task: str) -> None:
        metrics.redis_errors_total.labels(task).inc()
        count = self._read_errors.hit()
        if count:
            log.warning("reading from Redis at %s failed (%s)%s; retrying", self.location, exc or type(exc).__name__,
                        f", {count} times since the last report" if count > 1 else "")

    async def _load_lifecycle(self) -> None:
        """Start-up: recent lifecycle entries (calls that ended within the history window) and
        where to read on from."""
        newest_first = await self.redis.xrevrange(self.keys.lifecycle, count=LIFECYCLE_SCAN)
        seconds, micros = await self.redis.time()
        redis_now_ms = seconds * 1000 + micros // 1000
        now = time.monotonic()
        for entry_id, fields in reversed(newest_first):
            age = max(0.0, (redis_now_ms - parse_id(entry_id)[0]) / 1000)
            self._apply(self.registry.lifecycle(fields, now - age))
        self._lifecycle_position = newest_first[0][0] if newest_first else "0-0"

    async def _take_snapshot(self, *, regained: bool) -> None:
        reply = await self._snapshot(keys=[self.keys.instances, self.keys.lifecycle], args=[self.keys.prefix])
        last_id, rows = reply[0], reply[1:]
        if last_id and parse_id(last_id) > parse_id(self._lifecycle_position):
            # Apply the lifecycle up to the snapshot's instant first, so the two agree.
            self._lifecycle(await self.redis.xrange(self.keys.lifecycle, min="(" + self._lifecycle_position, max=last_id))
        now = time.monotonic()
        if regained:
            self.registry.grace(now)
        instances = [(i, alive == 1, dict(zip(owned[::2], owned[1::2]))) for i, alive, owned in rows]
        self._apply(self.registry.snapshot(instances, now))
        dead = self.registry.dead_instances(now)
        if dead:
            pipe = self.redis.pipeline(transaction=False)
            for instance in dead:
                log.warning("instance %s has not been alive for %.0f s: its calls are gone", instance, 3 * self.heartbeat)
                pipe.delete(self.keys.owned(instance), self.keys.alive(instance))
                pipe.srem(self.keys.instances, instance)
                self.registry.forget_instance(instance)
            await pipe.execute()

    def _lifecycle(self, entries: list) -> None:
        now = time.monotonic()
        for entry_id, fields in entries:
            self._lifecycle_position = entry_id
            try:
                changes = self.registry.lifecycle(fields, now)
            except (KeyError, ValueError, TypeError):
                self._bad_entry(self.keys.lifecycle, entry_id)
                continue
            self._apply(changes)

    def _bad_entry(self, key: str, entry_id: str) -> None:
        """An entry this code did not write (or a bug): skipped, counted, logged (rate-limited)."""
        metrics.redis_errors_total.labels("bad_entry").inc()
        count = self._bad_entries.hit()
        if count:
            log.warning("Redis entry %s of %s is not one of ours: skipped (%d since the last report)",
                        entry_id, key, count)

    def _apply(self, changes: list[Change]) -> None:
        for change in changes:
            if change.kind == "segment" and change.owner[0] != self.me:
                # Another instance took (part of) a call: read its stream from that segment's start
                # if anyone here listens (a `*` subscriber, or this call's).
                self._ensure_feed(change.call_sid, position=id_before(change.start_id))
            elif change.kind == "vanished":
                log.warning("call %s vanished: the instance carrying it stopped answering", change.call_sid)
                for sub in self._subscribers.get(change.call_sid, ()):
                    sub.lost = True
                self._end_remote(change.call_sid, event_json(change.call_sid, {
                    "type": "call_ended", "endOfCall": "lost",
                    "error": "the server carrying this call stopped answering"}))

    def _feed_entries(self, feed: Feed | None, entries: list) -> None:
        if feed is None:
            return
        for entry_id, fields in entries:
            feed.position = entry_id
            try:
                entry = Entry.parse(entry_id, fields)
            except (KeyError, ValueError):
                self._bad_entry(feed.key, entry_id)
                continue
            missed = feed.tracker.missed
            if not feed.tracker.accept(entry):
                continue
            if feed.tracker.missed != missed:
                metrics.redis_missed_total.inc(feed.tracker.missed - missed)
                log.warning("call %s: %d entries from %s never arrived through Redis", feed.call_sid,
                            feed.tracker.missed - missed, entry.origin)
            if entry.origin == self.me and (entry.local or entry.kind in (MSG, EVENT)):
                continue  # delivered here when it was published
            metrics.redis_received_total.inc()
            self._deliver_entry(feed, entry)
            if entry.kind == END and entry.public:
                self._end_remote(feed.call_sid, None)
                return

    def _deliver_entry(self, feed: Feed, entry: Entry) -> None:
        sid = feed.call_sid
        listeners = [s for s in (*self._subscribers.get(sid, ()), *self._everything) if s not in feed.joining]
        if entry.kind == START:
            if entry.public:
                for sub in listeners:
                    if sub.json_mode:
                        self._announce(sub, sid)
            return
        for sub in listeners:
            if sub.json_mode and sid not in sub.announced:
                self._announce(sub, sid)
        if entry.kind == MSG:
            wrapped = transcript_prefix(sid) + entry.data + "}" if any(s.json_mode for s in listeners) else None
            self._deliver(listeners, raw_message=entry.data, json_message=wrapped)
        elif entry.kind == EVENT or (entry.kind == END and entry.public):
            self._deliver(listeners, json_message=entry.data)

    def _end_remote(self, call_sid: str, call_ended: str | None) -> None:
        """A call carried elsewhere is over (or vanished): end its subscriptions here."""
        self._feeds.pop(call_sid, None)
        if call_sid in self._calls:
            return  # this instance still carries a segment of it: its own close will end it
        listeners = [*self._subscribers.get(call_sid, ()), *self._everything]
        if call_ended is not None:
            self._deliver([s for s in listeners if call_sid in s.announced], json_message=call_ended)
        for sub in self._everything:
            sub.announced.discard(call_sid)
        for sub in self._subscribers.pop(call_sid, set()):
            sub.finish()
        if call_sid in self._history:  # this instance carried a segment earlier: its history expires now
            history = self._history[call_sid]
            history.ended = history.ended or call_ended
            self._ended[call_sid] = time.monotonic() + self.history_seconds
