"""Which provider serves a call, and provider sessions opened before the call's stream arrives.

`ProviderChoice` is the `ProviderFactory` the bridge is given. A call picks its provider with
`<Parameter name="agent" value="openai|deepgram|embedded">` among AGENT_ALLOWED_PROVIDERS (by
default: those whose keys are set, plus embedded); any other call, or a choice that is not
allowed, gets the deployment's provider (AGENT_PROVIDER). AGENT_SETTINGS_FILE may hold one object
per provider (`{"openai": {...}, "deepgram": {...}}`); a file without such sections is for the
deployment's provider alone, since Deepgram's `Settings` and OpenAI's `session` differ.

`Preconnect` is the factory in front of it when the TwiML webhook is used: /twiml knows the
call's CallSid and its <Parameter>s a second before Twilio opens the stream, so it opens the
provider session then (`open`), and the stream's `start` finds it connected, configured and
already generating the greeting, instead of waiting for a TLS and websocket handshake and a
settings round trip. A session whose stream does not come within AGENT_PRECONNECT_SECONDS is
closed; at most `max_entries` wait at once (the oldest is closed to make room).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import AsyncIterator, Mapping

from agent import counters
from agent.provider import AgentEvent, AgentProvider, AgentSetup, ProviderFactory, ToolCallRequest
from agent.tools import ToolResult

log = logging.getLogger(__name__)

NAMES = ("deepgram", "openai", "embedded")
CHOICE_PARAMETER = "agent"


class ProviderChoice:
    """The provider for each call (see the module docstring); a `ProviderFactory`."""

    def __init__(self, factories: Mapping[str, ProviderFactory], default: str, allowed: tuple[str, ...],
                 provider_settings: Mapping):
        self.factories = dict(factories)
        self.default = default
        self.allowed = tuple(name for name in allowed if name in self.factories)
        sectioned = any(isinstance(provider_settings.get(name), dict) for name in NAMES)
        self.settings = ({name: provider_settings.get(name) or {} for name in NAMES} if sectioned
                         else {default: provider_settings})

    def name_for(self, parameters: Mapping[str, str]) -> str:
        """The provider a call with these <Parameter>s gets."""
        asked = parameters.get(CHOICE_PARAMETER)
        if asked is None or asked == self.default:
            return self.default
        if asked in self.allowed:
            return asked
        log.warning("a call asked for agent provider %r, which is not allowed here (%s); it gets %s",
                    str(asked)[:40], ", ".join(self.allowed) or "only the default", self.default)
        return self.default

    def __call__(self, setup: AgentSetup) -> AgentProvider:
        name = self.name_for(setup.call.parameters)
        setup = dataclasses.replace(setup, provider_settings=self.settings.get(name, {}))
        return self.factories[name](setup)


@dataclasses.dataclass
class _Waiting:
    setup: AgentSetup
    provider: AgentProvider
    starting: asyncio.Task
    expiry: asyncio.TimerHandle


def _same_call(a: AgentSetup, b: AgentSetup) -> bool:
    """Whether a session opened for `a` can serve `b`: same call, prompt, greeting and parameters."""
    return (a.call.call_sid == b.call.call_sid and a.prompt == b.prompt and a.greeting == b.greeting
            and dict(a.call.parameters) == dict(b.call.parameters) and a.tools is b.tools)


class Preconnect:
    """Sessions opened by /twiml, by CallSid, until their stream's `start` (a `ProviderFactory`)."""

    def __init__(self, factory: ProviderFactory, seconds: float, max_entries: int):
        self.factory = factory
        self.seconds = seconds
        self.max_entries = max(1, max_entries)
        self._waiting: dict[str, _Waiting] = {}
        self._closing: set[asyncio.Task] = set()

    def __len__(self) -> int:
        return len(self._waiting)

    def open(self, setup: AgentSetup) -> None:
        """Start the call's provider session now (from the webhook); its stream will pick it up."""
        if self.seconds <= 0 or setup.call.call_sid in self._waiting:
            return
        while len(self._waiting) >= self.max_entries:
            self._drop(next(iter(self._waiting)), "evicted")
        provider = self.factory(setup)
        starting = asyncio.create_task(provider.start(), name=f"preconnect {setup.call.call_sid}")
        starting.add_done_callback(_retrieve)
        expiry = asyncio.get_running_loop().call_later(self.seconds, self._drop, setup.call.call_sid, "expired")
        self._waiting[setup.call.call_sid] = _Waiting(setup, provider, starting, expiry)
        counters.preconnects_total.labels("opened").inc()

    def __call__(self, setup: AgentSetup) -> AgentProvider:
        waiting = self._waiting.pop(setup.call.call_sid, None)
        if waiting is not None:
            waiting.expiry.cancel()
            if _same_call(waiting.setup, setup):
                counters.preconnects_total.labels("used").inc()
                return Preconnected(waiting.provider, waiting.starting)
            log.info("call %s: the session opened by the webhook does not fit the stream's parameters; "
                     "opening another", setup.call.call_sid)
            self._close(waiting, "mismatch")
        return self.factory(setup)

    def _drop(self, call_sid: str, why: str) -> None:
        waiting = self._waiting.pop(call_sid, None)
        if waiting is not None:
            waiting.expiry.cancel()
            if why == "expired":
                log.info("call %s: no stream within %g s of the webhook; closing its provider session", call_sid,
                         self.seconds)
            self._close(waiting, why)

    def _close(self, waiting: _Waiting, why: str) -> None:
        counters.preconnects_total.labels(why).inc()

        async def close() -> None:
            waiting.starting.cancel()
            await asyncio.gather(waiting.starting, return_exceptions=True)
            await waiting.provider.close()

        task = asyncio.create_task(close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close_all(self) -> None:
        for call_sid in list(self._waiting):
            self._drop(call_sid, "evicted")
        await asyncio.gather(*self._closing, return_exceptions=True)


def _retrieve(task: asyncio.Task) -> None:
    """A failed pre-connection is reported by the call that uses it, not as 'never retrieved'."""
    if not task.cancelled():
        task.exception()


class Preconnected:
    """A provider whose `start()` began at the webhook: `start()` waits for that one to finish."""

    def __init__(self, provider: AgentProvider, starting: asyncio.Task):
        self.provider = provider
        self.starting = starting
        self.name = provider.name

    @property
    def stats(self):
        return self.provider.stats

    async def start(self) -> None:
        await self.starting  # raises the ProviderFailed of a session that could not be opened

    def events(self) -> AsyncIterator[AgentEvent]:
        return self.provider.events()

    def send_audio(self, audio: bytes) -> None:
        self.provider.send_audio(audio)

    def send_user_text(self, text: str) -> None:
        self.provider.send_user_text(text)

    def send_tool_result(self, request: ToolCallRequest, result: ToolResult) -> None:
        self.provider.send_tool_result(request, result)

    def interrupted(self, segment: str, heard_ms: int) -> None:
        self.provider.interrupted(segment, heard_ms)

    async def close(self) -> None:
        self.starting.cancel()
        await asyncio.gather(self.starting, return_exceptions=True)
        await self.provider.close()
