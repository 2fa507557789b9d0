"""What a provider session sends, in order, without ever blocking the call.

Both websocket providers (Deepgram's Voice Agent, OpenAI Realtime) have the same sending side:
caller audio arrives 50 times a second per call and control messages (tool results, keypresses,
truncations) now and then, all from synchronous code on the event loop, while the provider's
socket may still be connecting or may lag. So:

- while the session is ready, nothing is queued and the socket keeps up, a message is written at
  once (`sendnow.send_now`: no task wake-up per audio frame);
- otherwise it joins a queue that one writer task sends in order, with the socket's flow
  control; the caller audio in it is bounded (`max_audio` bytes): beyond it the oldest audio is
  dropped and counted in `stats.audio_unsent_bytes`, so a stuck provider never grows memory;
- with a `keepalive` message, it is sent whenever no audio has gone out for `keepalive_seconds`
  (Deepgram closes an idle session).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from agent.provider import ProviderStats
from sendnow import send_now

MAX_QUEUED_AUDIO = 10 * 8000  # caller audio held while connecting or while the socket lags: 10 s


class Outbox:
    def __init__(self, stats: ProviderStats, *, keepalive: str | None = None, keepalive_seconds: float = 5.0,
                 max_audio: int = MAX_QUEUED_AUDIO):
        self.stats = stats
        self.keepalive = keepalive
        self.keepalive_seconds = keepalive_seconds
        self.max_audio = max_audio
        self.closed = False
        self._ws: ClientConnection | None = None  # set by start(): the session is ready
        self._queue: deque[tuple[str | bytes, int]] = deque()  # (message, caller audio bytes in it)
        self._queued_audio = 0
        self._wakeup = asyncio.Event()
        self._writer: asyncio.Task | None = None
        self._sending = False  # the writer is writing the queue's first message (it stays queued until written)
        self._last_audio = time.monotonic()

    def start(self, ws: ClientConnection, name: str) -> None:
        """The session is configured: send what waited, then write as messages come."""
        self._ws = ws
        self._writer = asyncio.create_task(self._write(), name=name)

    def audio(self, message: str | bytes, nbytes: int) -> None:
        """A message carrying `nbytes` of caller audio."""
        if self.closed:
            return
        self.stats.audio_in_bytes += nbytes
        if self._ws is not None and not self._queue and send_now(self._ws, message):
            self._last_audio = time.monotonic()
            return
        self._put(message, nbytes)

    def send(self, message: str | bytes) -> None:
        """A control message: after everything already queued."""
        if not self.closed:
            self._put(message, 0)

    def _put(self, message: str | bytes, nbytes: int) -> None:
        self._queue.append((message, nbytes))
        self._queued_audio += nbytes
        first = 1 if self._sending else 0  # never the message being written
        while self._queued_audio > self.max_audio:  # keep the newest audio
            oldest = next((i for i in range(first, len(self._queue)) if self._queue[i][1]), None)
            if oldest is None:
                break
            _, dropped = self._queue[oldest]
            del self._queue[oldest]
            self._queued_audio -= dropped
            self.stats.audio_unsent_bytes += dropped
        self._wakeup.set()

    async def _write(self) -> None:
        ws = self._ws
        try:
            while True:
                if self._queue:
                    message, nbytes = self._queue[0]
                    self._sending = True
                    try:
                        await ws.send(message)
                    finally:
                        self._sending = False
                    self._queue.popleft()
                    if nbytes:
                        self._queued_audio -= nbytes
                        self._last_audio = time.monotonic()
                    continue
                timeout = None
                if self.keepalive is not None:
                    idle = time.monotonic() - self._last_audio
                    if idle >= self.keepalive_seconds:
                        await ws.send(self.keepalive)
                        self.stats.keepalives += 1
                        self._last_audio = time.monotonic()
                        continue
                    timeout = self.keepalive_seconds - idle
                self._wakeup.clear()
                try:
                    async with asyncio.timeout(timeout):
                        await self._wakeup.wait()
                except TimeoutError:
                    pass
        except ConnectionClosed:
            pass  # the provider's reader reports how the session ended

    async def close(self) -> None:
        """No more sending; what is still queued is dropped, its audio counted as unsent."""
        self.closed = True
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        self.stats.audio_unsent_bytes += self._queued_audio
        self._queue.clear()
        self._queued_audio = 0
