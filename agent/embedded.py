"""The embedded agent: a Deepgram Voice Agent V1-compatible server that needs no account.

As `local_stt.py` does for transcription, the proxy starts this server in-process on loopback
when there is no Deepgram key, and its Deepgram Voice Agent client connects to it: one code path
for both. It is faithful to protocols.md C: `Authorization: Token <key>` checked before the
upgrade (401), `/v1/agent/converse` only (404), then `Welcome`, `Settings`, `SettingsApplied`
and the conversation.

    async with EmbeddedAgent(host="127.0.0.1", port=0, api_key=key, settings=settings) as backend:
        backend.url   # ws://127.0.0.1:PORT/v1/agent/converse

The modules, in reading order:

    server_protocol.py   pure: client messages parsed and checked, server messages built
    listen.py            voice activity (barge-in) and the recogniser (turns)
    brain.py             thinking: an OpenAI-compatible endpoint, or the built-in responder
    voice.py             speaking: flite's slt voice, 8 kHz mu-law
    embedded_session.py  one connection: reader, writer and the agent's turns
    embedded.py          this file: the server, its parts, the command line

Two modes (`AGENT_EMBEDDED_MODE`): `live` hears with the project's recogniser and WebRTC's
voice activity detector and speaks with flite; `deterministic` hears by energy and names each
utterance by checksum (no recogniser) and speaks in tones (no flite), so tests and a
deployment check know exactly what to expect. Both think with `AGENT_LLM_URL` when it is set,
else with the built-in responder.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import http
import logging
import os
import signal
import sys
import time
import uuid
from urllib.parse import urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from agent.brain import Brain, LLMBrain, OfflineResponder
from agent.embedded_session import Parts, Session, SessionRecord, Tuning
from agent.listen import ChecksumEngine, EnergyClassifier, WebRtcClassifier
from agent.voice import FliteVoice, ToneVoice, Voice
from config import ConfigError, Settings, load_settings
from engine import EngineFactory
from local_stt import HandshakeRefused, check_authorization

log = logging.getLogger(__name__)

AGENT_PATH = "/v1/agent/converse"
KEPT_SESSIONS = 1000  # records of finished sessions kept for inspection; the server runs for months
MODES = ("live", "deterministic")


class AgentUnavailable(ConfigError):
    """The embedded agent cannot run here (flite missing); the message says how to fix it. A
    start-up error like a bad setting: the server exits with status 2 and this one line."""

    def __init__(self, message: str):
        super().__init__("AGENT_PROVIDER", message)


def default_engine_factory(mode: str) -> EngineFactory:
    """The recogniser the embedded agent listens with when none is given."""
    if mode == "deterministic":
        return ChecksumEngine
    import whisper_stt  # the project's embedded recogniser, behind the engine.EngineFactory contract

    if not whisper_stt.started():
        whisper_stt.start()  # checks the model and loads it in every worker: once, a second or two
    return whisper_stt.engine_factory


def build_parts(settings: Settings, engine_factory: EngineFactory | None = None, voice: Voice | None = None) -> Parts:
    """The recogniser, detector, voice and brain for `settings`; arguments override the first and the third."""
    mode = settings.agent_embedded_mode
    brain: Brain = OfflineResponder()
    if settings.agent_llm_url:
        brain = LLMBrain(settings.agent_llm_url, settings.agent_llm_model, settings.agent_llm_api_key,
                         settings.agent_llm_timeout)
    if mode == "deterministic":
        return Parts(engine_factory or default_engine_factory(mode), EnergyClassifier, voice or ToneVoice(), brain)
    if voice is None:
        voice = FliteVoice()
        if not voice.available():
            raise AgentUnavailable("the embedded agent speaks with flite, which is not installed: "
                                   "apt-get install flite (make run does it)")
    return Parts(engine_factory or default_engine_factory(mode), WebRtcClassifier, voice, brain)


class EmbeddedAgent:
    """The server on `host:port` (port 0 picks a free one).

    `api_key=None` accepts any `Token` credentials. `settings` is the project's `Settings`
    (read: `agent_embedded_mode`, `agent_llm_*`). `engine_factory` overrides the recogniser
    (default: the project's, or `ChecksumEngine` in deterministic mode) and `voice` the voice
    (default: flite, or tones in deterministic mode). Every connection that completed the
    handshake appends its `SessionRecord` to `sessions`, which keeps the last `KEPT_SESSIONS`.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        settings: Settings = Settings(),
        *,
        engine_factory: EngineFactory | None = None,
        voice: Voice | None = None,
        tuning: Tuning = Tuning(),
    ) -> None:
        self.host = host
        self.port = port
        self.api_key = api_key
        self.settings = settings
        self.tuning = tuning
        self.sessions: collections.deque[SessionRecord] = collections.deque(maxlen=KEPT_SESSIONS)
        self._engine_factory = engine_factory
        self._voice = voice
        self._parts: Parts | None = None
        self._server: Server | None = None

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}{AGENT_PATH}"

    async def start(self) -> None:
        self._parts = build_parts(self.settings, self._engine_factory, self._voice)
        self._server = await serve(
            self._handle, self.host, self.port,
            process_request=self._process_request,
            compression=None,  # audio both ways: deflate would cost CPU for nothing
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("embedded agent (%s mode, thinking with %s, speaking with %s) on %s",
                 self.settings.agent_embedded_mode, self._parts.brain.description, self._parts.voice.name, self.url)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._parts is not None and isinstance(self._parts.brain, LLMBrain):
            await self._parts.brain.aclose()

    async def __aenter__(self) -> EmbeddedAgent:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """404 for any other path, 401 without the right Token, before the upgrade (as Deepgram)."""
        try:
            if urlsplit(request.path).path != AGENT_PATH:
                raise HandshakeRefused(http.HTTPStatus.NOT_FOUND, "unknown path")
            check_authorization(request.headers, self.api_key)
        except HandshakeRefused as refused:
            log.info("refused %s: %s %s", request.path, refused.status.value, refused.message)
            return refused.response(connection)
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        assert self._parts is not None
        record = SessionRecord(request_id=str(uuid.uuid4()))
        self.sessions.append(record)
        log.info("agent session %s open from %s", record.request_id, ws.remote_address)
        try:
            await Session(ws, record, self._parts, self.tuning).run()
        finally:
            record.closed = time.monotonic()
            log.info(
                "agent session %s closed: code=%s error=%s turns=%d barge_ins=%d heard=%.1fs spoke=%.1fs",
                record.request_id, ws.close_code, record.error, record.turns, record.barge_ins,
                record.audio_in_bytes / 8000, record.audio_out_bytes / 8000,
            )


# --- Command line ---------------------------------------------------------------------------


async def _serve_until_signal(agent: EmbeddedAgent) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with agent:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    """`python -m agent.embedded --port 8082 --api-key KEY`: the agent on its own (tests, benchmarks).

    AGENT_LLM_* come from the environment as for the server. SIGTERM or SIGINT stop it cleanly
    (recogniser worker processes included).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8082)
    parser.add_argument("--api-key", help="required Token; omit to accept any")
    parser.add_argument("--mode", choices=MODES, default="live")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = load_settings({**os.environ, "AGENT_EMBEDDED_MODE": args.mode})
    try:
        asyncio.run(_serve_until_signal(EmbeddedAgent(args.host, args.port, args.api_key, settings)))
    except AgentUnavailable as exc:
        parser.exit(2, f"{exc}\n")
    finally:
        if "whisper_stt" in sys.modules:
            sys.modules["whisper_stt"].shutdown()


if __name__ == "__main__":
    main()
