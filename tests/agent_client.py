"""A Deepgram Voice Agent V1 test client, and a fake OpenAI-compatible endpoint.

`AgentClient` talks to an agent server over a real socket and validates every message both
ways against the official `deepgram-sdk` models (`deepgram.agent.v1.types`), with no field
left over at any depth: what the server sends and what the tests send is the real protocol.

`FakeLLM` is an OpenAI-compatible chat-completions server (stdlib HTTP, in a thread) that
answers from a script and records every request, so the agent's LLM path can be tested
without a model. No LLM server runs on this machine; this is the only stand-in.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pydantic
from deepgram.agent.v1.types import (
    AgentV1AgentAudioDone, AgentV1AgentStartedSpeaking, AgentV1AgentThinking, AgentV1ConversationText,
    AgentV1Error, AgentV1ForceEndTurn, AgentV1FunctionCallRequest, AgentV1InjectAgentMessage,
    AgentV1InjectionRefused, AgentV1InjectUserMessage, AgentV1KeepAlive, AgentV1LatencyReport,
    AgentV1PromptUpdated, AgentV1SendFunctionCallResponse, AgentV1Settings, AgentV1SettingsApplied,
    AgentV1ThinkUpdated, AgentV1UpdatePrompt, AgentV1UpdateSpeak, AgentV1UpdateThink, AgentV1UserStartedSpeaking,
    AgentV1Warning, AgentV1Welcome,
)
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from test_local_stt import assert_no_extra

SERVER_MODELS: dict[str, type[pydantic.BaseModel]] = {
    "Welcome": AgentV1Welcome,
    "SettingsApplied": AgentV1SettingsApplied,
    "ConversationText": AgentV1ConversationText,
    "UserStartedSpeaking": AgentV1UserStartedSpeaking,
    "AgentThinking": AgentV1AgentThinking,
    "AgentStartedSpeaking": AgentV1AgentStartedSpeaking,
    "AgentAudioDone": AgentV1AgentAudioDone,
    "FunctionCallRequest": AgentV1FunctionCallRequest,
    "LatencyReport": AgentV1LatencyReport,
    "PromptUpdated": AgentV1PromptUpdated,
    "ThinkUpdated": AgentV1ThinkUpdated,
    "InjectionRefused": AgentV1InjectionRefused,
    "Warning": AgentV1Warning,
    "Error": AgentV1Error,
}
CLIENT_MODELS: dict[str, type[pydantic.BaseModel]] = {
    "Settings": AgentV1Settings,
    "KeepAlive": AgentV1KeepAlive,
    "InjectUserMessage": AgentV1InjectUserMessage,
    "InjectAgentMessage": AgentV1InjectAgentMessage,
    "FunctionCallResponse": AgentV1SendFunctionCallResponse,
    "UpdatePrompt": AgentV1UpdatePrompt,
    "UpdateThink": AgentV1UpdateThink,
    "UpdateSpeak": AgentV1UpdateSpeak,
    "ForceEndTurn": AgentV1ForceEndTurn,
}

TWILIO_AUDIO = {
    "input": {"encoding": "mulaw", "sample_rate": 8000},
    "output": {"encoding": "mulaw", "sample_rate": 8000, "container": "none"},
}
END_CALL = {"name": "end_call", "description": "Hang up the call after saying goodbye.",
            "parameters": {"type": "object", "properties": {}}}


def settings_message(*, greeting: str | None = None, prompt: str = "You are a test agent.",
                     functions: list[dict] | None = None) -> dict[str, Any]:
    """A Settings message as the Twilio side sends it (protocols.md C.2)."""
    agent: dict[str, Any] = {
        "listen": {"provider": {"type": "deepgram", "model": "nova-3"}},
        "think": {"provider": {"type": "open_ai", "model": "gpt-4o-mini"}, "prompt": prompt},
        "speak": {"provider": {"type": "deepgram", "model": "aura-2-thalia-en"}},
    }
    if functions:
        agent["think"]["functions"] = functions
    if greeting is not None:
        agent["greeting"] = greeting
    return {"type": "Settings", "audio": copy.deepcopy(TWILIO_AUDIO), "agent": agent}


def validate_server_message(text: str) -> pydantic.BaseModel:
    data = json.loads(text)
    model = SERVER_MODELS[data["type"]].model_validate(data, strict=True)
    assert_no_extra(model)
    return model


def validate_client_message(message: dict[str, Any]) -> None:
    model = CLIENT_MODELS[message["type"]].model_validate(message)
    assert_no_extra(model)


@dataclass
class Received:
    at: float  # time.monotonic()
    message: pydantic.BaseModel | bytes

    @property
    def type(self) -> str:
        return "audio" if isinstance(self.message, bytes) else self.message.type


class AgentClient:
    """One connection; a background task records (and validates) everything the server sends."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.received: list[Received] = []
        self.closed = asyncio.Event()
        self._arrived = asyncio.Event()
        self._task = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, url: str, key: str) -> AgentClient:
        ws = await connect(url, additional_headers={"Authorization": f"Token {key}"}, compression=None)
        return cls(ws)

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                item = message if isinstance(message, bytes) else validate_server_message(message)
                self.received.append(Received(time.monotonic(), item))
                self._arrived.set()
        except ConnectionClosed:
            pass
        finally:
            self.closed.set()
            self._arrived.set()

    async def send(self, message: dict[str, Any]) -> None:
        validate_client_message(message)
        await self.ws.send(json.dumps(message))

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send(data)

    async def send_audio(self, audio: bytes, *, realtime: bool = False, frame: int = 160) -> float:
        """Send `audio` in Twilio-sized frames; return the monotonic time the first one left."""
        started = time.monotonic()
        for i in range(0, len(audio), frame):
            await self.ws.send(audio[i : i + frame])
            if realtime:
                await asyncio.sleep(max(0.0, started + (i + frame) / 8000 - time.monotonic()))
        return started

    async def wait_for(self, kind: str, *, after: int = 0, timeout: float = 10.0, **fields: Any) -> int:
        """Index of the first message of type `kind` (and these field values) at or after `after`."""
        deadline = time.monotonic() + timeout
        while True:
            for i in range(after, len(self.received)):
                item = self.received[i]
                if item.type == kind and all(getattr(item.message, k) == v for k, v in fields.items()):
                    return i
            if self.closed.is_set():
                raise AssertionError(f"closed before {kind} {fields}; got {self.types()}")
            self._arrived.clear()
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await self._arrived.wait()
            except TimeoutError:
                raise AssertionError(f"no {kind} {fields} within {timeout} s; got {self.types()}") from None

    def types(self, start: int = 0, end: int | None = None) -> list[str]:
        """Message types, runs of audio frames shown once as "audio"."""
        out: list[str] = []
        for item in self.received[start:end]:
            if not (item.type == "audio" and out and out[-1] == "audio"):
                out.append(item.type)
        return out

    def audio(self, start: int = 0, end: int | None = None) -> bytes:
        return b"".join(r.message for r in self.received[start:end] if isinstance(r.message, bytes))

    def messages(self, kind: str, start: int = 0, end: int | None = None) -> list[Any]:
        return [r.message for r in self.received[start:end] if r.type == kind]

    async def wait_closed(self, timeout: float = 10.0) -> tuple[int | None, str | None]:
        async with asyncio.timeout(timeout):
            await self.closed.wait()
        return self.ws.close_code, self.ws.close_reason

    async def close(self) -> None:
        await self.ws.close()
        await self._task


# --- A fake OpenAI-compatible endpoint ------------------------------------------------------


def completion(content: str | None = None, tool_calls: list[dict] | None = None) -> dict[str, Any]:
    """A chat.completion body as OpenAI's API returns it."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": "test-model",
        "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if tool_calls else "stop"}],
    }


@dataclass
class Reply:
    """One scripted answer: a body with a status, or a delay first (to hang)."""

    body: dict[str, Any] | None = None
    status: int = 200
    delay: float = 0.0


@dataclass
class FakeLLM:
    """`POST /v1/chat/completions` answered from `script`, in order; `requests` records the bodies."""

    script: list[Reply] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(body)
                fake.headers.append({k.lower(): v for k, v in self.headers.items()})
                reply = fake.script.pop(0) if fake.script else Reply({"error": {"message": "script empty"}}, 500)
                time.sleep(reply.delay)
                data = json.dumps(reply.body or {}).encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
