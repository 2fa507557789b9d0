"""The proxy: Twilio Media Streams in on /twilio, transcripts out to subscribers on /client.

    python server.py            # settings from the environment and .env (see README)

One `websockets` server, two websocket routes and three plain HTTP ones:
- /twilio   a Twilio <Stream>: events are parsed (twilio_events), each call's two legs mixed
            (audio) and streamed to the recogniser (upstream), all owned by a `Call` (calls).
- /client   subscribers (hub): the tutorial's raw protocol, or JSON mode for programs.
- /healthz, /readyz, /metrics   liveness, readiness (false while shutting down), Prometheus.

With no DEEPGRAM_API_KEY the recogniser is the embedded one: a Deepgram-compatible server
(local_stt) started in-process on loopback, so the proxy has a single upstream code path.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import os
import secrets
import signal
import ssl
import sys
from contextlib import AsyncExitStack
from urllib.parse import urlsplit, urlunsplit

from dotenv import find_dotenv, load_dotenv
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

import metrics
from calls import Calls
from config import ConfigError, Settings, configure_logging, load_settings
from hub import BadSubscription, Hub, Subscriber, parse_subscription
from twilio_events import BadEvent, Connected, Media, Start, Stop, Unknown, parse_event
from upstream import DeepgramStream

log = logging.getLogger("server")

# Close codes for /client, documented in the README.
CLOSE_BAD_SUBSCRIPTION = 4400
CLOSE_UNKNOWN_CALL = 4404
CLOSE_TOO_SLOW = 4429


class Proxy:
    def __init__(self, settings: Settings, upstream_url: str, upstream_key: str):
        self.settings = settings
        self.upstream_url = upstream_url
        self.upstream_key = upstream_key
        self.hub = Hub()
        self.calls = Calls(settings, self.hub, self._new_upstream)
        self.ready = True
        self._bad_frame_logged: set[str] = set()

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
        if path not in ("/twilio", "/client"):
            return connection.respond(http.HTTPStatus.NOT_FOUND, "unknown path; use /twilio or /client\n")
        if path == "/twilio" and not self.ready:
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "shutting down\n")
        return None

    async def handler(self, ws: ServerConnection) -> None:
        if urlsplit(ws.request.path).path == "/twilio":
            await self.handle_twilio(ws)
        else:
            await self.handle_client(ws)

    # --- /twilio ---------------------------------------------------------------------------

    async def handle_twilio(self, ws: ServerConnection) -> None:
        """Read one Twilio stream until `stop` or the socket closes; then leave the call."""
        call, offset = None, 0
        try:
            async for message in ws:
                try:
                    if isinstance(message, bytes):
                        raise BadEvent("binary_frame", "Twilio sends text frames only")
                    event = parse_event(message)
                except BadEvent as exc:
                    self._bad_frame(call, exc, ws)
                    continue
                if isinstance(event, Media):
                    if call is None:
                        self._bad_frame(None, BadEvent("media_before_start", "media before start"), ws)
                        continue
                    metrics.media_frames_total.inc()
                    call.media(event, offset)
                elif isinstance(event, Start):
                    if call is not None:
                        self._bad_frame(call, BadEvent("repeated_start", "a second start on one socket"), ws)
                        continue
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

    def _bad_frame(self, call, exc: BadEvent, ws: ServerConnection) -> None:
        """Count and log (once per kind per process at WARNING, then DEBUG) and carry on."""
        metrics.bad_frames_total.labels(exc.kind).inc()
        if call is not None:
            call.count(exc.kind)
        level = logging.DEBUG if exc.kind in self._bad_frame_logged else logging.WARNING
        self._bad_frame_logged.add(exc.kind)
        log.log(level, "bad Twilio message (%s) from %s on call %s: %s",
                exc.kind, _peer(ws), call.call_sid if call else "-", exc)

    # --- /client ---------------------------------------------------------------------------

    async def handle_client(self, ws: ServerConnection) -> None:
        """Greet with the calls in progress, take one subscription, then stream to it."""
        metrics.subscribers_active.inc()
        try:
            await ws.send(json.dumps(self.hub.call_sids()))
            try:
                call_sid, json_mode = parse_subscription(await ws.recv())
            except BadSubscription as exc:
                metrics.subscriber_rejections_total.labels("bad_request").inc()
                await ws.close(CLOSE_BAD_SUBSCRIPTION, str(exc))
                return
            sub = Subscriber(call_sid, json_mode=json_mode, max_queue=self.settings.subscriber_queue,
                             peer=_peer(ws))
            if not self.hub.subscribe(sub):
                metrics.subscriber_rejections_total.labels("unknown_call").inc()
                await ws.close(CLOSE_UNKNOWN_CALL, "unknown callSid: no such call in progress")
                return
            log.info("subscriber %s joined %s (%s mode)", sub.peer, call_sid, "json" if json_mode else "raw")
            try:
                await self._stream_to(ws, sub)
            finally:
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
        elif writer.done() and not writer.cancelled() and writer.exception() is None:
            await ws.close(1000, "call ended")

    async def _write_outbox(self, ws: ServerConnection, sub: Subscriber) -> None:
        while (message := await sub.next()) is not None:
            await ws.send(message)
            sub.sent += 1

    async def _ignore_input(self, ws: ServerConnection) -> None:
        async for _ in ws:
            metrics.subscriber_junk_total.inc()

    # --- shutdown --------------------------------------------------------------------------

    async def drain(self) -> None:
        """Not ready any more; finish every call's end-of-call sequence (bounded)."""
        self.ready = False
        await self.calls.close_all(self.settings.shutdown_timeout)
        self.hub.shutdown()


def _peer(ws: ServerConnection) -> str:
    address = ws.remote_address
    return f"{address[0]}:{address[1]}" if address else "?"


def _server_tls(settings: Settings) -> ssl.SSLContext | None:
    if not settings.tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.cert_pem, settings.key_pem)
    return context


async def start_recogniser(settings: Settings, stack: AsyncExitStack) -> tuple[str, str]:
    """The upstream URL and key: Deepgram's, or the embedded Deepgram-compatible server's."""
    if settings.engine == "deepgram":
        log.info("recogniser: Deepgram at %s", urlsplit(settings.deepgram_url).netloc)
        return settings.deepgram_url, settings.deepgram_api_key
    import local_stt

    factory = None
    if settings.engine == "pocketsphinx":
        import recognizer

        factory = recognizer.engine_factory
        stack.callback(recognizer.shutdown)
    key = secrets.token_urlsafe(24)
    stt = await stack.enter_async_context(local_stt.LocalSTT(host="127.0.0.1", port=0, api_key=key,
                                                             engine_factory=factory))
    why = "STT_ENGINE is set" if settings.stt_engine != "auto" else "DEEPGRAM_API_KEY is not set"
    log.info("recogniser: embedded %s on %s (%s)", settings.engine, stt.url, why)
    query = urlsplit(settings.deepgram_url).query
    return urlunsplit(urlsplit(stt.url)._replace(query=query)), key


async def run(settings: Settings, stop: asyncio.Event, started: asyncio.Future | None = None) -> None:
    """Serve until `stop` is set, then shut down gracefully.

    `started`, if given, receives (port, proxy) once the server listens (tests bind port 0).
    """
    async with AsyncExitStack() as stack:
        url, key = await start_recogniser(settings, stack)
        proxy = Proxy(settings, url, key)
        server = await stack.enter_async_context(serve(
            proxy.handler, settings.host, settings.port,
            process_request=proxy.process_request,
            ssl=_server_tls(settings),
            max_size=settings.max_message_bytes,
            compression=None,  # audio and transcripts: deflate costs CPU per message per peer
        ))
        port = server.sockets[0].getsockname()[1]
        scheme = "wss" if settings.tls else "ws"
        log.info("listening on %s://%s:%d (/twilio, /client, /healthz, /readyz, /metrics)",
                 scheme, settings.host, port)
        if started is not None:
            started.set_result((port, proxy))
        await stop.wait()
        log.info("shutting down: finishing %d calls in progress", len(proxy.calls))
        server.server.close()  # stop accepting; open connections stay up
        await proxy.drain()
        server.close()
        try:
            async with asyncio.timeout(max(1.0, settings.shutdown_timeout)):
                await server.wait_closed()
        except TimeoutError:
            log.warning("shutdown: some connections did not close in time")
    log.info("stopped")


def main() -> int:
    load_dotenv(find_dotenv(usecwd=True))  # the .env of the directory the server is run from
    try:
        settings = load_settings(os.environ)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)

    async def serve_until_signal() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run(settings, stop)

    asyncio.run(serve_until_signal())
    return 0


if __name__ == "__main__":
    sys.exit(main())
