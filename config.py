"""Settings, read once at start-up from the environment (and a `.env` file via python-dotenv).

`load_settings(environ)` is pure: it takes a mapping and returns a frozen `Settings`, or raises
`ConfigError` naming the variable. `server.py` turns that into one line on stderr and exit
status 2, so a typo never becomes a half-working server.

Every variable here is listed in the README's configuration table.
"""

from __future__ import annotations

import json
import logging
import os
import re
import ssl
from dataclasses import dataclass, field
from typing import Mapping
from urllib.parse import parse_qs, urlsplit, urlunsplit

import dial
import security
from agent.tools import ToolError, ToolRegistry, load_tools

DEFAULT_DEEPGRAM_URL = (
    "wss://api.deepgram.com/v1/listen?model=nova-3&encoding=mulaw&sample_rate=8000"
    "&channels=2&multichannel=true&interim_results=true&punctuate=true"
)
ENGINES = ("auto", "deepgram", "whisper", "deterministic")
AGENT_PROVIDERS = ("auto", "deepgram", "embedded", "openai")
DEFAULT_DEEPGRAM_AGENT_URL = "wss://agent.deepgram.com/v1/agent/converse"
DEFAULT_OPENAI_REALTIME_URL = "wss://api.openai.com/v1/realtime?model=gpt-realtime"
TURN_DETECTION_TYPES = ("server_vad", "semantic_vad")
DEFAULT_AGENT_PROMPT = (
    "You are a friendly phone assistant. Keep every answer short and plain: the caller hears it, "
    "and can interrupt you. When the caller says goodbye, say goodbye and call end_call."
)
DEFAULT_AGENT_GREETING = "Hello! How can I help you today?"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ConfigError(ValueError):
    def __init__(self, variable: str, message: str):
        super().__init__(f"{variable}: {message}")
        self.variable = variable


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 5000
    deepgram_url: str = DEFAULT_DEEPGRAM_URL
    deepgram_api_key: str | None = field(default=None, repr=False)  # a secret: never in a repr
    stt_engine: str = "auto"  # resolved by `engine` below
    local_stt_model: str | None = None  # a CTranslate2 Whisper directory instead of the pinned tiny.en
    cert_pem: str | None = None
    key_pem: str | None = None
    log_level: str = "INFO"
    frame_ms: int = 100  # audio per message to Deepgram
    max_lag_ms: int = 200  # how far one leg may run ahead before the other is padded
    max_gap_ms: int = 10_000  # larger timestamp jumps are re-based, not padded
    subscriber_queue: int = 1000  # messages a subscriber may fall behind before it is dropped
    max_message_bytes: int = 65_536  # largest websocket message accepted from a peer
    upstream_queue_seconds: float = 60.0  # audio held for a slow or connecting upstream
    replay_seconds: float = 10.0  # audio kept after sending, to replay if the upstream drops
    connect_timeout: float = 10.0  # opening the upstream socket
    close_timeout: float = 10.0  # waiting for the upstream's last results after CloseStream
    keepalive_seconds: float = 4.0  # KeepAlive to the upstream when no audio has gone out
    shutdown_timeout: float = 30.0  # SIGTERM: time for in-flight calls to finish
    # --- security (README "Security"); secrets are kept out of repr() ---
    twilio_auth_token: str | None = field(default=None, repr=False)  # checks X-Twilio-Signature on /twilio
    public_url: str | None = None  # wss://host[:port][/prefix] as Twilio dials it; the signed URL is this + path
    client_tokens: tuple[str, ...] = field(default=(), repr=False)  # bearer tokens accepted on /client
    call_token: str | None = field(default=None, repr=False)  # expected in start.customParameters
    call_token_param: str = "token"  # the <Parameter name> carrying call_token
    allow_open_server: bool = False  # start on a non-loopback address with open routes anyway
    max_calls: int = 500  # Twilio stream sockets open at once
    max_subscribers: int = 5000  # /client connections open at once
    max_subscribers_per_call: int = 10
    handshake_timeout: float = 10.0  # websocket opening handshake; and on /client, the subscription
    ping_interval: float = 20.0  # keepalive pings to every peer
    ping_timeout: float = 20.0  # a peer that does not answer a ping in time is closed (1011)
    max_subscriber_messages: int = 100  # messages a subscriber may send after subscribing
    # --- voice agents on /agent (README "Voice agents") ---
    agent_provider: str = "auto"  # resolved by `agent_backend` below
    deepgram_agent_url: str = DEFAULT_DEEPGRAM_AGENT_URL
    agent_prompt: str = DEFAULT_AGENT_PROMPT  # {placeholders} filled from a call's customParameters
    agent_greeting: str = DEFAULT_AGENT_GREETING
    agent_provider_settings: Mapping = field(default_factory=dict, hash=False)  # AGENT_SETTINGS_FILE
    agent_tools: ToolRegistry = field(default_factory=lambda: load_tools(None), repr=False, compare=False)
    agent_tool_timeout: float = 5.0  # seconds a tool may run before the model gets an error
    agent_end_call_wait: float = 10.0  # end_call: longest wait for the goodbye to be played
    agent_connect_timeout: float = 5.0  # opening and configuring the provider's session
    # --- OpenAI Realtime agents, the TwiML webhook, transfers (README "OpenAI Realtime agents") ---
    openai_api_key: str | None = field(default=None, repr=False)
    openai_realtime_url: str = DEFAULT_OPENAI_REALTIME_URL
    agent_voice: str = "marin"  # OpenAI's audio.output.voice
    openai_turn_detection: Mapping = field(default_factory=lambda: {"type": "server_vad"}, hash=False)
    agent_allowed_providers: tuple[str, ...] = ()  # a call may pick one with <Parameter name="agent">
    agent_preconnect_seconds: float = 15.0  # /twiml opens the provider session; closed if no stream comes
    require_webhook_token: bool = False  # streams must carry the token /twiml minted for their CallSid
    transfer_targets: Mapping = field(default_factory=dict, hash=False)  # number or SIP URI -> description

    @property
    def agent_backend(self) -> str:
        """The agent provider in use: Deepgram when its key is set (or asked for), else OpenAI when
        its key is set, else the embedded one."""
        if self.agent_provider != "auto":
            return self.agent_provider
        return "deepgram" if self.deepgram_api_key else "openai" if self.openai_api_key else "embedded"
    # --- the embedded agent (README "The embedded agent") ---
    agent_embedded_mode: str = "live"  # "deterministic": no recogniser, no flite, no randomness
    agent_llm_url: str | None = None  # an OpenAI-compatible endpoint to think with, else the built-in responder
    agent_llm_model: str | None = None
    agent_llm_api_key: str | None = field(default=None, repr=False)
    agent_llm_timeout: float = 15.0  # seconds for one chat completion
    # --- history and scaling out (README "Scaling out") ---
    history_messages: int = 1000  # per call, kept for late joiners ({"history": true})
    history_seconds: float = 300.0  # how long a call's history outlives the call
    redis_url: str | None = field(default=None, repr=False)  # may carry a password
    workers: int = 1  # server processes sharing the port (SO_REUSEPORT); > 1 needs redis_url
    redis_buffer: int = 10_000  # messages waiting for Redis before new ones are dropped (counted)
    redis_heartbeat_seconds: float = 2.0  # registry heartbeat; a silent instance is gone after 3 of them

    @property
    def engine(self) -> str:
        """The recogniser in use: Deepgram when a key is set (or asked for), else the embedded one."""
        if self.stt_engine != "auto":
            return self.stt_engine
        return "deepgram" if self.deepgram_api_key else "whisper"

    @property
    def tls(self) -> bool:
        return self.cert_pem is not None


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError("PROXY_URL", f"expected host:port such as 127.0.0.1:5000, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _number(env: Mapping[str, str], name: str, default, low, high, kind=int):
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = kind(raw.strip())
    except ValueError:
        raise ConfigError(name, f"expected a number, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(name, f"must be between {low} and {high}, got {raw!r}")
    return value


def _check_deepgram_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.netloc:
        raise ConfigError("DEEPGRAM_URL", f"expected a ws:// or wss:// URL, got {url!r}")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    wanted = {"encoding": "mulaw", "sample_rate": "8000", "channels": "2"}
    wrong = [f"{k}={v}" for k, v in wanted.items() if query.get(k) != v]
    if wrong:
        raise ConfigError(
            "DEEPGRAM_URL",
            "the proxy sends 2-channel 8 kHz mu-law; the query must include " + "&".join(wrong),
        )


def _pem_file(env: Mapping[str, str], name: str) -> str | None:
    path = env.get(name) or None
    if path is not None and not os.path.isfile(path):
        raise ConfigError(name, f"no such file: {path!r}")
    return path


def load_settings(env: Mapping[str, str]) -> Settings:
    host, port = _host_port(env.get("PROXY_URL") or "127.0.0.1:5000")

    deepgram_url = env.get("DEEPGRAM_URL") or DEFAULT_DEEPGRAM_URL
    _check_deepgram_url(deepgram_url)

    engine = (env.get("STT_ENGINE") or "auto").strip().lower()
    if engine not in ENGINES:
        raise ConfigError("STT_ENGINE", f"must be one of {', '.join(ENGINES)}, got {engine!r}")
    api_key = env.get("DEEPGRAM_API_KEY") or None
    if engine == "deepgram" and not api_key:
        raise ConfigError("DEEPGRAM_API_KEY", "STT_ENGINE=deepgram needs a Deepgram API key")

    local_stt_model = env.get("LOCAL_STT_MODEL") or None
    if local_stt_model is not None and not os.path.isdir(local_stt_model):
        raise ConfigError("LOCAL_STT_MODEL", f"not a directory: {local_stt_model!r} (a CTranslate2 Whisper model)")

    cert, key = _pem_file(env, "CERT_PEM"), _pem_file(env, "KEY_PEM")
    if (cert is None) != (key is None):
        raise ConfigError("CERT_PEM" if cert is None else "KEY_PEM", "CERT_PEM and KEY_PEM go together")
    if cert and key:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError("CERT_PEM", f"cannot load the certificate and key: {exc}") from None

    log_level = (env.get("LOG_LEVEL") or "INFO").strip().upper()
    if log_level not in LOG_LEVELS:
        raise ConfigError("LOG_LEVEL", f"must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")

    return Settings(
        host=host,
        port=port,
        deepgram_url=deepgram_url,
        deepgram_api_key=api_key,
        stt_engine=engine,
        local_stt_model=local_stt_model,
        cert_pem=cert,
        key_pem=key,
        log_level=log_level,
        frame_ms=_number(env, "DEEPGRAM_FRAME_MS", 100, 20, 250),
        max_lag_ms=_number(env, "MIX_MAX_LAG_MS", 200, 0, 2000),
        max_gap_ms=_number(env, "MIX_MAX_GAP_MS", 10_000, 0, 600_000),
        subscriber_queue=_number(env, "SUBSCRIBER_QUEUE", 1000, 1, 1_000_000),
        max_message_bytes=_number(env, "MAX_MESSAGE_BYTES", 65_536, 1024, 16 * 2**20),
        upstream_queue_seconds=_number(env, "UPSTREAM_QUEUE_SECONDS", 60.0, 1.0, 3600.0, float),
        replay_seconds=_number(env, "UPSTREAM_REPLAY_SECONDS", 10.0, 0.0, 600.0, float),
        connect_timeout=_number(env, "DEEPGRAM_CONNECT_TIMEOUT", 10.0, 0.1, 120.0, float),
        close_timeout=_number(env, "DEEPGRAM_CLOSE_TIMEOUT", 10.0, 0.1, 120.0, float),
        keepalive_seconds=_number(env, "DEEPGRAM_KEEPALIVE_SECONDS", 4.0, 0.5, 9.0, float),
        shutdown_timeout=_number(env, "SHUTDOWN_TIMEOUT", 30.0, 0.0, 3600.0, float),
        **_security_settings(env, host),
        **_agent_settings(env, api_key),
        **_embedded_agent_settings(env),
        **_scaling_settings(env),
        **_openai_settings(env, api_key),
    )


# --- the embedded agent (README "The embedded agent") -------------------------------------


def _embedded_agent_settings(env: Mapping[str, str]) -> dict:
    mode = (env.get("AGENT_EMBEDDED_MODE") or "live").strip().lower()
    if mode not in ("live", "deterministic"):
        raise ConfigError("AGENT_EMBEDDED_MODE", f"must be live or deterministic, got {mode!r}")
    url = (env.get("AGENT_LLM_URL") or "").strip() or None
    model = (env.get("AGENT_LLM_MODEL") or "").strip() or None
    if url is not None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError("AGENT_LLM_URL", "expected the http(s):// base URL of an OpenAI-compatible API, "
                                               f"such as http://127.0.0.1:11434/v1 for Ollama, got {url!r}")
        if model is None:
            raise ConfigError("AGENT_LLM_MODEL", "AGENT_LLM_URL needs the name of the model to ask (e.g. llama3.2)")
    return dict(
        agent_embedded_mode=mode,
        agent_llm_url=url,
        agent_llm_model=model,
        agent_llm_api_key=(env.get("AGENT_LLM_API_KEY") or "").strip() or None,
        agent_llm_timeout=_number(env, "AGENT_LLM_TIMEOUT", 15.0, 0.5, 300.0, float),
    )


def _scaling_settings(env: Mapping[str, str]) -> dict:
    redis_url = (env.get("REDIS_URL") or "").strip() or None
    if redis_url is not None:
        parts = urlsplit(redis_url)
        if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
            # The value may hold a password: name the problem, never echo it.
            raise ConfigError("REDIS_URL", "expected redis://[:password@]host[:port][/db], rediss://… for TLS, "
                                           "or unix:///path/to/redis.sock")
    workers = _number(env, "WORKERS", 1, 1, 256)
    if workers > 1 and redis_url is None:
        raise ConfigError("WORKERS", f"{workers} workers need REDIS_URL: calls and subscribers of different "
                                     "workers meet only through Redis")
    return dict(
        history_messages=_number(env, "HISTORY_MESSAGES", 1000, 0, 1_000_000),
        history_seconds=_number(env, "HISTORY_SECONDS", 300.0, 0.0, 7 * 86400.0, float),
        redis_url=redis_url,
        workers=workers,
        redis_buffer=_number(env, "REDIS_BUFFER", 10_000, 1, 10_000_000),
        redis_heartbeat_seconds=_number(env, "REDIS_HEARTBEAT_SECONDS", 2.0, 0.1, 60.0, float),
    )


def redis_password(redis_url: str | None) -> str | None:
    """The password in REDIS_URL, for log redaction."""
    return urlsplit(redis_url).password if redis_url else None


def redis_location(redis_url: str) -> str:
    """REDIS_URL without its credentials, for log lines: rediss://host:6380/0."""
    parts = urlsplit(redis_url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc, query=""))


# --- security settings (README "Security") -------------------------------------------------
# Error messages here never quote a secret's value: they end up on stderr and in CI logs.

_TOKEN_CHARS = re.compile(r"[A-Za-z0-9._~-]{16,}")  # what `secrets.token_urlsafe(24)` prints
_TOKEN_HINT = ("use at least 16 characters from A-Z a-z 0-9 . _ ~ - "
               "(python -c 'import secrets; print(secrets.token_urlsafe(24))')")


def _security_settings(env: Mapping[str, str], host: str) -> dict:
    twilio_auth_token = (env.get("TWILIO_AUTH_TOKEN") or "").strip() or None
    public_url = _public_url(env.get("PUBLIC_URL") or None)
    if twilio_auth_token and not public_url:
        raise ConfigError("PUBLIC_URL", "TWILIO_AUTH_TOKEN needs the public wss:// URL Twilio connects to "
                                        "(e.g. wss://proxy.example.com) to check signatures against")

    client_tokens = tuple(t.strip() for t in (env.get("CLIENT_TOKENS") or "").split(",") if t.strip())
    for position, token in enumerate(client_tokens, 1):
        if not _TOKEN_CHARS.fullmatch(token):
            raise ConfigError("CLIENT_TOKENS", f"token #{position} is not usable: {_TOKEN_HINT}")
    call_token = (env.get("CALL_TOKEN") or "").strip() or None
    if call_token and not _TOKEN_CHARS.fullmatch(call_token):
        raise ConfigError("CALL_TOKEN", f"not usable: {_TOKEN_HINT}")

    allow_open = _flag(env, "ALLOW_OPEN_SERVER")
    problem = security.exposure_problem(host, twilio_protected=bool(twilio_auth_token or call_token),
                                        clients_protected=bool(client_tokens), allow_open=allow_open)
    if problem:
        raise ConfigError("PROXY_URL", problem)

    return dict(
        twilio_auth_token=twilio_auth_token,
        public_url=public_url,
        client_tokens=client_tokens,
        call_token=call_token,
        call_token_param=(env.get("CALL_TOKEN_PARAM") or "token").strip(),
        allow_open_server=allow_open,
        max_calls=_number(env, "MAX_CALLS", 500, 1, 100_000),
        max_subscribers=_number(env, "MAX_SUBSCRIBERS", 5000, 1, 100_000),
        max_subscribers_per_call=_number(env, "MAX_SUBSCRIBERS_PER_CALL", 10, 1, 100_000),
        handshake_timeout=_number(env, "HANDSHAKE_TIMEOUT", 10.0, 0.1, 120.0, float),
        ping_interval=_number(env, "PING_INTERVAL", 20.0, 0.1, 600.0, float),
        ping_timeout=_number(env, "PING_TIMEOUT", 20.0, 0.1, 600.0, float),
        max_subscriber_messages=_number(env, "MAX_SUBSCRIBER_MESSAGES", 100, 0, 1_000_000),
    )


# --- voice agents (README "Voice agents") ----------------------------------------------------


def _agent_settings(env: Mapping[str, str], deepgram_api_key: str | None) -> dict:
    provider = (env.get("AGENT_PROVIDER") or "auto").strip().lower()
    if provider not in AGENT_PROVIDERS:
        raise ConfigError("AGENT_PROVIDER", f"must be one of {', '.join(AGENT_PROVIDERS)}, got {provider!r}")
    if provider == "deepgram" and not deepgram_api_key:
        raise ConfigError("DEEPGRAM_API_KEY", "AGENT_PROVIDER=deepgram needs a Deepgram API key")
    url = (env.get("DEEPGRAM_AGENT_URL") or DEFAULT_DEEPGRAM_AGENT_URL).strip()
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.netloc:
        raise ConfigError("DEEPGRAM_AGENT_URL", f"expected a ws:// or wss:// URL, got {url!r}")

    prompt = env.get("AGENT_PROMPT") or None
    prompt_file = env.get("AGENT_PROMPT_FILE") or None
    if prompt and prompt_file:
        raise ConfigError("AGENT_PROMPT_FILE", "set AGENT_PROMPT or AGENT_PROMPT_FILE, not both")
    if prompt_file:
        prompt = _text_file("AGENT_PROMPT_FILE", prompt_file)
    provider_settings = {}
    settings_file = env.get("AGENT_SETTINGS_FILE") or None
    if settings_file:
        try:
            provider_settings = json.loads(_text_file("AGENT_SETTINGS_FILE", settings_file))
        except ValueError as exc:
            raise ConfigError("AGENT_SETTINGS_FILE", f"{settings_file} is not valid JSON: {exc}") from None
        if not isinstance(provider_settings, dict):
            raise ConfigError("AGENT_SETTINGS_FILE", f"{settings_file} must hold a JSON object")
    try:
        tools = load_tools((env.get("AGENT_TOOLS") or "").strip() or None)
    except ToolError as exc:
        raise ConfigError("AGENT_TOOLS", str(exc)) from None

    return dict(
        agent_provider=provider,
        deepgram_agent_url=url,
        agent_prompt=(prompt or DEFAULT_AGENT_PROMPT).strip(),
        agent_greeting=(env.get("AGENT_GREETING") or DEFAULT_AGENT_GREETING).strip(),
        agent_provider_settings=provider_settings,
        agent_tools=tools,
        agent_tool_timeout=_number(env, "AGENT_TOOL_TIMEOUT", 5.0, 0.1, 600.0, float),
        agent_end_call_wait=_number(env, "AGENT_END_CALL_WAIT", 10.0, 0.0, 120.0, float),
        agent_connect_timeout=_number(env, "AGENT_CONNECT_TIMEOUT", 5.0, 0.5, 60.0, float),
    )


# --- OpenAI Realtime agents, the TwiML webhook, transfers (README "OpenAI Realtime agents") ------


def _openai_settings(env: Mapping[str, str], deepgram_api_key: str | None) -> dict:
    key = (env.get("OPENAI_API_KEY") or "").strip() or None
    if (env.get("AGENT_PROVIDER") or "").strip().lower() == "openai" and not key:
        raise ConfigError("OPENAI_API_KEY", "AGENT_PROVIDER=openai needs an OpenAI API key")
    url = (env.get("OPENAI_REALTIME_URL") or DEFAULT_OPENAI_REALTIME_URL).strip()
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.netloc:
        raise ConfigError("OPENAI_REALTIME_URL", f"expected a ws:// or wss:// URL, got {url!r}")
    voice = (env.get("AGENT_VOICE") or "marin").strip()
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", voice):
        raise ConfigError("AGENT_VOICE", f"expected a voice name such as marin or cedar, got {voice!r}")

    raw = (env.get("OPENAI_TURN_DETECTION") or "server_vad").strip()
    if raw.startswith("{"):
        try:
            turn_detection = json.loads(raw)
        except ValueError as exc:
            raise ConfigError("OPENAI_TURN_DETECTION", f"not valid JSON: {exc}") from None
    else:
        turn_detection = {"type": raw}
    if not isinstance(turn_detection, dict) or turn_detection.get("type") not in TURN_DETECTION_TYPES:
        raise ConfigError("OPENAI_TURN_DETECTION", "expected server_vad, semantic_vad, or a JSON object with one of "
                                                   "them as \"type\" and its options (barge-in needs turn detection)")

    available = {"embedded"} | ({"deepgram"} if deepgram_api_key else set()) | ({"openai"} if key else set())
    raw = (env.get("AGENT_ALLOWED_PROVIDERS") or "").strip()
    # By default a call may pick among the providers whose keys are set; the embedded agent (a
    # recogniser pool and flite to load) only when no key is set, or when listed here.
    allowed = tuple(dict.fromkeys(p.strip().lower() for p in raw.split(",") if p.strip())) if raw else (
        tuple(p for p in ("deepgram", "openai") if p in available) or ("embedded",))
    for name in allowed:
        if name not in ("deepgram", "openai", "embedded"):
            raise ConfigError("AGENT_ALLOWED_PROVIDERS", f"unknown provider {name!r}; use deepgram, openai, embedded")
        if name not in available:
            raise ConfigError("AGENT_ALLOWED_PROVIDERS", f"{name} needs its API key "
                                                         f"({'DEEPGRAM' if name == 'deepgram' else 'OPENAI'}_API_KEY)")

    raw = (env.get("TRANSFER_TARGETS") or "").strip()
    targets: dict = {}
    if raw:
        try:
            targets = json.loads(raw)
        except ValueError as exc:
            raise ConfigError("TRANSFER_TARGETS", f"expected a JSON object of number or SIP URI -> description: {exc}"
                              ) from None
        if not isinstance(targets, dict) or not targets:
            raise ConfigError("TRANSFER_TARGETS", 'expected a JSON object such as {"+15550001111": "the sales desk"}')
        for target, description in targets.items():
            problem = dial.problem(target)
            if problem:
                raise ConfigError("TRANSFER_TARGETS", problem)
            if not isinstance(description, str) or not description.strip():
                raise ConfigError("TRANSFER_TARGETS", f"{target}: the description (for the model) must be a text")

    return dict(
        openai_api_key=key,
        openai_realtime_url=url,
        agent_voice=voice,
        openai_turn_detection=turn_detection,
        agent_allowed_providers=allowed,
        agent_preconnect_seconds=_number(env, "AGENT_PRECONNECT_SECONDS", 15.0, 0.0, 600.0, float),
        require_webhook_token=_flag(env, "REQUIRE_WEBHOOK_TOKEN"),
        transfer_targets=targets,
    )


def _text_file(name: str, path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(name, f"cannot read {path}: {exc}") from None


def _public_url(value: str | None) -> str | None:
    """PUBLIC_URL without a trailing slash; Twilio signs the wss:// form of its <Stream url>."""
    if value is None:
        return None
    parts = urlsplit(value.strip())
    if parts.scheme != "wss" or not parts.netloc or parts.query or parts.fragment:
        raise ConfigError("PUBLIC_URL", "expected the wss:// URL Twilio connects to, without the route, query "
                                        f"or fragment (for https://abc.ngrok.app use wss://abc.ngrok.app), got {value!r}")
    return value.strip().rstrip("/")


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = (env.get(name) or "false").strip().lower()
    if raw not in ("true", "false", "1", "0", "yes", "no"):
        raise ConfigError(name, f"expected true or false, got {raw!r}")
    return raw in ("true", "1", "yes")


def configure_logging(level: str, process: str = "") -> None:
    """`process` names the worker in every line when WORKERS > 1 ("worker-2")."""
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s " + (f"{process} " if process else "") + "%(name)s: %(message)s",
    )
    # websockets logs every connection at INFO: with hundreds of calls that drowns our own
    # one-line-per-call logs, so it speaks only at DEBUG or when something is wrong.
    if level != "DEBUG":
        logging.getLogger("websockets").setLevel(logging.WARNING)
