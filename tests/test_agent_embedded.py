"""The embedded agent over real sockets on 127.0.0.1, as a Deepgram Voice Agent V1 client sees it.

Every message the server sends and every message these tests send is validated against the
`deepgram-sdk` models (`agent_client.AgentClient`). Most tests run the deterministic mode: the
caller's "speech" is loud noise, recognised as a checksum of exactly the bytes the agent heard,
and the agent speaks in tones (`voice.tone_speech`), so what it says can be compared byte for
byte. `test_live_recogniser_and_flite` runs the real recogniser and flite once.
"""

from __future__ import annotations

import asyncio
import json
import re
import zlib

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from agent import server_protocol as p
from agent.brain import GOODBYE_REPLY, OFFLINE_REPLY
from agent.embedded import EmbeddedAgent
from agent.embedded_session import APOLOGY, Tuning
from agent.voice import FliteVoice, split_sentences, tone_speech
from agent_client import END_CALL, AgentClient, FakeLLM, Reply, completion, settings_message
from config import Settings
from local_stt import parse_deterministic
from speech import speak

KEY = "embedded-agent-test-key"
FRAME = 160
SILENCE = b"\xff"
FAST = Tuning(output_lead=60.0)  # replies sent at once: most tests need not wait for real time


def noise(seconds: float, seed: int) -> bytes:
    """Loud "speech" for the energy detector: whole 20 ms frames of random mu-law."""
    frames = round(seconds * 50)
    return np.random.default_rng(seed).integers(0, 0x7F, frames * FRAME, dtype=np.uint8).tobytes()


def spoken(text: str) -> bytes:
    """What the deterministic voice says for `text`, sentence by sentence."""
    return b"".join(tone_speech(s) for s in split_sentences(text))


@pytest.fixture
async def agents():
    """Factory: `await agents(**settings, tuning=..., engine_factory=..., voice=...)`; all stopped afterwards."""
    running: list[EmbeddedAgent] = []

    async def make(*, tuning: Tuning = FAST, engine_factory=None, voice=None, **settings) -> EmbeddedAgent:
        values = {"agent_embedded_mode": "deterministic", **settings}
        agent = EmbeddedAgent("127.0.0.1", 0, KEY, Settings(**values), engine_factory=engine_factory,
                              voice=voice, tuning=tuning)
        await agent.start()
        running.append(agent)
        return agent

    yield make
    for agent in running:
        await agent.stop()


async def connected(agent: EmbeddedAgent, **settings) -> AgentClient:
    """A client past Welcome and SettingsApplied."""
    client = await AgentClient.open(agent.url, KEY)
    await client.wait_for("Welcome")
    await client.send(settings_message(**settings))
    await client.wait_for("SettingsApplied")
    return client


# --- Handshake ------------------------------------------------------------------------------


@pytest.mark.parametrize("path, headers, status", [
    ("/v1/agent/converse", {}, 401),
    ("/v1/agent/converse", {"Authorization": "Token wrong-key"}, 401),
    ("/v1/agent/converse", {"Authorization": f"Bearer {KEY}"}, 401),
    ("/v1/listen", {"Authorization": f"Token {KEY}"}, 404),
    ("/agent", {"Authorization": f"Token {KEY}"}, 404),
])
async def test_handshake_refused_before_upgrade(agents, path, headers, status):
    agent = await agents()
    with pytest.raises(InvalidStatus) as refused:
        await connect(f"ws://127.0.0.1:{agent.port}{path}", additional_headers=headers)
    assert refused.value.response.status_code == status
    assert len(agent.sessions) == 0


async def test_welcome_carries_a_fresh_request_id(agents):
    agent = await agents()
    first, second = await AgentClient.open(agent.url, KEY), await AgentClient.open(agent.url, KEY)
    ids = [(await c.wait_for("Welcome"), c.received[0].message.request_id)[1] for c in (first, second)]
    assert ids[0] != ids[1] and [s.request_id for s in agent.sessions] == ids
    await first.close(), await second.close()


# --- Greeting and a turn --------------------------------------------------------------------


async def test_greeting_then_a_turn_byte_exact(agents):
    agent = await agents()
    greeting = "Hello there. This is the test agent."
    client = await connected(agent, greeting=greeting)
    done = await client.wait_for("AgentAudioDone")
    assert client.types(end=done + 1) == [
        "Welcome", "SettingsApplied", "ConversationText", "AgentStartedSpeaking", "audio",
        "ConversationText", "audio", "AgentAudioDone",
    ]
    assert [m.content for m in client.messages("ConversationText")] == split_sentences(greeting)
    assert {m.role for m in client.messages("ConversationText")} == {"assistant"}
    assert client.audio() == spoken(greeting)

    # The caller: silence, one second of "speech", silence long enough to end the utterance.
    before, speech = SILENCE * 4000, noise(1.0, seed=1)
    await client.send_audio(before + speech + SILENCE * 8000)
    heard = await client.wait_for("ConversationText", after=done, role="user")
    transcript = parse_deterministic(client.received[heard].message.content)
    assert (transcript.start_byte, transcript.end_byte) == (len(before), len(before) + len(speech))
    assert transcript.crc == zlib.crc32(speech)
    assert client.types(done + 1, heard) == ["UserStartedSpeaking"]

    reply_done = await client.wait_for("AgentAudioDone", after=heard)
    reply = OFFLINE_REPLY.format(text=client.received[heard].message.content)
    assert client.types(heard, reply_done + 1) == [
        "ConversationText", "AgentThinking", "ConversationText", "AgentStartedSpeaking", "LatencyReport",
        "audio", "ConversationText", "audio", "AgentAudioDone",
    ]
    assert " ".join(m.content for m in client.messages("ConversationText", heard + 1)) == reply
    assert client.audio(heard) == spoken(reply)
    report = client.messages("LatencyReport")[0]
    assert report.stt_latency >= 0 and report.total_latency >= report.stt_latency
    assert report.ttt_token_latency == report.ttt_text_latency and report.ttt_tool_latency is None
    await client.close()
    assert agent.sessions[0].turns == 1 and agent.sessions[0].audio_in_bytes == 4000 + 8000 + 8000


async def test_audio_in_any_frame_sizes_is_heard_the_same(agents):
    agent = await agents()
    client = await connected(agent)
    speech = noise(0.6, seed=2)
    stream = SILENCE * 1000 + speech + SILENCE * 6000
    position, sizes, i = 0, [1, 7, 333, 161, 4096], 0  # frames need not be Twilio's 160 bytes
    while position < len(stream):
        await client.send_raw(stream[position : position + sizes[i % len(sizes)]])
        position += sizes[i % len(sizes)]
        i += 1
    heard = await client.wait_for("ConversationText", role="user")
    transcript = parse_deterministic(client.received[heard].message.content)
    # Speech starts mid-frame: the utterance is the 20 ms frames that hold it, counted from the stream's start.
    assert (transcript.start_byte, transcript.end_byte) == (960, 5920)
    assert transcript.crc == zlib.crc32(stream[960:5920])
    await client.close()


# --- Barge-in -------------------------------------------------------------------------------


async def test_barge_in_stops_the_reply_at_once(agents):
    agent = await agents(tuning=Tuning(output_lead=0.3))
    greeting = "This greeting is long enough that the caller can interrupt it before it ends. " * 2
    client = await connected(agent, greeting=greeting)
    first_audio = await client.wait_for("audio")
    await asyncio.sleep(0.5)
    speaking = asyncio.create_task(client.send_audio(noise(1.0, seed=3) + SILENCE * 4000, realtime=True))
    interrupted = await client.wait_for("UserStartedSpeaking")
    # From the voice activity detector, while the caller is still speaking, not from the recogniser
    # at the utterance's end. (How quick: bench/embedded_agent_bench.py.)
    assert not speaking.done() and "ConversationText" not in client.types(first_audio, interrupted)
    await speaking
    await client.wait_for("ConversationText", role="user", after=interrupted)

    heard_of_greeting = client.audio(end=interrupted)
    assert heard_of_greeting == spoken(greeting)[: len(heard_of_greeting)]
    assert 0 < len(heard_of_greeting) < len(spoken(greeting)) / 2
    assert "AgentAudioDone" not in client.types(first_audio, interrupted)
    # Nothing of the greeting after UserStartedSpeaking: the next audio is the answer's own.
    answer = await client.wait_for("AgentStartedSpeaking", after=interrupted)
    assert client.types(interrupted, answer) == ["UserStartedSpeaking", "ConversationText", "AgentThinking",
                                                 "ConversationText"]
    await client.close()
    assert agent.sessions[0].barge_ins == 1


async def test_a_turn_heard_while_the_previous_answer_plays_interrupts_it(agents):
    agent = await agents(tuning=Tuning(output_lead=0.3))
    client = await connected(agent)
    await client.send(p_inject("Tell me a long story please"))
    first = await client.wait_for("audio")
    await client.send(p_inject("Never mind"))
    second = await client.wait_for("ConversationText", after=first, role="user", content="Never mind")
    done = await client.wait_for("AgentAudioDone", after=second)
    # The first answer stopped and says so with AgentAudioDone: an injected turn is not speech,
    # so there is no UserStartedSpeaking to tell the client.
    assert client.types(first, second) == ["audio", "AgentAudioDone"]
    assert client.types().count("UserStartedSpeaking") == 0
    assert client.audio(second, done) == spoken(OFFLINE_REPLY.format(text="Never mind"))
    await client.close()


def p_inject(content: str) -> dict:
    return {"type": "InjectUserMessage", "content": content}


# --- DTMF and end_call ----------------------------------------------------------------------


async def test_dtmf_as_an_injected_user_message(agents):
    agent = await agents()
    client = await connected(agent)
    await client.send(p_inject("The caller pressed 5"))
    user = await client.wait_for("ConversationText", role="user")
    done = await client.wait_for("AgentAudioDone", after=user)
    assert client.received[user].message.content == "The caller pressed 5"
    reply = " ".join(m.content for m in client.messages("ConversationText", user + 1, done))
    assert "The caller pressed 5" in reply
    assert "UserStartedSpeaking" not in client.types()
    await client.close()


async def test_goodbye_speaks_then_calls_end_call(agents):
    agent = await agents()
    client = await connected(agent, functions=[END_CALL])
    await client.send(p_inject("OK, goodbye then."))
    request = await client.wait_for("FunctionCallRequest")
    done = await client.wait_for("AgentAudioDone")
    assert done < request, "end_call must come after the goodbye's last audio, so the caller hears it"
    assert [m.content for m in client.messages("ConversationText", end=done)][-1] == GOODBYE_REPLY
    (call,) = client.received[request].message.functions
    assert (call.name, json.loads(call.arguments), call.client_side) == ("end_call", {}, True)
    await client.send({"type": "FunctionCallResponse", "id": call.id, "name": "end_call", "content": "ok"})
    await asyncio.sleep(0.3)
    assert client.types(request + 1) == ["AgentThinking"], "nothing more is said after end_call"
    await client.close()


async def test_goodbye_without_end_call_only_says_goodbye(agents):
    agent = await agents()
    client = await connected(agent)
    await client.send(p_inject("bye"))
    await client.wait_for("AgentAudioDone")
    await asyncio.sleep(0.2)
    assert "FunctionCallRequest" not in client.types()
    await client.close()


# --- Injections and updates -----------------------------------------------------------------


async def test_inject_agent_message_behaviours(agents):
    agent = await agents(tuning=Tuning(output_lead=0.3))
    client = await connected(agent, greeting="A greeting long enough to still be playing when we inject.")
    await client.wait_for("audio")
    await client.send({"type": "InjectAgentMessage", "message": "Refused."})
    refused = await client.wait_for("InjectionRefused")
    await client.send({"type": "InjectAgentMessage", "message": "Queued.", "behavior": "queue"})
    await client.send({"type": "InjectAgentMessage", "message": "Now.", "behavior": "interrupt"})
    queued = await client.wait_for("ConversationText", after=refused, content="Queued.")
    now = await client.wait_for("ConversationText", after=refused, content="Now.")
    assert now < queued, "interrupt goes first, queue after"
    assert client.types(now, queued) == ["ConversationText", "AgentStartedSpeaking", "audio", "AgentAudioDone"]
    cut = client.types(end=now)
    assert cut[-1] == "AgentAudioDone" and cut.count("AgentAudioDone") == 1, "the greeting was cut"
    assert len(client.audio(end=now)) < len(spoken("A greeting long enough to still be playing when we inject."))
    await client.wait_for("AgentAudioDone", after=queued)
    await client.close()


async def test_keepalive_and_unsupported_updates(agents):
    agent = await agents(tuning=Tuning(idle_timeout=1.0, output_lead=60.0))
    client = await connected(agent)
    for _ in range(6):  # 1.8 s in all, each well inside the idle timeout
        await asyncio.sleep(0.3)
        await client.send({"type": "KeepAlive"})
    await client.send({"type": "UpdateSpeak", "speak": {"provider": {"type": "deepgram", "model": "aura-2-andromeda-en"}}})
    warning = await client.wait_for("Warning")
    assert client.received[warning].message.code == p.UNSUPPORTED_MESSAGE
    assert not client.closed.is_set()
    code, reason = await client.wait_closed(timeout=3)  # then silence: the idle timeout
    assert client.messages("Error")[-1].code == p.CLIENT_MESSAGE_TIMEOUT and (code, reason) == (1011, p.CLIENT_MESSAGE_TIMEOUT)


async def test_force_end_turn_ends_the_utterance_now(agents):
    agent = await agents()
    client = await connected(agent)
    speech = noise(0.8, seed=5)
    await client.send_audio(SILENCE * 1600 + speech)  # no silence after: the caller has not stopped
    await client.wait_for("UserStartedSpeaking")
    await asyncio.sleep(0.2)
    assert client.messages("ConversationText") == []
    await client.send({"type": "ForceEndTurn"})
    heard = await client.wait_for("ConversationText", role="user")
    transcript = parse_deterministic(client.received[heard].message.content)
    assert (transcript.start_byte, transcript.crc) == (1600, zlib.crc32(speech))
    await client.close()


async def test_update_think_replaces_prompt_and_functions(agents, llm):
    llm.script = [Reply(completion("Done."))]
    agent = await agents(agent_llm_url=llm.url, agent_llm_model="m")
    client = await connected(agent, prompt="Old prompt.", functions=[LOOKUP])
    await client.send({"type": "UpdateThink", "think": {"provider": {"type": "open_ai", "model": "gpt-4o-mini"},
                                                        "prompt": "New prompt.", "functions": [END_CALL]}})
    await client.wait_for("ThinkUpdated")
    await client.send(p_inject("Hi"))
    await client.wait_for("AgentAudioDone")
    assert llm.requests[0]["messages"][0] == {"role": "system", "content": "New prompt."}
    assert [t["function"]["name"] for t in llm.requests[0]["tools"]] == ["end_call"]
    await client.close()


async def test_server_side_functions_are_not_offered(agents, llm):
    llm.script = [Reply(completion("Fine."))]
    agent = await agents(agent_llm_url=llm.url, agent_llm_model="m")
    crm = {"name": "crm_lookup", "description": "Deepgram would call this", "endpoint": {"url": "https://crm.example",
                                                                                        "method": "post"}}
    client = await connected(agent, functions=[crm, LOOKUP])
    warning = await client.wait_for("Warning")
    assert client.received[warning].message.code == p.UNSUPPORTED_MESSAGE
    assert "crm_lookup" in client.received[warning].message.description
    await client.send(p_inject("Hi"))
    await client.wait_for("AgentAudioDone")
    assert [t["function"]["name"] for t in llm.requests[0]["tools"]] == ["lookup_order"]
    await client.close()


# --- Bad input ------------------------------------------------------------------------------


def _settings(**audio_output) -> str:
    message = settings_message()
    message["audio"] = {**message["audio"], "output": {**message["audio"]["output"], **audio_output}}
    return json.dumps(message)


@pytest.mark.parametrize("frames, code", [
    ([b"\xff" * 160], p.NON_SETTINGS_MESSAGE_BEFORE_SETTINGS),
    (['{"type": "InjectUserMessage", "content": "hi"}'], p.NON_SETTINGS_MESSAGE_BEFORE_SETTINGS),
    (["this is not json"], p.UNPARSABLE_CLIENT_MESSAGE),
    (['["Settings"]'], p.UNPARSABLE_CLIENT_MESSAGE),
    (['{"type": "Setings"}'], p.UNPARSABLE_CLIENT_MESSAGE),
    ([json.dumps(settings_message()), '{"type": "InjectUserMessage", "content": 5}'], p.UNPARSABLE_CLIENT_MESSAGE),
    ([json.dumps(settings_message()), json.dumps(settings_message())], p.SETTINGS_ALREADY_APPLIED),
    ([_settings(encoding="linear16", sample_rate=24000)], p.INVALID_SETTINGS),
    ([_settings(container="wav")], p.INVALID_SETTINGS),
    ([json.dumps({**settings_message(), "audio": {"input": {"encoding": "mulaw", "sample_rate": 16000}}})],
     p.INVALID_SETTINGS),
])
async def test_bad_input_is_an_error_then_1008(agents, frames, code):
    agent = await agents()
    client = await AgentClient.open(agent.url, KEY)
    await client.wait_for("Welcome")
    for frame in frames:
        await client.send_raw(frame)
    close_code, reason = await client.wait_closed()
    errors = client.messages("Error")
    assert [e.code for e in errors] == [code] and errors[0].description
    assert (close_code, reason) == (1008, code)
    assert agent.sessions[0].error == code


async def test_unexpected_function_response_is_ignored(agents):
    agent = await agents()
    client = await connected(agent)
    await client.send({"type": "FunctionCallResponse", "id": "nobody-asked", "name": "x", "content": "{}"})
    await client.send(p_inject("still here"))
    await client.wait_for("AgentAudioDone")
    assert "Error" not in client.types()
    await client.close()


async def test_a_failing_voice_ends_the_call_with_an_error(agents, tmp_path):
    agent = await agents(voice=FliteVoice(program="false"))  # exits 1: flite broken
    client = await connected(agent, greeting="Hello.")
    code, reason = await client.wait_closed()
    assert [e.code for e in client.messages("Error")] == [p.FAILED_TO_SPEAK]
    assert (code, reason) == (1011, p.FAILED_TO_SPEAK)


class BrokenEngine:
    def __init__(self, channel, emit, *, interim_results):
        pass

    def feed(self, mulaw):
        raise RuntimeError("decoder crashed")

    async def finalize(self):
        pass

    async def aclose(self):
        pass


def refusing_factory(channel, emit, *, interim_results):
    raise OSError("no model")


@pytest.mark.parametrize("factory, code", [
    (BrokenEngine, p.INTERNAL_SERVER_ERROR),
    (refusing_factory, p.FAILED_TO_START_LISTENING),
])
async def test_a_failing_recogniser_ends_the_call_with_an_error(agents, factory, code):
    agent = await agents(engine_factory=factory)
    client = await AgentClient.open(agent.url, KEY)
    await client.send(settings_message())
    await client.send_audio(SILENCE * 800)
    close_code, _ = await client.wait_closed()
    assert [e.code for e in client.messages("Error")] == [code] and close_code == 1011


# --- Isolation ------------------------------------------------------------------------------


async def test_two_connections_are_isolated(agents):
    agent = await agents()
    good = await connected(agent, greeting="Hello good caller.")
    bad = await connected(agent, greeting="Hello bad caller.")
    await bad.send_raw("garbage")
    await good.send_audio(SILENCE * 800 + noise(0.5, seed=4) + SILENCE * 4000)
    assert (await bad.wait_closed())[0] == 1008
    heard = await good.wait_for("ConversationText", role="user")
    await good.wait_for("AgentAudioDone", after=heard)
    assert "Error" not in good.types()
    assert good.audio(end=heard).startswith(spoken("Hello good caller."))
    assert [r.error for r in agent.sessions] == [None, p.UNPARSABLE_CLIENT_MESSAGE]
    await good.close()


# --- Thinking with an OpenAI-compatible endpoint --------------------------------------------

LOOKUP = {"name": "lookup_order", "description": "Get an order's status",
          "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}


@pytest.fixture
def llm():
    fake = FakeLLM()
    yield fake
    fake.stop()


async def test_llm_with_a_function_call_round_trip(agents, llm):
    llm.script = [
        Reply(completion("Let me check.", [{"id": "call_1", "type": "function",
                                           "function": {"name": "lookup_order", "arguments": '{"order_id": "A17"}'}}])),
        Reply(completion("Order A17 has shipped.")),
    ]
    agent = await agents(agent_llm_url=llm.url, agent_llm_model="test-model", agent_llm_api_key="llm-key",
                         agent_llm_timeout=5.0)
    client = await connected(agent, prompt="You are Acme's assistant.", functions=[LOOKUP])
    await client.send({"type": "UpdatePrompt", "prompt": "Be brief."})
    await client.wait_for("PromptUpdated")
    await client.send(p_inject("Where is my order A17?"))
    request = await client.wait_for("FunctionCallRequest")
    (call,) = client.received[request].message.functions
    assert (call.id, call.name, call.arguments, call.client_side) == ("call_1", "lookup_order", '{"order_id": "A17"}', True)
    assert client.types(end=request + 1)[-3:] == ["audio", "AgentAudioDone", "FunctionCallRequest"]
    await client.send({"type": "FunctionCallResponse", "id": "call_1", "name": "lookup_order",
                       "content": '{"status": "shipped"}'})
    said = await client.wait_for("ConversationText", after=request, content="Order A17 has shipped.")
    await client.wait_for("AgentAudioDone", after=said)

    first, second = llm.requests
    assert first["model"] == "test-model"
    assert first["messages"] == [
        {"role": "system", "content": "You are Acme's assistant.\nBe brief."},
        {"role": "user", "content": "Where is my order A17?"},
    ]
    assert first["tools"] == [{"type": "function", "function": LOOKUP}]
    assert second["messages"][2:] == [
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "lookup_order", "arguments": '{"order_id": "A17"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"status": "shipped"}'},
    ]
    assert llm.headers[0]["authorization"] == "Bearer llm-key"
    await client.close()


@pytest.mark.parametrize("failure", [
    Reply({"error": {"message": "model not loaded"}}, status=500),
    Reply(completion("too late"), delay=2.0),
    Reply({"unexpected": "shape"}),
])
async def test_llm_failure_is_an_apology_and_a_warning(agents, llm, failure):
    llm.script = [failure, Reply(completion("Back again."))]
    agent = await agents(agent_llm_url=llm.url, agent_llm_model="m", agent_llm_timeout=0.5)
    client = await connected(agent)
    await client.send(p_inject("Hello?"))
    warning = await client.wait_for("Warning")
    assert client.received[warning].message.code == p.THINK_REQUEST_FAILED
    done = await client.wait_for("AgentAudioDone", after=warning)
    assert " ".join(m.content for m in client.messages("ConversationText", warning, done)) == APOLOGY
    assert client.audio(warning, done) == spoken(APOLOGY)
    await client.send(p_inject("Hello again?"))  # the call goes on
    await client.wait_for("ConversationText", after=done, content="Back again.")
    await client.close()


async def test_a_function_the_client_never_answers_times_out(agents, llm):
    llm.script = [
        Reply(completion(None, [{"id": "call_9", "type": "function", "function": {"name": "lookup_order", "arguments": "{}"}}])),
        Reply(completion("I could not check that.")),
    ]
    agent = await agents(agent_llm_url=llm.url, agent_llm_model="m", tuning=Tuning(function_timeout=0.3, output_lead=60))
    client = await connected(agent, functions=[LOOKUP])
    await client.send(p_inject("Where is my order?"))
    warning = await client.wait_for("Warning")
    assert client.received[warning].message.code == p.FUNCTION_CALL_FAILED
    await client.wait_for("ConversationText", content="I could not check that.")
    assert "timeout" in llm.requests[1]["messages"][-1]["content"] or "within" in llm.requests[1]["messages"][-1]["content"]
    await client.close()


# --- The real recogniser and voice ----------------------------------------------------------


@pytest.mark.slow
async def test_live_recogniser_and_flite(agents):
    import whisper_stt

    def words_of(text: str) -> set[str]:  # Whisper punctuates and capitalises
        return set(re.findall(r"[a-z']+", text.lower()))

    whisper_stt.start()
    sentence = "please call me back tomorrow morning about my order"
    agent = await agents(agent_embedded_mode="live", tuning=Tuning())
    try:
        client = await connected(agent, greeting="Hello, this is the offline demo agent.")
        greeted = await client.wait_for("AgentAudioDone")
        greeting_audio = client.audio(end=greeted)
        assert len(greeting_audio) > 8000, "about two seconds of flite speech"
        # The voice is speech, not static: the recogniser finds the greeting's words in it.
        segments = []
        engine = whisper_stt.engine_factory(0, segments.append)
        engine.feed(greeting_audio + SILENCE * 8000)
        await engine.finalize()
        await engine.aclose()
        greeting_words = words_of(" ".join(s.transcript for s in segments))
        assert len(greeting_words & {"hello", "this", "is", "the", "offline", "demo", "agent"}) >= 3, greeting_words
        await client.send_audio(SILENCE * 4000 + speak(sentence, "espeak") + SILENCE * 16000, realtime=True)
        user = await client.wait_for("ConversationText", role="user", timeout=20)
        words = words_of(client.received[user].message.content)
        assert len(words & set(sentence.split())) >= 4, words
        assert client.types(greeted + 1, user) == ["UserStartedSpeaking"]
        done = await client.wait_for("AgentAudioDone", after=user, timeout=20)
        reply_audio = client.audio(user, done)
        pcm = np.frombuffer(reply_audio, np.uint8)
        assert len(reply_audio) > 3 * 8000 and np.count_nonzero((pcm != 0xFF) & (pcm != 0x7F)) > len(pcm) // 2
        await client.close()
    finally:
        whisper_stt.shutdown()
