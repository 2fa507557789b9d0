"""A scriptable stand-in for OpenAI's Realtime API, GA interface (protocols.md D), for tests and the benchmark.

    async with FakeRealtime(api_key="k") as fake:       # in a test, in the same event loop
        ... fake.url ...                                 # ws://127.0.0.1:PORT/v1/realtime?model=gpt-realtime
        session = await fake.session()                  # the next (or current) connection, once updated
        await session.say("Hello", seconds=1.0)         # one response: an assistant item with audio
        output = await session.call_function("lookup_order", {"order_id": "A17"})

    python tests/fake_openai.py --port 0 --api-key K --reply-every 4 --reply-seconds 2 --dump out.pickle

Protocol-faithful: the upgrade is checked as OpenAI does (`Authorization: Bearer`, 401 with an
`{"error": ...}` body; the retired beta shape, `OpenAI-Beta: realtime=v1`, is closed with 4000
`beta_api_shape_disabled`), `session.created` comes first, `session.update` is answered with
`session.updated`, and every event it sends *and* every event it receives is validated against
the `openai` package's class for its `type` (`openai.types.realtime`), with no unknown field
anywhere (`model_extra` empty, recursively). A client event that fails is recorded in
`session.violations` (tests assert it stays empty) and answered with an `error` event.

The conversation is kept as the API keeps it: each assistant item holds the audio generated for
it, and `conversation.item.truncate` is checked as the API checks it. An `audio_end_ms` beyond the
item's audio is refused with the API's own words ("Audio content of 9250ms is already shorter than
57340ms", protocols.md D.5) and recorded in `session.rejected`; an accepted one cuts the item's
audio and transcript and is recorded in `session.truncations`, so a test can compare where the
item was cut with what the caller heard.

Scripted behaviour (`Script`): server VAD on the energy of the appended audio
(`speech_started` cancels the active response, as `interrupt_response` does; `speech_stopped`,
`committed`, the caller's transcript and, as `create_response` does, the next scripted reply);
`response.create` speaks its `instructions` (the greeting) or the next reply; replies that first
call a function and then speak its output; replies on a timer (the benchmark). Audio deltas
arrive faster than real time (or at `speed` times real time) in odd sizes. Every `response.done`
carries usage, recorded in `session.usages`. Faults (`Faults`): refuse the key, delay the
handshake, reject the session settings, `error` then close, drop the TCP connection, garbage,
late audio after a barge-in, a delay before a reply's first audio.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
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
from dataclasses import dataclass, field
from pathlib import Path

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from fake_agent import EnergyVad, FakeAgent, Reply, check, reply_audio  # noqa: E402
from openai.types import realtime as rt  # noqa: E402

log = logging.getLogger("fake_openai")

PATH = "/v1/realtime"
BYTES_PER_MS = 8

# The classes of what each side may send over a WebSocket (protocols.md D.5).
SERVER_MODELS = {
    "session.created": rt.SessionCreatedEvent, "session.updated": rt.SessionUpdatedEvent,
    "error": rt.RealtimeErrorEvent, "response.created": rt.ResponseCreatedEvent,
    "response.done": rt.ResponseDoneEvent, "response.output_item.added": rt.ResponseOutputItemAddedEvent,
    "response.output_item.done": rt.ResponseOutputItemDoneEvent, "conversation.item.added": rt.ConversationItemAdded,
    "conversation.item.done": rt.ConversationItemDone,
    "response.content_part.added": rt.ResponseContentPartAddedEvent,
    "response.content_part.done": rt.ResponseContentPartDoneEvent,
    "response.output_audio.delta": rt.ResponseAudioDeltaEvent, "response.output_audio.done": rt.ResponseAudioDoneEvent,
    "response.output_audio_transcript.delta": rt.ResponseAudioTranscriptDeltaEvent,
    "response.output_audio_transcript.done": rt.ResponseAudioTranscriptDoneEvent,
    "response.function_call_arguments.delta": rt.ResponseFunctionCallArgumentsDeltaEvent,
    "response.function_call_arguments.done": rt.ResponseFunctionCallArgumentsDoneEvent,
    "input_audio_buffer.speech_started": rt.InputAudioBufferSpeechStartedEvent,
    "input_audio_buffer.speech_stopped": rt.InputAudioBufferSpeechStoppedEvent,
    "input_audio_buffer.committed": rt.InputAudioBufferCommittedEvent,
    "conversation.item.input_audio_transcription.completed": rt.ConversationItemInputAudioTranscriptionCompletedEvent,
    "conversation.item.truncated": rt.ConversationItemTruncatedEvent,
}
CLIENT_MODELS = {
    "session.update": rt.SessionUpdateEvent, "input_audio_buffer.append": rt.InputAudioBufferAppendEvent,
    "input_audio_buffer.commit": rt.InputAudioBufferCommitEvent,
    "input_audio_buffer.clear": rt.InputAudioBufferClearEvent,
    "conversation.item.create": rt.ConversationItemCreateEvent,
    "conversation.item.truncate": rt.ConversationItemTruncateEvent,
    "conversation.item.delete": rt.ConversationItemDeleteEvent, "response.create": rt.ResponseCreateEvent,
    "response.cancel": rt.ResponseCancelEvent,
}
WEBRTC_ONLY = {"output_audio_buffer.clear"}  # valid events, but not over a WebSocket (D.5)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


@dataclass
class Script:
    greet: bool = True  # speak the instructions of a response.create that has some (the greeting)
    replies: list[Reply] = field(default_factory=list)  # in order; then `default_reply`
    default_reply: Reply | None = field(default_factory=lambda: Reply("You said something.", 0.5))
    vad: bool = True  # server VAD on the energy of the appended audio
    reply_to_speech: bool = True  # create_response: a reply when the caller's turn ends
    reply_every: float | None = None  # speak a reply every N seconds (the benchmark)
    reply_seconds: float = 2.0
    chunk_sizes: tuple[int, ...] = (1000, 333, 2048, 160, 77)  # odd sizes, to exercise re-framing
    speed: float = 0.0  # 0: audio as fast as the socket takes it; N: N times real time
    first_audio_delay: float = 0.0  # seconds from response.created to the first audio
    loud_rms: float = 800.0
    quiet_ms: int = 400


@dataclass
class Faults:
    refuse: int | None = None  # HTTP status for every upgrade (401: a refused key)
    handshake_delay: float = 0.0  # seconds before the upgrade is answered (a slow provider handshake)
    settings_error: bool = False  # answer session.update with an error, then close
    error_after: float | None = None  # seconds after session.updated: a server_error, then close
    drop_after: float | None = None  # seconds after session.updated: drop the TCP connection
    garbage: bool = False  # mix unparsable and unexpected events into the session
    late_audio: bool = False  # after a barge-in, one more delta of the cancelled response


@dataclass
class Item:
    """A conversation item as the server keeps it."""

    id: str
    type: str  # message, function_call, function_call_output
    role: str = ""
    text: str = ""  # transcript (assistant audio), text (user text), arguments or output
    audio: bytearray = field(default_factory=bytearray)  # assistant audio generated so far
    call_id: str = ""
    name: str = ""
    status: str = "completed"
    truncated_ms: int | None = None

    @property
    def audio_ms(self) -> int:
        return len(self.audio) // BYTES_PER_MS


class Cancelled(Exception):
    """The response was cancelled (the caller spoke, or response.cancel)."""


class FakeSession:
    """One connection: the conversation, what it received and sent, and the controls a test uses."""

    def __init__(self, ws: ServerConnection, index: int, fake: "FakeRealtime"):
        self.ws = ws
        self.index = index
        self.fake = fake
        self.script = fake.script
        self.headers = ws.request.headers
        self.path = ws.request.path
        self.session: dict = {}  # the effective session configuration
        self.update: dict | None = None  # the first session.update, as received
        self.items: dict[str, Item] = {}  # the conversation, in order
        self.audio = bytearray()  # caller audio appended
        self.messages: list[dict] = []  # client events other than audio and session.update
        self.violations: list[str] = []
        self.sent: list[tuple[float, str]] = []  # (time, text) of events sent
        self.truncations: list[tuple[str, int]] = []  # accepted: (item_id, audio_end_ms)
        self.rejected: list[str] = []  # error messages sent for refused truncates
        self.usages: list[dict] = []  # usage of each response.done
        self.replies: list[tuple[str, bytes, str]] = []  # (text, audio, item_id) per audio item started
        self.audio_chunks: list[tuple[float, int, int, int]] = []  # (time, reply, offset in reply, bytes)
        self.barge_ins: list[float] = []  # times speech_started was sent
        self.created_at = time.monotonic()
        self.closed = asyncio.Event()
        self.applied = asyncio.Event()  # session.updated sent (FakeAgent.session() waits for it)
        self.call = -1  # the benchmark's call index, from "call N" in the instructions
        self.faulted_at: float | None = None
        self._active: tuple[str, asyncio.Task] | None = None  # the response in progress
        self._pending_outputs: dict[str, asyncio.Future] = {}  # call_id -> the output the client sends
        self._then: dict[str, Reply] = {}  # call_id -> the reply that speaks the function's output
        self._follow_up: list[tuple[str, float | None]] = []  # spoken by the next response.create
        self._replies_used = 0
        self._vad = EnergyVad(self.script.loud_rms, self.script.quiet_ms)
        self._speech_item = ""
        self._tasks: set[asyncio.Task] = set()

    # --- sending -------------------------------------------------------------------------------

    async def send(self, event: dict) -> None:
        event = {"event_id": new_id("event"), **event}
        problem = check(event, SERVER_MODELS)
        if problem:  # the fake itself must speak the protocol
            raise AssertionError(f"fake OpenAI would send an invalid event: {problem}")
        text = json.dumps(event)
        await self.ws.send(text)
        self.sent.append((time.monotonic(), text))

    async def error(self, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                    param: str | None = None, event_id: str | None = None) -> None:
        error = {"type": type, "message": message}
        error.update({k: v for k, v in (("code", code), ("param", param), ("event_id", event_id)) if v is not None})
        await self.send({"type": "error", "error": error})

    # --- responses -----------------------------------------------------------------------------

    def respond(self, text: str | None = None, seconds: float | None = None, function=None) -> asyncio.Task:
        """Start a response (one at a time, as the API does): speak `text`, or call `function`."""
        response_id = new_id("resp")
        task = asyncio.create_task(self._response(response_id, text, seconds, function))
        self._active = (response_id, task)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def say(self, text: str, seconds: float | None = None) -> None:
        await self.respond(text, seconds)

    async def call_function(self, name: str, arguments: dict, timeout: float = 10.0, then: Reply | None = None) -> str:
        """A response whose output is a function call; returns the output the client sends back.
        `then`: the reply the next response.create speaks, "{result}" replaced by the output."""
        call_id = f"call_{uuid.uuid4().hex[:12]}"
        future = self._pending_outputs[call_id] = asyncio.get_running_loop().create_future()
        if then is not None:
            self._then[call_id] = then
        await self.respond(function=(call_id, name, arguments))
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._pending_outputs.pop(call_id, None)

    async def _response(self, response_id: str, text: str | None, seconds: float | None, function) -> None:
        output: list[Item] = []
        status, reason = "completed", None
        await self.send({"type": "response.created", "response": self._response_object(response_id, "in_progress", [])})
        try:
            if function is not None:
                output.append(await self._function_item(response_id, *function))
            else:
                output.append(await self._audio_item(response_id, text or "", seconds))
        except Cancelled as exc:
            status, reason = "cancelled", str(exc)
        finally:
            if self._active and self._active[0] == response_id:
                self._active = None
        usage = self._usage(output)
        self.usages.append(usage)
        response = self._response_object(response_id, status, [self._item_object(i) for i in output], usage)
        if reason:
            response["status_details"] = {"type": "cancelled", "reason": reason}
        await self.send({"type": "response.done", "response": response})

    async def _audio_item(self, response_id: str, text: str, seconds: float | None) -> Item:
        audio = reply_audio(text, seconds)
        item = self._add(Item(new_id("item"), "message", "assistant", text, status="in_progress"))
        self.replies.append((text, audio, item.id))
        reply = len(self.replies)
        where = {"item_id": item.id, "response_id": response_id, "output_index": 0}
        await self.send({"type": "response.output_item.added", "response_id": response_id, "output_index": 0,
                         "item": self._item_object(item)})
        await self.send({"type": "conversation.item.added", "item": self._item_object(item)})
        await self.send({"type": "response.content_part.added", **where, "content_index": 0,
                         "part": {"type": "audio", "transcript": ""}})
        if self.script.first_audio_delay:
            await self._sleep(self.script.first_audio_delay)
        await self.send({"type": "response.output_audio_transcript.delta", **where, "content_index": 0, "delta": text})
        sizes = itertools.cycle(self.script.chunk_sizes)
        offset, started = 0, time.monotonic()
        while offset < len(audio):
            if self._cancelled(response_id):
                item.status = "incomplete"
                raise Cancelled("turn_detected")
            chunk = audio[offset:offset + next(sizes)]
            if self.script.speed > 0:
                due = started + offset / 8000 / self.script.speed
                if due > time.monotonic():
                    await self._sleep(due - time.monotonic())
                    continue  # look at cancellation again before sending
            self.audio_chunks.append((time.monotonic(), reply, offset, len(chunk)))
            item.audio += chunk  # generated: the item's audio is what was produced for it
            await self.send({"type": "response.output_audio.delta", **where, "content_index": 0,
                             "delta": base64.b64encode(chunk).decode()})
            offset += len(chunk)
            await asyncio.sleep(0)
        item.status = "completed"
        await self.send({"type": "response.output_audio.done", **where, "content_index": 0})
        await self.send({"type": "response.output_audio_transcript.done", **where, "content_index": 0,
                         "transcript": text})
        await self.send({"type": "response.content_part.done", **where, "content_index": 0,
                         "part": {"type": "audio", "transcript": text}})
        await self.send({"type": "response.output_item.done", "response_id": response_id, "output_index": 0,
                         "item": self._item_object(item)})
        await self.send({"type": "conversation.item.done", "item": self._item_object(item)})
        return item

    async def _function_item(self, response_id: str, call_id: str, name: str, arguments: dict) -> Item:
        item = self._add(Item(new_id("item"), "function_call", text=json.dumps(arguments), call_id=call_id, name=name))
        where = {"item_id": item.id, "response_id": response_id, "output_index": 0, "call_id": call_id}
        await self.send({"type": "response.output_item.added", "response_id": response_id, "output_index": 0,
                         "item": self._item_object(item)})
        await self.send({"type": "response.function_call_arguments.delta", **where, "delta": item.text})
        await self.send({"type": "response.function_call_arguments.done", **where, "name": name,
                         "arguments": item.text})
        await self.send({"type": "response.output_item.done", "response_id": response_id, "output_index": 0,
                         "item": self._item_object(item)})
        return item

    def _cancelled(self, response_id: str) -> bool:
        return self._active is None or self._active[0] != response_id

    async def _sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    def _add(self, item: Item) -> Item:
        self.items[item.id] = item
        return item

    def _item_object(self, item: Item) -> dict:
        base = {"id": item.id, "object": "realtime.item", "type": item.type, "status": item.status}
        if item.type == "function_call":
            return {**base, "call_id": item.call_id, "name": item.name, "arguments": item.text}
        if item.type == "function_call_output":
            return {**base, "call_id": item.call_id, "output": item.text}
        if item.role == "assistant":
            return {**base, "role": "assistant", "content": [{"type": "output_audio", "transcript": item.text}]}
        kind = "input_audio" if item.text.startswith("(speech") else "input_text"
        field_name = "transcript" if kind == "input_audio" else "text"
        return {**base, "role": "user", "content": [{"type": kind, field_name: item.text}]}

    def _response_object(self, response_id: str, status: str, output: list, usage: dict | None = None) -> dict:
        response = {"id": response_id, "object": "realtime.response", "status": status, "output": output,
                    "output_modalities": ["audio"], "conversation_id": "conv_fake",
                    "audio": {"output": {"format": {"type": "audio/pcmu"},
                                         "voice": self.session.get("audio", {}).get("output", {}).get("voice")}}}
        if usage is not None:
            response["usage"] = usage
        return response

    def _usage(self, output: list[Item]) -> dict:
        """Deterministic token counts: 1 output audio token per 50 ms generated, 1 text token per
        word, input audio per 100 ms appended so far (the whole conversation is input each time)."""
        out_audio = sum(len(i.audio) for i in output) // 400
        out_text = sum(len(i.text.split()) for i in output)
        in_audio = len(self.audio) // 800
        in_text = 20 + sum(len(i.text.split()) for i in self.items.values())
        cached = in_text // 2
        return {"total_tokens": in_audio + in_text + out_audio + out_text, "input_tokens": in_audio + in_text,
                "output_tokens": out_audio + out_text,
                "input_token_details": {"text_tokens": in_text, "audio_tokens": in_audio, "cached_tokens": cached,
                                        "cached_tokens_details": {"text_tokens": cached, "audio_tokens": 0}},
                "output_token_details": {"text_tokens": out_text, "audio_tokens": out_audio}}

    # --- receiving -----------------------------------------------------------------------------

    async def run(self) -> None:
        if self.headers.get("OpenAI-Beta"):  # the retired beta shape (protocols.md D.1)
            await self.error("The beta Realtime API shape is no longer supported; use the GA interface.",
                             code="beta_api_shape_disabled")
            await self.ws.close(4000, "beta_api_shape_disabled")
            self.closed.set()
            return
        await self.send({"type": "session.created", "session": self._session_object({})})
        try:
            async for message in self.ws:
                await self.on_text(message)
        except ConnectionClosed:
            pass
        finally:
            for task in list(self._tasks):
                task.cancel()
            self.closed.set()

    def _session_object(self, update: dict) -> dict:
        base = {"type": "realtime", "model": "gpt-realtime", "output_modalities": ["audio"],
                "instructions": "You are a helpful assistant.", "tool_choice": "auto", "tools": [],
                "max_output_tokens": "inf", "tracing": None,
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}, "transcription": None,
                                    "turn_detection": {"type": "server_vad", "threshold": 0.5,
                                                       "prefix_padding_ms": 300, "silence_duration_ms": 200,
                                                       "create_response": True, "interrupt_response": True}},
                          "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "marin", "speed": 1.0}}}
        return _merge(base, update)

    async def on_text(self, text: str | bytes) -> None:
        try:
            event = json.loads(text)
        except ValueError:
            event = text
        kind = event.get("type") if isinstance(event, dict) else None
        problem = None if kind not in WEBRTC_ONLY else f"{kind} exists only for WebRTC and SIP"
        problem = problem or check(event, CLIENT_MODELS)
        if problem is None and not self.session and kind != "session.update":
            problem = f"{kind} before session.update"  # not an API rule, but our bridge's contract
        if problem:
            self.violations.append(problem)
            await self.error(f"Invalid client event: {problem}", code="invalid_value",
                             event_id=event.get("event_id") if isinstance(event, dict) else None)
            return
        if kind == "session.update":
            await self.on_session_update(event)
        elif kind == "input_audio_buffer.append":
            await self.on_audio(base64.b64decode(event["audio"]))
        else:
            self.messages.append(event)
            handler = getattr(self, "on_" + kind.replace(".", "_"), None)
            if handler is not None:
                await handler(event)

    async def on_session_update(self, event: dict) -> None:
        if self.update is None:
            self.update = event
        if self.fake.faults.settings_error:
            self.faulted_at = time.monotonic()
            await self.error("Invalid value: 'nova'. Supported values are: 'alloy', 'ash', 'ballad', 'coral', "
                             "'echo', 'sage', 'shimmer', 'verse', 'marin', and 'cedar'.", code="invalid_value",
                             param="session.audio.output.voice", event_id=event.get("event_id"))
            await self.ws.close(1008, "invalid session")
            return
        self.session = self._session_object(_merge(self.session, event["session"]))
        words = str(self.session.get("instructions", "")).split()
        if "call" in words and words.index("call") + 1 < len(words) and words[words.index("call") + 1].isdigit():
            self.call = int(words[words.index("call") + 1])
        await self.send({"type": "session.updated", "session": self.session})
        if not self.applied.is_set():
            self.applied.set()
            self.on_ready()

    def on_ready(self) -> None:
        faults = self.fake.faults
        if faults.garbage:
            self.spawn(self.garbage())
        if faults.error_after is not None:
            self.spawn(self._later(faults.error_after, self.fail))
        if faults.drop_after is not None:
            self.spawn(self._later(faults.drop_after, self.drop))

    async def on_audio(self, audio: bytes) -> None:
        if not self.audio and self.script.reply_every:  # replies on a timer from the caller's first audio
            self.spawn(self._timer())
        self.audio += audio
        if not self.script.vad:
            return
        for change, speech_ms in self._vad.push(audio):
            if change == "started":
                await self.speech_started()
            else:
                await self.speech_stopped(speech_ms)

    async def speech_started(self) -> None:
        """Server VAD: the caller started speaking; the active response is cancelled (interrupt_response)."""
        self._speech_item = new_id("item")
        active = self._active
        self._active = None
        self.barge_ins.append(time.monotonic())
        await self.send({"type": "input_audio_buffer.speech_started", "item_id": self._speech_item,
                         "audio_start_ms": max(0, len(self.audio) // BYTES_PER_MS - 340)})
        if active is not None and self.fake.faults.late_audio and self.replies:
            text, audio, item_id = self.replies[-1]
            await self.send({"type": "response.output_audio.delta", "item_id": item_id, "response_id": active[0],
                             "output_index": 0, "content_index": 0, "delta": base64.b64encode(audio[:500]).decode()})

    async def speech_stopped(self, speech_ms: int) -> None:
        text = f"(speech {speech_ms / 1000:.1f} s)"
        item = self._add(Item(self._speech_item or new_id("item"), "message", "user", text))
        await self.send({"type": "input_audio_buffer.speech_stopped", "item_id": item.id,
                         "audio_end_ms": len(self.audio) // BYTES_PER_MS})
        await self.send({"type": "input_audio_buffer.committed", "item_id": item.id})
        await self.send({"type": "conversation.item.added", "item": self._item_object(item)})
        await self.send({"type": "conversation.item.input_audio_transcription.completed", "item_id": item.id,
                         "content_index": 0, "transcript": item.text,
                         "usage": {"type": "duration", "seconds": round(speech_ms / 1000, 3)}})
        if self.script.reply_to_speech and self._active is None:
            self.speak_next()

    async def on_conversation_item_create(self, event: dict) -> None:
        item = event["item"]
        if item["type"] == "function_call_output":
            if not any(i.call_id == item["call_id"] for i in self.items.values() if i.type == "function_call"):
                await self.error(f"Tool call ID '{item['call_id']}' not found in conversation.", code="invalid_value",
                                 param="item.call_id", event_id=event.get("event_id"))
                return
            self._add(Item(item.get("id") or new_id("item"), "function_call_output", text=item["output"],
                           call_id=item["call_id"]))
            then = self._then.pop(item["call_id"], None)
            if then is not None:  # decided now: the client's response.create may be the next event
                self._follow_up.append((then.text.replace("{result}", item["output"]), then.seconds))
            future = self._pending_outputs.get(item["call_id"])
            if future is not None and not future.done():
                future.set_result(item["output"])
            return
        text = " ".join(str(c.get("text", "")) for c in item.get("content", []))
        self._add(Item(item.get("id") or new_id("item"), "message", item.get("role", "user"), text))

    async def on_response_create(self, event: dict) -> None:
        if self._active is not None:
            await self.error(f"Conversation already has an active response in progress: {self._active[0]}. Wait "
                             "until the response is finished before creating a new one.",
                             code="conversation_already_has_active_response", event_id=event.get("event_id"))
            return
        instructions = (event.get("response") or {}).get("instructions")
        if instructions:
            if self.script.greet:
                self.respond(instructions)
            return
        if self._follow_up:
            self.respond(*self._follow_up.pop(0))
            return
        self.speak_next()

    async def on_response_cancel(self, event: dict) -> None:
        if self._active is None:
            await self.error("Cancellation failed: no active response found", code="response_cancel_not_active",
                             event_id=event.get("event_id"))
            return
        self._active = None

    async def on_conversation_item_truncate(self, event: dict) -> None:
        """Checked as the API checks it (protocols.md D.3, D.5)."""
        item = self.items.get(event["item_id"])
        end = event["audio_end_ms"]
        problem = None
        if item is None:
            problem = f"Item with item_id not found: {event['item_id']}"
        elif item.role != "assistant":
            problem = "Only assistant messages can be truncated."
        elif event["content_index"] != 0:
            problem = f"Content index {event['content_index']} is out of range."
        elif end < 0:
            problem = f"Invalid 'audio_end_ms': {end}. Expected a value >= 0."
        elif end > item.audio_ms:
            problem = f"Audio content of {item.audio_ms}ms is already shorter than {end}ms"
        if problem:
            self.rejected.append(problem)
            await self.error(problem, code="invalid_value", param="audio_end_ms", event_id=event.get("event_id"))
            return
        item.truncated_ms = end
        del item.audio[end * BYTES_PER_MS:]
        self.truncations.append((item.id, end))
        await self.send({"type": "conversation.item.truncated", "item_id": item.id, "content_index": 0,
                         "audio_end_ms": end})

    # --- scripted turns and faults ---------------------------------------------------------------

    def next_reply(self) -> Reply | None:
        if self._replies_used < len(self.script.replies):
            self._replies_used += 1
            return self.script.replies[self._replies_used - 1]
        return self.script.default_reply

    def speak_next(self) -> None:
        reply = self.next_reply()
        if reply is None:
            return
        if reply.function is None:
            self.respond(reply.text, reply.seconds)
            return
        name, arguments = reply.function
        self.spawn(self.call_function(name, arguments, then=reply))

    def spawn(self, coro) -> None:
        async def quietly() -> None:
            with contextlib.suppress(ConnectionClosed, asyncio.CancelledError, asyncio.TimeoutError):
                await coro

        task = asyncio.create_task(quietly())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _later(self, delay: float, action) -> None:
        await asyncio.sleep(delay)
        await action()

    async def _timer(self) -> None:
        started = time.monotonic()
        for k in itertools.count(1):
            await asyncio.sleep(max(0.0, started + k * self.script.reply_every - time.monotonic()))
            if self._active is None:
                self.respond(f"Reply for call {self.call}.", self.script.reply_seconds)

    async def fail(self) -> None:
        self.faulted_at = time.monotonic()
        await self.error("The server had an error while processing your request. Sorry about that!",
                         type="server_error", code="server_error")
        await self.ws.close(1011, "server_error")

    async def drop(self) -> None:
        self.faulted_at = time.monotonic()
        self.ws.transport.abort()

    async def garbage(self) -> None:
        for text in ("not json at all", "[1, 2, 3]", '{"no_type": true}', '{"type": "surprise.event"}',
                     '{"type": "response.output_audio.delta", "delta": 5}',
                     '{"type": "response.function_call_arguments.done", "call_id": "x"}'):
            await self.ws.send(text)


class FakeRealtime(FakeAgent):
    """The server: accepts sessions as OpenAI does; `sessions` in order of connection."""

    session_class = FakeSession

    def __init__(self, api_key: str = "fake-openai-key", script: Script | None = None, faults: Faults | None = None,
                 host: str = "127.0.0.1", port: int = 0):
        super().__init__(api_key, script or Script(), faults or Faults(), host, port)

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}{PATH}?model=gpt-realtime"

    async def _check(self, connection: ServerConnection, request: Request) -> Response | None:
        if self.faults.handshake_delay:
            await asyncio.sleep(self.faults.handshake_delay)
        if request.path.split("?")[0] != PATH:
            return connection.respond(http.HTTPStatus.NOT_FOUND, "Not Found\n")
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        status = self.faults.refuse
        if status is None and (scheme.lower() != "bearer" or token.strip() != self.api_key):
            status = 401
        if status is None:
            return None
        self.refused.append(request.headers)
        shown = f"{token[:3]}*****{token[-4:]}" if len(token) > 8 else "*****"
        body = json.dumps({"error": {"message": f"Incorrect API key provided: {shown}. You can find your API key "
                                                "at https://platform.openai.com/account/api-keys.",
                                     "type": "invalid_request_error", "code": "invalid_api_key", "param": None}})
        response = connection.respond(http.HTTPStatus(status), body)
        response.headers["Content-Type"] = "application/json"
        return response


WHOLE = {"format", "turn_detection", "transcription", "noise_reduction"}  # replaced, never merged


def _merge(base: dict, extra: dict) -> dict:
    """What session.update does: the fields present replace or (objects) update the current ones."""
    out = dict(base)
    for key, value in extra.items():
        mergeable = isinstance(value, dict) and isinstance(out.get(key), dict) and key not in WHOLE
        out[key] = _merge(out[key], value) if mergeable else value
    return out


# --- command line (the benchmark runs it as its own process) ------------------------------------


def dump(fake: FakeRealtime, path: str) -> None:
    out = []
    for s in fake.sessions:
        out.append({"call": s.call, "audio_chunks": s.audio_chunks, "barge_ins": s.barge_ins,
                    "replies": [(text, len(audio)) for text, audio, _ in s.replies],
                    "segments": [item_id for _, _, item_id in s.replies], "received": len(s.audio),
                    "violations": s.violations, "truncations": s.truncations, "rejected": s.rejected,
                    "created_at": s.created_at})
    with open(path, "wb") as f:
        pickle.dump(out, f, protocol=pickle.HIGHEST_PROTOCOL)


async def main_async(args: argparse.Namespace) -> None:
    script = Script(greet=True, reply_to_speech=False, reply_every=args.reply_every,
                    reply_seconds=args.reply_seconds, chunk_sizes=tuple(args.chunk_sizes), speed=args.speed)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with FakeRealtime(args.api_key, script, Faults(handshake_delay=args.handshake_delay),
                            port=args.port) as fake:
        print(f"READY {fake.port}", flush=True)
        await stop.wait()
    if args.dump:
        dump(fake, args.dump)


def main() -> None:
    parser = argparse.ArgumentParser(description="A fake OpenAI Realtime server (GA interface)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default="fake-openai-key")
    parser.add_argument("--reply-every", type=float, default=None, help="seconds between replies (default: none)")
    parser.add_argument("--reply-seconds", type=float, default=2.0, help="audio per reply")
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[1600, 960, 2400])
    parser.add_argument("--speed", type=float, default=0.0, help="times real time (0: as fast as possible)")
    parser.add_argument("--handshake-delay", type=float, default=0.0, help="seconds before answering an upgrade")
    parser.add_argument("--dump", help="write what each session did here (pickle) on SIGTERM")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
