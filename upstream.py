"""One call's Deepgram live-transcription socket (protocols.md B).

The Twilio side must never wait on Deepgram, so `send_audio()` is synchronous: it puts the frame
in a bounded outbox, and a writer task sends from it. A reader task hands every message Deepgram
sends to `on_message`, verbatim. The two tasks are the two directions of the connection.

End of call (`finish()`): the writer sends what is queued, then `{"type":"CloseStream"}`; the
reader keeps reading until Deepgram has sent its last Results and Metadata and closed, or until
`close_timeout` runs out. Only then does the call tell its subscribers it is over.

While no audio goes out (a call on hold, a slow start) the writer sends `KeepAlive` every
`keepalive_seconds`, so Deepgram does not close the socket after its ~10 s idle timeout.

Anything a later upstream (a voice agent) needs is the same shape: `start()`, `send_audio()`,
`finish()`, `stats`, and messages delivered through `on_message`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from dataclasses import dataclass
from typing import Callable

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

log = logging.getLogger(__name__)

KEEPALIVE = '{"type":"KeepAlive"}'
CLOSE_STREAM = '{"type":"CloseStream"}'
_CLOSE = object()  # outbox marker: send CloseStream after everything before it


@dataclass
class UpstreamStats:
    frames_sent: int = 0
    bytes_sent: int = 0
    messages: int = 0
    keepalives: int = 0
    frames_unsent: int = 0  # frames that never reached Deepgram (outbox full, or no connection)
    bytes_unsent: int = 0
    error: str = ""  # why the connection failed or ended early, for logs and subscribers
    metadata_received: bool = False
    close_code: int | None = None
    close_reason: str = ""


class DeepgramStream:
    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        on_message: Callable[[str], None],
        on_error: Callable[[str], None] = lambda error: None,
        label: str = "",
        connect_timeout: float = 10.0,
        close_timeout: float = 10.0,
        keepalive_seconds: float = 4.0,
        max_queued_frames: int = 600,
        max_message_bytes: int = 2**20,
    ):
        self.url = url
        self._headers = {"Authorization": f"Token {api_key}"}
        self._on_message = on_message
        self._on_error = on_error
        self.label = label
        self.connect_timeout = connect_timeout
        self.close_timeout = close_timeout
        self.keepalive_seconds = keepalive_seconds
        self.max_queued_frames = max_queued_frames
        self.max_message_bytes = max_message_bytes
        self.stats = UpstreamStats()
        self._outbox: deque = deque()
        self._ready = asyncio.Event()
        self._close_sent = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False
        self._warned_full = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"deepgram {self.label}")

    def send_audio(self, frame: bytes) -> None:
        """Queue one stereo frame for Deepgram; never blocks."""
        if self._closing:
            raise RuntimeError("send_audio() after finish()")
        if len(self._outbox) >= self.max_queued_frames:
            self.stats.frames_unsent += 1
            self.stats.bytes_unsent += len(frame)
            if not self._warned_full:
                self._warned_full = True
                log.error(
                    "call %s: Deepgram is not keeping up; %d frames queued, dropping new audio",
                    self.label, len(self._outbox),
                )
            return
        self._outbox.append(frame)
        self._ready.set()

    async def finish(self) -> None:
        """Send what is queued, then CloseStream; wait (bounded) for Deepgram's last messages."""
        if self._task is None:
            return
        self._closing = True
        self._outbox.append(_CLOSE)
        self._ready.set()
        try:
            async with asyncio.timeout(self.close_timeout):
                await self._close_sent.wait()
            async with asyncio.timeout(self.close_timeout):
                await asyncio.shield(self._task)
        except TimeoutError:
            self._fail("timed out waiting for Deepgram to close after CloseStream", logging.WARNING)
        finally:
            await self.abort()

    async def abort(self) -> None:
        """Stop now (used on shutdown and after finish()); counts whatever was not sent."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._count_unsent()

    # --- the connection ------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            ws = await connect(
                self.url,
                additional_headers=self._headers,
                open_timeout=self.connect_timeout,
                max_size=self.max_message_bytes,
                compression=None,  # audio does not deflate; it would only cost CPU
            )
        except InvalidStatus as exc:
            response = exc.response
            reason = response.headers.get("dg-error", "") or response.body.decode(errors="replace")[:200]
            self._fail(
                f"Deepgram refused the connection: HTTP {response.status_code} {reason} "
                f"(dg-request-id {response.headers.get('dg-request-id', '-')})"
            )
            self._close_sent.set()
            return
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            self._fail(f"cannot reach Deepgram: {exc or type(exc).__name__}")
            self._close_sent.set()
            return

        reader = asyncio.create_task(self._read(ws), name=f"deepgram reader {self.label}")
        try:
            await self._write(ws)
            await reader  # until Deepgram closes after its Metadata (finish() bounds the wait)
        except ConnectionClosed:
            await reader
        finally:
            self._close_sent.set()
            reader.cancel()
            await ws.close()
            self.stats.close_code = ws.close_code
            self.stats.close_reason = ws.close_reason or ""

    async def _write(self, ws: ClientConnection) -> None:
        while True:
            if not self._outbox:
                self._ready.clear()
                try:
                    async with asyncio.timeout(self.keepalive_seconds):
                        await self._ready.wait()
                except TimeoutError:
                    await ws.send(KEEPALIVE)
                    self.stats.keepalives += 1
                    continue
            item = self._outbox.popleft()
            if item is _CLOSE:
                await ws.send(CLOSE_STREAM)
                self._close_sent.set()
                return
            await ws.send(item)
            self.stats.frames_sent += 1
            self.stats.bytes_sent += len(item)

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    log.warning("call %s: unexpected binary message from Deepgram ignored", self.label)
                    continue
                try:
                    kind = json.loads(message).get("type")
                except (ValueError, AttributeError):
                    log.warning("call %s: Deepgram sent a message that is not a JSON object", self.label)
                    continue
                self.stats.messages += 1
                if kind == "Metadata":
                    self.stats.metadata_received = True
                self._on_message(message)
        except ConnectionClosed as exc:
            close = exc.rcvd
            self._fail(
                f"Deepgram closed the connection: {close.code} {close.reason}".strip() if close
                else "Deepgram connection lost"
            )

    def _fail(self, error: str, level: int = logging.ERROR) -> None:
        """Record why the upstream failed (first reason wins), log it and tell the call."""
        if self.stats.error:
            return
        self.stats.error = error
        log.log(level, "call %s: %s", self.label, error)
        self._on_error(error)

    def _count_unsent(self) -> None:
        for item in self._outbox:
            if item is not _CLOSE:
                self.stats.frames_unsent += 1
                self.stats.bytes_unsent += len(item)
        self._outbox.clear()
        if self.stats.frames_unsent:
            log.error(
                "call %s: %d frames (%d bytes) of audio never reached Deepgram",
                self.label, self.stats.frames_unsent, self.stats.bytes_unsent,
            )
