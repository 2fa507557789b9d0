"""The Deepgram Voice Agent V1 protocol seen from the server side (protocols.md C), as pure code.

The embedded agent plays Deepgram's part of the protocol, so this module does the opposite of a
client: it parses what a client sends (`parse_client_message`) into typed messages and builds
what Deepgram would answer (`welcome()`, `conversation_text()`, ...). No sockets here: the
session (`embedded_session.py`) does the I/O, and tests can try any input without one.

A client message that cannot be used raises `ProtocolError` carrying Deepgram's error code:
`UNPARSABLE_CLIENT_MESSAGE` for JSON that is not a known message of the right shape, and
`INVALID_SETTINGS` for a `Settings` that parses but asks for something this server cannot do
(any audio format but 8 kHz mu-law without a container, ...). Refusing
clearly beats sending audio the client would play as static.

Field names follow Deepgram's (and the `deepgram-sdk` models'); tests validate every message
built here against those models, with no field left over.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal, Union

SAMPLE_RATE = 8000  # the only rate this server hears and speaks: Twilio's 8 kHz mu-law

# Deepgram's error codes (developers.deepgram.com "Errors & Warnings").
UNPARSABLE_CLIENT_MESSAGE = "UNPARSABLE_CLIENT_MESSAGE"
NON_SETTINGS_MESSAGE_BEFORE_SETTINGS = "NON_SETTINGS_MESSAGE_BEFORE_SETTINGS"
SETTINGS_ALREADY_APPLIED = "SETTINGS_ALREADY_APPLIED"
INVALID_SETTINGS = "INVALID_SETTINGS"
CLIENT_MESSAGE_TIMEOUT = "CLIENT_MESSAGE_TIMEOUT"
FAILED_TO_START_LISTENING = "FAILED_TO_START_LISTENING"
FAILED_TO_SPEAK = "FAILED_TO_SPEAK"
INTERNAL_SERVER_ERROR = "INTERNAL_SERVER_ERROR"
# Deepgram's warning codes.
THINK_REQUEST_FAILED = "THINK_REQUEST_FAILED"
FUNCTION_CALL_FAILED = "FUNCTION_CALL_FAILED"
# Ours: a valid Deepgram message this server does not act on (UpdateSpeak, UpdateListen, ...).
UNSUPPORTED_MESSAGE = "UNSUPPORTED_BY_EMBEDDED_AGENT"

# OpenAI's rule for tool names, which every LLM behind `AGENT_LLM_URL` will apply too.
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
INJECT_BEHAVIORS = ("default", "queue", "interrupt")
# Valid Deepgram client messages that this server accepts but does not act on.
UNSUPPORTED_TYPES = frozenset({"UpdateSpeak", "UpdateListen", "UpdateThinkLive", "CustomToThinkProvider"})


class ProtocolError(Exception):
    """A client message this server refuses: `code` is Deepgram's error code for it."""

    def __init__(self, code: str, description: str) -> None:
        super().__init__(f"{code}: {description}")
        self.code = code
        self.description = description


# --- Client messages ------------------------------------------------------------------------


@dataclass(frozen=True)
class Function:
    """A function the agent may call; the client runs it (`client_side: true`)."""

    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class AgentConfig:
    """What a `Settings` message asks of the agent, once checked.

    `skipped_functions` names the server-side functions (those with an `endpoint`, which Deepgram
    would call itself): the embedded agent does not offer them, and says so in a `Warning`.
    """

    prompt: str
    functions: tuple[Function, ...]
    greeting: str | None
    skipped_functions: tuple[str, ...] = ()


@dataclass(frozen=True)
class Settings:
    config: AgentConfig


@dataclass(frozen=True)
class KeepAlive:
    pass


@dataclass(frozen=True)
class InjectUserMessage:
    content: str


@dataclass(frozen=True)
class InjectAgentMessage:
    message: str
    behavior: Literal["default", "queue", "interrupt"]


@dataclass(frozen=True)
class UpdatePrompt:
    prompt: str


@dataclass(frozen=True)
class UpdateThink:
    prompt: str
    functions: tuple[Function, ...]
    skipped_functions: tuple[str, ...] = ()


@dataclass(frozen=True)
class FunctionCallResponse:
    id: str | None
    name: str
    content: str


@dataclass(frozen=True)
class ForceEndTurn:
    pass


@dataclass(frozen=True)
class Unsupported:
    type: str


ClientMessage = Union[
    Settings, KeepAlive, InjectUserMessage, InjectAgentMessage, UpdatePrompt, UpdateThink,
    FunctionCallResponse, ForceEndTurn, Unsupported,
]


def _unparsable(description: str) -> ProtocolError:
    return ProtocolError(UNPARSABLE_CLIENT_MESSAGE, description)


def _field(message: dict, name: str, kind: type, *, required: bool = True, where: str = "") -> Any:
    """`message[name]` if it has type `kind`; a missing optional field is None."""
    value = message.get(name)
    if value is None and not required:
        return None
    if type(value) is not kind:  # `type is`, so that True is not taken for an int
        raise _unparsable(f"{where or message.get('type')}.{name} must be a {kind.__name__}")
    return value


def parse_client_message(text: str) -> ClientMessage:
    """One text frame from the client; `ProtocolError` if it is not a usable V1 message."""
    try:
        message = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise _unparsable("the message is not JSON") from None
    if not isinstance(message, dict) or type(message.get("type")) is not str:
        raise _unparsable("a message must be a JSON object with a string `type`")
    kind = message["type"]
    match kind:
        case "Settings":
            return Settings(parse_settings(message))
        case "KeepAlive":
            return KeepAlive()
        case "InjectUserMessage":
            return InjectUserMessage(_field(message, "content", str))
        case "InjectAgentMessage":
            behavior = _field(message, "behavior", str, required=False) or "default"
            if behavior not in INJECT_BEHAVIORS:
                raise _unparsable(f"InjectAgentMessage.behavior must be one of {', '.join(INJECT_BEHAVIORS)}")
            return InjectAgentMessage(_field(message, "message", str), behavior)
        case "UpdatePrompt":
            return UpdatePrompt(_field(message, "prompt", str))
        case "UpdateThink":
            think = _field(message, "think", dict, where="UpdateThink")
            return UpdateThink(*_parse_think(think, error=_unparsable))
        case "FunctionCallResponse":
            return FunctionCallResponse(
                _field(message, "id", str, required=False),
                _field(message, "name", str),
                _field(message, "content", str),
            )
        case "ForceEndTurn":
            return ForceEndTurn()
        case _ if kind in UNSUPPORTED_TYPES:
            return Unsupported(kind)
    raise _unparsable(f"unknown message type {kind[:40]!r}")


def _invalid(description: str) -> ProtocolError:
    return ProtocolError(INVALID_SETTINGS, description)


def parse_settings(message: dict) -> AgentConfig:
    """Check a `Settings` message (protocols.md C.2) and keep what the embedded agent uses.

    `listen`, `speak` and `think.provider` are accepted and ignored: the embedded agent has one
    recogniser, one voice, and thinks with `AGENT_LLM_URL` or its built-in responder.
    """
    audio = message.get("audio")
    if not isinstance(audio, dict):
        raise _unparsable("Settings.audio must be an object")
    _check_audio_input(audio.get("input"))
    _check_audio_output(audio.get("output"))
    agent = message.get("agent")
    if not isinstance(agent, dict):
        raise _invalid("Settings.agent must be an object (stored agent configurations are not supported)")
    greeting = agent.get("greeting")
    if greeting is not None and type(greeting) is not str:
        raise _invalid("agent.greeting must be a string")
    think = agent.get("think")
    if isinstance(think, list):  # a list is Deepgram's fallback order: the first one is used
        think = think[0] if think else None
    if think is None:
        prompt, functions, skipped = "", (), ()
    elif isinstance(think, dict):
        prompt, functions, skipped = _parse_think(think, error=_invalid)
    else:
        raise _invalid("agent.think must be an object or a list of objects")
    return AgentConfig(prompt=prompt, functions=functions, greeting=greeting or None, skipped_functions=skipped)


def _check_audio_input(spec: Any) -> None:
    if not isinstance(spec, dict):
        raise _invalid("audio.input is required: the embedded agent hears mulaw at 8000 Hz only")
    if spec.get("encoding") != "mulaw" or spec.get("sample_rate") != SAMPLE_RATE:
        raise _invalid(
            f"audio.input {spec.get('encoding')!r} at {spec.get('sample_rate')!r} Hz is not supported: "
            "the embedded agent hears mulaw at 8000 Hz only"
        )


def _check_audio_output(spec: Any) -> None:
    if not isinstance(spec, dict):
        raise _invalid("audio.output is required: the embedded agent speaks mulaw at 8000 Hz only")
    if spec.get("encoding") != "mulaw" or spec.get("sample_rate") != SAMPLE_RATE:
        raise _invalid(
            f"audio.output {spec.get('encoding')!r} at {spec.get('sample_rate')!r} Hz is not supported: "
            "the embedded agent speaks mulaw at 8000 Hz only"
        )
    if spec.get("container", "none") != "none":
        raise _invalid(f"audio.output.container {spec.get('container')!r} is not supported: use \"none\" (raw audio)")


def _parse_think(think: dict, *, error) -> tuple[str, tuple[Function, ...], tuple[str, ...]]:
    """(prompt, client-side functions, names of the server-side ones, which are not offered)."""
    prompt = think.get("prompt", "")
    if type(prompt) is not str:
        raise error("think.prompt must be a string")
    functions = think.get("functions") or []
    if not isinstance(functions, list):
        raise error("think.functions must be a list")
    parsed = [(_parse_function(f, error=error), f.get("endpoint") is not None) for f in functions]
    names = [f.name for f, _ in parsed]
    if len(set(names)) != len(names):
        raise error("think.functions has two functions with the same name")
    return (prompt, tuple(f for f, server_side in parsed if not server_side),
            tuple(f.name for f, server_side in parsed if server_side))


def _parse_function(spec: Any, *, error) -> Function:
    if not isinstance(spec, dict):
        raise error("each of think.functions must be an object")
    name = spec.get("name")
    if type(name) is not str or not FUNCTION_NAME.fullmatch(name):
        raise error(f"function name {name!r} must be 1-64 characters of A-Z a-z 0-9 _ -")
    description = spec.get("description") or ""
    parameters = spec.get("parameters") or {"type": "object", "properties": {}}
    if type(description) is not str or not isinstance(parameters, dict):
        raise error(f"function {name}: description must be a string and parameters an object")
    return Function(name, description, parameters)


# --- Server messages ------------------------------------------------------------------------
# Each returns the JSON text of one message, exactly the fields Deepgram's models declare.


def _json(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"))


def welcome(request_id: str) -> str:
    return _json({"type": "Welcome", "request_id": request_id})


def settings_applied() -> str:
    return _json({"type": "SettingsApplied"})


def conversation_text(role: Literal["user", "assistant"], content: str) -> str:
    # The SDK documents `conversational_behavior` as always sent; "default" without Think Live.
    return _json({"type": "ConversationText", "role": role, "content": content,
                  "conversational_behavior": "default"})


def user_started_speaking() -> str:
    return _json({"type": "UserStartedSpeaking"})


def agent_thinking(content: str) -> str:
    return _json({"type": "AgentThinking", "content": content})


def agent_started_speaking(total_latency: float, tts_latency: float, ttt_latency: float) -> str:
    return _json({"type": "AgentStartedSpeaking", "total_latency": round(total_latency, 4),
                  "tts_latency": round(tts_latency, 4), "ttt_latency": round(ttt_latency, 4)})


def agent_audio_done() -> str:
    return _json({"type": "AgentAudioDone"})


def latency_report(**latencies: float | None) -> str:
    """Only the figures measured for this turn: a field left out means "not measured"."""
    fields = {name: round(value, 4) for name, value in latencies.items() if value is not None}
    return _json({"type": "LatencyReport", **fields})


@dataclass(frozen=True)
class FunctionCall:
    """One call the agent asks the client to make; `arguments` is JSON text, as in the protocol."""

    id: str
    name: str
    arguments: str


def function_call_request(calls: list[FunctionCall]) -> str:
    return _json({"type": "FunctionCallRequest", "functions": [
        {"id": c.id, "name": c.name, "arguments": c.arguments, "client_side": True} for c in calls
    ]})


def prompt_updated() -> str:
    return _json({"type": "PromptUpdated"})


def think_updated() -> str:
    return _json({"type": "ThinkUpdated"})


def injection_refused(message: str) -> str:
    return _json({"type": "InjectionRefused", "message": message})


def warning(code: str, description: str) -> str:
    return _json({"type": "Warning", "description": description, "code": code})


def error(code: str, description: str) -> str:
    return _json({"type": "Error", "description": description, "code": code})
