"""A local stand-in for Deepgram live speech-to-text (`wss://api.deepgram.com/v1/listen`).

Two jobs share this file:

* In tests and the benchmark it plays Deepgram: it checks the handshake the way Deepgram does
  (protocols.md B.1-B.2), speaks the same messages (B.3-B.4), closes with the same codes (B.3,
  B.5), records everything a connection did (`ConnectionRecord`) and can misbehave on request
  (`Faults`).
* For users without a Deepgram key, the proxy starts it in-process on loopback as the embedded
  offline engine, with a real recogniser plugged in through `engine.EngineFactory`.

The default engine, `DeterministicEngine`, recognises nothing: it names every window of audio by
channel, time range and checksum (`"ch0 1000-2000 9f3a1c2e"`), so a test can prove from the
transcripts alone that the proxy delivered every byte, in order, to the right channel.

Reading order: handshake checks, the per-connection record, the deterministic engine, message
builders, the per-connection session, the server, the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import enum
import functools
import hashlib
import http
import json
import logging
import time
import uuid
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

import codec
from engine import BYTES_PER_SECOND, Emit, Engine, EngineFactory, Segment, Word

logger = logging.getLogger(__name__)

LISTEN_PATH = "/v1/listen"
SAMPLE_RATE = 8000  # the only rate this server decodes: Twilio's 8 kHz mu-law
DEFAULT_WINDOW = 1.0  # seconds of audio per deterministic Result
KEPT_CONNECTIONS = 1000  # records kept by a server that does not record audio (record=False)

# Deepgram reports which model answered; ours is fixed, one uuid for the life of the module.
MODEL_UUID = "6b28a1a2-7e4f-4d8e-9a53-6c1f0e2d4b71"
MODEL_INFO = {"name": "local-stt", "version": "1.0", "arch": "local"}

# Container formats start with a magic number; raw mu-law has none. Seeing one means the client
# is streaming a file (WAV, Ogg, MP3, FLAC) while claiming raw audio: Deepgram's DATA-0000.
CONTAINER_MAGICS = (b"RIFF", b"OggS", b"ID3", b"fLaC")
CONTROL_TYPES = frozenset({"KeepAlive", "Finalize", "CloseStream"})


# --- Handshake ------------------------------------------------------------------------------


class HandshakeRefused(Exception):
    """The upgrade is answered with a plain HTTP error, as Deepgram does before any frame."""

    def __init__(self, status: http.HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def response(self, connection: ServerConnection) -> Response:
        """The plain HTTP answer, with Deepgram's `dg-error` header."""
        response = connection.respond(self.status, self.message + "\n")
        response.headers["dg-error"] = self.message
        return response


@dataclass(frozen=True)
class ListenParams:
    """The query parameters that change how a connection behaves."""

    channels: int
    multichannel: bool
    interim_results: bool


def parse_query(path: str) -> dict[str, list[str]]:
    """Query string of a request path; lists because Deepgram repeats some (`keyterm`)."""
    return parse_qs(urlsplit(path).query, keep_blank_values=True)


def _last(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[-1] if values else None


def _parse_bool(query: dict[str, list[str]], name: str) -> bool:
    value = _last(query, name)
    if value is None:
        return False
    if value.lower() not in ("true", "false"):
        raise HandshakeRefused(http.HTTPStatus.BAD_REQUEST, f"{name} must be true or false")
    return value.lower() == "true"


def parse_listen_params(query: dict[str, list[str]]) -> ListenParams:
    """Check the audio description in the query, the checks protocols.md B.2/B.7 call for.

    Only 8 kHz mu-law is accepted: it is all Twilio sends and all the engines read, so anything
    else is refused at the handshake rather than transcribed as garbage.
    """
    encoding = _last(query, "encoding")
    if encoding is None:
        raise HandshakeRefused(http.HTTPStatus.BAD_REQUEST, "encoding is required for raw audio")
    if encoding != "mulaw":
        raise HandshakeRefused(
            http.HTTPStatus.BAD_REQUEST, f"encoding={encoding} is unsupported by this server"
        )
    sample_rate = _last(query, "sample_rate")
    if sample_rate is None:
        raise HandshakeRefused(http.HTTPStatus.BAD_REQUEST, "sample_rate is required with encoding")
    if sample_rate != str(SAMPLE_RATE):
        raise HandshakeRefused(
            http.HTTPStatus.BAD_REQUEST, f"sample_rate={sample_rate} is unsupported by this server"
        )
    channels_text = _last(query, "channels") or "1"
    if not channels_text.isdecimal() or int(channels_text) < 1:
        raise HandshakeRefused(http.HTTPStatus.BAD_REQUEST, "channels must be an integer >= 1")
    return ListenParams(
        channels=int(channels_text),
        multichannel=_parse_bool(query, "multichannel"),
        interim_results=_parse_bool(query, "interim_results"),
    )


def check_authorization(headers: Headers, api_key: str | None) -> None:
    """`Authorization: Token <key>`; with no configured key, any non-empty token passes."""
    scheme, _, token = headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "token" or not token.strip():
        raise HandshakeRefused(http.HTTPStatus.UNAUTHORIZED, "missing Token credentials")
    if api_key is not None and token.strip() != api_key:
        raise HandshakeRefused(http.HTTPStatus.UNAUTHORIZED, "invalid credentials")


# --- What a connection did ------------------------------------------------------------------


@dataclass
class ConnectionRecord:
    """Everything one connection did, for tests and the benchmark to inspect afterwards.

    All times are `time.monotonic()`, so they compare with the client's own clock readings.
    `close_code`/`close_reason` are those of the closing handshake (1006 when the TCP
    connection was dropped without one); None while open or if the handler crashed.

    With `keep=False` (the embedded recogniser in production, which runs for months) only the
    counts and the running SHA-256 that `Metadata` needs are kept: no audio, no message log.
    """

    request_id: str
    query: dict[str, list[str]]
    headers: Headers
    params: ListenParams
    opened: float = field(default_factory=time.monotonic)
    closed: float | None = None
    raw: bytearray = field(default_factory=bytearray)
    audio: list[bytearray] = field(init=False)
    arrivals: list[tuple[float, int]] = field(default_factory=list)
    controls: list[dict[str, Any]] = field(default_factory=list)
    sent: list[tuple[float, str]] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str | None = None
    keep: bool = True  # keep the audio and every message (tests, the benchmark's fake)
    bytes_received: int = 0
    messages_sent: int = 0
    sha256: Any = field(default_factory=hashlib.sha256, repr=False)  # of every audio byte received
    _carry: bytes = field(default=b"", init=False, repr=False)  # partial interleaved sample

    def __post_init__(self) -> None:
        self.audio = [bytearray() for _ in range(self.params.channels)]

    def add_audio(self, data: bytes) -> list[bytes]:
        """Record one binary frame; return the new bytes of each channel.

        Frames need not hold whole interleaved samples (a stereo frame may have an odd
        length): the incomplete tail is carried into the next frame, so every channel gets
        exactly its bytes.
        """
        self.bytes_received += len(data)
        self.sha256.update(data)
        if self.keep:
            self.arrivals.append((time.monotonic(), len(data)))
            self.raw += data
        channels = self.params.channels
        if channels == 1:
            chunks = [data]
        else:
            joined = self._carry + data
            whole = len(joined) - len(joined) % channels
            self._carry = joined[whole:]
            chunks = [joined[c:whole:channels] for c in range(channels)]
        if self.keep:
            for recorded, chunk in zip(self.audio, chunks):
                recorded += chunk
        return chunks

    def sent_message(self, text: str) -> None:
        self.messages_sent += 1
        if self.keep:
            self.sent.append((time.monotonic(), text))

    def control(self, control: dict[str, Any]) -> None:
        if self.keep:
            self.controls.append(control)

    def param(self, name: str) -> str | None:
        """Last value of a query parameter, the common case when checking what a client sent."""
        return _last(self.query, name)


# --- The deterministic engine ---------------------------------------------------------------


class DeterministicTranscript(NamedTuple):
    """What a deterministic transcript says: whose bytes, which range, and their crc32."""

    channel: int
    start_ms: float
    end_ms: float
    crc: int

    @property
    def start_byte(self) -> int:
        return round(self.start_ms * BYTES_PER_SECOND / 1000)

    @property
    def end_byte(self) -> int:
        return round(self.end_ms * BYTES_PER_SECOND / 1000)


def _format_ms(nbytes: int) -> str:
    # 8 bytes per millisecond, so three decimals are always exact.
    return f"{nbytes * 1000 / BYTES_PER_SECOND:.3f}".rstrip("0").rstrip(".")


def deterministic_transcript(channel: int, start_byte: int, chunk: bytes) -> str:
    """`"ch<channel> <start_ms>-<end_ms> <crc32 hex>"` for `chunk`, found at `start_byte`."""
    start, end = _format_ms(start_byte), _format_ms(start_byte + len(chunk))
    return f"ch{channel} {start}-{end} {zlib.crc32(chunk):08x}"


def parse_deterministic(transcript: str) -> DeterministicTranscript:
    """Inverse of `deterministic_transcript`; ValueError for any other text."""
    try:
        label, times, crc = transcript.split(" ")
        start, end = times.split("-")
        if not label.startswith("ch"):
            raise ValueError
        return DeterministicTranscript(int(label[2:]), float(start), float(end), int(crc, 16))
    except ValueError:
        raise ValueError(f"not a deterministic transcript: {transcript!r}") from None


class DeterministicEngine:
    """One final, `speech_final` Result per `window` seconds of a channel's audio.

    With interim results on, an interim covering the first half of each window comes first, as
    Deepgram sends partial hypotheses before settling a range. `finalize()` settles the partial
    last window. Words are the three tokens of the transcript, spread over the window.
    """

    def __init__(
        self, channel: int, emit: Emit, *, interim_results: bool, window: float = DEFAULT_WINDOW
    ) -> None:
        self._channel = channel
        self._emit = emit
        self._interim_results = interim_results
        self._window = max(2, round(window * BYTES_PER_SECOND))
        self._pending = bytearray()  # audio of the window in progress
        self._offset = 0  # byte position of _pending[0] in the channel
        self._interim_sent = False

    def feed(self, mulaw: bytes) -> None:
        self._pending += mulaw
        while len(self._pending) >= self._window:
            self._maybe_emit_interim()
            self._emit_final(self._window, from_finalize=False)
        self._maybe_emit_interim()

    async def finalize(self) -> None:
        if self._pending:
            self._emit_final(len(self._pending), from_finalize=True)

    async def aclose(self) -> None:
        self._pending.clear()

    def _maybe_emit_interim(self) -> None:
        half = self._window // 2
        if self._interim_results and not self._interim_sent and len(self._pending) >= half:
            self._emit(self._segment(bytes(self._pending[:half]), is_final=False))
            self._interim_sent = True

    def _emit_final(self, nbytes: int, *, from_finalize: bool) -> None:
        chunk = bytes(self._pending[:nbytes])
        del self._pending[:nbytes]
        self._emit(self._segment(chunk, is_final=True, from_finalize=from_finalize))
        self._offset += nbytes
        self._interim_sent = False

    def _segment(self, chunk: bytes, *, is_final: bool, from_finalize: bool = False) -> Segment:
        start = self._offset / BYTES_PER_SECOND
        duration = len(chunk) / BYTES_PER_SECOND
        transcript = deterministic_transcript(self._channel, self._offset, chunk)
        tokens = transcript.split(" ")
        step = duration / len(tokens)
        words = [
            Word(token, start + i * step, start + (i + 1) * step, punctuated_word=token)
            for i, token in enumerate(tokens)
        ]
        return Segment(
            start=start,
            duration=duration,
            transcript=transcript,
            words=words,
            is_final=is_final,
            speech_final=is_final,
            from_finalize=from_finalize,
        )


# --- Messages -------------------------------------------------------------------------------


def results_message(segment: Segment, channel_index: list[int], request_id: str) -> str:
    """A Deepgram `Results` message (protocols.md B.3) for one engine segment."""
    words = []
    for word in segment.words:
        item: dict[str, Any] = {
            "word": word.word,
            "start": word.start,
            "end": word.end,
            "confidence": word.confidence,
        }
        if word.punctuated_word is not None:
            item["punctuated_word"] = word.punctuated_word
        words.append(item)
    return json.dumps(
        {
            "type": "Results",
            "channel_index": channel_index,
            "duration": segment.duration,
            "start": segment.start,
            "is_final": segment.is_final,
            "speech_final": segment.speech_final,
            "from_finalize": segment.from_finalize,
            "channel": {
                "alternatives": [
                    {
                        "transcript": segment.transcript,
                        "confidence": segment.confidence,
                        "words": words,
                    }
                ]
            },
            "metadata": {
                "request_id": request_id,
                "model_uuid": MODEL_UUID,
                "model_info": MODEL_INFO,
            },
        }
    )


def metadata_message(record: ConnectionRecord) -> str:
    """The `Metadata` summary Deepgram sends after `CloseStream` (protocols.md B.3)."""
    channels = record.params.channels
    created = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    return json.dumps(
        {
            "type": "Metadata",
            "transaction_key": "deprecated",
            "request_id": record.request_id,
            "sha256": record.sha256.hexdigest(),
            "created": created.replace("+00:00", "Z"),
            "duration": record.bytes_received / channels / BYTES_PER_SECOND,
            "channels": channels,
        }
    )


def downmix(chunks: list[bytes]) -> bytes:
    """Average the channels into one mu-law stream (how `multichannel=false` is transcribed).

    Deepgram transcribes a multi-channel stream without `multichannel=true` as one mixed
    channel, reported as `channel_index: [0, 1]`; averaging the linear samples is that mix.
    """
    pcm = np.stack([codec.ulaw_to_pcm16(chunk).astype(np.int32) for chunk in chunks])
    return codec.pcm16_to_ulaw(pcm.sum(axis=0) // len(chunks))


# --- Faults ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Faults:
    """Ways to misbehave, so the proxy's recovery paths can be tested against this server.

    drop_after: seconds after opening, close with 1011 `NET-0000` (or, with `drop_abort`, cut
      the TCP connection without a close frame, as a network failure would).
    delay: hold every outgoing message this long (a latency, not a throughput cap).
    refuse_first: answer the first N upgrade attempts with HTTP 503.
    reject_status: answer every upgrade with this HTTP status (e.g. 429 over concurrency).
    idle_timeout: seconds without audio before closing with 1011 `NET-0001`.
    """

    drop_after: float | None = None
    drop_abort: bool = False
    delay: float = 0.0
    refuse_first: int = 0
    reject_status: int | None = None
    idle_timeout: float = 10.0


# --- One connection -------------------------------------------------------------------------


class NotAudio(Exception):
    """The client sent something Deepgram cannot take as audio or control: close `DATA-0000`."""


class Ending(enum.Enum):
    """Why the receive loop stopped, which decides how the connection is closed."""

    DISCONNECTED = enum.auto()  # the client, a fault or server shutdown closed it already
    CLOSE_STREAM = enum.auto()
    IDLE = enum.auto()
    NOT_AUDIO = enum.auto()


class Session:
    """Runs one accepted connection: feeds engines, answers control messages, closes.

    Engines call `emit` on the event loop; each segment becomes a Results message on a queue
    drained by a single writer task, so messages leave in the order they were produced.
    """

    def __init__(
        self,
        ws: ServerConnection,
        record: ConnectionRecord,
        engine_factory: EngineFactory,
        faults: Faults,
    ) -> None:
        self._ws = ws
        self._record = record
        self._faults = faults
        self._outbox: asyncio.Queue[tuple[float, str] | None] = asyncio.Queue()
        params = record.params
        # Without multichannel, Deepgram transcribes one mix of all channels (see `downmix`).
        engine_count = params.channels if params.multichannel else 1
        self._engines: list[Engine] = [
            engine_factory(c, self._emitter(c), interim_results=params.interim_results)
            for c in range(engine_count)
        ]

    def _emitter(self, channel: int) -> Emit:
        params = self._record.params
        channel_index = [channel, params.channels] if params.multichannel else [0, 1]

        def emit(segment: Segment) -> None:
            self._send(results_message(segment, channel_index, self._record.request_id))

        return emit

    def _send(self, text: str) -> None:
        self._outbox.put_nowait((time.monotonic() + self._faults.delay, text))

    async def run(self) -> None:
        writer = asyncio.create_task(self._write())
        dropper = (
            asyncio.create_task(self._drop_after(self._faults.drop_after))
            if self._faults.drop_after is not None
            else None
        )
        try:
            match await self._receive():
                case Ending.CLOSE_STREAM:
                    await self._finalize(self._engines)
                    self._send(metadata_message(self._record))
                    self._outbox.put_nowait(None)
                    await writer
                    await self._ws.close(1000)
                case Ending.IDLE:
                    await self._ws.close(1011, "NET-0001")
                case Ending.NOT_AUDIO:
                    await self._ws.close(1008, "DATA-0000")
            await self._ws.wait_closed()
        finally:
            writer.cancel()
            if dropper is not None:
                dropper.cancel()
            for engine in self._engines:
                await engine.aclose()

    async def _receive(self) -> Ending:
        """Read frames until the stream ends.

        The idle timer restarts on audio, and on control messages only once some audio has
        arrived: KeepAlive alone cannot hold a fresh connection open (protocols.md B.5).
        """
        idle_timeout = self._faults.idle_timeout
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(idle_timeout) as idle:
                async for message in self._ws:
                    if isinstance(message, bytes):
                        self._on_audio(message)
                    elif await self._on_control(message):
                        return Ending.CLOSE_STREAM
                    if self._record.bytes_received:
                        idle.reschedule(loop.time() + idle_timeout)
        except TimeoutError:
            return Ending.IDLE
        except NotAudio:
            return Ending.NOT_AUDIO
        except ConnectionClosed:
            pass
        return Ending.DISCONNECTED

    def _on_audio(self, data: bytes) -> None:
        # Only the first frame can carry a file header; checking later frames would misread
        # ordinary audio that happens to start with the same bytes.
        if not data or (not self._record.bytes_received and data.startswith(CONTAINER_MAGICS)):
            raise NotAudio
        chunks = self._record.add_audio(data)
        if not self._record.params.multichannel and len(chunks) > 1:
            chunks = [downmix(chunks)]
        for engine, chunk in zip(self._engines, chunks):
            if chunk:
                engine.feed(chunk)

    async def _on_control(self, text: str) -> bool:
        """Handle a control message; True when it asks to close the stream."""
        control = self._parse_control(text)
        self._record.control(control)
        if control["type"] == "Finalize":
            channel = control.get("channel")
            if channel is None or not self._record.params.multichannel:
                await self._finalize(self._engines)
            else:
                await self._finalize([self._engines[channel]])
        return control["type"] == "CloseStream"

    def _parse_control(self, text: str) -> dict[str, Any]:
        try:
            control = json.loads(text)
        except json.JSONDecodeError:
            raise NotAudio from None
        if not isinstance(control, dict) or control.get("type") not in CONTROL_TYPES:
            raise NotAudio
        channel = control.get("channel")
        if control["type"] == "Finalize" and channel is not None:
            if type(channel) is not int or not 0 <= channel < self._record.params.channels:
                raise NotAudio
        return control

    async def _finalize(self, engines: list[Engine]) -> None:
        """All channels at once: each waits for its own decodes, none queues behind another's."""
        await asyncio.gather(*(engine.finalize() for engine in engines))

    async def _write(self) -> None:
        """Send queued messages in order, each no earlier than its due time; None ends."""
        while (item := await self._outbox.get()) is not None:
            due, text = item
            if (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            try:
                await self._ws.send(text)
            except ConnectionClosed:
                return
            self._record.sent_message(text)

    async def _drop_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        if self._faults.drop_abort:
            self._ws.transport.abort()
        else:
            await self._ws.close(1011, "NET-0000")


# --- The server -----------------------------------------------------------------------------


class LocalSTT:
    """A Deepgram-compatible `/v1/listen` server on `host:port` (port 0 picks a free one).

    `api_key=None` accepts any `Token` credentials; `engine_factory=None` uses
    `DeterministicEngine`. Every accepted connection appends a `ConnectionRecord` to
    `connections`; with `record=False` (the embedded recogniser of a running server) the records
    keep no audio and only the last `KEPT_CONNECTIONS` are kept.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        engine_factory: EngineFactory | None = None,
        faults: Faults = Faults(),
        record: bool = True,
    ) -> None:
        self.host = host
        self.port = port
        self.api_key = api_key
        self.engine_factory: EngineFactory = engine_factory or DeterministicEngine
        self.faults = faults
        self.record = record
        self.connections: collections.deque[ConnectionRecord] = collections.deque(
            maxlen=None if record else KEPT_CONNECTIONS)
        self.attempts = 0
        self._server: Server | None = None

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}{LISTEN_PATH}"

    async def start(self) -> None:
        # No permessage-deflate: Deepgram's JSON is small and compression costs CPU per call.
        self._server = await serve(
            self._handle,
            self.host,
            self.port,
            process_request=self._process_request,
            process_response=self._process_response,
            compression=None,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("listening on %s", self.url)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> LocalSTT:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Refuse an upgrade with the HTTP error Deepgram would give; None lets it through."""
        try:
            self._check_request(request)
        except HandshakeRefused as refused:
            logger.info("refused %s: %s %s", request.path, refused.status.value, refused.message)
            return refused.response(connection)
        return None

    def _check_request(self, request: Request) -> None:
        if urlsplit(request.path).path != LISTEN_PATH:
            raise HandshakeRefused(http.HTTPStatus.NOT_FOUND, "unknown path")
        self.attempts += 1
        if self.attempts <= self.faults.refuse_first:
            raise HandshakeRefused(http.HTTPStatus.SERVICE_UNAVAILABLE, "service unavailable")
        if self.faults.reject_status is not None:
            status = http.HTTPStatus(self.faults.reject_status)
            raise HandshakeRefused(status, status.phrase.lower())
        check_authorization(request.headers, self.api_key)
        parse_listen_params(parse_query(request.path))

    def _process_response(
        self, connection: ServerConnection, request: Request, response: Response
    ) -> None:
        """Every answer, refusal or upgrade, carries a fresh `dg-request-id` (protocols.md B.1)."""
        response.headers["dg-request-id"] = str(uuid.uuid4())

    async def _handle(self, ws: ServerConnection) -> None:
        # process_request has refused anything invalid, so parsing again cannot fail; doing it
        # here keeps the handshake free of per-connection state.
        query = parse_query(ws.request.path)
        record = ConnectionRecord(
            request_id=ws.response.headers["dg-request-id"],
            query=query,
            headers=Headers(ws.request.headers),
            params=parse_listen_params(query),
            keep=self.record,
        )
        self.connections.append(record)
        logger.info("open %s %s from %s", record.request_id, ws.request.path, ws.remote_address)
        try:
            await Session(ws, record, self.engine_factory, self.faults).run()
        finally:
            record.closed = time.monotonic()
            record.close_code = ws.close_code
            record.close_reason = ws.close_reason
            logger.info(
                "close %s code=%s reason=%r audio=%d bytes sent=%d messages",
                record.request_id,
                record.close_code,
                record.close_reason,
                record.bytes_received,
                record.messages_sent,
            )


# --- Command line ---------------------------------------------------------------------------


def _engine_factory(parser: argparse.ArgumentParser, args: argparse.Namespace) -> EngineFactory:
    if args.engine == "deterministic":
        return functools.partial(DeterministicEngine, window=args.window_ms / 1000)
    try:
        import whisper_stt
    except ImportError as exc:
        parser.exit(2, f"--engine whisper needs the whisper_stt package and its requirements: {exc}\n")
    try:
        logger.info("model: %s", whisper_stt.start(args.model))
    except whisper_stt.ModelError as exc:
        parser.exit(2, f"{exc}\n")
    return whisper_stt.engine_factory


async def _serve_forever(stt: LocalSTT) -> None:
    async with stt:
        await asyncio.Future()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--api-key", help="required Token; omit to accept any")
    parser.add_argument("--window-ms", type=int, default=1000, help="deterministic engine only")
    parser.add_argument("--engine", choices=["deterministic", "whisper"], default="deterministic")
    parser.add_argument("--model", help="whisper only: a CTranslate2 Whisper directory (default: the pinned tiny.en)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stt = LocalSTT(args.host, args.port, args.api_key, _engine_factory(parser, args))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_forever(stt))


if __name__ == "__main__":
    main()
