"""The agent's settings: defaults, each variable's validation, placeholders."""

from __future__ import annotations

import json

import pytest

from agent.provider import fill_placeholders
from config import DEFAULT_AGENT_GREETING, DEFAULT_DEEPGRAM_AGENT_URL, ConfigError, load_settings


def test_defaults_pick_the_embedded_agent_without_a_key_and_deepgram_with_one():
    s = load_settings({})
    assert (s.agent_provider, s.agent_backend, s.deepgram_agent_url) == ("auto", "embedded", DEFAULT_DEEPGRAM_AGENT_URL)
    assert s.agent_greeting == DEFAULT_AGENT_GREETING and "end_call" in s.agent_prompt
    assert (s.agent_tool_timeout, s.agent_end_call_wait, s.agent_provider_settings) == (5.0, 10.0, {})
    assert list(s.agent_tools.tools) == ["end_call"]
    assert load_settings({"DEEPGRAM_API_KEY": "k"}).agent_backend == "deepgram"
    assert load_settings({"DEEPGRAM_API_KEY": "k", "AGENT_PROVIDER": "embedded"}).agent_backend == "embedded"


def test_values_are_read(tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("You work for {tenant}.\n")
    extra = tmp_path / "agent.json"
    extra.write_text(json.dumps({"agent": {"speak": {"provider": {"type": "deepgram", "model": "aura-2-zeus-en"}}}}))
    s = load_settings({"AGENT_PROMPT_FILE": str(prompt), "AGENT_GREETING": "Hi {name}!",
                       "AGENT_SETTINGS_FILE": str(extra), "AGENT_TOOL_TIMEOUT": "1.5",
                       "AGENT_END_CALL_WAIT": "3", "DEEPGRAM_AGENT_URL": "ws://127.0.0.1:9/v1/agent/converse"})
    assert (s.agent_prompt, s.agent_greeting, s.agent_tool_timeout, s.agent_end_call_wait) == (
        "You work for {tenant}.", "Hi {name}!", 1.5, 3.0)
    assert s.agent_provider_settings["agent"]["speak"]["provider"]["model"] == "aura-2-zeus-en"
    assert s.deepgram_agent_url == "ws://127.0.0.1:9/v1/agent/converse"


@pytest.mark.parametrize("env, variable", [
    ({"AGENT_PROVIDER": "azure"}, "AGENT_PROVIDER"),
    ({"AGENT_PROVIDER": "openai"}, "OPENAI_API_KEY"),
    ({"OPENAI_REALTIME_URL": "https://api.openai.com/v1/realtime"}, "OPENAI_REALTIME_URL"),
    ({"AGENT_VOICE": "marin <b>"}, "AGENT_VOICE"),
    ({"OPENAI_TURN_DETECTION": "none"}, "OPENAI_TURN_DETECTION"),
    ({"OPENAI_TURN_DETECTION": '{"type": "semantic_vad", "eagerness": "low"'}, "OPENAI_TURN_DETECTION"),
    ({"AGENT_ALLOWED_PROVIDERS": "openai,embedded"}, "AGENT_ALLOWED_PROVIDERS"),  # no OpenAI key
    ({"AGENT_ALLOWED_PROVIDERS": "embedded,watson"}, "AGENT_ALLOWED_PROVIDERS"),
    ({"TRANSFER_TARGETS": "+15550001111"}, "TRANSFER_TARGETS"),
    ({"TRANSFER_TARGETS": '{"+1 555 0001111": "sales"}'}, "TRANSFER_TARGETS"),
    ({"TRANSFER_TARGETS": '{"sip:a@b.com<Hangup/>": "sales"}'}, "TRANSFER_TARGETS"),
    ({"TRANSFER_TARGETS": '{"+15550001111": ""}'}, "TRANSFER_TARGETS"),
    ({"AGENT_PRECONNECT_SECONDS": "-1"}, "AGENT_PRECONNECT_SECONDS"),
    ({"REQUIRE_WEBHOOK_TOKEN": "maybe"}, "REQUIRE_WEBHOOK_TOKEN"),
    ({"AGENT_PROVIDER": "deepgram"}, "DEEPGRAM_API_KEY"),
    ({"DEEPGRAM_AGENT_URL": "https://agent.deepgram.com/v1/agent/converse"}, "DEEPGRAM_AGENT_URL"),
    ({"AGENT_PROMPT": "a", "AGENT_PROMPT_FILE": "/etc/hostname"}, "AGENT_PROMPT_FILE"),
    ({"AGENT_PROMPT_FILE": "/nonexistent/prompt.txt"}, "AGENT_PROMPT_FILE"),
    ({"AGENT_SETTINGS_FILE": "/nonexistent/agent.json"}, "AGENT_SETTINGS_FILE"),
    ({"AGENT_TOOL_TIMEOUT": "0"}, "AGENT_TOOL_TIMEOUT"),
    ({"AGENT_END_CALL_WAIT": "soon"}, "AGENT_END_CALL_WAIT"),
    ({"AGENT_TOOLS": "/nonexistent/tools.py"}, "AGENT_TOOLS"),
])
def test_bad_values_name_their_variable(env, variable):
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    assert caught.value.variable == variable


@pytest.mark.parametrize("env, backend, allowed", [
    ({}, "embedded", ("embedded",)),
    ({"OPENAI_API_KEY": "sk-o"}, "openai", ("openai",)),
    ({"DEEPGRAM_API_KEY": "dg", "OPENAI_API_KEY": "sk-o"}, "deepgram", ("deepgram", "openai")),
    ({"DEEPGRAM_API_KEY": "dg", "OPENAI_API_KEY": "sk-o", "AGENT_PROVIDER": "openai"}, "openai",
     ("deepgram", "openai")),
    ({"DEEPGRAM_API_KEY": "dg", "AGENT_ALLOWED_PROVIDERS": "deepgram,embedded"}, "deepgram",
     ("deepgram", "embedded")),
    ({"DEEPGRAM_API_KEY": "dg", "OPENAI_API_KEY": "sk-o", "AGENT_ALLOWED_PROVIDERS": "openai"}, "deepgram",
     ("openai",)),
])
def test_auto_picks_deepgram_then_openai_then_embedded_and_calls_may_pick_among_those_with_keys(env, backend,
                                                                                               allowed):
    s = load_settings(env)
    assert (s.agent_backend, s.agent_allowed_providers) == (backend, allowed)


def test_openai_settings_are_read():
    s = load_settings({"OPENAI_API_KEY": "sk-o", "OPENAI_REALTIME_URL": "ws://127.0.0.1:9/v1/realtime?model=x",
                       "AGENT_VOICE": "cedar", "OPENAI_TURN_DETECTION": '{"type": "semantic_vad", "eagerness": "low"}',
                       "TRANSFER_TARGETS": '{"+15550001111": "sales", "sip:help@pbx.example.com;transport=tls": "help"}',
                       "AGENT_PRECONNECT_SECONDS": "0", "REQUIRE_WEBHOOK_TOKEN": "true"})
    assert (s.openai_realtime_url, s.agent_voice, dict(s.openai_turn_detection)) == (
        "ws://127.0.0.1:9/v1/realtime?model=x", "cedar", {"type": "semantic_vad", "eagerness": "low"})
    assert list(s.transfer_targets) == ["+15550001111", "sip:help@pbx.example.com;transport=tls"]
    assert (s.agent_preconnect_seconds, s.require_webhook_token) == (0.0, True)
    assert "sk-o" not in repr(s)
    assert dict(load_settings({"OPENAI_TURN_DETECTION": "semantic_vad"}).openai_turn_detection) == {
        "type": "semantic_vad"}


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_a_settings_file_must_hold_a_json_object(tmp_path, content):
    path = tmp_path / "agent.json"
    path.write_text(content)
    with pytest.raises(ConfigError) as caught:
        load_settings({"AGENT_SETTINGS_FILE": str(path)})
    assert caught.value.variable == "AGENT_SETTINGS_FILE"


def test_placeholders_are_filled_and_a_missing_one_is_left_as_written():
    text = 'Hello {name}, you called {tenant}. Reply as JSON like {"ok": true} or {0}. {name}!'
    filled, missing = fill_placeholders(text, {"name": "Ada"})
    assert filled == 'Hello Ada, you called {tenant}. Reply as JSON like {"ok": true} or {0}. Ada!'
    assert missing == ["tenant"]
