"""The embedded agent end to end: simulated caller -> /agent -> the server's own embedded agent.

No fake here: the server starts `agent.embedded.EmbeddedAgent` itself (AGENT_PROVIDER=embedded),
and the Deepgram provider talks to it as it would to Deepgram, which is what `make run` does with
no key. Once in deterministic mode, where every step is exact (the agent names what it heard by
the checksum of the caller's bytes and speaks in tones), and once with the real recogniser
(Whisper) and voice (flite): the caller speaks, the agent answers, and a goodbye ends the call.
"""

from __future__ import annotations

import re
import zlib

import pytest

import whisper_stt
from agent.voice import tone_speech
from config import DEFAULT_AGENT_GREETING
from local_stt import parse_deterministic
from simulate import run_agent_call
from speech import speak
from test_agent import events_of, of_type, quiet, subscriber, tone


def words_of(text: str) -> set[str]:
    return set(re.findall(r"[a-z']+", text.lower()))


async def test_deterministic_embedded_agent_hears_answers_is_interrupted_and_takes_keys(stacks):
    stack = await stacks(agent_provider="embedded", agent_embedded_mode="deterministic")
    listener = await subscriber(stack)
    # The greeting (1.6 s of tones), an utterance, then the caller talks over the reply (5 s long).
    caller = quiet(2.5) + tone(0.8) + quiet(1.6) + tone(0.6) + quiet(10.0)
    result = await run_agent_call(stack.url("/agent"), caller, dtmf=[(9.0, "5")], tail=2.0, max_seconds=40)

    assert result.violations == [] and result.error is None
    # The greeting is spoken sentence by sentence, each in the deterministic voice's tones.
    assert tone_speech("Hello!") in result.heard and tone_speech("How can I help you today?") in result.heard
    events = await events_of(listener, result.call_sid, timeout=20)
    started = events[0]
    assert (started["type"], started["mode"], started["provider"]) == ("call_started", "agent", "embedded")

    lines = of_type(events, "conversation")
    users = [e["text"] for e in lines if e["role"] == "user"]
    # The agent heard exactly the caller's bytes: its transcript is their checksum.
    first = parse_deterministic(users[0])
    start, end = round(first.start_ms * 8), round(first.end_ms * 8)
    assert 2.4 * 8000 <= start <= 2.6 * 8000 and zlib.crc32(caller[start:end]) == first.crc
    agent_lines = [e for e in lines if e["role"] == "agent"]
    assert agent_lines[0]["text"] == DEFAULT_AGENT_GREETING
    first_user = next(i for i, e in enumerate(lines) if e["role"] == "user")
    answer = next(e for e in lines[first_user:] if e["role"] == "agent")  # the reply to it
    # The caller spoke over that answer: Twilio was cleared, and the line says what was heard.
    assert result.clears and of_type(events, "barge_in")
    assert answer["interrupted"] is True and answer["heardEstimated"] is True
    assert 0 < answer["heardSeconds"] < answer["audioSeconds"]
    # The key reached the agent as the caller's words, and subscribers saw it.
    assert [e["digit"] for e in of_type(events, "dtmf")] == ["5"]
    assert any("5" in text and "pressed" in text for text in users[1:])
    ended = of_type(events, "call_ended")[0]
    assert ended["agent"]["provider"] == "embedded" and ended["agent"]["bargeIns"] >= 1
    assert ended["agent"]["turns"] >= 2 and ended["agent"]["providerErrors"] == 0


@pytest.mark.slow
async def test_live_embedded_agent_with_whisper_and_flite_answers_and_hangs_up_on_goodbye(stacks):
    stack = await stacks(agent_provider="embedded", agent_embedded_mode="live")
    listener = await subscriber(stack)
    question = "what time do you open tomorrow morning"
    caller = (quiet(4.0) + speak(question, "espeak") + quiet(9.0) + speak("thank you, goodbye", "espeak")
              + quiet(15.0))
    result = await run_agent_call(stack.url("/agent"), caller, tail=6.0, max_seconds=60)

    assert result.violations == [] and result.error is None
    assert result.closed_by_server, "end_call closed the stream after the goodbye"
    events = await events_of(listener, result.call_sid, timeout=20)
    users = [e["text"] for e in of_type(events, "conversation") if e["role"] == "user"]
    assert len(words_of(users[0]) & words_of(question)) >= 4, users
    assert any("goodbye" in words_of(text) for text in users), users
    assert [e["name"] for e in of_type(events, "tool_call")] == ["end_call"]
    ended = of_type(events, "call_ended")[0]
    assert ended["endOfCall"] == "end_call"
    # What the caller heard is speech: the recogniser finds the greeting's and the answer's words in it.
    segments = []
    engine = whisper_stt.engine_factory(0, segments.append)
    engine.feed(bytes(result.heard))
    await engine.finalize()
    await engine.aclose()
    heard = words_of(" ".join(s.transcript for s in segments))
    assert len(heard & words_of(DEFAULT_AGENT_GREETING)) >= 3, heard
    assert len(heard & {"offline", "demo", "repeat", "understood", "heard"}) >= 3, heard
    assert {"goodbye", "thank"} <= heard, heard
