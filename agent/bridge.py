"""The Twilio side of a voice-agent call, shared by every provider.

One `AgentCall` per `<Connect><Stream>` socket on /agent, from Twilio's `start` to the end:

    Twilio socket --(media: caller audio)----------------> provider.send_audio()
                  --(mark echoes)-----------------------> playback ledger (what was heard)
                  --(dtmf)------------------------------> provider.send_user_text(), subscribers
    provider.events() --(agent audio)--> 20 ms framer --> Twilio `media` + `mark` (ledger: sent)
                      --(caller started speaking)-------> Twilio `clear` at once, unsent audio dropped
                      --(tool call)--> tools.run() -----> provider.send_tool_result()
                      --(lines, latency, errors)--------> subscribers (hub)

One task reads Twilio, one reads the provider; each handles a message synchronously, so a
barge-in's `clear` is written in the same step that reads `UserStartedSpeaking`, with nothing
awaited in between. Audio to Twilio is written in place while the socket keeps up (sendnow.py),
else through a bounded outbox and a writer task. We send agent audio as fast as the provider
makes it; Twilio buffers and plays it in order, and the ledger (playback.py) keeps track of what
the caller has actually heard from the mark echoes.

How a call ends, and what the caller gets:
- the caller hangs up (`stop`, or Twilio's socket closes): the provider session is closed;
- `end_call`: the goodbye is played to its last mark (bounded by AGENT_END_CALL_WAIT), then we
  close Twilio's socket, so Twilio runs the TwiML after `</Connect>` or hangs up;
- the provider fails (refused, unreachable, `Error`, socket lost): one log line with its reason,
  an `error` event, counted, and Twilio's socket closed at once (bounded to well under 2 s) so
  the caller falls through to the TwiML after `</Connect>` instead of sitting in silence;
- shutdown (SIGTERM): Twilio's socket is closed with 1001.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections import deque
from datetime import datetime, timezone
from typing import Callable

from websockets.asyncio.connection import broadcast
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

import metrics
from agent import counters
from agent.playback import BYTES_PER_SECOND, FRAME_BYTES, Framer, PlaybackLedger, heard_words
from agent.provider import (
    AgentAudio, AgentAudioDone, AgentEvent, AgentProvider, AgentSetup, Latency, ProviderError, ProviderFactory,
    ProviderFailed, ToolCallRequest, Transcript, Usage, UserStartedSpeaking, fill_placeholders,
)
from agent.tools import CallContext
from config import Settings
from hub import CallInfo, Hub
from sendnow import send_now
from twilio_events import Dtmf, Event, Mark, Media, Start, Stop, Unknown

log = logging.getLogger(__name__)

MAX_MEDIA_BYTES = 20 * FRAME_BYTES  # 400 ms per `media` message at most
MAX_OUTBOX = 5000  # messages waiting for a slow Twilio socket (about 100 s of audio)
DTMF_GAP = 1.0  # seconds without a key before the digits go to the agent ("#" sends at once)
END_CALL_SETTLE = 1.5  # after end_call and a quiet line: time for a goodbye spoken after the tool result
CLOSE_WAIT = 1.0  # seconds for Twilio to answer our close frame before the TCP connection is cut

# The server's parser: a Twilio message -> an event, or None once it has counted and logged a bad one.
ParseTwilio = Callable[[str | bytes, "AgentCall"], Event | None]


def _seconds(nbytes: int) -> float:
    return round(nbytes / BYTES_PER_SECOND, 3)


class AgentCall:
    """One agent call: its Twilio socket, its provider session, its playback ledger; `run()` it."""

    def __init__(self, ws: ServerConnection, start: Start, *, settings: Settings, hub: Hub,
                 provider_factory: ProviderFactory, parse: ParseTwilio):
        self.ws = ws
        self.call_sid = start.callSid
        self.stream_sid = start.streamSid
        self.settings = settings
        self.hub = hub
        self.parse = parse
        self.started = time.monotonic()
        self._loop = asyncio.get_running_loop()
        self.context = CallContext(start.callSid, start.streamSid, start.accountSid,
                                   dict(start.customParameters), _end_call=self._end_call_requested)
        prompt, missing = fill_placeholders(settings.agent_prompt, start.customParameters)
        greeting, missing_too = fill_placeholders(settings.agent_greeting, start.customParameters)
        if missing or missing_too:
            log.warning("call %s: no <Parameter> for %s in the prompt or greeting; left as written",
                        self.call_sid, ", ".join(sorted({*missing, *missing_too})))
        self.provider: AgentProvider = provider_factory(AgentSetup(
            self.context, prompt, greeting, settings.agent_tools, settings.agent_provider_settings))
        self.info = CallInfo(
            callSid=start.callSid, streamSid=start.streamSid, accountSid=start.accountSid, tracks=start.tracks,
            customParameters=dict(start.customParameters),
            startTime=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            mode="agent", provider=self.provider.name,
        )
        self.ledger = PlaybackLedger()
        self.framer = Framer()
        self._prefix = '{"event":"media","streamSid":%s,"media":{"payload":"' % json.dumps(self.stream_sid)
        self._mark_prefix = '{"event":"mark","streamSid":%s,"mark":{"name":' % json.dumps(self.stream_sid)
        self._outbox: deque[tuple[str, str, str, int | str]] = deque()  # (kind, text, segment, bytes | mark name)
        self._outbox_ready = asyncio.Event()
        self._segment: str | None = None  # the segment whose audio is arriving
        self._lines: dict[str, str] = {}  # agent lines waiting for their audio to be heard (or cut)
        self._progress = asyncio.Event()  # audio arrived or a mark came back (for end_call's wait)
        self._tasks: set[asyncio.Task] = set()
        self._digits = ""
        self._digit_timer: asyncio.TimerHandle | None = None
        self._ending = False  # no more agent audio: the call is being hung up
        self._counted_played = 0
        self.outcome = ""  # caller_hung_up, end_call, failed, shutdown
        self.error = ""
        self.end_reason = ""
        self.caller_bytes = 0
        self.unsent_bytes = 0
        self.figures = {"turns": 0, "bargeIns": 0, "toolCalls": 0, "toolFailures": 0, "dtmf": 0,
                        "providerErrors": 0, "badFrames": 0}
        self.tokens: dict[str, int] = {}
        self.ended = asyncio.Event()

    def at(self) -> float:
        """Call time, for events: seconds since the stream started."""
        return round(time.monotonic() - self.started, 3)

    def count(self, kind: str) -> None:
        """A bad Twilio message on this call (counted by kind in /metrics by the server)."""
        self.figures["badFrames"] += 1

    def publish(self, event: dict) -> None:
        self.hub.publish_event(self.call_sid, {**event, "at": self.at()})

    # --- the call's life ---------------------------------------------------------------------

    async def run(self) -> None:
        self.hub.open_call(self.info)
        counters.calls_total.labels(self.provider.name).inc()
        counters.calls_active.inc()
        log.info("agent call started callSid=%s streamSid=%s provider=%s params=%d", self.call_sid,
                 self.stream_sid, self.provider.name, len(self.info.customParameters))
        twilio = asyncio.create_task(self._read_twilio(), name=f"agent-twilio {self.call_sid}")
        writer = asyncio.create_task(self._write_twilio(), name=f"agent-writer {self.call_sid}")
        tasks = [twilio, writer]
        try:
            starting = asyncio.create_task(self.provider.start())
            tasks.append(starting)
            await asyncio.wait({twilio, starting}, return_when=asyncio.FIRST_COMPLETED)
            if starting.done() and not twilio.done():
                failure = starting.exception()
                if failure is None:
                    tasks.append(asyncio.create_task(self._read_provider(), name=f"agent-provider {self.call_sid}"))
                elif isinstance(failure, ProviderFailed):
                    await self._fail(str(failure), failure.code)
                else:
                    log.error("call %s: starting %s raised", self.call_sid, self.provider.name, exc_info=failure)
                    await self._fail(f"{type(failure).__name__}: {failure}", "internal")
            await twilio  # ends once the caller hangs up or we closed the socket
        finally:
            for task in (*tasks, *self._tasks):
                task.cancel()
            await asyncio.gather(*tasks, *self._tasks, return_exceptions=True)
            await self.provider.close()
            self._finish()

    async def _read_twilio(self) -> None:
        """Caller audio to the provider; marks to the ledger; DTMF to the agent. Until the end."""
        try:
            async for message in self.ws:
                event = self.parse(message, self)
                if isinstance(event, Media):
                    if event.track == "inbound":
                        self.caller_bytes += len(event.payload)
                        self.provider.send_audio(event.payload)
                elif isinstance(event, Mark):
                    self._on_mark(event.name)
                elif isinstance(event, Dtmf):
                    self._on_dtmf(event.digit)
                elif isinstance(event, Stop):
                    break
                elif isinstance(event, Start):
                    metrics.bad_frames_total.labels("repeated_start").inc()
                    self.count("repeated_start")
                    log.warning("call %s: a second start on one socket, ignored", self.call_sid)
                elif isinstance(event, Unknown):
                    metrics.twilio_events_total.labels("unknown").inc()
        except ConnectionClosed as exc:
            log.info("call %s: Twilio socket closed without stop: %s", self.call_sid, exc)
        if not self.outcome:
            self.outcome = "caller_hung_up"
        self._ending = True

    async def _read_provider(self) -> None:
        """Provider events, until the session ends; a fatal error ends the call (fallback close)."""
        events = self.provider.events()
        failure = None
        try:
            async for event in events:
                if isinstance(event, ProviderError) and event.fatal:
                    failure = event
                    break
                self._on_event(event)
            else:
                if not self._ending:
                    failure = ProviderError(f"{self.provider.name} ended the session", "closed")
        finally:
            await events.aclose()
        if failure is not None:
            self._count_provider_error(failure)
            await self._fail(failure.message, failure.code)

    # --- provider events (each handled in one synchronous step) ----------------------------

    def _on_event(self, event: AgentEvent) -> None:
        if isinstance(event, AgentAudio):
            self._on_audio(event)
        elif isinstance(event, UserStartedSpeaking):
            self._barge_in()
        elif isinstance(event, AgentAudioDone):
            self._on_audio_done(event.segment)
        elif isinstance(event, Transcript):
            self._on_transcript(event)
        elif isinstance(event, ToolCallRequest):
            self._on_tool_call(event)
        elif isinstance(event, Latency):
            self.publish({"type": "latency", "segment": event.segment, "seconds": dict(event.seconds)})
        elif isinstance(event, Usage):
            self.tokens = dict(event.tokens)
            self.publish({"type": "usage", "tokens": self.tokens})
        elif isinstance(event, ProviderError):
            self._on_provider_error(event)

    def _on_audio(self, event: AgentAudio) -> None:
        if self._ending or not event.audio:
            return
        self.ledger.generated(event.segment, len(event.audio))
        if event.segment != self._segment:
            if self._segment is not None:  # the previous segment ended without saying so
                self._send_audio(self._segment, self.framer.flush())
            self._segment = event.segment
            self.figures["turns"] += 1
            counters.turns_total.inc()
        self._send_audio(event.segment, self.framer.push(event.audio))
        self._progress.set()

    def _on_audio_done(self, segment: str) -> None:
        if self._ending:
            return
        if segment == self._segment:
            self._send_audio(segment, self.framer.flush())
            self._segment = None
        self.ledger.done(segment)
        self._progress.set()

    def _barge_in(self) -> None:
        """The caller started speaking: if the agent may be heard, `clear` now and drop what is unsent."""
        now = time.monotonic()
        unsent = self.framer.discard() + sum(n for kind, _, _, n in self._outbox if kind == "media")
        if not (unsent or self.ledger.playing(now)):
            self._segment = None
            self._resolve_lines(cut=True)
            return
        self._outbox.clear()
        self._write_now('{"event":"clear","streamSid":%s}' % json.dumps(self.stream_sid))
        cut = self.ledger.clear(now)
        self._segment = None
        self.unsent_bytes += unsent
        counters.audio_unsent_bytes.inc(unsent)
        counters.audio_discarded_bytes.inc(cut.discarded)
        counters.barge_ins_total.inc()
        self._count_played()
        self.figures["bargeIns"] += 1
        if cut.segment is not None:
            self.provider.interrupted(cut.segment, cut.heard * 1000 // BYTES_PER_SECOND)
        self.publish({"type": "barge_in", "segment": cut.segment, "heardSeconds": _seconds(cut.heard),
                      "discardedSeconds": _seconds(cut.discarded + unsent)})
        self._resolve_lines(cut=True)

    def _on_transcript(self, event: Transcript) -> None:
        if event.raw is not None:
            self.hub.publish(self.call_sid, event.raw)  # raw subscribers: the provider's own message
        if event.role == "user":
            self.publish({"type": "conversation", "role": "user", "text": event.text})
            return
        segment = event.segment or self._segment or next(reversed(self.ledger.segments), "")
        self._lines[segment] = f"{self._lines[segment]} {event.text}" if segment in self._lines else event.text
        self._resolve_lines()

    def _resolve_lines(self, cut: bool = False) -> None:
        """Publish the agent lines whose audio has been heard to the end or cut off.

        A line is published once, with what the caller heard: all of it, or (cut by a barge-in)
        the words of the share of its audio that played, marked as an estimate. With `cut`, every
        waiting line is settled: a reply the caller cut before its audio began was not heard.
        """
        for segment, text in list(self._lines.items()):
            seg = self.ledger.segments.get(segment)
            if seg is not None and not seg.interrupted and not self.ledger.finished(segment) and not cut:
                continue
            if seg is None and not cut:
                continue
            del self._lines[segment]
            heard = seg.heard_capped if seg is not None else 0
            generated = seg.generated if seg is not None else 0
            event = {"type": "conversation", "role": "agent", "text": text, "segment": segment}
            if seg is None or seg.interrupted or heard < generated:
                event.update(text=heard_words(text, heard, generated), interrupted=True, heardEstimated=True,
                             fullText=text, heardSeconds=_seconds(heard), audioSeconds=_seconds(generated))
            self.publish(event)

    def _on_tool_call(self, request: ToolCallRequest) -> None:
        try:
            arguments = json.loads(request.arguments or "{}")
        except ValueError:
            arguments = request.arguments
        self.figures["toolCalls"] += 1
        self.publish({"type": "tool_call", "id": request.id, "name": request.name, "arguments": arguments})
        self._spawn(self._run_tool(request))

    async def _run_tool(self, request: ToolCallRequest) -> None:
        result = await self.settings.agent_tools.run(request.name, request.arguments, self.context,
                                                     self.settings.agent_tool_timeout)
        counters.tool_calls_total.labels(result.error or "ok").inc()
        if not result.ok:
            self.figures["toolFailures"] += 1
            log.warning("call %s: tool %s failed (%s): %s", self.call_sid, request.name, result.error, result.content)
        self.provider.send_tool_result(request, result)
        self.publish({"type": "tool_result", "id": request.id, "name": request.name, "ok": result.ok,
                      "error": result.error or None, "result": result.content, "seconds": round(result.seconds, 3)})

    def _on_provider_error(self, error: ProviderError) -> None:
        """A warning (fatal errors end the call in `_read_provider`)."""
        self._count_provider_error(error)
        log.warning("call %s: %s", self.call_sid, error.message)
        self.publish({"type": "error", "source": "provider", "fatal": False, "code": error.code,
                      "message": error.message})

    def _count_provider_error(self, error: ProviderError) -> None:
        self.figures["providerErrors"] += 1
        counters.provider_errors_total.labels(self.provider.name, str(error.fatal).lower()).inc()

    # --- Twilio events -------------------------------------------------------------------------

    def _on_mark(self, name: str) -> None:
        if self.ledger.echoed(name, time.monotonic()) is not None:
            self._count_played()
            self._resolve_lines()
            self._progress.set()

    def _on_dtmf(self, digit: str) -> None:
        self.figures["dtmf"] += 1
        counters.dtmf_total.inc()
        self.publish({"type": "dtmf", "digit": digit})
        self._digits += digit
        if self._digit_timer is not None:
            self._digit_timer.cancel()
        if digit == "#":
            self._send_digits()
        else:
            self._digit_timer = asyncio.get_running_loop().call_later(DTMF_GAP, self._send_digits)

    def _send_digits(self) -> None:
        digits, self._digits, self._digit_timer = self._digits, "", None
        if digits and not self._ending:
            keys = " ".join(digits)
            self.provider.send_user_text(f"The caller pressed {keys} on the phone keypad.")

    # --- writing to Twilio ---------------------------------------------------------------------

    def _send_audio(self, segment: str, audio: bytes) -> None:
        """Whole frames as `media` (at most MAX_MEDIA_BYTES each), then a mark after them."""
        if not audio:
            return
        for start in range(0, len(audio), MAX_MEDIA_BYTES):
            part = audio[start:start + MAX_MEDIA_BYTES]
            text = self._prefix + base64.b64encode(part).decode("ascii") + '"}}'
            self._send(("media", text, segment, len(part)))
        name = self.ledger.next_mark_name(segment)
        self._send(("mark", self._mark_prefix + json.dumps(name) + "}}", segment, name))

    def _send(self, item: tuple[str, str, str, int | str]) -> None:
        if not self._outbox and send_now(self.ws, item[1]):
            self._sent(item)
            return
        if len(self._outbox) >= MAX_OUTBOX or self.ws.state is not State.OPEN:
            if item[0] == "media":
                self.unsent_bytes += item[3]
                counters.audio_unsent_bytes.inc(item[3])
            return
        self._outbox.append(item)
        self._outbox_ready.set()

    def _sent(self, item: tuple[str, str, str, int | str]) -> None:
        kind, _, segment, value = item
        if kind == "media":
            self.ledger.sent(segment, value, time.monotonic())
            counters.audio_sent_bytes.inc(value)
        else:
            self.ledger.marked(value, segment)

    async def _write_twilio(self) -> None:
        """The outbox, with the socket's flow control (only used when Twilio's socket lags)."""
        try:
            while True:
                await self._outbox_ready.wait()
                self._outbox_ready.clear()
                while self._outbox:
                    item = self._outbox.popleft()
                    self._sent(item)  # the frame is written before send() awaits the drain
                    await self.ws.send(item[1])
        except ConnectionClosed:
            pass

    def _write_now(self, text: str) -> None:
        """Write a control message at once, even past the write buffer's limit (it is tiny)."""
        if self.ws.state is State.OPEN:
            broadcast([self.ws], text)

    # --- ending ------------------------------------------------------------------------------

    def _end_call_requested(self, reason: str) -> None:
        """CallContext.end_call(): from a tool, maybe in a worker thread; acts on the event loop."""
        self._loop.call_soon_threadsafe(self._end_call, reason)

    def _end_call(self, reason: str) -> None:
        if self.end_reason or self._ending:
            return
        self.end_reason = reason or "requested by the agent"
        log.info("call %s: the agent ends the call (%s)", self.call_sid, self.end_reason)
        self._spawn(self._hang_up_after_goodbye())

    async def _hang_up_after_goodbye(self) -> None:
        """Let the agent's last words play to their last mark (bounded), then close Twilio's socket."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.agent_end_call_wait
        while loop.time() < deadline:
            speaking = self._segment is not None or self._outbox or self.ledger.pending_marks
            self._progress.clear()
            wait = deadline - loop.time() if speaking else min(END_CALL_SETTLE, deadline - loop.time())
            try:
                async with asyncio.timeout(wait):
                    await self._progress.wait()
            except TimeoutError:
                if not speaking:
                    break  # quiet for END_CALL_SETTLE: the goodbye is over
        else:
            log.warning("call %s: goodbye still playing after %.0f s; hanging up", self.call_sid,
                        self.settings.agent_end_call_wait)
        if not self.outcome:
            self.outcome = "end_call"
        self._ending = True
        await self._close_twilio(1000, "call ended by the agent")

    async def _fail(self, message: str, code: str = "") -> None:
        """The provider cannot serve the call: say why once, tell subscribers, let Twilio move on."""
        if self.error:
            return
        self.error, self.outcome, self._ending = message, "failed", True
        log.error("call %s: agent provider %s failed: %s", self.call_sid, self.provider.name, message)
        self.publish({"type": "error", "source": "provider", "fatal": True, "code": code, "message": message})
        await self._close_twilio(1000, "agent unavailable")

    async def _close_twilio(self, code: int, reason: str) -> None:
        self._outbox.clear()
        try:
            async with asyncio.timeout(CLOSE_WAIT):
                await self.ws.close(code, reason)
        except TimeoutError:
            self.ws.transport.abort()

    async def close_for_shutdown(self) -> None:
        if not self.outcome:
            self.outcome = "shutdown"
        self._ending = True
        await self._close_twilio(1001, "server shutting down")

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _count_played(self) -> None:
        heard = self.ledger.stats.heard
        counters.audio_played_bytes.inc(heard - self._counted_played)
        self._counted_played = heard

    def _finish(self) -> None:
        """Settle the last lines, tell subscribers how the call went, count it, log one line."""
        if self._digit_timer is not None:
            self._digit_timer.cancel()
        self._count_played()
        unplayed = self.ledger.unplayed + self.framer.discard()
        self._resolve_lines(cut=True)
        stats, provider = self.ledger.stats, self.provider.stats
        agent = {"provider": self.provider.name, **self.figures,
                 "playedSeconds": _seconds(stats.heard), "discardedSeconds": _seconds(stats.discarded),
                 "unplayedSeconds": _seconds(unplayed + self.unsent_bytes)}
        if self.tokens:
            agent["tokens"] = self.tokens
        summary = {"streamSid": self.stream_sid, "duration": round(time.monotonic() - self.started, 3),
                   "audioSeconds": _seconds(self.caller_bytes), "messages": provider.messages,
                   "endOfCall": self.outcome or "caller_hung_up", "agent": agent}
        if self.error:
            summary["error"] = self.error
        if self.end_reason:
            summary["endReason"] = self.end_reason
        self.hub.close_call(self.call_sid, summary)
        counters.calls_active.dec()
        counters.end_of_call_total.labels(summary["endOfCall"]).inc()
        tokens = ",".join(f"{kind}:{n}" for kind, n in self.tokens.items())  # usage (OpenAI): what it cost
        log.info(
            "agent call ended callSid=%s streamSid=%s provider=%s duration=%.1fs outcome=%s turns=%d barge_ins=%d "
            "tool_calls=%d tool_failures=%d dtmf=%d played=%.1fs discarded=%.1fs unplayed=%.1fs provider_errors=%d "
            "caller_audio=%.1fs caller_audio_unsent=%.1fs provider_messages=%d bad_provider_messages=%d bad_frames=%d"
            "%s",
            self.call_sid, self.stream_sid, self.provider.name, summary["duration"], summary["endOfCall"],
            self.figures["turns"], self.figures["bargeIns"], self.figures["toolCalls"], self.figures["toolFailures"],
            self.figures["dtmf"], stats.heard / BYTES_PER_SECOND, stats.discarded / BYTES_PER_SECOND,
            (unplayed + self.unsent_bytes) / BYTES_PER_SECOND, self.figures["providerErrors"],
            self.caller_bytes / BYTES_PER_SECOND, provider.audio_unsent_bytes / BYTES_PER_SECOND, provider.messages,
            provider.bad_messages, self.figures["badFrames"], f" tokens={tokens}" if tokens else "",
        )
        self.ended.set()


class AgentCalls:
    """The agent calls in progress (for shutdown)."""

    def __init__(self) -> None:
        self._calls: set[AgentCall] = set()

    def __len__(self) -> int:
        return len(self._calls)

    async def run(self, call: AgentCall) -> None:
        self._calls.add(call)
        try:
            await call.run()
        finally:
            self._calls.discard(call)

    async def close_all(self, timeout: float) -> None:
        calls = list(self._calls)
        if not calls:
            return
        await asyncio.gather(*(call.close_for_shutdown() for call in calls), return_exceptions=True)
        done, pending = await asyncio.wait([asyncio.ensure_future(c.ended.wait()) for c in calls], timeout=timeout)
        for waiter in pending:
            waiter.cancel()
        if pending:
            log.warning("shutdown: %d agent calls did not finish within %.0f s", len(pending), timeout)
