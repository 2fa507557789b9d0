"""Writing this instance's calls to Redis, without ever making a call wait.

`open()`, `message()` and `close()` are synchronous: they put an operation in a bounded queue
and return. One task sends what is queued as a pipeline (one round trip for everything that
queued up during the previous one and COALESCE_SECONDS after the first), in order. If Redis is slow or unreachable the queue holds
up to REDIS_BUFFER messages; beyond that new messages are not queued, and counted
(`redis_publish_dropped_total`). Segment starts and ends may use twice that, so the registry
survives a burst of messages. When Redis answers again, the same task registers this
instance again (a restarted Redis has forgotten it) and sends the queue.

A batch whose reply was lost (connection dropped mid-way) is sent again: its entries may then
be in a stream twice, and readers drop the repeats by their numbers (entries.SegmentTracker).

The same task beats the heartbeat: `alive:<instance>` with an expiry of three heartbeats, and
an expiry on the streams of its calls in progress, so nothing of a crashed instance stays.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from itertools import islice

from redis.exceptions import RedisError, ResponseError

import metrics
from redishub import scripts
from redishub.entries import Keys, fields
from throttle import Throttle

log = logging.getLogger(__name__)

BATCH = 1000  # operations per pipeline
# Each round trip wakes redis-server, which costs this process about 100-150 µs of CPU here
# (bench/scaleout.py); waiting this long after the first entry lets the entries of other calls
# share it, for at most that much more latency.
COALESCE_SECONDS = 0.002
RETRY_SECONDS = 0.5  # between attempts while Redis does not answer
LIFECYCLE_MAXLEN = 100_000
MIN_STREAM_SECONDS = 30.0  # an ended call's stream stays at least this long, so readers finish it


class Publisher:
    def __init__(self, client, keys: Keys, me: str, *, buffer: int, history_messages: int,
                 history_seconds: float, heartbeat: float, location: str):
        self.client = client
        self.keys = keys
        self.me = me
        self.buffer = buffer
        self.maxlen = max(history_messages, 100)  # the stream also carries calls to readers that lag a little
        self.history_ms = int(max(history_seconds, MIN_STREAM_SECONDS) * 1000)
        self.heartbeat = heartbeat
        self.location = location
        self.queue: deque[tuple] = deque()
        # This instance's segments in progress: callSid -> [segment, start id, call_started],
        # to register them again after Redis restarts.
        self.segments: dict[str, list] = {}
        self.connected: bool | None = None  # None: not tried yet
        self.down_since = 0.0
        self._wake = asyncio.Event()
        self._drop_log = Throttle(10.0)
        self._open = client.register_script(scripts.OPEN_SEGMENT)
        self._close = client.register_script(scripts.CLOSE_SEGMENT)

    # --- called by the hub, never waits ----------------------------------------------------

    def open(self, call_sid: str, segment: int, started: str, delivered: bool) -> None:
        self.segments[call_sid] = [segment, None, started]
        self._put(("open", call_sid, segment, started, delivered), self.buffer * 2)

    def message(self, call_sid: str, segment: int, n: int, kind: str, data: str) -> None:
        self._put(("add", call_sid, segment, n, kind, data), self.buffer)

    def close(self, call_sid: str, segment: int, n: int, ended: str, delivered: bool) -> None:
        self.segments.pop(call_sid, None)
        self._put(("close", call_sid, segment, n, ended, delivered), self.buffer * 2)

    def _put(self, op: tuple, limit: int) -> None:
        if len(self.queue) >= limit:
            metrics.redis_publish_dropped_total.labels(op[0]).inc()
            count = self._drop_log.hit()
            if count:
                log.warning("Redis publishing is %d entries behind (REDIS_BUFFER=%d): %d not published%s",
                            len(self.queue), self.buffer, count, "" if self.connected else "; Redis is unreachable")
            return
        self.queue.append(op)
        self._wake.set()

    # --- the task --------------------------------------------------------------------------

    async def run(self) -> None:
        next_beat = 0.0
        full = True  # register everything: at the start and after every failure
        while True:
            batch: list[tuple] = []
            try:
                if time.monotonic() >= next_beat:
                    await self.beat(full)
                    full = False
                    next_beat = time.monotonic() + self.heartbeat
                if self.queue:
                    if len(self.queue) < BATCH:  # let what arrives meanwhile share the round trip
                        await asyncio.sleep(COALESCE_SECONDS)
                    batch = list(islice(self.queue, BATCH))
                    await self._send(batch)
                else:
                    self._wake.clear()
                    try:
                        async with asyncio.timeout(max(0.0, next_beat - time.monotonic())):
                            await self._wake.wait()
                    except TimeoutError:
                        pass
            except (RedisError, OSError) as exc:  # Redis unreachable or slow: keep the queue, retry
                self.unreachable(exc)
                full, next_beat = True, 0.0
                await asyncio.sleep(RETRY_SECONDS)
            except Exception:  # a bug: say so, drop what could not be sent (counted), go on
                log.exception("publishing to Redis: unexpected error; %d entries dropped", len(batch))
                for _ in batch:
                    self.queue.popleft()
                metrics.redis_publish_dropped_total.labels("error").inc(len(batch))
                metrics.redis_errors_total.labels("publish").inc()
                await asyncio.sleep(RETRY_SECONDS)

    async def beat(self, full: bool) -> None:
        """Heartbeat. With `full`, or when our `alive` key had lapsed (Redis restarted, or this
        process was stalled), register every segment again, in one transaction: no one ever
        sees this instance alive without its segments."""
        ttl = int(self.heartbeat * 3000)
        if not full:
            pipe = self.client.pipeline(transaction=False)
            pipe.set(self.keys.alive(self.me), "1", px=ttl, xx=True, get=True)
            for call_sid in self.segments:
                pipe.pexpire(self.keys.call(call_sid), self.history_ms + ttl)
            full = (await pipe.execute())[0] is None
        if full:
            owned = {sid: json.dumps({"g": g, "i": start_id, "d": started})
                     for sid, (g, start_id, started) in self.segments.items() if start_id}
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(self.keys.owned(self.me))
            if owned:
                pipe.hset(self.keys.owned(self.me), mapping=owned)
            pipe.set(self.keys.alive(self.me), "1", px=ttl)
            pipe.sadd(self.keys.instances, self.me)
            for call_sid in self.segments:
                pipe.pexpire(self.keys.call(call_sid), self.history_ms + ttl)
            await pipe.execute()
        self._up()

    async def _send(self, batch: list[tuple]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for op in batch:
            await self._add(pipe, op)
        results = await pipe.execute(raise_on_error=False)
        for _ in batch:
            self.queue.popleft()
        for op, result in zip(batch, results):
            if isinstance(result, ResponseError):  # a bug or a Redis that refuses the command: say so, go on
                metrics.redis_errors_total.labels("publish").inc()
                log.error("Redis refused %s for call %s: %s", op[0], op[1], result)
            elif op[0] == "open" and op[1] in self.segments and self.segments[op[1]][0] == op[2]:
                self.segments[op[1]][1:] = [result[1], result[2]]
        metrics.redis_published_total.inc(len(batch))
        metrics.redis_publish_waiting.set(len(self.queue))
        self._up()

    async def _add(self, pipe, op: tuple) -> None:
        kind, call_sid = op[0], op[1]
        keys = [self.keys.call(call_sid), self.keys.lifecycle, self.keys.owned(self.me), self.keys.instances]
        prefix = self.keys.prefix
        if kind == "add":
            _, _, segment, n, entry_kind, data = op
            pipe.xadd(keys[0], fields(self.me, segment, n, entry_kind, data), maxlen=self.maxlen, approximate=True)
        elif kind == "open":
            _, _, segment, started, delivered = op
            await self._open(keys, [prefix, self.me, segment, call_sid, started, int(delivered), self.maxlen,
                                    LIFECYCLE_MAXLEN, self.history_ms + int(self.heartbeat * 3000)], client=pipe)
        else:
            _, _, segment, n, ended, delivered = op
            await self._close(keys, [prefix, self.me, segment, call_sid, n, ended, int(delivered), self.maxlen,
                                     LIFECYCLE_MAXLEN, self.history_ms], client=pipe)

    def unreachable(self, exc: BaseException) -> None:
        metrics.redis_errors_total.labels("publish").inc()
        metrics.redis_publish_waiting.set(len(self.queue))
        if self.connected is not False:
            self.down_since = time.monotonic()
            metrics.redis_connected.set(0)
            log.error("Redis at %s unreachable (%s): calls go on and this instance's subscribers are served; "
                      "%d entries wait (REDIS_BUFFER=%d), retrying every %.1f s",
                      self.location, exc or type(exc).__name__, len(self.queue), self.buffer, RETRY_SECONDS)
        self.connected = False

    def _up(self) -> None:
        if self.connected is False:
            log.warning("Redis at %s reachable again after %.1f s; publishing %d waiting entries",
                        self.location, time.monotonic() - self.down_since, len(self.queue))
        elif self.connected is None:
            log.info("Redis at %s: connected as instance %s", self.location, self.me)
        if not self.connected:
            metrics.redis_connected.set(1)
        self.connected = True

    # --- shutdown --------------------------------------------------------------------------

    async def flush(self, timeout: float) -> bool:
        """Wait (bounded) until everything queued is written; True if it was."""
        deadline = time.monotonic() + timeout
        while self.queue and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return not self.queue

    async def unregister(self) -> None:
        """Leaving: other instances drop this one at once instead of after three heartbeats."""
        pipe = self.client.pipeline(transaction=False)
        pipe.delete(self.keys.alive(self.me), self.keys.owned(self.me))
        pipe.srem(self.keys.instances, self.me)
        await pipe.execute()

