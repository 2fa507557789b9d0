"""The one interface between the Twilio side (bridge.py) and a speech-to-speech provider.

The bridge knows nothing provider-specific: it starts a provider, feeds it the caller's audio,
DTMF (as user text), tool results and barge-in notices, and reads the provider's events. A new
provider (OpenAI Realtime, issue 13) is a new module implementing `AgentProvider` plus one entry
in the factory table of `server.py`; nothing else changes.

All audio is 8 kHz mu-law both ways (Twilio's format; Deepgram `mulaw`, OpenAI `audio/pcmu`), so
nothing is transcoded.

Contract of an `AgentProvider`:
- `await start()` connects and configures the session (prompt, greeting, tools, voice) and
  returns once the provider accepted it; it raises `ProviderFailed` with the provider's reason
  (refused key, unreachable, settings rejected). Caller audio sent before or during `start()`
  is held (bounded) and sent once configured.
- `events()` is an async iterator of the events below, read by one task of the bridge; it ends
  when the session is over. A socket lost mid-call ends it with a fatal `ProviderError`. Audio
  of a segment the caller interrupted (after `UserStartedSpeaking`) that still arrives from the
  provider is dropped by the provider, not yielded: the bridge has already cleared Twilio.
- `send_audio`, `send_user_text`, `send_tool_result`, `interrupted` never block: they write now
  or queue (bounded) for the provider's own writer.
- `await close()` ends the session and frees everything; safe to call at any time, twice.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import re
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterable, Literal, Mapping, Protocol

import orjson
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.http11 import Response

from agent import counters
from agent.tools import CallContext, ToolRegistry, ToolResult
from throttle import Throttle

log = logging.getLogger(__name__)


# --- events a provider yields ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AgentAudio:
    """Agent speech, any length, belonging to one segment (a reply, or a provider's audio item)."""

    segment: str
    audio: bytes


@dataclass(frozen=True, slots=True)
class AgentAudioDone:
    """The provider has produced all of the segment's audio (it may still be playing)."""

    segment: str


@dataclass(frozen=True, slots=True)
class UserStartedSpeaking:
    """The caller started a turn: barge-in if the agent is being heard."""


@dataclass(frozen=True, slots=True)
class Transcript:
    """A line of the conversation. `segment` ties an agent line to its audio when the provider
    knows it (else the bridge ties it to the reply being spoken, or the next one); `raw` is the
    provider's own message, passed verbatim to raw-mode subscribers."""

    role: Literal["user", "agent"]
    text: str
    segment: str | None = None
    raw: str | None = None


@dataclass(frozen=True, slots=True)
class ToolCallRequest:
    id: str
    name: str
    arguments: str  # a JSON object as text, as the model wrote it


@dataclass(frozen=True, slots=True)
class Latency:
    """A turn's timing in seconds, by stage: total, stt, llm, tts (those the provider reports),
    and the segment (reply) it led to, when known."""

    seconds: Mapping[str, float]
    segment: str | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens used so far by this call's session, by kind (e.g. inputAudio, outputText)."""

    tokens: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class ProviderError:
    """Something the provider reported or did wrong. Fatal: the call cannot go on with it."""

    message: str
    code: str = ""
    fatal: bool = True


AgentEvent = (AgentAudio | AgentAudioDone | UserStartedSpeaking | Transcript | ToolCallRequest | Latency
              | Usage | ProviderError)


class ProviderFailed(Exception):
    """`start()` could not open a usable session; the message is the provider's reason."""

    def __init__(self, message: str, code: str = ""):
        super().__init__(message)
        self.code = code


@dataclass
class ProviderStats:
    audio_in_bytes: int = 0  # caller audio sent to the provider
    audio_unsent_bytes: int = 0  # caller audio dropped (provider not connected in time, or gone)
    audio_out_bytes: int = 0  # agent audio received
    messages: int = 0  # provider messages received
    bad_messages: int = 0  # unparsable or unexpected provider messages
    keepalives: int = 0


# --- what a provider is given for a call -------------------------------------------------------


@dataclass(frozen=True)
class AgentSetup:
    """One call's agent configuration, placeholders already filled from customParameters."""

    call: CallContext
    prompt: str
    greeting: str
    tools: ToolRegistry
    provider_settings: Mapping = field(default_factory=dict)  # AGENT_SETTINGS_FILE, merged by the provider


class AgentProvider(Protocol):
    name: str  # "deepgram", "embedded", "openai": shown to subscribers and in metrics
    stats: ProviderStats

    async def start(self) -> None: ...
    def events(self) -> AsyncIterator[AgentEvent]: ...
    def send_audio(self, audio: bytes) -> None: ...
    def send_user_text(self, text: str) -> None: ...
    def send_tool_result(self, request: ToolCallRequest, result: ToolResult) -> None: ...
    def interrupted(self, segment: str, heard_ms: int) -> None:
        """The caller barged in after hearing `heard_ms` of the segment's audio (never more than
        was generated for it). OpenAI truncates the item there; Deepgram needs nothing."""
    async def close(self) -> None: ...


ProviderFactory = Callable[[AgentSetup], AgentProvider]


def merged(base: dict, extra) -> dict:
    """`base` with `extra` (AGENT_SETTINGS_FILE) merged in: objects merge key by key, anything else
    is replaced. Neither argument is modified."""
    out = copy.deepcopy(base)
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class ProviderMessages:
    """A provider's incoming JSON messages: parsed and counted; the bad ones counted in
    `agent_provider_bad_messages_total` and logged, rate-limited (a provider gone wrong can send
    thousands a second, and the call goes on)."""

    LOG_INTERVAL = 10.0

    def __init__(self, provider: str, label: str, stats: ProviderStats):
        self.provider, self.label, self.stats = provider, label, stats
        self._throttle = Throttle(self.LOG_INTERVAL)

    def parse(self, message: str | bytes) -> dict:
        """A JSON object with a string `type`, or {} (counted and logged) for anything else."""
        self.stats.messages += 1
        try:
            data = orjson.loads(message)
        except ValueError:
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("type"), str):
            self.bad(f"not a JSON message with a type: {str(message)[:60]!r}")
            return {}
        return data

    def bad(self, what: str) -> None:
        self.stats.bad_messages += 1
        counters.provider_bad_messages.labels(self.provider).inc()
        count = self._throttle.hit()
        log.log(logging.WARNING if count else logging.DEBUG, "call %s: bad message from %s: %s%s", self.label,
                self.provider, what, f" ({count} since the last report)" if count > 1 else "")


def setup_failure(exc: BaseException, provider: str, session: str, timeout: float,
                  refusal: Callable[[Response], str]) -> ProviderFailed:
    """What went wrong while opening a provider session, as the `ProviderFailed` the call reports:
    refused (HTTP status, with `refusal(response)` as the provider's reason), timed out,
    closed during set-up, or unreachable."""
    if isinstance(exc, InvalidStatus):
        status = exc.response.status_code
        return ProviderFailed(f"{provider} refused the connection: HTTP {status} {refusal(exc.response)}".strip(),
                              f"http_{status}")
    if isinstance(exc, TimeoutError):
        return ProviderFailed(f"no {session} within {timeout:g} s", "timeout")
    if isinstance(exc, ConnectionClosed):
        close = exc.rcvd
        return ProviderFailed(f"{provider} closed the session during set-up"
                              + (f": {close.code} {close.reason}" if close else ""), "closed")
    return ProviderFailed(f"cannot reach {provider}: {exc or type(exc).__name__}", "unreachable")


async def read_session(ws: ClientConnection, early: list[AgentEvent],
                       events_of: Callable[[str | bytes], Iterable[AgentEvent]], provider: str,
                       closing: Callable[[], bool]) -> AsyncIterator[AgentEvent]:
    """A provider session's events, for `AgentProvider.events()`: those that came during set-up
    (`early`), then `events_of(message)` for each message, until a fatal `ProviderError` or the
    end of the socket, which is itself a `ProviderError` unless we were closing it."""
    for event in early:
        yield event
    early.clear()
    try:
        async for message in ws:
            for event in events_of(message):
                yield event
                if isinstance(event, ProviderError) and event.fatal:
                    return
    except ConnectionClosed as exc:
        if not closing():
            close = exc.rcvd
            yield ProviderError(f"{provider} connection lost: " + (f"{close.code} {close.reason}".strip()
                                if close else "no close frame"), "connection_lost")
        return
    if not closing():
        yield ProviderError(f"{provider} closed the session ({f'{ws.close_code} {ws.close_reason}'.strip()})",
                            "closed")


async def close_socket(ws: ClientConnection | None) -> None:
    """Close a provider socket, waiting at most a second for the provider's answer."""
    if ws is None:
        return
    try:
        async with asyncio.timeout(1.0):
            await ws.close()
    except TimeoutError:
        ws.transport.abort()


# --- placeholders ------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def fill_placeholders(text: str, parameters: Mapping[str, str]) -> tuple[str, list[str]]:
    """`{name}` replaced by the call's <Parameter name>; (text, names that had no parameter).

    Anything else in braces (JSON examples in a prompt) is left alone, and a missing parameter
    leaves its placeholder as written: a prompt is never a reason for a call to fail.
    """
    missing: list[str] = []

    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name in parameters:
            return parameters[name]
        missing.append(name)
        return match.group(0)

    return _PLACEHOLDER.sub(replace, text), missing
