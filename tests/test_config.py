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
    assert s.engine == "pocketsphinx" and not s.tls


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
    ({"STT_ENGINE": "whisper"}, "STT_ENGINE"),
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
