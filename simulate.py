"""Replay audio as a Twilio Media Stream against any `/twilio` WebSocket URL.

Twilio opens a WebSocket to our server and sends `connected`, `start`, a `media` message per
20 ms of mu-law audio per track, and `stop` (protocols.md section A.2). This module plays
Twilio's part so the server can be tried, tested and load-tested without a phone call:

* `TwilioStream` builds the messages and nothing else (no sockets), so tests can hand-craft
  streams, including broken ones.
* `run_call()` plays one call in real time (or as fast as possible), optionally with the faults a
  real network adds: lost, late, reordered and duplicated packets, a hold, a hang-up without
  `stop`, a dropped TCP connection. `run_calls()` plays many calls at once.
* The command line (`python simulate.py --help`) wraps both for people.

Timing model. Every chunk has a `timestamp` (ms since the stream began) and is sent when the
stream clock reaches that timestamp. A fault never renumbers a chunk: a lost chunk leaves a gap
in both `chunk` and `timestamp`, and a late or duplicated chunk carries its original numbers,
which is how Twilio's counters look when packets go missing upstream (protocols.md A.5).

A pause (a call on hold) is different: the audio itself stops and resumes where it left off.
Chunks after the pause keep consecutive `chunk` numbers, but their `timestamp` jumps by the
length of the pause, because the stream clock kept running while nothing was sent. A server
that fills timestamp gaps with silence therefore inserts the hold as silence.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import random
import secrets
import ssl
import sys
import time
import wave
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

import codec

logger = logging.getLogger(__name__)

SAMPLE_RATE = 8000
BYTES_PER_MS = SAMPLE_RATE // 1000  # mu-law: one byte per sample
TRACKS = ("inbound", "outbound")  # the order Twilio lists them in `start.tracks`
CLOSE_TIMEOUT = 5.0  # seconds to wait for the server's half of the close handshake


def new_sid(prefix: str) -> str:
    """A Twilio-style id: two-letter prefix and 32 lowercase hex digits (e.g. `CA…` for calls)."""
    return prefix + secrets.token_hex(16)


# --------------------------------------------------------------------------------------------
# Messages


def _compact(message: dict) -> str:
    return json.dumps(message, separators=(",", ":"))


@dataclass
class TwilioStream:
    """The messages of one Media Stream, as JSON text, in the exact shape Twilio sends them.

    The object only counts: `sequenceNumber` (shared by every message after `connected`) and the
    per-track `chunk` numbers. Sending is up to the caller, so a test can send messages in any
    order, on any socket, or leave some out.
    """

    account_sid: str = field(default_factory=lambda: new_sid("AC"))
    call_sid: str = field(default_factory=lambda: new_sid("CA"))
    stream_sid: str = field(default_factory=lambda: new_sid("MZ"))
    tracks: list[str] = field(default_factory=lambda: ["inbound"])
    custom_parameters: dict[str, str] = field(default_factory=dict)
    sequence: int = field(default=0, init=False)
    """The last `sequenceNumber` handed out (0 before `start`)."""
    last_chunk: dict[str, int] = field(default_factory=dict, init=False)
    """The highest `chunk` number handed out per track."""

    def _next_sequence(self) -> str:
        self.sequence += 1
        return str(self.sequence)

    def connected(self) -> str:
        """First message; it carries no `streamSid` and no `sequenceNumber`."""
        return _compact({"event": "connected", "protocol": "Call", "version": "1.0.0"})

    def start(self) -> str:
        """The stream's metadata, `sequenceNumber` "1"; the only place customParameters appear."""
        return _compact(
            {
                "event": "start",
                "sequenceNumber": self._next_sequence(),
                "streamSid": self.stream_sid,
                "start": {
                    "accountSid": self.account_sid,
                    "streamSid": self.stream_sid,
                    "callSid": self.call_sid,
                    "tracks": list(self.tracks),
                    "customParameters": dict(self.custom_parameters),
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": SAMPLE_RATE, "channels": 1},
                },
            }
        )

    def media(self, track: str, timestamp_ms: int, payload: bytes, chunk: int | None = None) -> str:
        """One chunk of mu-law audio of `track` ("inbound" or "outbound").

        `chunk` defaults to the track's next number; pass it to replay a chunk that is late,
        duplicated or follows a lost one, since those keep their original number.
        """
        if chunk is None:
            chunk = self.last_chunk.get(track, 0) + 1
        self.last_chunk[track] = max(chunk, self.last_chunk.get(track, 0))
        return _compact(
            {
                "event": "media",
                "sequenceNumber": self._next_sequence(),
                "streamSid": self.stream_sid,
                "media": {
                    "track": track,
                    "chunk": str(chunk),
                    "timestamp": str(timestamp_ms),
                    "payload": base64.b64encode(payload).decode("ascii"),
                },
            }
        )

    def stop(self) -> str:
        """Last message: the caller hung up or the stream was stopped."""
        return _compact(
            {
                "event": "stop",
                "sequenceNumber": self._next_sequence(),
                "streamSid": self.stream_sid,
                "stop": {"accountSid": self.account_sid, "callSid": self.call_sid},
            }
        )


# --------------------------------------------------------------------------------------------
# Planning a call: which chunk goes out when


@dataclass(frozen=True, slots=True)
class Chunk:
    """One `media` message's content."""

    track: str
    chunk: int
    timestamp: int  # ms since the stream began
    payload: bytes


@dataclass(frozen=True, slots=True)
class SentChunk(Chunk):
    """A chunk as it went out: its `sequenceNumber` and `time.monotonic()` just before sending."""

    sequence: int
    sent_at: float


@dataclass(frozen=True, slots=True)
class PlannedSend:
    """A chunk and the stream time (ms) at which to send it."""

    at_ms: float
    chunk: Chunk


@dataclass
class CallOptions:
    """Everything about one simulated call. Audio is 8 kHz mu-law; a leg that is None is absent."""

    inbound: bytes | None = None
    outbound: bytes | None = None
    outbound_delay_ms: int = 0
    """The outbound leg starts this late (the dialed party answers late); its timestamps too."""
    speed: float = 1.0
    """1.0 = real time, 2.0 = twice as fast; <= 0 sends everything without sleeping."""
    frame_ms: int = 20
    """Audio per `media` message; the last chunk of a leg may be shorter."""
    loss: float = 0.0
    """Probability that a chunk is never sent."""
    jitter_ms: float = 0.0
    """Each chunk is sent up to this much later than due (uniformly), which can reorder."""
    reorder: float = 0.0
    """Probability that a chunk swaps places with its successor on the same track."""
    dup: float = 0.0
    """Probability that a chunk is sent twice in a row."""
    pause_at: float | None = None
    """Stream time (s) at which the call goes on hold: no media for `pause_for` seconds."""
    pause_for: float = 0.0
    hangup: bool = False
    """End by closing the WebSocket normally but without sending `stop`."""
    abort: bool = False
    """End by dropping the TCP connection: no `stop`, no close frame."""
    params: dict[str, str] = field(default_factory=dict)
    """`start.customParameters` (TwiML `<Parameter>`s)."""
    call_sid: str | None = None
    stream_sid: str | None = None
    account_sid: str | None = None
    seed: int | None = None
    """Seed for the fault dice, so a failing run can be replayed exactly."""
    start_offset_ms: float = 0.0
    """Wait this long before connecting (spreads many calls over the 20 ms tick)."""
    additional_headers: dict[str, str] = field(default_factory=dict)
    ssl_context: ssl.SSLContext | None = None
    """For wss:// URLs, e.g. a context trusting a test CA; None = system defaults."""

    def tracks(self) -> list[str]:
        """The legs present, in Twilio's order (the `start.tracks` value)."""
        return [t for t, audio in zip(TRACKS, (self.inbound, self.outbound)) if audio is not None]


def _leg_chunks(track: str, audio: bytes, options: CallOptions) -> list[Chunk]:
    """Cut a leg into frames and stamp them with stream time, skipping over the pause."""
    size = options.frame_ms * BYTES_PER_MS
    offset = options.outbound_delay_ms if track == "outbound" else 0
    pause_start = None if options.pause_at is None else round(options.pause_at * 1000)
    pause_ms = round(options.pause_for * 1000)
    chunks = []
    for index, start in enumerate(range(0, len(audio), size)):
        timestamp = offset + index * options.frame_ms
        if pause_start is not None and timestamp >= pause_start:
            timestamp += pause_ms
        chunks.append(Chunk(track, index + 1, timestamp, audio[start : start + size]))
    return chunks


def plan_media(options: CallOptions, rng: random.Random) -> tuple[list[PlannedSend], list[Chunk]]:
    """Decide every send of the call up front: (sends in order, chunks lost).

    Doing this before connecting keeps the send loop down to sleeping and sending, and makes
    the faults depend on the seed only, never on timing.
    """
    planned: list[PlannedSend] = []
    lost: list[Chunk] = []
    for track, audio in zip(TRACKS, (options.inbound, options.outbound)):
        if audio is None:
            continue
        kept = []
        for chunk in _leg_chunks(track, audio, options):
            (lost if rng.random() < options.loss else kept).append(chunk)
        slots = [chunk.timestamp for chunk in kept]  # send times, before any reordering
        i = 0
        while i + 1 < len(kept):
            if rng.random() < options.reorder:
                kept[i], kept[i + 1] = kept[i + 1], kept[i]  # the later chunk takes the earlier slot
                i += 2
            else:
                i += 1
        for chunk, slot in zip(kept, slots):
            at_ms = slot + rng.uniform(0, options.jitter_ms) if options.jitter_ms > 0 else slot
            planned.append(PlannedSend(at_ms, chunk))
            if rng.random() < options.dup:
                planned.append(PlannedSend(at_ms, chunk))
    # Stable sort: equal times keep inbound before outbound and a duplicate after its original.
    planned.sort(key=lambda send: send.at_ms)
    return planned, lost


# --------------------------------------------------------------------------------------------
# Running calls


class CallRefused(Exception):
    """The WebSocket could not be opened (HTTP status, nothing listening, TLS, bad URL)."""


@dataclass
class CallResult:
    """What one call sent and how it ended, for tests to compare with what the server saw."""

    call_sid: str
    stream_sid: str
    sent: list[SentChunk]
    """Every `media` message in send order, duplicates included."""
    lost: list[Chunk]
    """Chunks deliberately not sent (their numbers are missing from the stream)."""
    stop_sent: bool
    received: int
    """Messages the server sent us (read and discarded)."""
    close_code: int | None
    """Close code sent by the server; 1006 when the connection ended without one."""
    close_reason: str
    error: str | None = None
    """Set when the connection ended before the call was over (e.g. the server closed it)."""
    started_at: float = 0.0
    """`time.monotonic()` just before `connected` went out."""
    ended_at: float = 0.0

    @property
    def duplicates(self) -> int:
        return len(self.sent) - len({(c.track, c.chunk) for c in self.sent})

    def summary(self) -> str:
        """One line for people: ids, media counts, how the call ended."""
        per_track = ", ".join(f"{t} {sum(c.track == t for c in self.sent)}" for t in TRACKS)
        ending = self.error or ("stop" if self.stop_sent else "no stop")
        return (
            f"{self.call_sid} stream={self.stream_sid} media={len(self.sent)} ({per_track}) "
            f"lost={len(self.lost)} duplicated={self.duplicates} received={self.received} "
            f"close={self.close_code} {self.close_reason!r} ended={ending} "
            f"seconds={self.ended_at - self.started_at:.2f}"
        )


def _refusal(url: str, exc: Exception) -> CallRefused:
    """Turn a connection failure into one readable line."""
    if isinstance(exc, InvalidStatus):
        reason = f"server answered HTTP {exc.response.status_code} instead of upgrading"
    elif isinstance(exc, ssl.SSLError):
        detail = getattr(exc, "verify_message", None) or exc.reason or str(exc)  # e.g. "self-signed certificate"
        reason = f"TLS handshake failed: {detail}"
    elif isinstance(exc, ConnectionRefusedError):
        reason = "connection refused (is the server running?)"
    elif isinstance(exc, TimeoutError):
        reason = "timed out while connecting"
    else:
        reason = str(exc) or type(exc).__name__
    return CallRefused(f"cannot connect to {url}: {reason}")


async def _open(url: str, options: CallOptions) -> ClientConnection:
    """Open the WebSocket without compression: per-message deflate would cost CPU on both ends
    under load, and we have no sign that Twilio negotiates it."""
    kwargs = {}
    if options.ssl_context is not None:
        kwargs["ssl"] = options.ssl_context
    try:
        return await connect(
            url,
            additional_headers=options.additional_headers,
            compression=None,
            close_timeout=CLOSE_TIMEOUT,
            **kwargs,
        )
    except (InvalidHandshake, InvalidURI, OSError, TimeoutError) as exc:
        raise _refusal(url, exc) from exc


async def _count_incoming(ws: ClientConnection) -> int:
    """Read and discard whatever the server sends, so its frames never pile up in our buffers."""
    count = 0
    try:
        async for _ in ws:
            count += 1
    except ConnectionClosed:
        pass
    return count


async def _send_media(
    ws: ClientConnection, stream: TwilioStream, plan: list[PlannedSend], speed: float, sent: list[SentChunk]
) -> None:
    """Send the planned chunks, sleeping until absolute deadlines so the pace never drifts.

    If the event loop falls behind (an overloaded machine), the overdue chunks go out at once
    and the call is back on schedule, as a real network's burst after a stall would be.
    """
    t0 = time.monotonic()
    due_ms = None
    for send in plan:
        if speed > 0 and send.at_ms != due_ms:  # chunks due together go out together
            due_ms = send.at_ms
            delay = t0 + due_ms / 1000 / speed - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        chunk = send.chunk
        text = stream.media(chunk.track, chunk.timestamp, chunk.payload, chunk=chunk.chunk)
        sent_at = time.monotonic()
        await ws.send(text)
        sent.append(SentChunk(chunk.track, chunk.chunk, chunk.timestamp, chunk.payload, stream.sequence, sent_at))


async def _flush(ws: ClientConnection) -> None:
    """Wait (bounded) until every byte written so far is handed to the OS.

    `transport.abort()` discards what asyncio still buffers; without this, an aborted call would
    lose its last chunks silently and `CallResult.sent` would overstate what was sent.
    """
    deadline = time.monotonic() + CLOSE_TIMEOUT
    while ws.transport.get_write_buffer_size() and time.monotonic() < deadline:
        await asyncio.sleep(0.005)


async def run_call(url: str, options: CallOptions) -> CallResult:
    """Play one call against `url`; raise `CallRefused` if the WebSocket cannot be opened.

    A server closing the connection mid-call is not an exception: it is reported in
    `CallResult.error` with the close code, as a test usually wants to inspect it.
    """
    tracks = options.tracks()
    if not tracks:
        raise ValueError("a call needs inbound or outbound audio")
    stream = TwilioStream(
        account_sid=options.account_sid or new_sid("AC"),
        call_sid=options.call_sid or new_sid("CA"),
        stream_sid=options.stream_sid or new_sid("MZ"),
        tracks=tracks,
        custom_parameters=dict(options.params),
    )
    plan, lost = plan_media(options, random.Random(options.seed))
    if options.start_offset_ms > 0:
        await asyncio.sleep(options.start_offset_ms / 1000)

    ws = await _open(url, options)
    logger.debug("call %s connected to %s", stream.call_sid, url)
    incoming = asyncio.create_task(_count_incoming(ws))
    sent: list[SentChunk] = []
    stop_sent = False
    error = None
    started_at = time.monotonic()
    try:
        await ws.send(stream.connected())
        await ws.send(stream.start())
        await _send_media(ws, stream, plan, options.speed, sent)
        if options.abort:
            await _flush(ws)
            ws.transport.abort()
        else:
            if not options.hangup:
                await ws.send(stream.stop())
                stop_sent = True
            await ws.close()
    except ConnectionClosed as exc:
        received = exc.rcvd
        error = f"connection closed early ({received.code} {received.reason!r})" if received else "connection lost"
    finally:
        # A no-op after a normal close; after a cancellation it frees the socket at once.
        ws.transport.abort()
        await ws.wait_closed()
        received_count = await incoming
    result = CallResult(
        call_sid=stream.call_sid,
        stream_sid=stream.stream_sid,
        sent=sent,
        lost=lost,
        stop_sent=stop_sent,
        received=received_count,
        close_code=ws.close_code,
        close_reason=ws.close_reason or "",
        error=error,
        started_at=started_at,
        ended_at=time.monotonic(),
    )
    logger.info("%s", result.summary())
    return result


async def run_calls(url: str, options_list: list[CallOptions]) -> list[CallResult]:
    """Play many calls concurrently, one task each; results in the order of `options_list`.

    The first `CallRefused` cancels the other calls and is raised. To keep going past refusals
    (e.g. to count HTTP 429s under load), gather `run_call()` with `return_exceptions=True`.
    """
    tasks = [asyncio.create_task(run_call(url, options)) for options in options_list]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# --------------------------------------------------------------------------------------------
# Agent calls: the caller's side of a <Connect><Stream>, with Twilio's player

SILENCE_FRAME = b"\xff" * 160
ALLOWED_SHAPES = {  # what the server may send on a bidirectional stream (protocols.md A.3), exactly
    "media": {"event", "streamSid", "media"},
    "mark": {"event", "streamSid", "mark"},
    "clear": {"event", "streamSid"},
}


@dataclass
class AgentCallResult:
    """What the simulated caller heard and what the server sent it."""

    call_sid: str
    stream_sid: str
    heard: bytearray
    """The agent audio as the caller heard it, 8 kHz mu-law from the start of the stream, with
    silence (0xFF) wherever nothing was playing."""
    received: bytearray
    """Every `media` payload, concatenated in arrival order (what the server sent)."""
    messages: list[tuple[float, dict]] = field(default_factory=list)
    """Every message from the server with its arrival time (seconds since `connected`)."""
    echoed: list[tuple[float, str]] = field(default_factory=list)
    """Marks echoed back: (time, name)."""
    clears: list[float] = field(default_factory=list)
    dtmf: list[tuple[float, str]] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    """Server messages that are not exactly a `media`, `mark` or `clear` of this stream."""
    close_code: int | None = None
    close_reason: str = ""
    closed_by_server: bool = False
    closed_at: float | None = None
    """When the server closed the socket (seconds since `connected`), if it did."""
    error: str | None = None
    started_at: float = 0.0
    """`time.monotonic()` when `connected` went out; the other times count from it."""

    def summary(self) -> str:
        played = sum(1 for b in self.heard if b != 0xFF) / SAMPLE_RATE
        ending = (f"server closed at {self.closed_at:.2f} s ({self.close_code} {self.close_reason!r})"
                  if self.closed_by_server else "caller ended")
        return (f"{self.call_sid} agent audio received {len(self.received) / SAMPLE_RATE:.2f} s, heard "
                f"{played:.2f} s in {len(self.heard) / SAMPLE_RATE:.2f} s, marks echoed {len(self.echoed)}, "
                f"clears {len(self.clears)}, dtmf {len(self.dtmf)}, {ending}"
                + (f", {len(self.violations)} protocol violations" if self.violations else ""))


class TwilioPlayer:
    """Twilio's playback of a bidirectional stream: what the server sends is queued and played at
    real time, 20 ms per tick; a mark is echoed once everything before it has played (at once if
    nothing is queued); `clear` drops the queue and echoes its pending marks at once."""

    def __init__(self, ws: ClientConnection, stream: TwilioStream, result: AgentCallResult, t0: float):
        self.ws, self.stream, self.result, self.t0 = ws, stream, result, t0
        self.queue: deque[bytes | str] = deque()  # audio (bytes) and mark names (str), in order
        self.queued_audio = 0

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def on_message(self, text: str | bytes) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            message = None
        event = message.get("event") if isinstance(message, dict) else None
        if event not in ALLOWED_SHAPES or set(message) != ALLOWED_SHAPES[event] \
                or message["streamSid"] != self.stream.stream_sid:
            self.result.violations.append(f"unexpected message: {str(text)[:120]}")
            return
        self.result.messages.append((self.now(), message))
        if event == "media":
            media = message["media"]
            if not isinstance(media, dict) or set(media) != {"payload"}:
                self.result.violations.append(f"media with fields {sorted(media)}")
                return
            audio = base64.b64decode(media["payload"])
            self.result.received += audio
            self.queue.append(audio)
            self.queued_audio += len(audio)
        elif event == "mark":
            mark = message["mark"]
            if not isinstance(mark, dict) or set(mark) != {"name"}:
                self.result.violations.append(f"mark with fields {sorted(mark)}")
                return
            self.queue.append(mark["name"])
            await self.echo_ready()
        else:
            self.result.clears.append(self.now())
            names = [item for item in self.queue if isinstance(item, str)]
            self.queue.clear()
            self.queued_audio = 0
            for name in names:
                await self.echo(name)

    async def echo(self, name: str) -> None:
        self.result.echoed.append((self.now(), name))
        await self.ws.send(_compact({"event": "mark", "sequenceNumber": str(self.stream.sequence + 1),
                                     "streamSid": self.stream.stream_sid, "mark": {"name": name}}))
        self.stream.sequence += 1

    async def echo_ready(self) -> None:
        """Echo the marks at the head of the queue: everything before them has played."""
        while self.queue and isinstance(self.queue[0], str):
            await self.echo(self.queue.popleft())

    def take(self, n: int) -> bytes:
        """The next `n` bytes to play (silence where the queue runs dry)."""
        out = bytearray()
        while len(out) < n and self.queue and isinstance(self.queue[0], bytes):
            audio = self.queue.popleft()
            need = n - len(out)
            if len(audio) > need:
                self.queue.appendleft(audio[need:])
                audio = audio[:need]
            out += audio
            self.queued_audio -= len(audio)
        return bytes(out) + b"\xff" * (n - len(out))

    def idle(self) -> bool:
        return not self.queue


def _agent_sends(audio: bytes, dtmf: list[tuple[float, str]]) -> list[tuple[float, str, bytes | str]]:
    """The caller's schedule: 20 ms media frames of `audio`, and keypresses at their times."""
    sends: list[tuple[float, str, bytes | str]] = [
        (i / 50, "media", audio[i * 160:(i + 1) * 160]) for i in range((len(audio) + 159) // 160)]
    for at, digits in dtmf:
        sends += [(at + k * 0.1, "dtmf", digit) for k, digit in enumerate(digits)]
    return sorted(sends, key=lambda s: s[0])


async def run_agent_call(url: str, audio: bytes, *, dtmf: list[tuple[float, str]] = (), tail: float = 4.0,
                         max_seconds: float = 120.0, hangup: bool = False, params: dict[str, str] | None = None,
                         call_sid: str | None = None, additional_headers: dict[str, str] | None = None,
                         ssl_context: ssl.SSLContext | None = None) -> AgentCallResult:
    """Play the caller of an agent call against a /agent URL, in real time.

    The caller's `audio` is streamed as inbound media; afterwards silence is streamed until
    nothing has played for `tail` seconds (the agent has finished), the server closes the socket,
    or `max_seconds` pass. Then `stop` (or, with `hangup`, a close without it).
    """
    stream = TwilioStream(call_sid=call_sid or new_sid("CA"), tracks=["inbound"], custom_parameters=dict(params or {}))
    result = AgentCallResult(stream.call_sid, stream.stream_sid, bytearray(), bytearray())
    options = CallOptions(inbound=audio, additional_headers=dict(additional_headers or {}), ssl_context=ssl_context)
    ws = await _open(url, options)
    t0 = result.started_at = time.monotonic()
    player = TwilioPlayer(ws, stream, result, t0)

    async def read() -> None:
        try:
            async for message in ws:
                await player.on_message(message)
        except ConnectionClosed:
            pass
        result.closed_at = time.monotonic() - t0

    reader = asyncio.create_task(read())
    schedule = deque(_agent_sends(audio, list(dtmf)))
    audio_ticks = (len(audio) + 159) // 160
    try:
        await ws.send(stream.connected())
        await ws.send(stream.start())
        tick, quiet_since = 0, 0.0
        while not reader.done():
            now = tick / 50
            while schedule and schedule[0][0] <= now:
                _, kind, value = schedule.popleft()
                if kind == "dtmf":
                    result.dtmf.append((time.monotonic() - t0, value))
                    await ws.send(_compact({"event": "dtmf", "sequenceNumber": str(stream.sequence + 1),
                                            "streamSid": stream.stream_sid,
                                            "dtmf": {"track": "inbound_track", "digit": value}}))
                    stream.sequence += 1
                else:
                    await ws.send(stream.media("inbound", tick * 20, value))
            if tick >= audio_ticks:
                await ws.send(stream.media("inbound", tick * 20, SILENCE_FRAME))  # the line stays open
            await player.echo_ready()
            result.heard += player.take(160)  # this tick's 20 ms of playback
            if not player.idle() or schedule:
                quiet_since = now
            if (not schedule and now - quiet_since >= tail) or now >= max_seconds:
                break
            tick += 1
            delay = t0 + tick / 50 - time.monotonic()
            if delay > 0:
                try:
                    await asyncio.wait_for(asyncio.shield(reader), delay)
                except TimeoutError:
                    pass
        if reader.done():
            result.closed_by_server = True
        elif hangup:
            await ws.close()
        else:
            await ws.send(stream.stop())
            await ws.close()
    except ConnectionClosed as exc:
        received = exc.rcvd
        result.closed_by_server = True
        result.error = f"connection closed ({received.code} {received.reason!r})" if received else "connection lost"
    finally:
        ws.transport.abort()
        await ws.wait_closed()
        await reader
    result.close_code, result.close_reason = ws.close_code, ws.close_reason or ""
    logger.info("%s", result.summary())
    return result


def write_wav(path: Path, mulaw: bytes) -> None:
    """8 kHz mono 16-bit PCM WAV of mu-law audio (what a media player opens)."""
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(codec.ulaw_to_pcm16(mulaw).astype("<i2").tobytes())


# --------------------------------------------------------------------------------------------
# Command line

RAW_SUFFIXES = {".ulaw", ".mulaw", ".ul", ".raw"}
DEMO_SECONDS = 3.0
DEMO_TONES_HZ = (440.0, 660.0)  # inbound, outbound

USAGE_NOTES = """\
audio:
  no AUDIO         a 3 s demo: a 440 Hz tone on inbound and 660 Hz on outbound
  one file         mono: the inbound leg (--track outbound/both to move or copy it);
                   stereo WAV: left = inbound, right = outbound
  two files        inbound, then outbound
  WAV files may be PCM16 or mu-law at any sample rate (converted to 8 kHz mu-law);
  .ulaw/.mulaw/.ul/.raw files (or any file with --raw) are headerless 8 kHz mu-law.

output:
  stdout starts with the callSid of every call, one per line, printed before any audio is
  sent (so you can subscribe to the call while it plays), then one summary line per call.
  Exit status 1 when a connection is refused or a call is cut off by the server.

examples:
  python simulate.py ws://127.0.0.1:8080/twilio
  python simulate.py wss://proxy.example.com/twilio caller.wav agent.wav --param tenant=acme
  python simulate.py ws://127.0.0.1:8080/twilio call.wav --fast --loss 0.05 --seed 7
  python simulate.py --agent ws://127.0.0.1:5000/agent caller.wav --record heard.wav --dtmf 5@3.2
"""


def _tone(hz: float, seconds: float) -> bytes:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return codec.pcm16_to_ulaw((8000 * np.sin(2 * np.pi * hz * t)).astype(np.int16))


def _read_audio(path: Path, raw: bool) -> list[bytes]:
    """One 8 kHz mu-law bytes object per channel of the file."""
    data = path.read_bytes()
    if data[:4] == b"RIFF":
        return codec.wav_to_mulaw_8k(data)
    if raw or path.suffix.lower() in RAW_SUFFIXES:
        return [data]
    raise ValueError(f"{path}: not a WAV file; use --raw for headerless 8 kHz mu-law")


def _legs(paths: list[Path], raw: bool, track: str | None) -> dict[str, bytes]:
    """Map the AUDIO arguments and --track to {track name: mu-law audio}."""
    if paths:
        channels = [channel for path in paths for channel in _read_audio(path, raw)]
    else:
        channels = [_tone(hz, DEMO_SECONDS) for hz in DEMO_TONES_HZ]
    if len(channels) > 2:
        raise ValueError("give one mono file, one stereo WAV or two mono files")
    if len(channels) == 1:
        names = TRACKS if track == "both" else [track or "inbound"]
        return {name: channels[0] for name in names}
    legs = dict(zip(TRACKS, channels))
    return legs if track in (None, "both") else {track: legs[track]}


def _probability(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return value


def _param(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError("expected NAME=VALUE")
    return name, value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simulate.py",
        description="Replay audio as a Twilio Media Stream (<Start><Stream>) against a WebSocket URL.",
        epilog=USAGE_NOTES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("url", metavar="URL",
                        help="ws:// or wss:// URL of the /twilio (or, with --agent, /agent) endpoint")
    parser.add_argument("audio", metavar="AUDIO", nargs="*", type=Path, help="WAV or raw mu-law file(s)")
    parser.add_argument("--raw", action="store_true", help="AUDIO files are headerless 8 kHz mu-law")
    parser.add_argument("--track", choices=["inbound", "outbound", "both"], help="which leg(s) to send")
    parser.add_argument("--outbound-delay", type=int, default=0, metavar="MS", help="outbound leg starts MS later")
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument("--speed", type=float, default=1.0, metavar="N", help="N times real time (default 1)")
    pace.add_argument("--fast", action="store_true", help="send as fast as possible")
    faults = parser.add_argument_group("network faults")
    faults.add_argument("--loss", type=_probability, default=0.0, metavar="P", help="drop each chunk with probability P")
    faults.add_argument("--jitter", type=float, default=0.0, metavar="MS", help="delay each chunk by up to MS")
    faults.add_argument("--reorder", type=_probability, default=0.0, metavar="P", help="swap a chunk with the next")
    faults.add_argument("--dup", type=_probability, default=0.0, metavar="P", help="send a chunk twice")
    faults.add_argument("--seed", type=int, help="seed for the faults (reproducible runs)")
    hold = parser.add_argument_group("hold (no media; timestamps jump by the pause afterwards)")
    hold.add_argument("--pause", type=float, metavar="S", help="hold for S seconds at mid-call")
    hold.add_argument("--pause-at", type=float, metavar="S", help="hold starting S seconds into the call")
    hold.add_argument("--pause-for", type=float, default=0.0, metavar="S", help="length of the hold in seconds")
    ending = parser.add_mutually_exclusive_group()
    ending.add_argument("--hangup", action="store_true", help="close the WebSocket without sending stop")
    ending.add_argument("--abort", action="store_true", help="drop the TCP connection (no stop, no close frame)")
    parser.add_argument("--param", type=_param, action="append", default=[], metavar="K=V", help="customParameter")
    parser.add_argument("--calls", type=int, default=1, metavar="N", help="N concurrent calls")
    parser.add_argument("--call-sid", help="use this callSid (shared by all --calls)")
    tls = parser.add_argument_group("wss://")
    tls.add_argument("--cafile", help="trust the CA certificates in this PEM file")
    tls.add_argument("--insecure", action="store_true", help="do not verify the server certificate")
    agent = parser.add_argument_group("agent calls (<Connect><Stream> to /agent): AUDIO is the caller")
    agent.add_argument("--agent", action="store_true", help="be the caller of a voice-agent call and play "
                       "what the server sends at real time, echoing marks and honouring clear")
    agent.add_argument("--record", type=Path, metavar="WAV", help="write what the caller heard (silence where "
                       "nothing played) to this WAV file")
    agent.add_argument("--speak-at", type=float, default=0.0, metavar="S", help="the caller starts speaking S "
                       "seconds into the call, after silence (e.g. once the greeting has played; default 0)")
    agent.add_argument("--dtmf", type=_keypress, action="append", default=[], metavar="DIGITS@S",
                       help="press keys S seconds into the call, e.g. 5@3.2 or 1234#@8 (repeatable)")
    agent.add_argument("--tail", type=float, default=4.0, metavar="S", help="after the caller's audio, stay "
                       "on the line until nothing has played for S seconds (default 4)")
    agent.add_argument("--max-seconds", type=float, default=120.0, metavar="S", help="hang up after S seconds")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    return parser


def _keypress(text: str) -> tuple[float, str]:
    digits, sep, at = text.partition("@")
    try:
        seconds = float(at)
    except ValueError:
        seconds = -1.0
    if not sep or not digits or seconds < 0 or any(d not in "0123456789*#" for d in digits):
        raise argparse.ArgumentTypeError("expected DIGITS@SECONDS, e.g. 5@3.2")
    return seconds, digits


def _agent_main(args: argparse.Namespace, legs: dict[str, bytes]) -> int:
    """--agent: one caller, printed callSid first, then what was heard."""
    call_sid = args.call_sid or new_sid("CA")
    print(call_sid, flush=True)
    audio = legs.get("inbound") or legs.get("outbound") or b""
    audio = b"\xff" * round(args.speak_at * 8000) + audio  # mu-law silence while the caller listens
    try:
        result = asyncio.run(run_agent_call(
            args.url, audio, dtmf=args.dtmf, tail=args.tail, max_seconds=args.max_seconds, hangup=args.hangup,
            params=dict(args.param), call_sid=call_sid, ssl_context=_ssl_context(args)))
    except CallRefused as exc:
        print(f"simulate.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if args.record:
        write_wav(args.record, bytes(result.heard))
    print(result.summary())
    for violation in result.violations:
        print(f"simulate.py: {violation}", file=sys.stderr)
    return 1 if result.violations or result.error else 0


def _ssl_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not args.url.startswith("wss://"):
        return None
    context = ssl.create_default_context(cafile=args.cafile)
    if args.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _call_options(args: argparse.Namespace, legs: dict[str, bytes]) -> list[CallOptions]:
    """One CallOptions per call, starts spread evenly over one 20 ms tick."""
    pause_at, pause_for = args.pause_at, args.pause_for
    if args.pause is not None:
        longest_ms = max(len(audio) / BYTES_PER_MS + (args.outbound_delay if track == "outbound" else 0)
                         for track, audio in legs.items())
        pause_at, pause_for = longest_ms / 2000, args.pause
    context = _ssl_context(args)
    return [
        CallOptions(
            inbound=legs.get("inbound"),
            outbound=legs.get("outbound"),
            outbound_delay_ms=args.outbound_delay,
            speed=0.0 if args.fast else args.speed,
            loss=args.loss,
            jitter_ms=args.jitter,
            reorder=args.reorder,
            dup=args.dup,
            pause_at=pause_at,
            pause_for=pause_for,
            hangup=args.hangup,
            abort=args.abort,
            params=dict(args.param),
            call_sid=args.call_sid or new_sid("CA"),
            seed=None if args.seed is None else args.seed + i,
            start_offset_ms=i * 20 / args.calls,
            ssl_context=context,
        )
        for i in range(args.calls)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error("--calls must be at least 1")
    if (args.cafile or args.insecure) and not args.url.startswith("wss://"):
        parser.error("--cafile and --insecure only apply to wss:// URLs")
    if args.pause is not None and args.pause_at is not None:
        parser.error("use either --pause or --pause-at/--pause-for")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        legs = _legs(args.audio, args.raw, args.track)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    if args.agent:
        return _agent_main(args, legs)
    options_list = _call_options(args, legs)
    print("\n".join(options.call_sid for options in options_list), flush=True)
    try:
        results = asyncio.run(run_calls(args.url, options_list))
    except CallRefused as exc:
        print(f"simulate.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    for result in results:
        print(result.summary())
    failed = [result for result in results if result.error]
    for result in failed:
        print(f"simulate.py: call {result.call_sid}: {result.error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
