"""Thinking: what the embedded agent answers.

One small interface, `Brain.think(conversation) -> Thought`, and two implementations:

* `LLMBrain`: any OpenAI-compatible chat-completions endpoint (`AGENT_LLM_URL`: Ollama,
  llama.cpp's server, vLLM, ...), through the `openai` package (Apache-2.0) pointed at that
  `base_url`. The Settings' functions are offered as tools; tool calls come back as
  `FunctionCall`s, which the session turns into `FunctionCallRequest`s and whose results it
  adds to the conversation before thinking again. A timeout or any failure raises
  `ThinkError`; the session then apologises out loud (never silence) and sends a `Warning`.
* `OfflineResponder`: no model at all. It says plainly that it is an offline demo, repeats
  back what it understood, and on "goodbye" says goodbye and calls `end_call` when the Settings
  offer it. Deterministic, so it is also the brain of the deterministic mode.

A `Conversation` is per connection and kept in OpenAI's chat format, which is what an LLM
endpoint takes and what a reader of the code already knows.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.server_protocol import Function, FunctionCall

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Thought:
    """What to say, then which functions to call (after the text has been spoken)."""

    text: str
    calls: tuple[FunctionCall, ...] = ()


class ThinkError(Exception):
    """The brain could not answer (endpoint down, timeout, malformed reply)."""


@dataclass
class Conversation:
    """One connection's prompt, functions and history, as OpenAI chat messages."""

    prompt: str
    functions: tuple[Function, ...]
    messages: list[dict[str, Any]] = field(default_factory=list)

    def add_user(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})

    def add_assistant(self, text: str, calls: tuple[FunctionCall, ...] = ()) -> None:
        message: dict[str, Any] = {"role": "assistant", "content": text or None}
        if calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in calls
            ]
        if text or calls:
            self.messages.append(message)

    def add_result(self, call_id: str, content: str) -> None:
        self.messages.append({"role": "tool", "tool_call_id": call_id, "content": content})

    def function(self, name: str) -> Function | None:
        return next((f for f in self.functions if f.name == name), None)

    def chat(self) -> list[dict[str, Any]]:
        """The messages for a chat-completions request: the prompt first, as the system message."""
        system = [{"role": "system", "content": self.prompt}] if self.prompt else []
        return system + self.messages


class Brain(Protocol):
    description: str  # for AgentThinking and the logs

    async def think(self, conversation: Conversation) -> Thought: ...


# --- The built-in responder ----------------------------------------------------------------

END_CALL = "end_call"
_GOODBYE = re.compile(r"\b(good ?bye|bye|hang up|that'?s all)\b", re.IGNORECASE)
OFFLINE_REPLY = "This is the offline demo agent, so I can only repeat what I understood. I heard: {text}."
GOODBYE_REPLY = "Goodbye, and thank you for trying the offline demo."


class OfflineResponder:
    description = "offline demo responder"

    async def think(self, conversation: Conversation) -> Thought:
        last = conversation.messages[-1] if conversation.messages else None
        if last is None or last["role"] != "user":
            return Thought("")  # e.g. end_call answered: nothing more to say
        text = " ".join(str(last["content"]).split()).rstrip(".!?")
        if _GOODBYE.search(text):
            calls = ()
            if conversation.function(END_CALL) is not None:
                calls = (FunctionCall(new_call_id(), END_CALL, "{}"),)
            return Thought(GOODBYE_REPLY, calls)
        return Thought(OFFLINE_REPLY.format(text=text))


def new_call_id() -> str:
    return str(uuid.uuid4())


# --- An OpenAI-compatible endpoint ---------------------------------------------------------


class LLMBrain:
    """Chat completions at `base_url` with `model`; one HTTP connection pool for every call.

    Retries are off: a caller is waiting, and a second attempt after a timeout would double the
    silence. The session speaks an apology instead.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None, timeout: float) -> None:
        import openai  # imported only when an LLM is configured: it takes a while to load

        self.description = f"{model} (OpenAI-compatible endpoint)"
        self.model = model
        self.timeout = timeout
        self._errors = (openai.OpenAIError, ValueError, KeyError, TypeError, IndexError, AttributeError)
        # Local servers ignore the key, but the client insists on one.
        self._client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "none", timeout=timeout,
                                          max_retries=0)

    async def think(self, conversation: Conversation) -> Thought:
        request: dict[str, Any] = {"model": self.model, "messages": conversation.chat()}
        if conversation.functions:
            request["tools"] = [
                {"type": "function",
                 "function": {"name": f.name, "description": f.description, "parameters": f.parameters}}
                for f in conversation.functions
            ]
        try:
            async with asyncio.timeout(self.timeout):
                completion = await self._client.chat.completions.create(**request)
            message = completion.choices[0].message
            calls = tuple(
                FunctionCall(call.id or new_call_id(), call.function.name, call.function.arguments or "{}")
                for call in message.tool_calls or ()
            )
            return Thought(message.content or "", calls)
        except TimeoutError:
            raise ThinkError(f"no answer from the LLM within {self.timeout:g} s") from None
        except self._errors as exc:
            raise ThinkError(f"LLM request failed: {type(exc).__name__}: {str(exc)[:200]}") from None

    async def aclose(self) -> None:
        await self._client.close()


def function_error(message: str) -> str:
    """A function result that tells the LLM the call did not happen, as JSON text."""
    return json.dumps({"error": message})
