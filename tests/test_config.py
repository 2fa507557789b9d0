"""Settings: defaults, each variable's validation, and the exit-2 contract of `server.py`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from config import DEFAULT_DEEPGRAM_URL, ConfigError, load_settings

ROOT = Path(__file__).resolve().parent.parent


def test_defaults():
    s = load_settings({})
    assert (s.host, s.port) == ("127.0.0.1", 5000)
    assert s.deepgram_url == DEFAULT_DEEPGRAM_URL
    for part in ("encoding=mulaw", "sample_rate=8000", "channels=2", "multichannel=true",
                 "interim_results=true", "punctuate=true", "model="):
        assert part in s.deepgram_url
    assert s.frame_ms == 100 and s.max_lag_ms == 200
    assert s.engine == "whisper" and not s.tls and s.local_stt_model is None


def test_a_deepgram_key_selects_deepgram():
    assert load_settings({"DEEPGRAM_API_KEY": "k"}).engine == "deepgram"
    assert load_settings({"DEEPGRAM_API_KEY": "k", "STT_ENGINE": "deterministic"}).engine == "deterministic"


def test_values_are_read():
    s = load_settings({"PROXY_URL": "[::1]:6000", "DEEPGRAM_FRAME_MS": "20", "LOG_LEVEL": "debug",
                       "MIX_MAX_LAG_MS": "0", "SUBSCRIBER_QUEUE": "5", "DEEPGRAM_CLOSE_TIMEOUT": "2.5"})
    assert (s.host, s.port, s.frame_ms, s.log_level, s.max_lag_ms, s.subscriber_queue, s.close_timeout) == (
        "::1", 6000, 20, "DEBUG", 0, 5, 2.5)


@pytest.mark.parametrize("env, variable", [
    ({"PROXY_URL": "localhost"}, "PROXY_URL"),
    ({"PROXY_URL": "0.0.0.0:99999"}, "PROXY_URL"),
    ({"PROXY_URL": ":5000"}, "PROXY_URL"),
    ({"DEEPGRAM_URL": "https://api.deepgram.com/v1/listen"}, "DEEPGRAM_URL"),
    ({"DEEPGRAM_URL": "wss://api.deepgram.com/v1/listen?encoding=linear16&sample_rate=8000&channels=2"}, "DEEPGRAM_URL"),
    ({"DEEPGRAM_URL": "wss://api.deepgram.com/v1/listen?encoding=mulaw&sample_rate=8000"}, "DEEPGRAM_URL"),
    ({"DEEPGRAM_FRAME_MS": "400"}, "DEEPGRAM_FRAME_MS"),
    ({"DEEPGRAM_FRAME_MS": "10"}, "DEEPGRAM_FRAME_MS"),
    ({"DEEPGRAM_FRAME_MS": "fast"}, "DEEPGRAM_FRAME_MS"),
    ({"MIX_MAX_LAG_MS": "-1"}, "MIX_MAX_LAG_MS"),
    ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
    ({"STT_ENGINE": "pocketsphinx"}, "STT_ENGINE"),  # removed: whisper replaced it
    ({"LOCAL_STT_MODEL": "/nonexistent/model"}, "LOCAL_STT_MODEL"),
    ({"STT_ENGINE": "deepgram"}, "DEEPGRAM_API_KEY"),
    ({"CERT_PEM": "/nonexistent.pem"}, "CERT_PEM"),
    ({"SUBSCRIBER_QUEUE": "0"}, "SUBSCRIBER_QUEUE"),
])
def test_bad_values_name_their_variable(env, variable):
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    assert caught.value.variable == variable
    assert str(caught.value).startswith(variable)


def test_cert_without_key_is_refused(tmp_path):
    cert = tmp_path / "cert.pem"
    cert.write_text("not a certificate")
    with pytest.raises(ConfigError) as caught:
        load_settings({"CERT_PEM": str(cert)})
    assert caught.value.variable == "KEY_PEM"
    with pytest.raises(ConfigError) as caught:
        load_settings({"CERT_PEM": str(cert), "KEY_PEM": str(cert)})
    assert caught.value.variable == "CERT_PEM"  # both given, but unusable


def test_server_exits_2_with_one_line_naming_the_variable(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DEEPGRAM_API_KEY", "STT_ENGINE")}
    env["DEEPGRAM_FRAME_MS"] = "5000"
    result = subprocess.run([sys.executable, str(ROOT / "server.py")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "DEEPGRAM_FRAME_MS" in lines[0]


def test_dotenv_file_is_read(tmp_path):
    (tmp_path / ".env").write_text("PROXY_URL=nonsense\n")
    env = {k: v for k, v in os.environ.items() if k != "PROXY_URL"}
    result = subprocess.run([sys.executable, str(ROOT / "server.py")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "PROXY_URL" in result.stderr


# --- security settings (README "Security") ----------------------------------------------------

TOKEN = "tok-0123456789abcdef"


def test_security_defaults_are_closed_limits_and_no_credentials():
    s = load_settings({})
    assert (s.twilio_auth_token, s.public_url, s.client_tokens, s.call_token) == (None, None, (), None)
    assert not s.allow_open_server
    assert (s.max_calls, s.max_subscribers, s.max_subscribers_per_call, s.max_subscriber_messages) == (500, 5000, 10, 100)
    assert (s.handshake_timeout, s.ping_interval, s.ping_timeout) == (10.0, 20.0, 20.0)
    assert s.max_message_bytes <= 65_536  # Twilio's frames are a few hundred bytes, not the library's 1 MiB


def test_security_values_are_read():
    s = load_settings({"TWILIO_AUTH_TOKEN": "abc", "PUBLIC_URL": "wss://proxy.example.com/",
                       "CLIENT_TOKENS": f" {TOKEN} , {TOKEN}2,", "CALL_TOKEN": TOKEN, "CALL_TOKEN_PARAM": "secret",
                       "MAX_CALLS": "5", "MAX_SUBSCRIBERS": "6", "MAX_SUBSCRIBERS_PER_CALL": "2",
                       "HANDSHAKE_TIMEOUT": "3", "PING_INTERVAL": "5", "PING_TIMEOUT": "7",
                       "MAX_SUBSCRIBER_MESSAGES": "0"})
    assert s.public_url == "wss://proxy.example.com"  # the route is appended to it
    assert s.client_tokens == (TOKEN, TOKEN + "2") and (s.call_token, s.call_token_param) == (TOKEN, "secret")
    assert (s.max_calls, s.max_subscribers, s.max_subscribers_per_call, s.max_subscriber_messages) == (5, 6, 2, 0)
    assert (s.handshake_timeout, s.ping_interval, s.ping_timeout) == (3.0, 5.0, 7.0)


def test_secrets_stay_out_of_the_settings_repr():
    s = load_settings({"TWILIO_AUTH_TOKEN": "twilio-secret", "PUBLIC_URL": "wss://p.example.com",
                       "CLIENT_TOKENS": TOKEN, "CALL_TOKEN": TOKEN + "c", "DEEPGRAM_API_KEY": "dg-secret"})
    assert not any(secret in repr(s) for secret in ("twilio-secret", TOKEN, "dg-secret"))


@pytest.mark.parametrize("env, variable", [
    ({"TWILIO_AUTH_TOKEN": "abc"}, "PUBLIC_URL"),  # nothing to check the signature against
    ({"PUBLIC_URL": "https://abc.ngrok.app"}, "PUBLIC_URL"),  # Twilio signs the wss:// form
    ({"PUBLIC_URL": "wss://proxy.example.com/?a=1"}, "PUBLIC_URL"),
    ({"CLIENT_TOKENS": "short"}, "CLIENT_TOKENS"),
    ({"CLIENT_TOKENS": f"{TOKEN},with space in it 123"}, "CLIENT_TOKENS"),
    ({"CALL_TOKEN": "short"}, "CALL_TOKEN"),
    ({"ALLOW_OPEN_SERVER": "maybe"}, "ALLOW_OPEN_SERVER"),
    ({"MAX_CALLS": "0"}, "MAX_CALLS"),
    ({"MAX_SUBSCRIBERS": "many"}, "MAX_SUBSCRIBERS"),
    ({"MAX_SUBSCRIBERS_PER_CALL": "0"}, "MAX_SUBSCRIBERS_PER_CALL"),
    ({"HANDSHAKE_TIMEOUT": "0"}, "HANDSHAKE_TIMEOUT"),
    ({"PING_INTERVAL": "0"}, "PING_INTERVAL"),
    ({"PING_TIMEOUT": "-1"}, "PING_TIMEOUT"),
    ({"MAX_SUBSCRIBER_MESSAGES": "-1"}, "MAX_SUBSCRIBER_MESSAGES"),
])
def test_bad_security_values_name_their_variable(env, variable):
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    assert caught.value.variable == variable


def test_a_rejected_token_is_not_quoted_in_the_error():
    with pytest.raises(ConfigError) as caught:
        load_settings({"CLIENT_TOKENS": f"{TOKEN},my secret token"})
    assert "#2" in str(caught.value) and "my secret token" not in str(caught.value)


@pytest.mark.parametrize("env, starts", [
    ({"PROXY_URL": "127.0.0.1:5000"}, True),  # loopback: the first local trial needs nothing
    ({"PROXY_URL": "[::1]:5000"}, True),
    ({"PROXY_URL": "localhost:5000"}, True),
    ({"PROXY_URL": "0.0.0.0:5000"}, False),
    ({"PROXY_URL": "[::]:5000"}, False),
    ({"PROXY_URL": "proxy.internal:5000"}, False),  # a name may resolve to anything
    ({"PROXY_URL": "0.0.0.0:5000", "CLIENT_TOKENS": TOKEN}, False),  # /twilio still open
    ({"PROXY_URL": "0.0.0.0:5000", "TWILIO_AUTH_TOKEN": "a", "PUBLIC_URL": "wss://p.example.com"}, False),
    ({"PROXY_URL": "0.0.0.0:5000", "TWILIO_AUTH_TOKEN": "a", "PUBLIC_URL": "wss://p.example.com",
      "CLIENT_TOKENS": TOKEN}, True),
    ({"PROXY_URL": "0.0.0.0:5000", "CALL_TOKEN": TOKEN, "CLIENT_TOKENS": TOKEN}, True),
    ({"PROXY_URL": "0.0.0.0:5000", "ALLOW_OPEN_SERVER": "true"}, True),
])
def test_a_non_loopback_address_needs_credentials_on_both_routes_or_an_explicit_opt_out(env, starts):
    if starts:
        load_settings(env)
    else:
        with pytest.raises(ConfigError) as caught:
            load_settings(env)
        assert caught.value.variable == "PROXY_URL" and "ALLOW_OPEN_SERVER" in str(caught.value)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_server_on_all_interfaces_without_credentials_exits_2_saying_what_to_set(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("TWILIO_AUTH_TOKEN", "CLIENT_TOKENS", "CALL_TOKEN", "ALLOW_OPEN_SERVER")}
    env.update(PROXY_URL=f"0.0.0.0:{_free_port()}", STT_ENGINE="deterministic")
    result = subprocess.run([sys.executable, str(ROOT / "server.py")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    for what in ("TWILIO_AUTH_TOKEN", "PUBLIC_URL", "CLIENT_TOKENS", "ALLOW_OPEN_SERVER=true"):
        assert what in result.stderr


def test_server_on_all_interfaces_starts_when_allowed_open(tmp_path):
    import signal
    import time
    import urllib.request

    port = _free_port()
    env = {**os.environ, "PROXY_URL": f"0.0.0.0:{port}", "STT_ENGINE": "deterministic",
           "AGENT_EMBEDDED_MODE": "deterministic", "ALLOW_OPEN_SERVER": "true"}
    process = subprocess.Popen([sys.executable, str(ROOT / "server.py")], cwd=tmp_path, env=env,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                    assert response.read() == b"ok\n"
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, "server did not start"
                time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()


# --- history and scaling out (README "Scaling out") ------------------------------------------------


def test_scaling_defaults_are_one_process_and_no_redis():
    s = load_settings({})
    assert (s.workers, s.redis_url, s.history_messages, s.history_seconds) == (1, None, 1000, 300.0)


def test_scaling_values_are_read_and_the_redis_password_is_kept_out_of_repr_and_logs():
    from config import redis_location, redis_password

    s = load_settings({"REDIS_URL": "rediss://:pa55-word-xyz@redis.internal:6380/2", "WORKERS": "4",
                       "HISTORY_MESSAGES": "50", "HISTORY_SECONDS": "30", "REDIS_BUFFER": "99",
                       "REDIS_HEARTBEAT_SECONDS": "0.5"})
    assert (s.workers, s.history_messages, s.history_seconds, s.redis_buffer, s.redis_heartbeat_seconds) == (
        4, 50, 30.0, 99, 0.5)
    assert "pa55-word-xyz" not in repr(s)
    assert redis_password(s.redis_url) == "pa55-word-xyz"
    assert redis_location(s.redis_url) == "rediss://redis.internal:6380/2"


@pytest.mark.parametrize("env, variable", [
    ({"WORKERS": "2"}, "WORKERS"),  # workers meet only through Redis
    ({"WORKERS": "0"}, "WORKERS"),
    ({"REDIS_URL": "http://redis:6379"}, "REDIS_URL"),
    ({"REDIS_URL": "redis://"}, "REDIS_URL"),
    ({"HISTORY_MESSAGES": "-1"}, "HISTORY_MESSAGES"),
    ({"REDIS_BUFFER": "0"}, "REDIS_BUFFER"),
    ({"REDIS_HEARTBEAT_SECONDS": "0"}, "REDIS_HEARTBEAT_SECONDS"),
])
def test_bad_scaling_values_name_their_variable(env, variable):
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    assert caught.value.variable == variable


def test_a_bad_redis_url_is_not_quoted_in_the_error():
    with pytest.raises(ConfigError) as caught:
        load_settings({"REDIS_URL": "htp://:hunter2-secret@redis:6379"})
    assert "hunter2-secret" not in str(caught.value)


def test_workers_without_redis_exit_2_saying_why(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"} | {"WORKERS": "2"}
    result = subprocess.run([sys.executable, str(ROOT / "server.py")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "configuration error: WORKERS: 2 workers need REDIS_URL: calls and subscribers of different workers "
        "meet only through Redis"]
