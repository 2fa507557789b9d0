"""The proxy: Twilio Media Streams in on /twilio, transcripts out to subscribers on /client.

    python server.py            # settings from the environment and .env (see README)

One `websockets` server, its websocket routes and plain HTTP ones:
- /twilio   a Twilio <Stream>: events are parsed (twilio_events), each call's two legs mixed
            (audio) and streamed to the recogniser (upstream), all owned by a `Call` (calls).
- /agent    a Twilio <Connect><Stream>: a voice agent answers the caller (agent/bridge.py).
- /client   subscribers (hub): the tutorial's raw protocol, or JSON mode for programs.
- /twiml, /twiml/action   Twilio's "A call comes in" webhook and <Connect action> (webhook.py).
- /healthz, /readyz, /metrics   liveness, readiness (false while shutting down), Prometheus.
- / and /static/…   the dashboard (web.py, web/): a page that watches calls through /client.

With no DEEPGRAM_API_KEY the recogniser is the embedded one: a Deepgram-compatible server
(local_stt) started in-process on loopback, so the proxy has a single upstream code path.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import http
import json
import logging
import os
import secrets
import signal
import ssl
import sys
from collections import defaultdict
from contextlib import AsyncExitStack
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from dotenv import find_dotenv, load_dotenv
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

import metrics
import security
import tuning
import web
from agent.bridge import AgentCall, AgentCalls
from agent.deepgram import DeepgramAgent
from agent.openai_realtime import OpenAIRealtime
from agent.provider import ProviderFactory
from agent.providers import Preconnect, ProviderChoice
from agent.tools import ToolError, ToolRegistry
from agent.transfer import Transfers, transfer_tool
from calls import Calls
from config import ConfigError, Settings, configure_logging, load_settings, redis_password
from health import HealthFeed
from hub import EVERY_CALL, BadSubscription, FanOut, Hub, Subscriber, parse_subscription
from sendnow import send_now
from twilio_events import BadEvent, Connected, Event, Media, Start, Stop, Unknown, parse_event
from throttle import Throttle
from upstream import DeepgramStream
from webhook import Webhook

log = logging.getLogger("server")

# Close codes for /client, documented in the README.
CLOSE_BAD_SUBSCRIPTION = 4400
CLOSE_UNKNOWN_CALL = 4404
CLOSE_NO_SUBSCRIPTION = 4408  # nothing subscribed within HANDSHAKE_TIMEOUT
CLOSE_TOO_MANY_MESSAGES = 4413  # more than MAX_SUBSCRIBER_MESSAGES sent after subscribing
CLOSE_TOO_SLOW = 4429
CLOSE_CALL_FULL = 4503  # MAX_SUBSCRIBERS_PER_CALL reached
CLOSE_CALL_LOST = 4410  # REDIS_URL: the server carrying the call stopped answering
# On /twilio, a `start` without the expected CALL_TOKEN: Twilio's own code for a bad stream.
CLOSE_POLICY_VIOLATION = 1008

BAD_FRAME_LOG_INTERVAL = 10.0  # seconds between warnings about one kind of bad Twilio message

# A socket that sends this many messages without a `start` is not a Twilio stream.
MAX_MESSAGES_BEFORE_START = 50


class Proxy:
    def __init__(self, settings: Settings, upstream_url: str, upstream_key: str,
                 agent_factory: ProviderFactory | None = None, webhook: Webhook | None = None):
        self.settings = settings
        self.webhook = webhook  # /twiml; also mints the per-call tokens checked on stream starts
        self.upstream_url = upstream_url
        self.upstream_key = upstream_key
        self.agent_factory = agent_factory  # None: no agent provider, /agent answers 503
        self.hub = make_hub(settings)
        self.calls = Calls(settings, self.hub, self._new_upstream)
        self.agent_calls = AgentCalls()
        self.health = HealthFeed()
        self.site = web.Site()  # the dashboard's files
        self.ready = True
        self._bad_frame_throttles: defaultdict[str, Throttle] = defaultdict(lambda: Throttle(BAD_FRAME_LOG_INTERVAL))
        # Connections admitted per route, for MAX_CALLS / MAX_SUBSCRIBERS (see `_admit`).
        self._admitted: dict[str, set[ServerConnection]] = {"/twilio": set(), "/agent": set(), "/client": set()}

    def _new_upstream(self, call_sid, on_message, on_error) -> DeepgramStream:
        s = self.settings
        return DeepgramStream(
            self.upstream_url,
            self.upstream_key,
            on_message=on_message,
            on_error=on_error,
            label=call_sid,
            connect_timeout=s.connect_timeout,
            close_timeout=s.close_timeout,
            keepalive_seconds=s.keepalive_seconds,
            max_queued_frames=max(1, int(s.upstream_queue_seconds * 1000 / s.frame_ms)),
            replay_frames=int(s.replay_seconds * 1000 / s.frame_ms),
        )

    # --- plain HTTP routes -----------------------------------------------------------------

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            if self.ready:
                return connection.respond(http.HTTPStatus.OK, "ready\n")
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "shutting down\n")
        if path == "/metrics":
            body = metrics.render()
            headers = Headers({"Content-Type": "text/plain; version=0.0.4", "Content-Length": str(len(body))})
            return Response(http.HTTPStatus.OK, "OK", headers, body)
        if path in ("/twiml", "/twiml/action") and self.webhook is not None:
            return self.webhook.respond(connection, request)
        page = self.site.response(path)  # the dashboard: / and /static/… (web.py)
        if page is not None:
            return page
        if path not in ("/twilio", "/agent", "/client"):
            return connection.respond(http.HTTPStatus.NOT_FOUND, "unknown path; use /twilio, /agent or /client\n")
        if path in ("/twilio", "/agent") and not self.ready:
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "shutting down\n")
        refusal = self._authenticate(connection, request, path)
        if refusal is None and path == "/agent" and self.agent_factory is None:
            refusal = connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "no agent provider is configured\n")
        return refusal if refusal is not None else self._admit(connection, path)

    # --- who may connect (README "Security"), checked before the upgrade --------------------

    def _authenticate(self, connection: ServerConnection, request: Request, path: str) -> Response | None:
        """403 for /twilio and /agent without Twilio's signature, 401 for /client without a token."""
        s = self.settings
        if path in ("/twilio", "/agent") and s.twilio_auth_token:
            url = s.public_url + request.path  # the URL Twilio signed, not what the Host header says
            signature = security.single_header(request.headers, "X-Twilio-Signature")
            if signature is None:
                reason = "missing_signature"
            elif not security.twilio_signature_valid(s.twilio_auth_token, url, signature):
                reason = "bad_signature"
            else:
                return None
            self._auth_failed(connection, path, reason, f"signed URL expected: {url}; it must be the <Stream url>")
            return connection.respond(http.HTTPStatus.FORBIDDEN, "missing or invalid X-Twilio-Signature\n")
        if path == "/client" and s.client_tokens:
            tokens = security.presented_tokens(request.headers, request.path)
            if not tokens:
                reason = "missing_token"
            elif len(tokens) > 1:
                reason = "several_tokens"
            elif not security.token_valid(tokens[0], s.client_tokens):
                reason = "bad_token"
            else:
                return None
            self._auth_failed(connection, path, reason,
                              "expected one token: Authorization: Bearer <token>, a bearer.<token> subprotocol, or ?token=")
            response = connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or invalid subscriber token\n")
            response.headers["WWW-Authenticate"] = 'Bearer realm="transcripts"'
            return response
        return None

    def _auth_failed(self, connection: ServerConnection, path: str, reason: str, hint: str) -> None:
        metrics.auth_failures_total.labels(path.strip("/"), reason).inc()
        log.warning("refused %s from %s: %s (%s)", path, _peer(connection), reason, hint)

    def _admit(self, connection: ServerConnection, path: str) -> Response | None:
        """503 when the route is at its limit (MAX_CALLS, MAX_SUBSCRIBERS); else count it in.

        Counted here rather than in the handler so that a burst of handshakes cannot all pass
        before the first one opens. A connection counts until it is closed, whether or not its
        handshake completed.
        """
        admitted = self._admitted[path] = {c for c in self._admitted[path] if c.state is not State.CLOSED}
        limit, name, label = ((self.settings.max_calls, "MAX_CALLS", "calls") if path != "/client"
                              else (self.settings.max_subscribers, "MAX_SUBSCRIBERS", "subscribers"))
        # Transcription and agent streams share MAX_CALLS.
        others = len(self._admitted["/agent" if path == "/twilio" else "/twilio"]) if path != "/client" else 0
        if len(admitted) + others >= limit:
            metrics.limit_refusals_total.labels(label).inc()
            log.warning("refused %s from %s: %s=%d connections already open", path, _peer(connection), name, limit)
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE,
                                      f"too many connections on {path} ({name}={limit}); try again later\n")
        admitted.add(connection)
        return None

    async def handler(self, ws: ServerConnection) -> None:
        path = urlsplit(ws.request.path).path
        if path == "/twilio":
            await self.handle_twilio(ws)
        elif path == "/agent":
            await self.handle_agent(ws)
        else:
            await self.handle_client(ws)

    # --- /twilio ---------------------------------------------------------------------------

    async def handle_twilio(self, ws: ServerConnection) -> None:
        """Read one Twilio stream until `stop` or the socket closes; then leave the call."""
        call, offset, before_start = None, 0, 0
        try:
            async for message in ws:
                if call is None:
                    before_start += 1
                    if before_start > MAX_MESSAGES_BEFORE_START:
                        await _close_draining(ws, CLOSE_POLICY_VIOLATION, "expected a Twilio start event")
                        break
                event = self._parse(message, call, ws)
                if event is None:
                    continue
                if isinstance(event, Media):
                    if call is None:
                        self._bad_frame(None, BadEvent("media_before_start", "media before start"), ws)
                        continue
                    call.media(event, offset)
                elif isinstance(event, Start):
                    if call is not None:
                        self._bad_frame(call, BadEvent("repeated_start", "a second start on one socket"), ws)
                        continue
                    if not self._call_token_valid(event, ws):
                        await _close_draining(ws, CLOSE_POLICY_VIOLATION, "missing or invalid call token")
                        break
                    event = self._without_call_token(event)
                    call, offset = await self.calls.join(event, ws)
                elif isinstance(event, Stop):
                    break
                elif isinstance(event, Connected):
                    continue
                else:  # mark, dtmf, unknown events: nothing to transcribe, but counted
                    kind = "unknown" if isinstance(event, Unknown) else type(event).__name__.lower()
                    metrics.twilio_events_total.labels(kind).inc()
                    if call is not None:
                        call.count(f"ignored_{kind}")
        except ConnectionClosed as exc:
            log.info("Twilio socket %s closed without stop: %s", _peer(ws), exc)
        finally:
            await ws.close()
            if call is not None:
                await self.calls.leave(call, ws)

    # --- /agent ----------------------------------------------------------------------------

    async def handle_agent(self, ws: ServerConnection) -> None:
        """A <Connect><Stream>: wait for its `start`, then its `AgentCall` owns the socket."""
        start, received = None, 0
        try:
            async for message in ws:
                received += 1
                if received > MAX_MESSAGES_BEFORE_START:
                    await _close_draining(ws, CLOSE_POLICY_VIOLATION, "expected a Twilio start event")
                    break
                event = self._parse(message, None, ws)
                if isinstance(event, (Start, Stop)):
                    start = event if isinstance(event, Start) else None
                    break
                if isinstance(event, Media):
                    self._bad_frame(None, BadEvent("media_before_start", "media before start"), ws)
        except ConnectionClosed:
            return
        if start is None:
            return
        if not self._call_token_valid(start, ws, "/agent"):
            await _close_draining(ws, CLOSE_POLICY_VIOLATION, "missing or invalid call token")
            return
        start = self._without_call_token(start)
        metrics.twilio_streams_total.inc()
        call = AgentCall(ws, start, settings=self.settings, hub=self.hub, provider_factory=self.agent_factory,
                         parse=lambda message, call: self._parse(message, call, ws))
        if self.webhook is not None:
            self.webhook.track(call.call_sid, lambda: call.outcome)  # for its <Connect action> request
        await self.agent_calls.run(call)

    def _call_token_valid(self, start: Start, ws: ServerConnection, path: str = "/twilio") -> bool:
        """The token <Parameter>: the one /twiml minted for this CallSid if it minted one; else
        CALL_TOKEN, the shared token of a static TwiML (a second check, for deployments where
        PUBLIC_URL cannot be pinned and signatures cannot be checked), when it is set; else none,
        unless REQUIRE_WEBHOOK_TOKEN."""
        presented = start.customParameters.get(self.settings.call_token_param)
        minted = self.webhook.tokens.check(start.callSid, presented) if self.webhook is not None else None
        if minted is None and not self.settings.require_webhook_token:
            if not self.settings.call_token:
                return True
            minted = presented is not None and security.token_valid(presented, [self.settings.call_token])
        if minted:
            return True
        self._auth_failed(ws, path, "call_token",
                          f"start for {start.callSid} without the <Parameter name={self.settings.call_token_param!r}>")
        return False

    def _without_call_token(self, start: Start) -> Start:
        """The start event minus the token, so subscribers never see it in `call_started`."""
        if self.settings.call_token_param not in start.customParameters:
            return start
        params = {k: v for k, v in start.customParameters.items() if k != self.settings.call_token_param}
        return dataclasses.replace(start, customParameters=params)

    def _parse(self, message: str | bytes, call, ws: ServerConnection) -> Event | None:
        """A Twilio message as an event, or None when it is unusable (then counted and logged)."""
        try:
            if isinstance(message, bytes):
                raise BadEvent("binary_frame", "Twilio sends text frames only")
            return parse_event(message)
        except BadEvent as exc:
            self._bad_frame(call, exc, ws)
            return None

    def _bad_frame(self, call, exc: BadEvent, ws: ServerConnection) -> None:
        """Count it, log it (rate-limited per kind) and carry on with the call."""
        metrics.bad_frames_total.labels(exc.kind).inc()
        if call is not None:
            call.count(exc.kind)
        count = self._bad_frame_throttles[exc.kind].hit()
        log.log(logging.WARNING if count else logging.DEBUG,
                "bad Twilio message (%s) from %s on call %s: %s%s", exc.kind, _peer(ws),
                call.call_sid if call else "-", exc, f" ({count} of this kind since the last report)" if count > 1 else "")

    # --- /client ---------------------------------------------------------------------------

    async def handle_client(self, ws: ServerConnection) -> None:
        """Greet with the calls in progress, take one subscription, then stream to it."""
        metrics.subscribers_active.inc()
        try:
            await ws.send(json.dumps(self.hub.call_sids()))
            try:
                async with asyncio.timeout(self.settings.handshake_timeout):
                    request = await ws.recv()
            except TimeoutError:  # an idle connection must not hold a MAX_SUBSCRIBERS slot
                metrics.limit_refusals_total.labels("subscription_timeout").inc()
                await ws.close(CLOSE_NO_SUBSCRIPTION, f"no subscription within {self.settings.handshake_timeout:g} s")
                return
            try:
                subscription = parse_subscription(request)
            except BadSubscription as exc:
                metrics.subscriber_rejections_total.labels("bad_request").inc()
                await ws.close(CLOSE_BAD_SUBSCRIPTION, str(exc))
                return
            call_sid, json_mode, history = subscription.call_sid, subscription.json_mode, subscription.history
            limit = self.settings.max_subscribers_per_call
            if call_sid != EVERY_CALL and self.hub.subscriber_count(call_sid) >= limit:
                metrics.limit_refusals_total.labels("subscribers_per_call").inc()
                await ws.close(CLOSE_CALL_FULL, f"this call has {limit} subscribers already (MAX_SUBSCRIBERS_PER_CALL)")
                return
            sub = Subscriber(call_sid, json_mode=json_mode, max_queue=self.settings.subscriber_queue,
                             peer=_peer(ws), history=history)
            if subscription.recent:  # calls ended lately, then (same step) the calls in progress
                sub.preload([event for call in self.hub.ended_calls() for event in call])
            if not self.hub.subscribe(sub):
                metrics.subscriber_rejections_total.labels("unknown_call").inc()
                await ws.close(CLOSE_UNKNOWN_CALL, "unknown callSid: no such call in progress"
                               + (" or in the history window" if history else ""))
                return
            log.info("subscriber %s joined %s (%s mode%s)", sub.peer, call_sid, "json" if json_mode else "raw",
                     ", with history" if history else "")
            if subscription.health:
                self.health.add(sub)
            try:
                await self._stream_to(ws, sub)
            finally:
                self.health.discard(sub)
                self.hub.unsubscribe(sub)
        except ConnectionClosed:
            pass
        finally:
            metrics.subscribers_active.dec()

    async def _stream_to(self, ws: ServerConnection, sub: Subscriber) -> None:
        """Two tasks: one writes the outbox, one reads (and ignores) what the client sends."""
        writer = asyncio.create_task(self._write_outbox(ws, sub))
        reader = asyncio.create_task(self._ignore_input(ws))
        dropped = asyncio.create_task(sub.dropped_event.wait())
        try:
            await asyncio.wait({writer, reader, dropped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (writer, reader, dropped):
                task.cancel()
        if sub.dropped:
            metrics.subscribers_dropped_total.inc()
            await ws.close(CLOSE_TOO_SLOW, f"too slow: {sub.max_queue} messages queued")
        elif sub.lost:
            await ws.close(CLOSE_CALL_LOST, "the server carrying this call stopped answering")
        elif writer.done() and not writer.cancelled() and writer.exception() is None:
            await ws.close(1000, "call ended")

    async def _write_outbox(self, ws: ServerConnection, sub: Subscriber) -> None:
        """Send what queued up; while waiting, the hub may write to the socket itself."""
        write = functools.partial(send_now, ws)
        while True:
            sub.send_now = write
            try:
                message = await sub.next()
            finally:
                sub.send_now = None
            if message is None:
                return
            await ws.send(message)

    async def _ignore_input(self, ws: ServerConnection) -> None:
        """Subscribers have nothing to say after subscribing; a flood is closed, not just ignored."""
        received = 0
        async for _ in ws:
            metrics.subscriber_junk_total.inc()
            received += 1
            if received > self.settings.max_subscriber_messages:
                metrics.limit_refusals_total.labels("subscriber_messages").inc()
                await _close_draining(ws, CLOSE_TOO_MANY_MESSAGES,
                                      f"more than {self.settings.max_subscriber_messages} messages after subscribing")
                return

    # --- shutdown --------------------------------------------------------------------------

    async def drain(self) -> None:
        """Not ready any more; finish every call's end-of-call sequence (bounded)."""
        self.ready = False
        deadline = asyncio.get_running_loop().time() + self.settings.shutdown_timeout
        await asyncio.gather(self.calls.close_all(self.settings.shutdown_timeout),
                             self.agent_calls.close_all(self.settings.shutdown_timeout))
        await self.hub.settle(max(0.0, deadline - asyncio.get_running_loop().time()))
        self.hub.shutdown()


def make_hub(settings: Settings) -> FanOut:
    """In-process by default; through Redis when REDIS_URL is set (README "Scaling out")."""
    if settings.redis_url:
        from redishub import RedisHub

        return RedisHub(settings)
    return Hub(settings.history_messages, settings.history_seconds)


def _peer(ws: ServerConnection) -> str:
    address = ws.remote_address
    return f"{address[0]}:{address[1]}" if address else "?"


async def _close_draining(ws: ServerConnection, code: int, reason: str) -> None:
    """Close a peer that is still sending, discarding what it sends until it closes too.

    A plain `close()` from the task that stopped reading would wait the whole close timeout
    when the incoming queue is full: reading is paused, so the peer's close frame is never read.
    """
    async def discard() -> None:
        try:
            async for _ in ws:
                pass
        except ConnectionClosed:
            pass

    draining = asyncio.create_task(discard())  # starts reading once close() has sent our frame
    await ws.close(code, reason)
    await draining


def _server_tls(settings: Settings) -> ssl.SSLContext | None:
    if not settings.tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.cert_pem, settings.key_pem)
    return context


async def start_whisper(settings: Settings, stack: AsyncExitStack):
    """The embedded recogniser's engine factory, its model checked and loaded once per process:
    transcription and the embedded agent share one decoder pool."""
    import whisper_stt

    if not whisper_stt.started():
        # Checks the model's SHA-256 and loads it in every worker (a second or two): off the loop.
        model = await asyncio.to_thread(whisper_stt.start, settings.local_stt_model)
        stack.callback(whisper_stt.shutdown)
        log.info("embedded recogniser: Whisper, model: %s", model)
    return whisper_stt.engine_factory


async def start_recogniser(settings: Settings, stack: AsyncExitStack) -> tuple[str, str]:
    """The upstream URL and key: Deepgram's, or the embedded Deepgram-compatible server's."""
    if settings.engine == "deepgram":
        log.info("recogniser: Deepgram at %s", urlsplit(settings.deepgram_url).netloc)
        return settings.deepgram_url, settings.deepgram_api_key
    import local_stt

    factory = await start_whisper(settings, stack) if settings.engine == "whisper" else None
    key = secrets.token_urlsafe(24)
    stt = await stack.enter_async_context(local_stt.LocalSTT(host="127.0.0.1", port=0, api_key=key,
                                                             engine_factory=factory, record=False))
    why = "STT_ENGINE is set" if settings.stt_engine != "auto" else "DEEPGRAM_API_KEY is not set"
    log.info("recogniser: embedded %s on %s (%s)", settings.engine, stt.url, why)
    query = urlsplit(settings.deepgram_url).query
    return urlunsplit(urlsplit(stt.url)._replace(query=query)), key


async def start_agent(settings: Settings, stack: AsyncExitStack) -> ProviderChoice | None:
    """The agent providers for /agent: the deployment's (AGENT_PROVIDER) and those a call may pick
    (AGENT_ALLOWED_PROVIDERS): Deepgram's Voice Agent, OpenAI Realtime, or the embedded
    Deepgram-compatible agent started in-process on loopback (one code path, as with local_stt)."""
    factories: dict[str, ProviderFactory] = {}
    for name in dict.fromkeys((settings.agent_backend, *settings.agent_allowed_providers)):
        if name == "deepgram":
            factories[name] = functools.partial(DeepgramAgent, url=settings.deepgram_agent_url,
                                                api_key=settings.deepgram_api_key, name="deepgram",
                                                connect_timeout=settings.agent_connect_timeout)
            log.info("voice agent: Deepgram at %s", urlsplit(settings.deepgram_agent_url).netloc)
        elif name == "openai":
            factories[name] = functools.partial(OpenAIRealtime, url=settings.openai_realtime_url,
                                                api_key=settings.openai_api_key, voice=settings.agent_voice,
                                                turn_detection=settings.openai_turn_detection,
                                                connect_timeout=settings.agent_connect_timeout)
            log.info("voice agent: OpenAI Realtime at %s", urlsplit(settings.openai_realtime_url).netloc)
        else:
            from agent.embedded import EmbeddedAgent

            live = settings.agent_embedded_mode == "live"
            key = secrets.token_urlsafe(24)
            backend = await stack.enter_async_context(EmbeddedAgent(
                host="127.0.0.1", port=0, api_key=key, settings=settings,
                engine_factory=await start_whisper(settings, stack) if live else None))
            factories[name] = functools.partial(DeepgramAgent, url=backend.url, api_key=key, name="embedded",
                                                connect_timeout=settings.agent_connect_timeout)
            why = "AGENT_PROVIDER is set" if settings.agent_provider != "auto" else "no provider key is set"
            log.info("voice agent: embedded on %s (%s)", backend.url, why)
    if settings.agent_backend not in factories:
        log.warning("voice agent: /agent answers 503 until DEEPGRAM_API_KEY or OPENAI_API_KEY is set")
        return None
    choice = ProviderChoice(factories, settings.agent_backend, settings.agent_allowed_providers,
                            settings.agent_provider_settings)
    if len(choice.allowed) > 1:
        log.info("voice agent: %s by default; a call may pick %s with <Parameter name=\"agent\">",
                 settings.agent_backend, ", ".join(choice.allowed))
    return choice


def with_transfer_tool(settings: Settings, transfers: Transfers) -> Settings:
    """TRANSFER_TARGETS set: the same settings with `transfer_call` among the agent's tools."""
    if not settings.transfer_targets:
        return settings
    tools = [*settings.agent_tools.tools.values(), transfer_tool(settings.transfer_targets, transfers)]
    try:
        return dataclasses.replace(settings, agent_tools=ToolRegistry(tools))
    except ToolError:
        raise ConfigError("AGENT_TOOLS", "transfer_call is a built-in tool name when TRANSFER_TARGETS is set"
                          ) from None


async def run(settings: Settings, stop: asyncio.Event, started: asyncio.Future | None = None, *,
              reuse_port: bool = False) -> None:
    """Serve until `stop` is set, then shut down gracefully.

    `started`, if given, receives (port, proxy) once the server listens (tests bind port 0).
    `reuse_port`: one of WORKERS processes sharing the port (workers.py).
    """
    async with AsyncExitStack() as stack:
        url, key = await start_recogniser(settings, stack)
        transfers = Transfers()
        settings = with_transfer_tool(settings, transfers)
        providers = await start_agent(settings, stack)
        preconnect = Preconnect(providers, settings.agent_preconnect_seconds, settings.max_calls) if providers else None
        if preconnect is not None:
            stack.push_async_callback(preconnect.close_all)
        webhook = Webhook(settings, providers=providers, preconnect=preconnect, transfers=transfers)
        proxy = Proxy(settings, url, key, preconnect, webhook)
        await proxy.hub.start()
        stack.push_async_callback(proxy.hub.aclose)  # after the calls' last messages (drain below)
        metrics.CALL_FIGURES.sources.add(proxy.calls.figures)  # live per-call counters on /metrics
        stack.callback(metrics.CALL_FIGURES.sources.discard, proxy.calls.figures)
        stack.callback(metrics.flush)  # the last figures, before the source goes
        if metrics.MULTIPROCESS:  # workers: the others read this one's figures from its files
            flushing = asyncio.create_task(metrics.flush_periodically())
            stack.callback(flushing.cancel)
        server = await stack.enter_async_context(serve(
            proxy.handler, settings.host, settings.port,
            process_request=proxy.process_request,
            select_subprotocol=lambda _, offered: security.select_subprotocol(offered),  # the dashboard's
            ssl=_server_tls(settings),
            max_size=settings.max_message_bytes,
            compression=None,  # audio and transcripts: deflate costs CPU per message per peer
            open_timeout=settings.handshake_timeout,
            ping_interval=settings.ping_interval,
            ping_timeout=settings.ping_timeout,
            reuse_port=reuse_port,
        ))
        port = server.sockets[0].getsockname()[1]
        scheme = "wss" if settings.tls else "ws"
        log.info("listening on %s://%s:%d (/twilio, /agent, /client, /twiml, /healthz, /readyz, /metrics)",
                 scheme, settings.host, port)
        host = f"[{settings.host}]" if ":" in settings.host else settings.host or "0.0.0.0"
        log.info("dashboard: %s://%s:%d/", "https" if settings.tls else "http", host, port)
        if started is not None:
            started.set_result((port, proxy))
        await stop.wait()
        log.info("shutting down: finishing %d calls in progress", len(proxy.calls) + len(proxy.agent_calls))
        deadline = asyncio.get_running_loop().time() + settings.shutdown_timeout
        await proxy.drain()  # /readyz and new /twilio upgrades answer 503 meanwhile
        server.close()
        try:
            async with asyncio.timeout_at(deadline):
                await server.wait_closed()
        except TimeoutError:
            # A peer that never answers our close frame (`websocat -n` does not) would otherwise
            # hold the exit for websockets' close timeout, again in `serve`'s exit.
            log.warning("shutdown: %d connections did not close within SHUTDOWN_TIMEOUT; dropping them",
                        len(server.all_connections))
            for connection in server.all_connections:
                connection.transport.abort()
    log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Twilio Media Streams in, transcripts out (README).")
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)  # set by workers.py
    worker = parser.parse_args(argv).worker
    load_dotenv(find_dotenv(usecwd=True))  # the .env of the directory the server is run from
    try:
        settings = load_settings(os.environ)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, f"worker-{worker}" if worker else "")
    tuning.tune_allocator()
    security.redact_logs([settings.deepgram_api_key, settings.twilio_auth_token, settings.call_token,
                          settings.agent_llm_api_key, settings.openai_api_key, redis_password(settings.redis_url), *settings.client_tokens])
    if settings.workers > 1 and not worker:
        import workers

        return workers.supervise(settings, Path(__file__).resolve())

    async def serve_until_signal() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run(settings, stop, reuse_port=bool(worker))

    try:
        asyncio.run(serve_until_signal())
    except ConfigError as exc:  # found while starting: an embedded model that cannot be used
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
