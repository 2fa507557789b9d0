"""One call's connection to Deepgram's live transcription (protocols.md B), kept alive for the
whole call whatever the network does.

The Twilio side must never wait on Deepgram, so `send_audio()` is synchronous: it numbers the
frame with its place in the call (bytes per channel) and, in the common case (connected, nothing
waiting, the socket keeping up), writes it at once. Otherwise it goes into a bounded outbox that
a writer task sends from, with the socket's flow control. A reader task hands every message
Deepgram sends to `on_message`. (Writing in place saves a task wake-up per frame; see the
README's Performance section.)

Keeping transcripts complete across failures
- Frames stay in a *replay window* after they are sent, until final `Results` on every channel
  cover them. If the socket drops (1011, reset, ping timeout, unexpected close), we reconnect
  with backoff and send the replay window again, then the rest of the outbox.
- Deepgram's times restart at 0 on a new socket. Each connection keeps a map from "audio
  received on this socket" to "call time" (piecewise, since audio dropped while Deepgram was
  unreachable leaves holes), and every time field of every message is shifted back to call
  time. Results that finals already delivered for that channel fully cover are dropped, so
  the seam neither duplicates nor loses results.
- Deepgram throttles streams faster than 1.25x real time, so a backlog larger than
  `CATCH_UP_SECONDS` is sent at 1.25x until it is gone.
- HTTP 400/401/403/404 at the handshake, or close 1008 (our audio is not audio), will not get
  better by retrying: that is logged once with Deepgram's `dg-error` reason and reported.
  Anything else (unreachable, 429, 5xx, timeouts) is retried while the audio waits, up to
  `max_queued_frames`; beyond that the oldest waiting audio is dropped and counted.

End of call (`finish()`): the writer sends what is queued, then `{"type":"CloseStream"}`; the
reader keeps reading until Deepgram's last Results and Metadata and its close. While no audio
goes out the writer sends `KeepAlive`, so Deepgram never closes for inactivity (~10 s).

A later upstream (a voice agent) has the same shape: `start()`, `send_audio()`, `finish()`,
`abort()`, `stats`, messages through `on_message`.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import random
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedError, InvalidHandshake, InvalidStatus

import metrics
from sendnow import send_now

log = logging.getLogger(__name__)

KEEPALIVE = '{"type":"KeepAlive"}'
CLOSE_STREAM = '{"type":"CloseStream"}'
BYTES_PER_SECOND = 8000  # per channel: 8 kHz mu-law
REPLAY_SPEED = 1.25  # Deepgram's limit for streaming faster than real time
CATCH_UP_SECONDS = 2.0  # a backlog larger than this at connect time is paced at REPLAY_SPEED
PERMANENT_STATUSES = {400, 401, 403, 404}
RECONNECT_DELAYS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # then 8 s between attempts


@dataclass
class UpstreamStats:
    frames_sent: int = 0
    bytes_sent: int = 0  # including audio sent again after a reconnect
    messages: int = 0
    keepalives: int = 0
    connections: int = 0
    reconnects: int = 0  # connections opened after a drop
    connect_failures: int = 0
    replayed_bytes: int = 0
    seam_duplicates: int = 0  # results dropped because finals already delivered covered them
    frames_unsent: int = 0  # audio that never reached Deepgram (outbox overflow, or no connection)
    bytes_unsent: int = 0
    error: str = ""  # the first permanent problem (or the reason the call's stream ended early)
    metadata_received: bool = False
    timed_out: bool = False  # finish() gave up waiting for the last results

    @property
    def outcome(self) -> str:
        """How the end-of-call flush went: complete (Metadata received), timeout, failed, incomplete."""
        if self.metadata_received:
            return "complete"
        if self.timed_out:
            return "timeout"
        return "failed" if self.error else "incomplete"


class _Closed(Exception):
    """The stream is over for good: the call ended, or a failure that retrying cannot fix."""


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
        replay_frames: int = 100,
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
        self.replay_frames = replay_frames
        self.max_message_bytes = max_message_bytes
        self.stats = UpstreamStats()

        self._position = 0  # call position (bytes per channel) of the next frame
        self._outbox: deque[tuple[int, bytes]] = deque()  # (position, frame), not yet sent
        self._replay: deque[tuple[int, bytes]] = deque()  # sent, not yet covered by finals
        self._final_end: dict[int, float] = {}  # per channel: call time covered by delivered finals
        self._channels = 0
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None
        self._ws: ClientConnection | None = None  # the current connection, if any
        self._direct: ClientConnection | None = None  # the connection send_audio() may write to
        self._last_sent = time.monotonic()  # for KeepAlive: when audio last went out
        self._warned_overflow = False
        # Per connection: conn_bytes -> call position, as two parallel sorted lists.
        self._map_conn: list[int] = []
        self._map_call: list[int] = []
        self._conn_bytes = 0
        self._verbatim = True  # this connection's times are call times: pass messages as they are

    # --- the call's side ---------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"deepgram {self.label}")

    def send_audio(self, frame: bytes) -> None:
        """Queue one stereo frame for Deepgram; never blocks."""
        if self._closing:
            raise RuntimeError("send_audio() after finish()")
        position = self._position
        self._position += len(frame) // 2
        if self._task is None or self._task.done():
            self._count_unsent(frame)
            return
        if not self._outbox and self._send_now(position, frame):
            return
        if len(self._outbox) >= self.max_queued_frames:
            _, dropped = self._outbox.popleft()  # keep the newest audio; the oldest is lost
            self._count_unsent(dropped)
            if not self._warned_overflow:
                self._warned_overflow = True
                log.error("call %s: %d frames waiting for Deepgram; dropping the oldest audio",
                          self.label, len(self._outbox))
        self._outbox.append((position, frame))
        self._wakeup.set()

    def _send_now(self, position: int, frame: bytes) -> bool:
        """Write a frame from the caller, without the writer task; False if it must wait its turn.

        Only when nothing is queued, so order is kept (the writer task removes a frame from the
        outbox only once it is sent), and if the socket keeps up (sendnow.py).
        """
        if self._direct is None or not send_now(self._direct, frame):
            return False
        self._note_sent(position, frame)  # into the replay window, which a reconnect sends again
        return True

    async def finish(self) -> None:
        """Send what is queued, then CloseStream; wait (bounded) for Deepgram's last messages."""
        if self._task is None:
            return
        self._closing = True
        self._wakeup.set()
        try:
            async with asyncio.timeout(self.close_timeout + self._backlog_seconds() / REPLAY_SPEED):
                await asyncio.shield(self._task)
        except TimeoutError:
            self.stats.timed_out = True
            self._fail("timed out waiting for Deepgram's last results after CloseStream", logging.WARNING)
        finally:
            await self.abort()

    def _backlog_seconds(self) -> float:
        """Seconds of call audio waiting to be sent (stereo frames: 2 bytes per sample instant)."""
        return sum(len(f) for _, f in self._outbox) / 2 / BYTES_PER_SECOND

    async def abort(self) -> None:
        """Stop now (shutdown, or after finish()); whatever was not sent is counted."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._ws is not None and self._ws.close_code is None:
            self._ws.transport.abort()  # cancelled mid-connection: leave no socket behind
        for _, frame in self._outbox:
            self._count_unsent(frame)
        self._outbox.clear()
        self._replay.clear()
        if self.stats.frames_unsent:
            log.error("call %s: %d frames (%d bytes) of audio never reached Deepgram",
                      self.label, self.stats.frames_unsent, self.stats.bytes_unsent)

    # --- connections ---------------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0  # in a row, without any message from Deepgram in between
        try:
            while True:
                try:
                    ws = await self._connect()
                except _Retry as exc:
                    self.stats.connect_failures += 1
                    metrics.upstream_connect_failures_total.labels(exc.kind).inc()
                    log.warning("call %s: %s; retrying (attempt %d)", self.label, exc, failures + 1)
                else:
                    messages_before = self.stats.messages
                    if await self._session(ws):
                        return
                    if self.stats.messages > messages_before:
                        failures = 0
                    self.stats.reconnects += 1
                    metrics.upstream_reconnects_total.inc()
                    self._outbox.extendleft(reversed(self._replay))  # send it all again
                    self.stats.replayed_bytes += sum(len(f) for _, f in self._replay)
                    self._replay.clear()
                delay = RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS) - 1)]
                failures += 1
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
        except _Closed:
            return

    async def _connect(self) -> ClientConnection:
        try:
            return await connect(
                self.url,
                additional_headers=self._headers,
                open_timeout=self.connect_timeout,
                max_size=self.max_message_bytes,
                compression=None,  # audio does not deflate; it would only cost CPU
            )
        except InvalidStatus as exc:
            response = exc.response
            reason = response.headers.get("dg-error", "") or response.body.decode(errors="replace")[:200]
            detail = (f"Deepgram refused the connection: HTTP {response.status_code} {reason} "
                      f"(dg-request-id {response.headers.get('dg-request-id', '-')})")
            if response.status_code in PERMANENT_STATUSES:
                self._fail(detail)
                raise _Closed from None
            raise _Retry(f"http_{response.status_code}", detail) from None
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            raise _Retry("unreachable", f"cannot reach Deepgram: {exc or type(exc).__name__}") from None

    async def _session(self, ws: ClientConnection) -> bool:
        """One connection, until it closes. True when the stream ended as asked (CloseStream)."""
        self.stats.connections += 1
        self._ws = ws
        first = self._outbox[0][0] if self._outbox else self._position
        self._map_conn, self._map_call = [0], [first]
        self._conn_bytes = 0
        self._verbatim = first == 0 and self.stats.connections == 1
        backlog = self._backlog_seconds()
        if self.stats.connections > 1:
            log.warning("call %s: reconnected to Deepgram; sending %.1f s of audio again from %.1f s",
                        self.label, backlog, first / BYTES_PER_SECOND)
        writer = asyncio.create_task(self._write(ws, pace=backlog > CATCH_UP_SECONDS))
        self._direct = ws  # used only while the outbox is empty, i.e. once any backlog has gone
        try:
            ended = await self._read(ws)
        finally:
            self._direct = None
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            if ws.close_code is None:
                ws.transport.abort()  # a stuck peer: do not wait for a close handshake
            await ws.wait_closed()
        return ended

    async def _write(self, ws: ClientConnection, *, pace: bool) -> None:
        started, sent_seconds = time.monotonic(), 0.0
        while True:
            if not self._outbox:
                pace = False  # caught up: from now on audio goes as it comes
                if self._closing:
                    await ws.send(CLOSE_STREAM)
                    return
                idle = time.monotonic() - self._last_sent
                if idle >= self.keepalive_seconds:
                    await ws.send(KEEPALIVE)
                    self.stats.keepalives += 1
                    self._last_sent = time.monotonic()
                    continue
                self._wakeup.clear()  # set when a frame is queued, or by finish()
                try:
                    async with asyncio.timeout(self.keepalive_seconds - idle):
                        await self._wakeup.wait()
                except TimeoutError:
                    pass
                continue
            position, frame = self._outbox[0]
            if pace:
                ahead = (sent_seconds - CATCH_UP_SECONDS) / REPLAY_SPEED - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            await ws.send(frame)
            self._outbox.popleft()
            self._note_sent(position, frame)
            sent_seconds += len(frame) / 2 / BYTES_PER_SECOND

    def _note_sent(self, position: int, frame: bytes) -> None:
        if position != self._map_call[-1] + (self._conn_bytes - self._map_conn[-1]):
            self._map_conn.append(self._conn_bytes)  # a hole in the call's audio (dropped frames)
            self._map_call.append(position)
            self._verbatim = False
        self._conn_bytes += len(frame) // 2
        self._last_sent = time.monotonic()
        self._replay.append((position, frame))
        if len(self._replay) > self.replay_frames:
            self._replay.popleft()  # Deepgram has long had it; the window only bounds a replay
        self.stats.frames_sent += 1
        self.stats.bytes_sent += len(frame)

    async def _read(self, ws: ClientConnection) -> bool:
        try:
            async for message in ws:
                if isinstance(message, str):
                    self._on_text(message)
                else:
                    log.warning("call %s: unexpected binary message from Deepgram ignored", self.label)
        except ConnectionClosedError as exc:
            close = exc.rcvd
            if close is not None and close.code == 1008:
                self._fail(f"Deepgram closed the stream: 1008 {close.reason} (the audio was not accepted)")
                raise _Closed from None
            log.warning("call %s: Deepgram connection dropped (%s); reconnecting", self.label,
                        f"{close.code} {close.reason}".strip() if close else "no close frame")
            return False
        if self._closing and not self._outbox:
            return True
        log.warning("call %s: Deepgram closed the connection unexpectedly; reconnecting", self.label)
        return False

    # --- messages --------------------------------------------------------------------------

    def _on_text(self, message: str) -> None:
        try:
            data = orjson.loads(message)  # per message from Deepgram: 3x faster than json.loads
            kind = data.get("type")
        except (ValueError, AttributeError):
            log.warning("call %s: Deepgram sent a message that is not a JSON object", self.label)
            return
        if kind == "Results" and not self._on_results(data):
            self.stats.seam_duplicates += 1
            return
        if kind == "Metadata":
            self.stats.metadata_received = True
        if not self._verbatim:
            _shift_times(data, self._call_time)
            message = orjson.dumps(data).decode()
        self.stats.messages += 1
        self._on_message(message)

    def _on_results(self, data: dict) -> bool:
        """Track what finals cover; False for a result already covered (a replay duplicate)."""
        try:
            channel, self._channels = data["channel_index"][0], data["channel_index"][1]
            start = float(data["start"])
            end = self._call_time(start + float(data["duration"]))
        except (KeyError, IndexError, TypeError, ValueError):
            return True  # not ours to judge: deliver as it is
        covered = self._final_end.get(channel, 0.0)
        if not self._verbatim and end <= covered + 1e-6 and end > self._call_time(start):
            return False
        if data.get("is_final"):
            self._final_end[channel] = max(covered, end)
            self._forget_confirmed()
        return True

    def _forget_confirmed(self) -> None:
        """Drop from the replay window what every channel's finals now cover."""
        if len(self._final_end) < self._channels:
            return
        confirmed = min(self._final_end.values()) * BYTES_PER_SECOND
        while self._replay and self._replay[0][0] + len(self._replay[0][1]) // 2 <= confirmed:
            self._replay.popleft()

    def _call_time(self, seconds: float) -> float:
        """A time on this connection (seconds of audio it received) -> seconds of call audio."""
        conn_bytes = seconds * BYTES_PER_SECOND
        i = max(0, bisect.bisect_right(self._map_conn, conn_bytes) - 1)
        return (self._map_call[i] + conn_bytes - self._map_conn[i]) / BYTES_PER_SECOND

    def _fail(self, error: str, level: int = logging.ERROR) -> None:
        """Record why the stream failed (first reason wins), log it once and tell the call."""
        if self.stats.error:
            return
        self.stats.error = error
        log.log(level, "call %s: %s", self.label, error)
        self._on_error(error)

    def _count_unsent(self, frame: bytes) -> None:
        self.stats.frames_unsent += 1
        self.stats.bytes_unsent += len(frame)


class _Retry(Exception):
    """A connection attempt failed in a way that may succeed later."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


def _shift_times(data: dict, to_call_time: Callable[[float], float]) -> None:
    """Rewrite a Deepgram message's times from its connection's clock to the call's clock."""
    kind = data.get("type")
    try:
        if kind == "Results":
            start = float(data["start"])
            data["start"] = round(to_call_time(start), 3)
            for alternative in data.get("channel", {}).get("alternatives", []):
                for word in alternative.get("words", []):
                    word["start"] = round(to_call_time(float(word["start"])), 3)
                    word["end"] = round(to_call_time(float(word["end"])), 3)
        elif kind == "UtteranceEnd":
            data["last_word_end"] = round(to_call_time(float(data["last_word_end"])), 3)
        elif kind == "SpeechStarted":
            data["timestamp"] = round(to_call_time(float(data["timestamp"])), 3)
        elif kind == "Metadata":
            data["duration"] = round(to_call_time(float(data["duration"])), 3)
    except (KeyError, TypeError, ValueError):
        pass  # a field we did not expect: leave it as Deepgram sent it
