"""The Deepgram Voice Agent V1 provider (protocols.md C), also used for the embedded agent.

    open wss://agent.deepgram.com/v1/agent/converse (Authorization: Token <key>)
    <- Welcome   -> Settings   <- SettingsApplied       then, until the call ends:
    -> caller audio (binary, 8 kHz mu-law)              <- agent audio (binary, 8 kHz mu-law)
    -> InjectUserMessage, FunctionCallResponse, KeepAlive
    <- ConversationText, UserStartedSpeaking, AgentThinking, AgentStartedSpeaking, AgentAudioDone,
       FunctionCallRequest, LatencyReport, Warning, Error, ...

`Settings` is built from the call's `AgentSetup`: our audio formats (mulaw 8000 in, mulaw 8000
`container: "none"` out, whatever AGENT_SETTINGS_FILE says), the file's fields merged in
(models, voices, keyterms...), then the prompt, greeting and tool schemas.

Deepgram has no reply ids, so replies are numbered here ("r1", "r2", ...): a reply starts with
`AgentStartedSpeaking` (or with audio when none came) and ends with `AgentAudioDone`. After
`UserStartedSpeaking` the interrupted reply's audio still in flight is dropped until the next
reply begins, so the caller never hears the tail of a reply it cut off.

Caller audio goes out as it comes (one binary frame per Twilio frame), written in place when the
socket keeps up (sendnow.py), else through a bounded outbox; while none flows, `KeepAlive`.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from typing import AsyncIterator

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.http11 import Response

from agent import counters
from agent.provider import (
    AgentAudio, AgentAudioDone, AgentEvent, AgentSetup, Latency, ProviderError, ProviderFailed, ProviderMessages,
    ProviderStats, ToolCallRequest, Transcript, UserStartedSpeaking, close_socket, merged, read_session,
    setup_failure,
)
from agent.outbox import Outbox
from agent.tools import ToolResult

log = logging.getLogger(__name__)

AUDIO = {
    "input": {"encoding": "mulaw", "sample_rate": 8000},
    "output": {"encoding": "mulaw", "sample_rate": 8000, "container": "none"},
}
DEFAULT_AGENT = {
    "listen": {"provider": {"type": "deepgram", "model": "nova-3"}},
    "think": {"provider": {"type": "open_ai", "model": "gpt-4o-mini"}},
    "speak": {"provider": {"type": "deepgram", "model": "aura-2-thalia-en"}},
}
KEEPALIVE = '{"type":"KeepAlive"}'
KEEPALIVE_SECONDS = 5.0  # Deepgram closes an idle session (CLIENT_MESSAGE_TIMEOUT) after ~10 s
MAX_MESSAGE_BYTES = 2**22  # agent audio can come in large binary messages


def _refusal(response: Response) -> str:
    """Deepgram's reason for refusing an upgrade, and the request id to quote to its support."""
    reason = response.headers.get("dg-error", "") or response.body.decode(errors="replace")[:200]
    return f"{reason} (dg-request-id {response.headers.get('dg-request-id', '-')})".strip()


def settings_message(setup: AgentSetup) -> dict:
    """The `Settings` message for one call (protocols.md C.2)."""
    message = merged({"type": "Settings", "audio": AUDIO, "agent": DEFAULT_AGENT}, setup.provider_settings)
    message["type"] = "Settings"
    message["audio"] = copy.deepcopy(AUDIO)  # Twilio's format both ways, whatever the file says
    agent = message["agent"]
    if setup.greeting:
        agent["greeting"] = setup.greeting
    thinks = agent["think"] if isinstance(agent.get("think"), list) else [agent.setdefault("think", {})]
    for think in thinks:
        think["prompt"] = setup.prompt
        server_side = [f for f in think.get("functions", []) if isinstance(f, dict) and "endpoint" in f]
        think["functions"] = server_side + setup.tools.schemas()
    return message


class DeepgramAgent:
    """One call's Voice Agent session; implements `agent.provider.AgentProvider`."""

    def __init__(self, setup: AgentSetup, *, url: str, api_key: str, name: str = "deepgram",
                 connect_timeout: float = 5.0, keepalive_seconds: float = KEEPALIVE_SECONDS):
        self.name = name
        self.setup = setup
        self.url = url
        self._headers = {"Authorization": f"Token {api_key}"}
        self.connect_timeout = connect_timeout
        self.label = setup.call.call_sid
        self.stats = ProviderStats()
        self.request_id = ""
        self._ws: ClientConnection | None = None
        self._ready = False  # Settings applied: audio may flow
        self._closing = False
        self._outbox = Outbox(self.stats, keepalive=KEEPALIVE, keepalive_seconds=keepalive_seconds)
        self._early: list[AgentEvent] = []  # events that arrived before SettingsApplied
        self._messages = ProviderMessages(name, self.label, self.stats)
        # Reply numbering (see the module docstring).
        self._replies = 0
        self._segment: str | None = None  # the reply whose audio is arriving
        self._next_segment: str | None = None  # an id given to a reply's text before its audio
        self._texted: set[str] = set()  # replies that got their text
        self._last_segment: str | None = None
        self._muted = False  # after a barge-in: drop the interrupted reply's late audio

    # --- set-up ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, wait for Welcome, send Settings, wait for SettingsApplied (bounded)."""
        try:
            async with asyncio.timeout(self.connect_timeout):
                self._ws = await connect(self.url, additional_headers=self._headers, max_size=MAX_MESSAGE_BYTES,
                                         compression=None, open_timeout=None)
                await self._handshake(self._ws)
        except (OSError, InvalidHandshake, ConnectionClosed) as exc:  # TimeoutError is an OSError
            raise setup_failure(exc, "Deepgram", "Deepgram agent session", self.connect_timeout, _refusal) from None
        finally:
            if not self._ready and self._ws is not None:
                self._ws.transport.abort()
        self._outbox.start(self._ws, f"deepgram-agent {self.label}")  # audio that waited goes out now

    async def _handshake(self, ws: ClientConnection) -> None:
        welcome = self._messages.parse(await ws.recv())
        if welcome.get("type") != "Welcome":
            raise ProviderFailed(f"Deepgram sent {welcome.get('type')!r} instead of Welcome", "protocol")
        self.request_id = str(welcome.get("request_id", ""))
        await ws.send(orjson.dumps(settings_message(self.setup)).decode())
        while True:
            message = await ws.recv()
            if isinstance(message, bytes):
                continue  # no audio is expected before SettingsApplied
            data = self._messages.parse(message)
            if data.get("type") == "SettingsApplied":
                self._ready = True
                log.info("call %s: Deepgram agent session %s ready", self.label, self.request_id)
                return
            if data.get("type") == "Error":
                raise ProviderFailed(f"Deepgram refused the settings: {data.get('code', '')} "
                                     f"{data.get('description', '')}".strip(), str(data.get("code", "")))
            self._early.extend(self._on_message(data, message))

    # --- towards Deepgram --------------------------------------------------------------------

    def send_audio(self, audio: bytes) -> None:
        self._outbox.audio(audio, len(audio))

    def send_user_text(self, text: str) -> None:
        self._outbox.send(orjson.dumps({"type": "InjectUserMessage", "content": text}).decode())

    def send_tool_result(self, request: ToolCallRequest, result: ToolResult) -> None:
        self._outbox.send(orjson.dumps({"type": "FunctionCallResponse", "id": request.id, "name": request.name,
                                  "content": result.content}).decode())

    def interrupted(self, segment: str, heard_ms: int) -> None:
        """Deepgram keeps its own account of the conversation: nothing to tell it."""

    # --- from Deepgram -----------------------------------------------------------------------

    def events(self) -> AsyncIterator[AgentEvent]:
        return read_session(self._ws, self._early, self._events_of, "Deepgram", lambda: self._closing)

    def _events_of(self, message: str | bytes) -> list[AgentEvent]:
        """Binary messages are the agent's audio; text ones its JSON events."""
        if isinstance(message, bytes):
            audio = self._on_audio(message)
            return [audio] if audio is not None else []
        return self._on_message(self._messages.parse(message), message)

    def _on_audio(self, audio: bytes) -> AgentAudio | None:
        self.stats.audio_out_bytes += len(audio)
        if self._muted:
            counters.provider_audio_dropped_bytes.inc(len(audio))
            return None
        if self._segment is None:
            self._open_segment()
        return AgentAudio(self._segment, audio)

    def _open_segment(self) -> None:
        if self._next_segment is not None:
            self._segment, self._next_segment = self._next_segment, None
        else:
            self._replies += 1
            self._segment = f"r{self._replies}"
        self._last_segment = self._segment
        self._muted = False

    def _text_segment(self) -> str:
        """The reply an assistant line belongs to: the one speaking, the last one if it came
        without a line (text after its audio), or else the next one (text before its audio)."""
        if self._segment is not None:
            return self._segment
        if self._last_segment is not None and self._last_segment not in self._texted:
            return self._last_segment
        if self._next_segment is None:
            self._replies += 1
            self._next_segment = f"r{self._replies}"
        return self._next_segment

    def _on_message(self, data: dict, raw: str) -> list[AgentEvent]:
        """One JSON message -> the events it means (often none)."""
        kind = data.get("type")
        if kind is None:
            return []  # _parse already counted it
        try:
            if kind == "UserStartedSpeaking":
                self._segment, self._next_segment, self._muted = None, None, True
                return [UserStartedSpeaking()]
            if kind == "ConversationText":
                role, text = data["role"], data["content"]
                if role not in ("user", "assistant") or not isinstance(text, str):
                    raise ValueError(f"role {role!r}")
                self._muted = False  # a new turn: audio from now on is the new reply's
                if role == "user":
                    return [Transcript("user", text, None, raw)]
                segment = self._text_segment()
                self._texted.add(segment)
                return [Transcript("agent", text, segment, raw)]
            if kind == "AgentStartedSpeaking":
                self._open_segment()
                return [Latency({"total": float(data["total_latency"]), "llm": float(data["ttt_latency"]),
                                 "tts": float(data["tts_latency"])}, self._segment)]
            if kind == "AgentAudioDone":
                segment, self._segment = self._segment, None
                return [AgentAudioDone(segment)] if segment is not None else []
            if kind == "FunctionCallRequest":
                self._muted = False
                requests = []
                for function in data["functions"]:
                    if function["client_side"] is True:
                        requests.append(ToolCallRequest(str(function["id"]), str(function["name"]),
                                                        str(function["arguments"])))
                    else:
                        log.info("call %s: Deepgram runs function %s itself", self.label, function["name"])
                return requests
            if kind == "LatencyReport":
                names = {"total_latency": "total", "stt_latency": "stt", "ttt_token_latency": "llm",
                         "tts_latency": "tts"}
                return [Latency({short: float(data[key]) for key, short in names.items()
                                 if isinstance(data.get(key), (int, float))}, self._segment or self._last_segment)]
            if kind == "AgentThinking":
                self._muted = False
                return []
            if kind == "Error":
                return [ProviderError(f"Deepgram error: {data.get('code', '')} {data.get('description', '')}".strip(),
                                      str(data.get("code", "")), fatal=True)]
            if kind == "Warning":
                return [ProviderError(f"Deepgram warning: {data.get('code', '')} {data.get('description', '')}".strip(),
                                      str(data.get("code", "")), fatal=False)]
            if kind == "InjectionRefused":
                return [ProviderError(f"Deepgram refused an injected message: {data.get('message', '')}",
                                      "INJECTION_REFUSED", fatal=False)]
            if kind in ("Welcome", "SettingsApplied", "PromptUpdated", "SpeakUpdated", "ThinkUpdated",
                        "ListenUpdated", "FunctionCallResponse", "History", "FunctionCallCancelled"):
                return []  # acknowledgements and information the call does not need
        except (KeyError, TypeError, ValueError) as exc:
            self._messages.bad(f"malformed {kind}: {type(exc).__name__} {exc}")
            return []
        self._messages.bad(f"unknown message type {str(kind)[:40]!r}")
        return []

    # --- the end -------------------------------------------------------------------------------

    async def close(self) -> None:
        self._closing = True
        await self._outbox.close()
        await close_socket(self._ws)
