"""The OpenAI Realtime provider, GA interface (protocols.md D), over a `websockets` client socket.

    open wss://api.openai.com/v1/realtime?model=gpt-realtime (Authorization: Bearer <key>, no OpenAI-Beta)
    <- session.created   -> session.update   <- session.updated   -> response.create (the greeting)
    then, until the call ends:
    -> input_audio_buffer.append (caller audio)    <- response.output_audio.delta (agent audio, per item)
    -> conversation.item.truncate (barge-in)       <- input_audio_buffer.speech_started (barge-in)
    -> conversation.item.create + response.create  <- response.function_call_arguments.done (tools)
       (tool results, keypresses)                  <- response.done (usage), error, transcripts, ...

Audio is G.711 mu-law both ways (`audio/pcmu`), Twilio's own format: nothing is transcoded. A
*segment* for the bridge is an assistant item (`item_id`), so the playback ledger counts what the
caller heard of each item, and a barge-in truncates exactly that item at exactly that point.

Truncation (what public bridges get wrong, protocols.md D.5). When the caller starts speaking,
the server cancels the response itself (`interrupt_response`, on by default); the bridge sends
Twilio `clear` and calls `interrupted(item, heard_ms)` with what the caller heard of the item
playing, from the ledger: marks Twilio echoed plus real time since, never beyond the audio
received for it. We send `conversation.item.truncate` with that `audio_end_ms`, clamped again
here to the audio received for the item (which is never more than the server generated, so the
API cannot answer "already shorter than"); items queued behind it were not heard at all and are
truncated at 0. A barge-in with nothing playing sends no truncate. Audio of the interrupted
response still in flight is dropped here, by `response_id`.

One response at a time: OpenAI refuses `response.create` while a response is active, so a tool
result or a keypress that wants an answer waits for the active response's `response.done`, and
several calls of one response are answered with a single `response.create` once all their
outputs are in.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator, Mapping

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.http11 import Response

from agent import counters
from agent.provider import (
    AgentAudio, AgentAudioDone, AgentEvent, AgentSetup, Latency, ProviderError, ProviderFailed, ProviderMessages,
    ProviderStats, ToolCallRequest, Transcript, Usage, UserStartedSpeaking, close_socket, merged, read_session,
    setup_failure,
)
from agent.outbox import Outbox
from agent.tools import ToolResult

log = logging.getLogger(__name__)

PCMU = {"type": "audio/pcmu"}  # 8 kHz G.711 mu-law, as Twilio sends and plays it
DEFAULT_TRANSCRIPTION = {"model": "gpt-4o-mini-transcribe"}  # the caller's words, for subscribers
BYTES_PER_MS = 8
MAX_MESSAGE_BYTES = 2**22  # audio deltas can be large
# Errors after which the session cannot serve the caller: the call falls back (fallback close).
FATAL_CODES = frozenset({"session_expired", "invalid_api_key", "insufficient_quota", "beta_api_shape_disabled",
                         "session_not_found", "model_not_found"})
# Server events a Twilio bridge does not need (protocols.md D.3): accepted and ignored.
IGNORED = frozenset({
    "session.created", "session.updated", "conversation.created", "conversation.item.created",
    "conversation.item.added", "conversation.item.done", "conversation.item.deleted", "conversation.item.truncated",
    "conversation.item.retrieved", "conversation.item.input_audio_transcription.delta",
    "conversation.item.input_audio_transcription.segment", "input_audio_buffer.committed",
    "input_audio_buffer.cleared", "input_audio_buffer.timeout_triggered", "response.output_item.added",
    "response.output_item.done", "response.content_part.added", "response.content_part.done",
    "response.function_call_arguments.delta", "response.output_text.delta", "response.output_text.done",
    "rate_limits.updated", "mcp_list_tools.in_progress", "mcp_list_tools.completed", "mcp_list_tools.failed",
    "response.mcp_call_arguments.delta", "response.mcp_call_arguments.done", "response.mcp_call.in_progress",
    "response.mcp_call.completed", "response.mcp_call.failed",
})
# response.done usage -> the names subscribers see (README "Voice agents": `usage`).
USAGE_FIELDS = {
    ("input_tokens",): "input", ("output_tokens",): "output", ("total_tokens",): "total",
    ("input_token_details", "text_tokens"): "inputText", ("input_token_details", "audio_tokens"): "inputAudio",
    ("input_token_details", "cached_tokens"): "inputCached", ("output_token_details", "text_tokens"): "outputText",
    ("output_token_details", "audio_tokens"): "outputAudio",
}


def session_update(setup: AgentSetup, *, voice: str, turn_detection: Mapping) -> dict:
    """The `session.update` for one call (protocols.md D.2).

    Defaults (voice, turn detection, input transcription) first, AGENT_SETTINGS_FILE merged over
    them key by key, then what the bridge needs whatever the file says: a realtime session, audio
    out, `audio/pcmu` both ways, the call's prompt, and our tools next to the file's non-function
    tools (MCP servers, say).
    """
    defaults = {"type": "realtime", "output_modalities": ["audio"],
                "audio": {"input": {"format": PCMU, "transcription": DEFAULT_TRANSCRIPTION,
                                    "turn_detection": dict(turn_detection)},
                          "output": {"format": PCMU, "voice": voice}},
                "tool_choice": "auto"}
    session = merged(defaults, setup.provider_settings)
    session["type"] = "realtime"
    session["output_modalities"] = ["audio"]
    audio = session["audio"] if isinstance(session.get("audio"), dict) else {}
    session["audio"] = audio
    for direction in ("input", "output"):
        if not isinstance(audio.get(direction), dict):
            audio[direction] = {}
        audio[direction]["format"] = dict(PCMU)
    session["instructions"] = setup.prompt
    others = [t for t in session.get("tools") or [] if isinstance(t, dict) and t.get("type") != "function"]
    session["tools"] = others + [{"type": "function", **schema} for schema in setup.tools.schemas()]
    return {"type": "session.update", "session": session}


def greeting_instructions(greeting: str) -> str:
    """The instructions of the first `response.create`: the greeting, and nothing else."""
    return f"Greet the caller by saying exactly this, and nothing else: {greeting}"


@dataclass
class _Item:
    """An assistant item (audio or transcript received): for truncation and its line."""

    response_id: str
    received: int = 0  # bytes of audio received
    transcript: str = ""  # from the transcript deltas, in case `.done` never comes
    texted: bool = False  # its Transcript was yielded
    truncated: bool = False


class OpenAIRealtime:
    """One call's Realtime session; implements `agent.provider.AgentProvider`."""

    def __init__(self, setup: AgentSetup, *, url: str, api_key: str, voice: str = "marin",
                 turn_detection: Mapping | None = None, connect_timeout: float = 5.0, name: str = "openai"):
        self.name = name
        self.setup = setup
        self.url = url
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self.voice = voice
        self.turn_detection = dict(turn_detection or {"type": "server_vad"})
        self.connect_timeout = connect_timeout
        self.label = setup.call.call_sid
        self.stats = ProviderStats()
        self.session: dict = {}  # as the server confirmed it (session.updated)
        self._ws: ClientConnection | None = None
        self._ready = False
        self._closing = False
        self._outbox = Outbox(self.stats)
        self._early: list[AgentEvent] = []  # events that came before session.updated
        self._messages = ProviderMessages(name, self.label, self.stats)
        self._ids = itertools.count(1)
        self._items: dict[str, _Item] = {}  # assistant items, in the order they began
        self._muted: set[str] = set()  # responses interrupted by the caller: their late audio is dropped
        self._response: str | None = None  # the active response (response.created .. response.done)
        self._create_sent: str | None = None  # event_id of our response.create not yet answered
        self._want_response = False  # a tool result or keypress waits for the model's answer
        self._pending_calls: set[str] = set()  # function calls whose output has not gone back yet
        self._speech_stopped: float | None = None  # for the Latency of the next reply
        self.tokens: dict[str, int] = {}  # usage so far, by kind (USAGE_FIELDS)

    # --- set-up ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, session.created, session.update, session.updated (bounded); then the greeting."""
        try:
            async with asyncio.timeout(self.connect_timeout):
                self._ws = await connect(self.url, additional_headers=self._headers, max_size=MAX_MESSAGE_BYTES,
                                         compression=None, open_timeout=None)
                await self._handshake(self._ws)
        except (OSError, InvalidHandshake, ConnectionClosed) as exc:  # TimeoutError is an OSError
            raise setup_failure(exc, "OpenAI", "OpenAI Realtime session", self.connect_timeout, _refusal) from None
        finally:
            if not self._ready and self._ws is not None:
                self._ws.transport.abort()
        self._outbox.start(self._ws, f"openai-realtime {self.label}")  # audio that waited goes out now
        if self.setup.greeting:
            self._want_response = True
            self._respond({"instructions": greeting_instructions(self.setup.greeting)})

    async def _handshake(self, ws: ClientConnection) -> None:
        created = self._messages.parse(await ws.recv())
        if created.get("type") == "error":
            raise ProviderFailed(f"OpenAI refused the session: {_describe(created)}", _code(created))
        if created.get("type") != "session.created":
            raise ProviderFailed(f"OpenAI sent {created.get('type')!r} instead of session.created", "protocol")
        update = session_update(self.setup, voice=self.voice, turn_detection=self.turn_detection)
        await ws.send(orjson.dumps(update).decode())
        while True:
            data = self._messages.parse(await ws.recv())
            if data.get("type") == "session.updated":
                self.session = data.get("session") or {}
                self._ready = True
                log.info("call %s: OpenAI Realtime session ready (%s)", self.label, self.session.get("model", "?"))
                return
            if data.get("type") == "error":
                raise ProviderFailed(f"OpenAI refused the session settings: {_describe(data)}", _code(data))
            self._early.extend(self._on_message(data, ""))

    # --- towards OpenAI ----------------------------------------------------------------------

    def send_audio(self, audio: bytes) -> None:
        self._outbox.audio('{"type":"input_audio_buffer.append","audio":"' + base64.b64encode(audio).decode("ascii")
                           + '"}', len(audio))

    def send_user_text(self, text: str) -> None:
        """A keypress (or any text from the caller's side): a user message, then an answer."""
        self._send({"type": "conversation.item.create",
                    "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})
        self._want_response = True
        self._respond()

    def send_tool_result(self, request: ToolCallRequest, result: ToolResult) -> None:
        self._send({"type": "conversation.item.create",
                    "item": {"type": "function_call_output", "call_id": request.id, "output": result.content}})
        self._pending_calls.discard(request.id)
        self._want_response = True
        self._respond()

    def interrupted(self, segment: str, heard_ms: int) -> None:
        """Truncate the item at what the caller heard of it; items queued behind it at 0."""
        if segment not in self._items:
            return  # not an assistant item of ours: nothing the model believes was heard
        later = False
        for item_id, item in self._items.items():
            if item_id == segment:
                later = True
                end = min(int(heard_ms), item.received // BYTES_PER_MS)
            elif later and item.received and not item.truncated:
                end = 0  # sent behind the item playing, discarded by the clear: never heard
            else:
                continue
            item.truncated = True
            self._send({"type": "conversation.item.truncate", "event_id": f"truncate_{next(self._ids)}",
                        "item_id": item_id, "content_index": 0, "audio_end_ms": max(0, end)})
            log.debug("call %s: truncated %s at %d ms of %d ms", self.label, item_id, end,
                      item.received // BYTES_PER_MS)

    def _respond(self, response: dict | None = None) -> None:
        """`response.create` if an answer is wanted and none is active or asked for (see above)."""
        if not self._want_response or self._response or self._create_sent or self._pending_calls or self._closing:
            return
        self._want_response = False
        self._create_sent = f"response_{next(self._ids)}"
        message = {"type": "response.create", "event_id": self._create_sent}
        if response:
            message["response"] = response
        self._send(message)

    def _send(self, message: dict) -> None:
        self._outbox.send(orjson.dumps(message).decode())

    # --- from OpenAI -------------------------------------------------------------------------

    def events(self) -> AsyncIterator[AgentEvent]:
        return read_session(self._ws, self._early, self._events_of, "OpenAI", lambda: self._closing)

    def _events_of(self, message: str | bytes) -> list[AgentEvent]:
        return self._on_message(self._messages.parse(message), message)

    def _on_message(self, data: dict, raw: str | bytes) -> list[AgentEvent]:
        """One server event -> the events it means (often none)."""
        kind = data.get("type")
        if kind is None:
            return []  # _parse already counted it
        try:
            if kind == "response.output_audio.delta":
                return self._on_audio(data)
            if kind == "response.output_audio.done":
                item_id = data["item_id"]
                item = self._items.get(item_id)
                if item is None or item.response_id in self._muted:
                    return []
                return [AgentAudioDone(item_id)]
            if kind == "response.output_audio_transcript.delta":
                self._item(str(data["item_id"]), str(data["response_id"])).transcript += str(data["delta"])
                return []
            if kind == "response.output_audio_transcript.done":
                return self._line(data["item_id"], str(data["transcript"]), raw)
            if kind == "conversation.item.input_audio_transcription.completed":
                return [Transcript("user", str(data["transcript"]), None, _text(raw))]
            if kind == "input_audio_buffer.speech_started":
                if self._response is not None:
                    self._muted.add(self._response)  # the server cancels it (interrupt_response)
                return [UserStartedSpeaking()]
            if kind == "input_audio_buffer.speech_stopped":
                self._speech_stopped = time.monotonic()
                return []
            if kind == "response.created":
                self._response = str(data["response"]["id"])
                self._create_sent = None
                return []
            if kind == "response.function_call_arguments.done":
                self._pending_calls.add(str(data["call_id"]))
                return [ToolCallRequest(str(data["call_id"]), str(data["name"]), str(data["arguments"]))]
            if kind == "response.done":
                return self._on_response_done(data["response"])
            if kind == "error":
                return [self._on_error(data)]
            if kind == "conversation.item.input_audio_transcription.failed":
                log.info("call %s: OpenAI could not transcribe the caller: %s", self.label, _describe(data))
                return []
            if kind in IGNORED:
                return []
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            self._messages.bad(f"malformed {kind}: {type(exc).__name__} {exc}")
            return []
        self._messages.bad(f"unknown event type {str(kind)[:60]!r}")
        return []

    def _on_audio(self, data: dict) -> list[AgentEvent]:
        item_id, response_id = str(data["item_id"]), str(data["response_id"])
        audio = base64.b64decode(data["delta"], validate=True)
        self.stats.audio_out_bytes += len(audio)
        if response_id in self._muted:
            counters.provider_audio_dropped_bytes.inc(len(audio))
            return []
        item = self._item(item_id, response_id)
        events: list[AgentEvent] = []
        if item.received == 0:
            if self._speech_stopped is not None:  # the caller's turn ended -> this reply's first audio
                events.append(Latency({"total": round(time.monotonic() - self._speech_stopped, 3)}, item_id))
                self._speech_stopped = None
        item.received += len(audio)
        events.append(AgentAudio(item_id, audio))
        return events

    def _item(self, item_id: str, response_id: str) -> _Item:
        item = self._items.get(item_id)
        if item is None:
            item = self._items[item_id] = _Item(response_id)
        return item

    def _line(self, item_id: str, text: str, raw: str | bytes | None) -> list[AgentEvent]:
        item = self._items.get(item_id)
        if item is not None:
            if item.texted:
                return []
            item.texted = True
        return [Transcript("agent", text, item_id, _text(raw) if raw else None)] if text else []

    def _on_response_done(self, response: dict) -> list[AgentEvent]:
        events: list[AgentEvent] = []
        usage = response.get("usage")
        if isinstance(usage, dict):
            events.append(self._add_usage(usage))
        if response.get("status") == "failed":
            error = (response.get("status_details") or {}).get("error") or {}
            events.append(ProviderError(f"OpenAI response failed: {error.get('type', '')} {error.get('code', '')}: "
                                        f"{error.get('message', '')}".strip(), str(error.get("code") or "failed"),
                                        fatal=False))
        response_id = str(response.get("id", ""))
        for item_id, item in self._items.items():  # lines whose transcript.done never came (cancelled)
            if item.response_id == response_id and not item.texted and item.transcript:
                events += self._line(item_id, item.transcript, None)
        if response_id == self._response:
            self._response = None
        self._respond()
        return events

    def _add_usage(self, usage: dict) -> Usage:
        for path, name in USAGE_FIELDS.items():
            value = usage
            for key in path:
                value = value.get(key) if isinstance(value, dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                self.tokens[name] = self.tokens.get(name, 0) + value
                if name != "total":
                    counters.tokens_total.labels(self.name, name).inc(value)
        return Usage(dict(self.tokens))

    def _on_error(self, data: dict) -> ProviderError:
        error = data["error"]
        code = str(error.get("code") or error.get("type") or "")
        fatal = code in FATAL_CODES or error.get("type") == "server_error"
        failed_event = str(error.get("event_id") or "")
        if failed_event.startswith("truncate_"):
            log.error("call %s: OpenAI rejected a truncate (a bug: audio_end_ms must never exceed the item's "
                      "audio): %s", self.label, _describe(data))
        if failed_event and failed_event == self._create_sent:
            self._create_sent = None  # refused (a response was active): that response answers instead
        return ProviderError(f"OpenAI error: {_describe(data)}", code, fatal=fatal)

    # --- the end -------------------------------------------------------------------------------

    async def close(self) -> None:
        self._closing = True
        await self._outbox.close()
        await close_socket(self._ws)


def _describe(data: dict) -> str:
    """An `error` event as one line: type, code, message and the parameter it is about."""
    error = data.get("error") if isinstance(data.get("error"), dict) else {}
    text = f"{error.get('type', '')} {error.get('code') or ''}: {error.get('message', '')}".strip()
    return text + (f" (param {error['param']})" if error.get("param") else "")


def _code(data: dict) -> str:
    error = data.get("error") if isinstance(data.get("error"), dict) else {}
    return str(error.get("code") or error.get("type") or "")


def _refusal(response: Response) -> str:
    """OpenAI's reason from an HTTP error body ({"error": {"message": ...}}), else the body's start."""
    try:
        return str(orjson.loads(response.body or b"")["error"]["message"])[:200]
    except (ValueError, KeyError, TypeError):
        return (response.body or b"").decode(errors="replace")[:200]


def _text(raw: str | bytes) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw
