"""A scriptable stand-in for Deepgram's Voice Agent API (protocols.md C), for tests and the benchmark.

    async with FakeAgent(api_key="k") as fake:          # in a test, in the same event loop
        ... fake.url ...                                 # ws://127.0.0.1:PORT/v1/agent/converse
        session = await fake.session()                  # the next (or current) connection
        await session.say("Hello", seconds=1.0)         # text, AgentStartedSpeaking, audio, AgentAudioDone
        await session.user_started_speaking()
        response = await session.request_function("lookup_order", {"order_id": "A17"})

    python tests/fake_agent.py --port 0 --api-key K --reply-every 4 --reply-seconds 2 --dump out.pickle

Protocol-faithful: the handshake is checked as Deepgram does (path, `Authorization: Token`, 401
with `dg-error`), it sends `Welcome`, expects `Settings` first and answers `SettingsApplied`,
speaks the greeting, and every message it sends *and* every message it receives is validated with
the `deepgram-sdk` models, with no unknown field anywhere (`model_extra` empty, recursively).
A message that fails is recorded in `session.violations` (tests assert it stays empty) and
answered with Deepgram's `Error` UNPARSABLE_CLIENT_MESSAGE.

Scripted behaviour (`Script`): the greeting on connect; `UserStartedSpeaking` when the caller's
audio gets loud (energy on the decoded mu-law), a user line and the next scripted reply when it
goes quiet; replies to `InjectUserMessage`; replies that first request a function and speak its
result; replies on a timer (the benchmark). Misbehaviour on request (`Faults`): refuse the key
(HTTP 401), `Error` after N seconds, drop the TCP connection mid-call, garbage messages, late audio
after a barge-in, refused settings.

Agent audio is deterministic (`reply_audio`): never 0xFF, so padding is recognisable, and a
function of the text, so a test can tell replies apart in what the caller heard.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http
import itertools
import json
import logging
import pickle
import signal
import sys
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydantic
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import codec  # noqa: E402
from deepgram.agent.v1 import types as dg  # noqa: E402

log = logging.getLogger("fake_agent")

PATH = "/v1/agent/converse"
BYTES_PER_SECOND = 8000

# The models of what each side may send (protocols.md C.7).
SERVER_MODELS = {
    "Welcome": dg.AgentV1Welcome, "SettingsApplied": dg.AgentV1SettingsApplied,
    "ConversationText": dg.AgentV1ConversationText, "UserStartedSpeaking": dg.AgentV1UserStartedSpeaking,
    "AgentThinking": dg.AgentV1AgentThinking, "AgentStartedSpeaking": dg.AgentV1AgentStartedSpeaking,
    "AgentAudioDone": dg.AgentV1AgentAudioDone, "FunctionCallRequest": dg.AgentV1FunctionCallRequest,
    "LatencyReport": dg.AgentV1LatencyReport, "Warning": dg.AgentV1Warning, "Error": dg.AgentV1Error,
    "InjectionRefused": dg.AgentV1InjectionRefused,
}
CLIENT_MODELS = {
    "Settings": dg.AgentV1Settings, "KeepAlive": dg.AgentV1KeepAlive,
    "FunctionCallResponse": dg.AgentV1SendFunctionCallResponse, "InjectUserMessage": dg.AgentV1InjectUserMessage,
    "InjectAgentMessage": dg.AgentV1InjectAgentMessage, "UpdatePrompt": dg.AgentV1UpdatePrompt,
}


def leftover_fields(model, path: str = "$") -> list[str]:
    """Paths of fields a model accepted without knowing them (the SDK models allow extras)."""
    found = []
    if isinstance(model, pydantic.BaseModel):
        found += [f"{path}.{key}" for key in (model.model_extra or {})]
        for name in type(model).model_fields:
            found += leftover_fields(getattr(model, name), f"{path}.{name}")
    elif isinstance(model, (list, tuple)):
        for i, item in enumerate(model):
            found += leftover_fields(item, f"{path}[{i}]")
    elif isinstance(model, dict):
        for key, item in model.items():
            found += leftover_fields(item, f"{path}.{key}")
    return found


def check(message: dict, models: dict) -> str | None:
    """None if `message` is a valid message of its type with no unknown field; else why not."""
    model = models.get(message.get("type")) if isinstance(message, dict) else None
    if model is None:
        return f"unknown message type {message.get('type') if isinstance(message, dict) else message!r}"
    try:
        parsed = model.model_validate(message)
    except pydantic.ValidationError as exc:
        return f"{message['type']}: {exc.errors()[0]['loc']} {exc.errors()[0]['msg']}"
    extra = leftover_fields(parsed)
    return f"{message['type']}: unknown fields {extra}" if extra else None


def reply_audio(text: str, seconds: float | None = None) -> bytes:
    """Deterministic agent speech for `text`: about 61 ms per character (491 bytes, so a reply is
    rarely a whole number of 20 ms frames) unless `seconds` is given."""
    n = int(seconds * BYTES_PER_SECOND) if seconds is not None else 491 * len(text)
    rng = np.random.default_rng(zlib.crc32(text.encode()))
    return rng.integers(0, 255, n, dtype=np.uint8).tobytes()  # never 0xFF, and no repeating pattern


@dataclass
class Reply:
    text: str
    seconds: float | None = None  # audio length; default from the text
    function: tuple[str, dict] | None = None  # request this first; {result} in text gets its content


@dataclass
class Script:
    greet: bool = True
    replies: list[Reply] = field(default_factory=list)  # in order; then `default_reply`
    default_reply: Reply | None = field(default_factory=lambda: Reply("You said something.", 0.5))
    on_speech: bool = True  # UserStartedSpeaking when the caller's audio gets loud
    reply_to_speech: bool = True  # a user line and a reply when it goes quiet again
    reply_to_text: bool = True  # a reply to InjectUserMessage
    reply_every: float | None = None  # speak a reply every N seconds (the benchmark)
    reply_seconds: float = 2.0
    chunk_sizes: tuple[int, ...] = (1000, 333, 2048, 160, 77)  # odd sizes, to exercise re-framing
    speed: float = 0.0  # 0: audio as fast as the socket takes it; N: N times real time
    loud_rms: float = 800.0
    quiet_ms: int = 400


@dataclass
class Faults:
    refuse: int | None = None  # HTTP status for every upgrade (401: a refused key)
    settings_error: bool = False  # answer Settings with Error instead of SettingsApplied
    error_after: float | None = None  # seconds after SettingsApplied: Error, then close
    drop_after: float | None = None  # seconds after SettingsApplied: drop the TCP connection
    garbage: bool = False  # mix unparsable and unexpected messages into the session
    late_audio: bool = False  # after a barge-in, one more chunk of the interrupted reply


class FakeSession:
    """One connection: what it received, what it sent, and the controls a test drives it with."""

    def __init__(self, ws: ServerConnection, index: int, fake: "FakeAgent"):
        self.ws = ws
        self.index = index
        self.fake = fake
        self.script = fake.script
        self.headers = ws.request.headers
        self.settings: dict | None = None
        self.audio = bytearray()  # caller audio received
        self.messages: list[dict] = []  # client JSON messages after Settings
        self.violations: list[str] = []
        self.sent: list[tuple[float, str]] = []  # (time, text) of JSON messages sent
        self.audio_chunks: list[tuple[float, int, int, int]] = []  # (time, reply, offset in reply, bytes)
        self.replies: list[tuple[str, bytes]] = []  # (text, audio) per reply started
        self.barge_ins: list[float] = []  # times UserStartedSpeaking was sent
        self.closed = asyncio.Event()
        self.applied = asyncio.Event()
        self.call = -1  # the benchmark's call index, from "call N" in the prompt
        self.faulted_at: float | None = None  # when an Error was sent or the connection dropped
        self._speaking: asyncio.Task | None = None
        self._pending: dict[str, asyncio.Future] = {}
        self._lock = asyncio.Lock()  # one reply at a time
        self._replies_used = 0
        self._vad = EnergyVad(self.script.loud_rms, self.script.quiet_ms)
        self._tasks: set[asyncio.Task] = set()

    # --- sending -------------------------------------------------------------------------------

    async def send_json(self, message: dict) -> None:
        problem = check(message, SERVER_MODELS)
        if problem:  # the fake itself must speak the protocol
            raise AssertionError(f"fake agent would send an invalid message: {problem}")
        text = json.dumps(message)
        await self.ws.send(text)
        self.sent.append((time.monotonic(), text))

    async def say(self, text: str, seconds: float | None = None, audio: bytes | None = None) -> None:
        """One reply: its line, AgentStartedSpeaking, its audio in odd-sized chunks, AgentAudioDone."""
        audio = reply_audio(text, seconds) if audio is None else audio
        async with self._lock:
            self.replies.append((text, audio))
            reply = len(self.replies)
            await self.send_json({"type": "ConversationText", "role": "assistant", "content": text})
            await self.send_json({"type": "AgentStartedSpeaking", "total_latency": 0.42, "tts_latency": 0.12,
                                  "ttt_latency": 0.3})
            self._speaking = asyncio.current_task()
            try:
                sizes = itertools.cycle(self.script.chunk_sizes)
                offset, started = 0, time.monotonic()
                while offset < len(audio):
                    chunk = audio[offset:offset + next(sizes)]
                    if self.script.speed > 0:
                        due = started + offset / BYTES_PER_SECOND / self.script.speed
                        if due > time.monotonic():
                            await asyncio.sleep(due - time.monotonic())
                    self.audio_chunks.append((time.monotonic(), reply, offset, len(chunk)))
                    await self.ws.send(chunk)
                    offset += len(chunk)
                    await asyncio.sleep(0)
            finally:
                self._speaking = None
            await self.send_json({"type": "AgentAudioDone"})
            await self.send_json({"type": "LatencyReport", "stt_latency": 0.1, "ttt_token_latency": 0.3,
                                  "tts_latency": 0.12, "total_latency": 0.52})

    async def user_started_speaking(self) -> None:
        """The caller starts a turn: the reply being spoken stops, as Deepgram's does."""
        speaking = self._speaking
        if speaking is not None:
            speaking.cancel()
        self.barge_ins.append(time.monotonic())
        await self.send_json({"type": "UserStartedSpeaking"})
        if self.fake.faults.late_audio and self.replies:
            await self.ws.send(self.replies[-1][1][:500])  # in flight when Deepgram noticed

    async def user_said(self, text: str) -> None:
        await self.send_json({"type": "ConversationText", "role": "user", "content": text})

    async def request_function(self, name: str, arguments: dict, timeout: float = 10.0) -> dict:
        """FunctionCallRequest (client side); returns our FunctionCallResponse."""
        call_id = f"fc_{uuid.uuid4().hex[:12]}"
        future = self._pending[call_id] = asyncio.get_running_loop().create_future()
        await self.send_json({"type": "FunctionCallRequest", "functions": [
            {"id": call_id, "name": name, "arguments": json.dumps(arguments), "client_side": True}]})
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._pending.pop(call_id, None)

    async def error(self, code: str = "INTERNAL_SERVER_ERROR", description: str = "Something went wrong") -> None:
        self.faulted_at = time.monotonic()
        await self.send_json({"type": "Error", "code": code, "description": description})
        await self.ws.close(1011, "error")

    def drop(self) -> None:
        self.faulted_at = time.monotonic()
        self.ws.transport.abort()

    async def garbage(self) -> None:
        for text in ("not json at all", "[1, 2, 3]", '{"no_type": true}', '{"type": "Surprise"}',
                     '{"type": "ConversationText", "role": "narrator", "content": 5}',
                     '{"type": "FunctionCallRequest", "functions": "everything"}'):
            await self.ws.send(text)

    async def reply(self, reply: Reply) -> None:
        text = reply.text
        if reply.function is not None:
            name, arguments = reply.function
            response = await self.request_function(name, arguments)
            text = text.replace("{result}", response.get("content", ""))
        await self.say(text, reply.seconds)

    def next_reply(self) -> Reply | None:
        if self._replies_used < len(self.script.replies):
            self._replies_used += 1
            return self.script.replies[self._replies_used - 1]
        return self.script.default_reply

    def spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def speak_next(self) -> None:
        reply = self.next_reply()
        if reply is not None:
            self.spawn(self._quietly(self.reply(reply)))

    async def _quietly(self, coro) -> None:
        with contextlib.suppress(ConnectionClosed, asyncio.CancelledError, asyncio.TimeoutError):
            await coro

    # --- receiving -----------------------------------------------------------------------------

    async def run(self) -> None:
        await self.send_json({"type": "Welcome", "request_id": str(uuid.uuid4())})
        try:
            async for message in self.ws:
                if isinstance(message, bytes):
                    self.on_audio(message)
                else:
                    await self.on_text(message)
        except ConnectionClosed:
            pass
        finally:
            for task in list(self._tasks):
                task.cancel()
            self.closed.set()

    async def on_text(self, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            message = text
        problem = check(message, CLIENT_MODELS)
        if problem is None and self.settings is None and message["type"] != "Settings":
            problem = f"{message['type']} before Settings"
        if problem is None and self.settings is not None and message["type"] == "Settings":
            problem = "a second Settings"
        if problem:
            self.violations.append(problem)
            await self.send_json({"type": "Error", "code": "UNPARSABLE_CLIENT_MESSAGE", "description": problem})
            return
        if message["type"] == "Settings":
            await self.on_settings(message)
            return
        self.messages.append(message)
        if message["type"] == "FunctionCallResponse":
            future = self._pending.get(message.get("id"))
            if future is not None and not future.done():
                future.set_result(message)
        elif message["type"] == "InjectUserMessage" and self.script.reply_to_text:
            self.speak_next()

    async def on_settings(self, settings: dict) -> None:
        self.settings = settings
        prompt = settings["agent"]["think"]["prompt"] if isinstance(settings["agent"].get("think"), dict) else ""
        words = prompt.split()
        if "call" in words and words.index("call") + 1 < len(words) and words[words.index("call") + 1].isdigit():
            self.call = int(words[words.index("call") + 1])
        if self.fake.faults.settings_error:
            self.faulted_at = time.monotonic()
            await self.send_json({"type": "Error", "code": "INVALID_SETTINGS",
                                  "description": "think provider rejected"})
            await self.ws.close(1008, "invalid settings")
            return
        await self.send_json({"type": "SettingsApplied"})
        self.applied.set()
        faults = self.fake.faults
        if faults.garbage:
            await self.garbage()
        if faults.error_after is not None:
            self.spawn(self._later(faults.error_after, self.error()))
        if faults.drop_after is not None:
            self.spawn(self._later(faults.drop_after, asyncio.sleep(0), then=self.drop))
        greeting = settings["agent"].get("greeting")
        if self.script.greet and greeting:
            self.spawn(self._quietly(self.say(greeting)))

    async def _later(self, delay: float, coro, then=None) -> None:
        await asyncio.sleep(delay)
        with contextlib.suppress(ConnectionClosed):
            await coro
        if then is not None:
            then()

    async def _timer(self) -> None:
        started = time.monotonic()
        for k in itertools.count(1):
            await asyncio.sleep(max(0.0, started + k * self.script.reply_every - time.monotonic()))
            if self._speaking is None:
                self.spawn(self._quietly(self.say(f"Reply for call {self.call}.", self.script.reply_seconds)))

    def on_audio(self, audio: bytes) -> None:
        if self.settings is None:
            self.violations.append("audio before Settings")
            return
        if not self.audio and self.script.reply_every:  # replies on a timer from the caller's first audio
            self.spawn(self._quietly(self._timer()))
        self.audio += audio
        if not (self.script.on_speech or self.script.reply_to_speech):
            return
        for change, speech_ms in self._vad.push(audio):
            if change == "started" and self.script.on_speech:
                self.spawn(self._quietly(self.user_started_speaking()))
            elif change == "stopped" and self.script.reply_to_speech:
                self.spawn(self._quietly(self.user_said(f"(speech {speech_ms / 1000:.1f} s)")))
                self.speak_next()


class EnergyVad:
    """Voice activity on 20 ms frames of caller mu-law: loud for 40 ms starts speech, `quiet_ms`
    of quiet ends it. `push(audio)` returns the changes: ("started" | "stopped", speech ms so far)."""

    def __init__(self, loud_rms: float = 800.0, quiet_ms: int = 400):
        self.loud_rms, self.quiet_ms = loud_rms, quiet_ms
        self.in_speech = False
        self._loud_frames = self._quiet = self._speech_ms = 0
        self._partial = b""

    def push(self, audio: bytes) -> list[tuple[str, int]]:
        data, self._partial = self._partial + audio, b""
        changes = []
        for start in range(0, len(data) - 159, 160):
            change = self._frame(data[start:start + 160])
            if change:
                changes.append((change, self._speech_ms))
        self._partial = data[len(data) - len(data) % 160:]
        return changes

    def _frame(self, frame: bytes) -> str | None:
        silent = frame.count(0xFF) == len(frame)  # the common case, without decoding
        rms = 0.0 if silent else float(np.sqrt(np.mean(codec.ulaw_to_pcm16(frame).astype(np.float64) ** 2)))
        if rms >= self.loud_rms:
            self._loud_frames += 1
            self._quiet = 0
            if self.in_speech:
                self._speech_ms += 20
            elif self._loud_frames >= 2:
                self.in_speech, self._speech_ms = True, 40
                return "started"
            return None
        self._loud_frames = 0
        if self.in_speech:
            self._quiet += 20
            if self._quiet >= self.quiet_ms:
                self.in_speech = False
                return "stopped"
        return None


class FakeAgent:
    """The server: accepts sessions as Deepgram does; `sessions` in order of connection."""

    session_class = FakeSession

    def __init__(self, api_key: str = "fake-agent-key", script: Script | None = None, faults: Faults | None = None,
                 host: str = "127.0.0.1", port: int = 0):
        self.api_key = api_key
        self.script = script or Script()
        self.faults = faults or Faults()
        self.host, self.port = host, port
        self.sessions: list[FakeSession] = []
        self.refused: list[Headers] = []
        self._new = asyncio.Condition()
        self._returned = 0  # sessions handed out by session()
        self._server = None

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}{PATH}"

    async def __aenter__(self) -> "FakeAgent":
        self._server = await serve(self._handler, self.host, self.port, process_request=self._check,
                                   compression=None, max_size=2**20)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self._server.close()
        await self._server.wait_closed()

    def _check(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?")[0] != PATH:
            return connection.respond(http.HTTPStatus.NOT_FOUND, "Not Found\n")
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        status = self.faults.refuse
        if status is None and (scheme.lower() != "token" or token.strip() != self.api_key):
            status = 401
        if status is None:
            return None
        self.refused.append(request.headers)
        response = connection.respond(http.HTTPStatus(status),
                                      '{"err_code":"INVALID_AUTH","err_msg":"Invalid credentials."}')
        response.headers["dg-error"] = "Invalid credentials."
        response.headers["dg-request-id"] = str(uuid.uuid4())
        return response

    async def _handler(self, ws: ServerConnection) -> None:
        session = self.session_class(ws, len(self.sessions), self)
        async with self._new:
            self.sessions.append(session)
            self._new.notify_all()
        await session.run()

    async def session(self, index: int | None = None, timeout: float = 10.0) -> FakeSession:
        """The session with this index (default: the next one not yet returned), once configured."""
        if index is None:
            index, self._returned = self._returned, self._returned + 1
        async with self._new:
            await asyncio.wait_for(self._new.wait_for(lambda: len(self.sessions) > index), timeout)
        session = self.sessions[index]
        await asyncio.wait_for(session.applied.wait(), timeout)
        return session


# --- command line (the benchmark runs it as its own process) ------------------------------------


def dump(fake: FakeAgent, path: str) -> None:
    out = []
    for s in fake.sessions:
        out.append({"call": s.call, "audio_chunks": s.audio_chunks, "barge_ins": s.barge_ins,
                    "replies": [(text, len(audio)) for text, audio in s.replies], "received": len(s.audio),
                    "violations": s.violations})
    with open(path, "wb") as f:
        pickle.dump(out, f, protocol=pickle.HIGHEST_PROTOCOL)


async def main_async(args: argparse.Namespace) -> None:
    script = Script(greet=True, reply_to_speech=False, reply_to_text=False, on_speech=True,
                    reply_every=args.reply_every, reply_seconds=args.reply_seconds,
                    chunk_sizes=tuple(args.chunk_sizes), speed=args.speed)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with FakeAgent(args.api_key, script, port=args.port) as fake:
        print(f"READY {fake.port}", flush=True)
        await stop.wait()
    if args.dump:
        dump(fake, args.dump)


def main() -> None:
    parser = argparse.ArgumentParser(description="A fake Deepgram Voice Agent server")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default="fake-agent-key")
    parser.add_argument("--reply-every", type=float, default=4.0, help="seconds between replies")
    parser.add_argument("--reply-seconds", type=float, default=2.0, help="audio per reply")
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[1600, 960, 2400])
    parser.add_argument("--speed", type=float, default=0.0, help="times real time (0: as fast as possible)")
    parser.add_argument("--dump", help="write what each session did here (pickle) on SIGTERM")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
