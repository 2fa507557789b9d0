"""The embedded agent's parts without sockets: protocol parsing and building, voice activity,
the deterministic recogniser, sentences and voices, the built-in responder, bounded queues and
settings. Property tests (hypothesis) where a rule must hold for every input.
"""

from __future__ import annotations

import asyncio
import json
import os
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import codec
from agent import server_protocol as p
from agent.brain import END_CALL, GOODBYE_REPLY, OFFLINE_REPLY, Conversation, OfflineResponder
from agent.embedded_session import Close, Outbox, OutboxFull, Say, TurnQueue
from agent.listen import (
    FRAME_BYTES, Arrivals, ChecksumEngine, EnergyClassifier, SpeechGate, VoiceActivity, WebRtcClassifier,
)
from agent.voice import FliteVoice, VoiceError, split_sentences, tone_speech
from agent_client import END_CALL as END_CALL_SPEC
from agent_client import settings_message, validate_client_message, validate_server_message
from config import ConfigError, load_settings
from local_stt import parse_deterministic
from speech import require_program, speak

LOUD = np.random.default_rng(7).integers(0, 0x7F, FRAME_BYTES, dtype=np.uint8).tobytes()
QUIET = b"\xff" * FRAME_BYTES


# --- Protocol: what clients send ------------------------------------------------------------


def test_settings_keeps_prompt_functions_and_greeting():
    message = settings_message(greeting="Hi.", prompt="Be kind.", functions=[END_CALL_SPEC])
    validate_client_message(message)
    parsed = p.parse_client_message(json.dumps(message))
    assert parsed == p.Settings(p.AgentConfig(
        prompt="Be kind.",
        functions=(p.Function("end_call", END_CALL_SPEC["description"], END_CALL_SPEC["parameters"]),),
        greeting="Hi.",
    ))


def test_server_side_functions_are_named_not_offered():
    message = settings_message(functions=[END_CALL_SPEC, {"name": "crm_lookup", "description": "d",
                                                          "endpoint": {"url": "https://crm.example", "method": "post"}}])
    validate_client_message(message)
    config = p.parse_client_message(json.dumps(message)).config
    assert [f.name for f in config.functions] == ["end_call"] and config.skipped_functions == ("crm_lookup",)


def test_settings_think_list_uses_the_first_provider():
    message = settings_message(prompt="first")
    message["agent"]["think"] = [message["agent"]["think"], {"provider": {"type": "open_ai", "model": "x"},
                                                             "prompt": "fallback"}]
    validate_client_message(message)
    assert p.parse_client_message(json.dumps(message)).config.prompt == "first"


@pytest.mark.parametrize("message, kind", [
    ({"type": "KeepAlive"}, p.KeepAlive()),
    ({"type": "InjectUserMessage", "content": "The caller pressed 5"}, p.InjectUserMessage("The caller pressed 5")),
    ({"type": "InjectAgentMessage", "message": "One moment."}, p.InjectAgentMessage("One moment.", "default")),
    ({"type": "InjectAgentMessage", "message": "Now.", "behavior": "interrupt"}, p.InjectAgentMessage("Now.", "interrupt")),
    ({"type": "UpdatePrompt", "prompt": "Also offer a callback."}, p.UpdatePrompt("Also offer a callback.")),
    ({"type": "UpdateThink", "think": {"provider": {"type": "open_ai", "model": "x"}, "prompt": "New."}},
     p.UpdateThink("New.", ())),
    ({"type": "FunctionCallResponse", "id": "fc_1", "name": "f", "content": "{}"}, p.FunctionCallResponse("fc_1", "f", "{}")),
    ({"type": "FunctionCallResponse", "name": "f", "content": "{}"}, p.FunctionCallResponse(None, "f", "{}")),
    ({"type": "ForceEndTurn"}, p.ForceEndTurn()),
    ({"type": "UpdateSpeak", "speak": {"provider": {"type": "deepgram", "model": "aura-2-andromeda-en"}}},
     p.Unsupported("UpdateSpeak")),
])
def test_client_messages(message, kind):
    validate_client_message(message)  # what the test sends is the real protocol
    assert p.parse_client_message(json.dumps(message)) == kind


def _with(agent_changes: dict | None = None, **output) -> str:
    message = settings_message()
    message["agent"].update(agent_changes or {})
    message["audio"]["output"] = {**message["audio"]["output"], **output}
    return json.dumps(message)


@pytest.mark.parametrize("text, code", [
    ("{", p.UNPARSABLE_CLIENT_MESSAGE),
    ('"KeepAlive"', p.UNPARSABLE_CLIENT_MESSAGE),
    ('{"type": 3}', p.UNPARSABLE_CLIENT_MESSAGE),
    ('{"type": "Hello"}', p.UNPARSABLE_CLIENT_MESSAGE),
    ('{"type": "InjectUserMessage"}', p.UNPARSABLE_CLIENT_MESSAGE),
    ('{"type": "InjectAgentMessage", "message": "x", "behavior": "shout"}', p.UNPARSABLE_CLIENT_MESSAGE),
    ('{"type": "FunctionCallResponse", "id": 1, "name": "f", "content": "x"}', p.UNPARSABLE_CLIENT_MESSAGE),
    ('{"type": "Settings"}', p.UNPARSABLE_CLIENT_MESSAGE),
    (_with(encoding="linear16"), p.INVALID_SETTINGS),
    (_with(sample_rate=16000), p.INVALID_SETTINGS),
    (_with(container="ogg"), p.INVALID_SETTINGS),
    (_with({"greeting": 5}), p.INVALID_SETTINGS),
    (_with({"think": "gpt"}), p.INVALID_SETTINGS),
    (_with({"think": {"prompt": 5}}), p.INVALID_SETTINGS),
    (_with({"think": {"functions": [{"name": "has space"}]}}), p.INVALID_SETTINGS),
    (_with({"think": {"functions": [END_CALL_SPEC, END_CALL_SPEC]}}), p.INVALID_SETTINGS),
    (json.dumps({**settings_message(), "agent": "stored-agent-id"}), p.INVALID_SETTINGS),
])
def test_unusable_messages_have_deepgram_codes(text, code):
    with pytest.raises(p.ProtocolError) as refused:
        p.parse_client_message(text)
    assert refused.value.code == code and refused.value.description


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.sampled_from(
        ["input", "output", "encoding", "sample_rate", "container", "think", "prompt", "functions", "name",
         "greeting", "endpoint", "mulaw"]), children, max_size=3),
    max_leaves=10,
)
message_types = st.sampled_from([
    "Settings", "KeepAlive", "InjectUserMessage", "InjectAgentMessage", "UpdatePrompt", "UpdateThink",
    "FunctionCallResponse", "ForceEndTurn", "UpdateSpeak", "Other",
])


@given(st.dictionaries(st.sampled_from(["content", "message", "behavior", "prompt", "think", "id", "name",
                                        "audio", "agent"]), json_values), message_types)
def test_any_json_is_a_message_or_a_protocol_error(fields, kind):
    try:
        p.parse_client_message(json.dumps({**fields, "type": kind}))
    except p.ProtocolError as exc:
        assert exc.code in (p.UNPARSABLE_CLIENT_MESSAGE, p.INVALID_SETTINGS)


# --- Protocol: what the server sends --------------------------------------------------------


@pytest.mark.parametrize("text", [
    p.welcome("0d9c6f9e-2b5c-4f2a-9d1e-0c3b7a1f5e11"),
    p.settings_applied(),
    p.conversation_text("user", "hello"),
    p.conversation_text("assistant", "hi"),
    p.user_started_speaking(),
    p.agent_thinking("offline demo responder"),
    p.agent_started_speaking(0.5, 0.1, 0.2),
    p.agent_audio_done(),
    p.latency_report(stt_latency=0.3, ttt_text_latency=0.1, tts_latency=0.05, total_latency=0.5),
    p.latency_report(ttt_tool_latency=0.1, tts_latency=None),
    p.function_call_request([p.FunctionCall("fc_1", "end_call", "{}"), p.FunctionCall("fc_2", "f", '{"a": 1}')]),
    p.prompt_updated(),
    p.think_updated(),
    p.injection_refused("busy"),
    p.warning(p.THINK_REQUEST_FAILED, "down"),
    p.error(p.CLIENT_MESSAGE_TIMEOUT, "quiet"),
])
def test_server_messages_match_the_sdk_models(text):
    model = validate_server_message(text)
    assert json.loads(text)["type"] == model.type


# --- Voice activity -------------------------------------------------------------------------


votes = st.lists(st.booleans(), max_size=300)


@given(votes, st.integers(1, 5), st.integers(1, 20))
def test_speech_gate_events_follow_runs_of_votes(sequence, onset, hangover):
    gate = SpeechGate(onset, hangover)
    in_speech = False
    for i, voiced in enumerate(sequence):
        event = gate.step(voiced)
        needed, wanted = (hangover, False) if in_speech else (onset, True)
        run = sequence[max(0, i - needed + 1) : i + 1]
        # An event exactly when the last `needed` votes all disagree with the state (and not earlier).
        flips = len(run) == needed and all(v == wanted for v in run)
        assert (event is not None) == flips, (i, sequence[: i + 1])
        if event is not None:
            in_speech = not in_speech
            assert event == ("start" if in_speech else "stop")


frames = st.lists(st.booleans(), min_size=1, max_size=80)


@settings(max_examples=50)
@given(frames, st.lists(st.integers(1, 500), min_size=1, max_size=10))
def test_voice_activity_does_not_depend_on_chunk_sizes(loud_frames, sizes):
    stream = b"".join(LOUD if loud else QUIET for loud in loud_frames)
    whole = VoiceActivity(EnergyClassifier(), SpeechGate()).feed(stream)
    chunked_detector = VoiceActivity(EnergyClassifier(), SpeechGate())
    chunked, position, i = [], 0, 0
    while position < len(stream):
        chunked += chunked_detector.feed(stream[position : position + sizes[i % len(sizes)]])
        position += sizes[i % len(sizes)]
        i += 1
    assert chunked == whole
    for event in whole:  # a start names the first loud frame of its run, a stop the first quiet one
        assert loud_frames[event.frame] == (event.kind == "start")


def test_webrtc_vad_hears_speech_not_silence():
    speech = speak("the quick brown fox jumps over the lazy dog", "flite")
    pcm = codec.ulaw_to_pcm16(speech[: len(speech) // FRAME_BYTES * FRAME_BYTES]).tobytes()
    classifier = WebRtcClassifier()
    votes_ = [classifier.is_speech(pcm[i : i + 320]) for i in range(0, len(pcm), 320)]
    assert sum(votes_) > len(votes_) / 2
    silence = codec.ulaw_to_pcm16(b"\xff" * 8000).tobytes()
    assert not any(classifier.is_speech(silence[i : i + 320]) for i in range(0, len(silence), 320))


# --- The deterministic recogniser -----------------------------------------------------------


def _run_engine(stream: bytes, sizes: list[int], **options) -> list:
    segments: list = []
    engine = ChecksumEngine(0, segments.append, **options)
    position, i = 0, 0
    while position < len(stream):
        engine.feed(stream[position : position + sizes[i % len(sizes)]])
        position += sizes[i % len(sizes)]
        i += 1
    asyncio.run(engine.finalize())
    return segments


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30)), min_size=1, max_size=6),
       st.lists(st.integers(1, 700), min_size=1, max_size=5))
def test_checksum_engine_names_exactly_the_loud_frames(pattern, sizes):
    """Runs of quiet and loud frames: each utterance is the loud run's bytes, whatever the chunking."""
    stream, runs = b"", []
    for quiet, loud in pattern:
        stream += QUIET * (quiet + 16)  # longer than the hangover: utterances stay apart
        if loud >= 3:  # the onset: shorter bursts are clicks, not speech
            runs.append((len(stream), len(stream) + loud * FRAME_BYTES))
        stream += LOUD * loud if loud >= 3 else QUIET * loud
    segments = _run_engine(stream, sizes)
    named = [parse_deterministic(s.transcript) for s in segments]
    assert [(n.start_byte, n.end_byte) for n in named] == runs
    assert all(n.crc == zlib.crc32(stream[n.start_byte : n.end_byte]) for n in named)
    assert all(s.speech_final and s.is_final for s in segments)


def test_checksum_engine_cuts_long_speech_and_finalizes():
    stream = LOUD * 200  # 4 s of speech, never ending
    segments = _run_engine(stream, [1000], max_utterance_seconds=1.5)
    assert [(s.start, s.duration, s.speech_final, s.from_finalize) for s in segments] == [
        (0.0, 1.5, False, False), (1.5, 1.5, False, False), (3.0, 1.0, True, True),
    ]


def test_arrivals_say_when_a_byte_came():
    arrivals = Arrivals(limit=3)
    for n, t in [(100, 1.0), (100, 2.0), (100, 3.0), (100, 4.0)]:
        arrivals.add(n, t)
    assert [arrivals.time_of(e) for e in (100, 150, 300, 301, 400, 401)] == [None, 2.0, 3.0, 4.0, 4.0, None]


# --- Sentences and voices -------------------------------------------------------------------


@given(st.text(alphabet=st.sampled_from("ab .!?\n\t"), max_size=80))
def test_sentences_give_the_text_back(text):
    sentences = split_sentences(text)
    assert " ".join(sentences) == " ".join(text.split())
    assert all(s and s == s.strip() for s in sentences)


@given(st.text(max_size=60))
def test_tone_speech_is_50_ms_per_character(text):
    audio = tone_speech(text)
    assert audio == tone_speech(text)
    assert len(audio) == 400 * len(" ".join("".join(c if c >= " " and c != "\x7f" else " " for c in text).split()))


async def test_flite_speaks_8khz_mulaw():
    require_program("flite")
    audio = await FliteVoice().synthesize("Hello, this is the offline demo agent.")
    assert 1.0 < len(audio) / 8000 < 5.0
    pcm = codec.ulaw_to_pcm16(audio).astype(np.int32)
    assert np.abs(pcm).mean() > 300, "speech, not silence"


async def test_voice_failures_are_voice_errors(tmp_path):
    with pytest.raises(VoiceError, match="status 1"):
        await FliteVoice(program="false").synthesize("hello")
    with pytest.raises(VoiceError, match="cannot run"):
        await FliteVoice(program=str(tmp_path / "missing")).synthesize("hello")
    slow = tmp_path / "slow-flite"
    pid_file = tmp_path / "pid"
    slow.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 30\n")
    slow.chmod(0o755)
    with pytest.raises(VoiceError, match="more than"):
        await FliteVoice(program=str(slow), timeout=0.5).synthesize("hello")
    with pytest.raises(ProcessLookupError):  # killed, not left running
        os.kill(int(pid_file.read_text()), 0)


# --- The built-in responder -----------------------------------------------------------------


def _think(conversation: Conversation):
    return asyncio.run(OfflineResponder().think(conversation))


def test_offline_responder_repeats_and_says_goodbye():
    end_call = p.Function(END_CALL, "hang up", {"type": "object", "properties": {}})
    conversation = Conversation("prompt", (end_call,))
    conversation.add_user("I would like a pizza.")
    assert _think(conversation).text == OFFLINE_REPLY.format(text="I would like a pizza")
    conversation.add_user("Thanks, goodbye!")
    thought = _think(conversation)
    assert thought.text == GOODBYE_REPLY and [c.name for c in thought.calls] == [END_CALL]
    conversation.add_assistant(thought.text, thought.calls)
    conversation.add_result(thought.calls[0].id, "ok")
    assert _think(conversation).text == "" and not _think(conversation).calls
    no_end_call = Conversation("", ())
    no_end_call.add_user("bye")
    assert _think(no_end_call).calls == ()


def test_conversation_in_chat_format():
    conversation = Conversation("Be brief.", ())
    conversation.add_user("hi")
    conversation.add_assistant("")  # nothing said (a barge-in before the first sentence): nothing kept
    call = p.FunctionCall("c1", "f", "{}")
    conversation.add_assistant("", (call,))
    conversation.add_result("c1", "done")
    assert conversation.chat() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "done"},
    ]


# --- Bounded queues -------------------------------------------------------------------------


async def test_outbox_order_barge_in_and_bounds():
    outbox = Outbox(limit=6, audio_limit=2)
    outbox.put_event("a")
    await outbox.put_audio(b"1")
    await outbox.put_audio(b"2")
    third = asyncio.create_task(outbox.put_audio(b"3"))
    await asyncio.sleep(0.01)
    assert not third.done(), "audio waits for room"
    assert await outbox.get() == "a" and await outbox.get() == b"1"
    await asyncio.wait_for(third, 1)
    outbox.put_event("b")
    outbox.drop_audio()  # barge-in: the audio goes, the events stay in order
    outbox.put_event("c")
    assert [await outbox.get(), await outbox.get()] == ["b", "c"]
    for i in range(6):
        outbox.put_event(str(i))
    with pytest.raises(OutboxFull):
        outbox.put_event("too many")


async def test_outbox_close_sends_what_is_queued_then_closes():
    outbox = Outbox(limit=10, audio_limit=10)
    await outbox.put_audio(b"unsent")
    outbox.put_event("Error")
    outbox.close(1008, "CODE")
    outbox.put_event("after")
    await outbox.put_audio(b"after")
    assert [await outbox.get(), await outbox.get()] == ["Error", Close(1008, "CODE")]


async def test_turn_queue_front_and_limit():
    turns = TurnQueue(limit=2)
    assert turns.push(Say("queued")) and turns.push(Say("first"), front=True)
    assert not turns.push(Say("one too many"))
    assert [await turns.pop(), await turns.pop()] == [Say("first"), Say("queued")]


# --- Settings -------------------------------------------------------------------------------


def test_agent_settings_from_the_environment():
    settings = load_settings({"AGENT_LLM_URL": "http://127.0.0.1:11434/v1", "AGENT_LLM_MODEL": "llama3.2",
                              "AGENT_LLM_API_KEY": "sk-secret", "AGENT_LLM_TIMEOUT": "8",
                              "AGENT_EMBEDDED_MODE": "Deterministic"})
    assert (settings.agent_llm_url, settings.agent_llm_model, settings.agent_llm_timeout,
            settings.agent_embedded_mode) == ("http://127.0.0.1:11434/v1", "llama3.2", 8.0, "deterministic")
    assert "sk-secret" not in repr(settings)
    defaults = load_settings({})
    assert (defaults.agent_embedded_mode, defaults.agent_llm_url) == ("live", None)


@pytest.mark.parametrize("env, variable", [
    ({"AGENT_EMBEDDED_MODE": "fast"}, "AGENT_EMBEDDED_MODE"),
    ({"AGENT_LLM_URL": "127.0.0.1:11434", "AGENT_LLM_MODEL": "m"}, "AGENT_LLM_URL"),
    ({"AGENT_LLM_URL": "http://127.0.0.1:11434/v1"}, "AGENT_LLM_MODEL"),
    ({"AGENT_LLM_TIMEOUT": "0"}, "AGENT_LLM_TIMEOUT"),
])
def test_bad_agent_settings_name_the_variable(env, variable):
    with pytest.raises(ConfigError) as error:
        load_settings(env)
    assert error.value.variable == variable
