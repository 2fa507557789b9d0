"""Voice agents on /agent over real sockets: simulated caller -> server -> fake Deepgram Voice Agent.

The caller is `simulate.run_agent_call`, which plays Twilio's part of a <Connect><Stream>: it
streams the caller's audio in real time, plays what the server sends at real time into `heard`,
echoes marks when their audio has played, honours `clear`, and records any message that is not
exactly a `media`, `mark` or `clear` of its stream (protocols.md A.3). The agent is
`fake_agent.FakeAgent`, which validates every message both ways with the deepgram-sdk models
(`session.violations` must stay empty). Subscribers are JSON-mode `Listener`s and websocat.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from twilio.request_validator import RequestValidator
from websockets.asyncio.client import connect

import codec
from agent.bridge import END_CALL_SETTLE
from agent.deepgram import DeepgramAgent, settings_message
from agent.playback import FRAME_BYTES
from agent.provider import AgentSetup
from agent.tools import CallContext, load_tools
from conftest import LISTEN_QUERY, STT_KEY, Listener, wait_for, websocat_subscriber
from fake_agent import CLIENT_MODELS, Faults, FakeAgent, Reply, Script, check, reply_audio
from local_stt import LocalSTT
from simulate import run_agent_call
from test_integration import _reachable, metric_values
from test_security import AUTH_TOKEN, PUBLIC_URL, refusal, sign

GREETING = "Hello! How can I help you today?"
LONG_GREETING = "Thank you for calling the Acme support line, how may I help you with your order today?"


def tone(seconds: float, amplitude: int = 12000) -> bytes:
    """A loud 300 Hz tone: speech as far as the fake's voice-activity detection is concerned."""
    t = np.arange(int(seconds * 8000)) / 8000
    return codec.pcm16_to_ulaw((amplitude * np.sin(2 * np.pi * 300 * t)).astype(np.int16))


def quiet(seconds: float) -> bytes:
    return b"\xff" * int(seconds * 8000)


def padded(audio: bytes) -> bytes:
    return audio + b"\xff" * (-len(audio) % FRAME_BYTES)


@pytest.fixture
async def agents(stacks):
    """Factory: `stack, fake = await agents(script=..., faults=..., **settings)`."""
    fakes = []

    async def make(script: Script | None = None, faults: Faults | None = None, **settings):
        fake = await FakeAgent(STT_KEY, script, faults).__aenter__()
        fakes.append(fake)
        stack = await stacks(deepgram_agent_url=fake.url, agent_provider="deepgram", **settings)
        return stack, fake

    yield make
    for fake in fakes:
        await fake.__aexit__()


async def subscriber(stack) -> Listener:
    return await Listener(stack.url("/client"), '{"type":"subscribe","callSid":"*"}').start()


async def events_of(listener: Listener, call_sid: str, timeout: float = 10.0) -> list[dict]:
    """The call's JSON events, once its call_ended has arrived."""
    def ended() -> bool:
        return any(e["type"] == "call_ended" and e["callSid"] == call_sid for e in map(json.loads, listener.messages))
    await wait_for(ended, timeout, what=f"call_ended of {call_sid}")
    return [e for e in map(json.loads, listener.messages) if e.get("callSid") == call_sid]


def of_type(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e["type"] == kind]


def prefix_heard(heard: bytes, audio: bytes) -> int:
    """How many bytes of `audio`, from its start, the caller heard in one stretch."""
    start = heard.find(audio[:800])
    assert start >= 0, "the start of the reply was never heard"
    n = 0
    while n < len(audio) and start + n < len(heard) and heard[start + n] == audio[n]:
        n += 1
    return n


# --- the greeting and the contract -----------------------------------------------------------------


async def test_the_greeting_reaches_the_caller_byte_exact_in_20_ms_frames_with_marks(agents):
    stack, fake = await agents()
    listener = await subscriber(stack)
    result = await run_agent_call(stack.url("/agent"), quiet(0.5), tail=0.5, params={"tenant": "acme"})
    greeting = reply_audio(GREETING)
    assert len(greeting) % FRAME_BYTES != 0  # the fake's odd sizes and length exercise the framer
    assert bytes(result.received) == padded(greeting)  # every byte, in order, padded only at its end
    assert greeting in bytes(result.heard)
    assert result.violations == [] and fake.sessions[0].violations == []
    media = [m for _, m in result.messages if m["event"] == "media"]
    assert all(len(codec_b64(m)) % FRAME_BYTES == 0 for m in media)
    marks = [m["mark"]["name"] for _, m in result.messages if m["event"] == "mark"]
    assert marks and [name for _, name in result.echoed] == marks  # every mark came back, in order
    assert result.messages[-1][1]["event"] == "mark"  # the reply ends with a mark after its last audio
    events = await events_of(listener, result.call_sid)
    started = events[0]
    assert (started["type"], started["mode"], started["provider"], started["customParameters"]) == (
        "call_started", "agent", "deepgram", {"tenant": "acme"})
    line = of_type(events, "conversation")[0]
    assert (line["role"], line["text"], line["segment"]) == ("agent", GREETING, "r1")
    assert "interrupted" not in line
    assert [(e["segment"], e["seconds"]) for e in of_type(events, "latency")] == [
        ("r1", {"total": 0.42, "llm": 0.3, "tts": 0.12}),  # AgentStartedSpeaking
        ("r1", {"total": 0.52, "stt": 0.1, "llm": 0.3, "tts": 0.12})]  # LatencyReport
    ended = of_type(events, "call_ended")[0]
    assert ended["endOfCall"] == "caller_hung_up"
    assert ended["agent"]["playedSeconds"] == pytest.approx(len(padded(greeting)) / 8000, abs=0.001)
    assert ended["agent"]["turns"] == 1 and ended["agent"]["discardedSeconds"] == 0


def codec_b64(media_message: dict) -> bytes:
    import base64
    return base64.b64decode(media_message["media"]["payload"])


async def test_settings_carry_our_audio_formats_prompt_greeting_and_tools_with_the_settings_file_merged(agents):
    extra = {"audio": {"input": {"encoding": "linear16", "sample_rate": 16000}},
             "agent": {"speak": {"provider": {"type": "deepgram", "model": "aura-2-zeus-en"}},
                       "listen": {"provider": {"type": "deepgram", "model": "nova-3", "keyterms": ["Acme"]}}}}
    stack, fake = await agents(agent_prompt="You work for {tenant}. Caller: {caller}.",
                               agent_greeting="Welcome to {tenant}!", agent_provider_settings=extra)
    await run_agent_call(stack.url("/agent"), quiet(0.2), tail=0.3, params={"tenant": "Acme"})
    session = fake.sessions[0]
    settings = session.settings
    assert check(settings, CLIENT_MODELS) is None  # valid, no unknown field anywhere
    assert settings["audio"] == {"input": {"encoding": "mulaw", "sample_rate": 8000},
                                 "output": {"encoding": "mulaw", "sample_rate": 8000, "container": "none"}}
    agent = settings["agent"]
    assert agent["greeting"] == "Welcome to Acme!"
    assert agent["think"]["prompt"] == "You work for Acme. Caller: {caller}."  # a missing one is left as written
    assert agent["think"]["functions"] == load_tools(None).schemas()
    assert agent["speak"]["provider"]["model"] == "aura-2-zeus-en"
    assert agent["listen"]["provider"]["keyterms"] == ["Acme"]
    assert session.headers["Authorization"] == f"Token {STT_KEY}"
    assert session.violations == []


def test_a_misspelled_field_is_caught_by_the_contract_check():
    setup = AgentSetup(CallContext("CA1"), "prompt", "hi", load_tools(None))
    message = settings_message(setup)
    assert check(message, CLIENT_MODELS) is None
    message["agent"]["think"]["promt"] = "typo"
    assert "unknown fields ['$.agent.think.promt']" in check(message, CLIENT_MODELS)
    assert check({"type": "FunctionCallResponse", "id": "x", "output": "y"}, CLIENT_MODELS) is not None


async def test_keepalive_goes_out_while_no_caller_audio_does():
    async with FakeAgent(STT_KEY, Script(greet=False)) as fake:
        setup = AgentSetup(CallContext("CAka"), "prompt", "", load_tools(None))
        provider = DeepgramAgent(setup, url=fake.url, api_key=STT_KEY, keepalive_seconds=0.2)
        await provider.start()
        session = await fake.session()
        await asyncio.sleep(0.75)
        provider.send_audio(b"\xff" * 160)
        await asyncio.sleep(0.1)
        keepalives = sum(1 for m in session.messages if m["type"] == "KeepAlive")
        await provider.close()
    assert keepalives >= 2 and session.violations == [] and bytes(session.audio) == b"\xff" * 160


# --- barge-in --------------------------------------------------------------------------------------


async def test_barge_in_clears_twilio_and_the_caller_hears_only_what_played_before(agents):
    stack, fake = await agents(agent_greeting=LONG_GREETING)
    listener = await subscriber(stack)
    before = await metric_values(stack.port)
    result = await run_agent_call(stack.url("/agent"), quiet(1.0) + tone(0.5) + quiet(0.3), tail=1.0)
    session = fake.sessions[0]
    greeting = reply_audio(LONG_GREETING)
    # The whole greeting had been sent before the caller spoke (the fake sends faster than real
    # time): the clear must still come, because it was still playing.
    done_at = next(t for t, text in session.sent if '"AgentAudioDone"' in text)
    assert done_at < session.barge_ins[0]
    assert len(result.clears) == 1 and 1.0 < result.clears[0] < 2.0
    heard = prefix_heard(bytes(result.heard), greeting)
    assert 0.8 * 8000 < heard < 2.0 * 8000  # about 1 s of the 5 s greeting, then nothing more of it
    assert greeting[heard:heard + 1600] not in bytes(result.heard)
    assert result.violations == [] and session.violations == []

    events = await events_of(listener, result.call_sid)
    barge = of_type(events, "barge_in")[0]
    assert barge["segment"] == "r1"
    assert barge["heardSeconds"] == pytest.approx(heard / 8000, abs=0.15)  # the ledger's estimate
    assert barge["discardedSeconds"] == pytest.approx((len(padded(greeting)) - heard) / 8000, abs=0.15)
    cut = [e for e in of_type(events, "conversation") if e["role"] == "agent"][0]
    words = LONG_GREETING.split()
    expected = " ".join(words[:len(words) * int(barge["heardSeconds"] * 8000) // len(greeting)])
    assert cut["interrupted"] and cut["heardEstimated"] and cut["fullText"] == LONG_GREETING
    assert cut["text"] == expected and 0 < len(cut["text"].split()) < len(words)
    # Marks echoed because of the clear are not "played": the call's played audio is what was heard.
    echoed_after_clear = [name for t, name in result.echoed if t >= result.clears[0]]
    assert echoed_after_clear
    ended = of_type(events, "call_ended")[0]["agent"]
    reply = padded(reply_audio("You said something.", 0.5))
    assert ended["bargeIns"] == 1
    assert ended["playedSeconds"] == pytest.approx((heard + len(reply)) / 8000, abs=0.2)
    assert ended["playedSeconds"] < len(greeting) / 8000
    after = await metric_values(stack.port)
    grew = {name: after[name] - before.get(name, 0) for name in after if name.startswith("agent_")}
    assert grew["agent_barge_ins_total"] == 1 and grew["agent_turns_total"] == 2
    assert grew["agent_audio_sent_bytes_total"] == len(result.received)
    # (the events give seconds to 3 decimals: 8 bytes)
    assert grew["agent_audio_discarded_bytes_total"] == pytest.approx(barge["discardedSeconds"] * 8000, abs=4)
    assert grew["agent_audio_played_bytes_total"] == pytest.approx(ended["playedSeconds"] * 8000, abs=4)
    assert grew['agent_end_of_call_total{outcome="caller_hung_up"}'] == 1


async def test_barge_in_while_the_reply_is_still_arriving_drops_what_was_not_sent(agents):
    stack, fake = await agents(script=Script(speed=2.0), agent_greeting=LONG_GREETING)
    listener = await subscriber(stack)
    result = await run_agent_call(stack.url("/agent"), quiet(1.0) + tone(0.4) + quiet(0.2), tail=1.0)
    greeting = reply_audio(LONG_GREETING)
    assert len(result.clears) == 1
    heard = prefix_heard(bytes(result.heard), greeting)
    assert heard < 2.0 * 8000
    # At twice real time about 2 s of audio had been sent; the rest never left the fake or the server.
    assert len(result.received) < len(greeting)
    events = await events_of(listener, result.call_sid)
    assert of_type(events, "barge_in")[0]["heardSeconds"] == pytest.approx(heard / 8000, abs=0.15)
    assert result.violations == []


async def test_late_audio_of_an_interrupted_reply_never_reaches_the_caller(agents):
    stack, fake = await agents(faults=Faults(late_audio=True), agent_greeting=LONG_GREETING)
    result = await run_agent_call(stack.url("/agent"), quiet(1.0) + tone(0.4) + quiet(0.2), tail=1.0)
    greeting = reply_audio(LONG_GREETING)
    clear_at = result.clears[0]
    later_media = [codec_b64(m) for t, m in result.messages if t > clear_at and m["event"] == "media"]
    after_clear = b"".join(later_media)
    assert greeting[:500] not in after_clear  # the 500 late bytes were dropped
    assert reply_audio("You said something.", 0.5)[:800] in after_clear  # the next reply plays
    assert (await metric_values(stack.port)).get("agent_provider_late_audio_bytes_total", 0) >= 500


# --- DTMF, tools and end_call ------------------------------------------------------------------------


async def test_dtmf_reaches_the_agent_as_a_user_message_and_subscribers_see_it(agents):
    stack, fake = await agents(script=Script(greet=False, reply_to_text=True))
    listener = await subscriber(stack)
    result = await run_agent_call(stack.url("/agent"), quiet(2.5), dtmf=[(0.3, "5"), (1.6, "12#")], tail=0.8)
    session = fake.sessions[0]
    injected = [m["content"] for m in session.messages if m["type"] == "InjectUserMessage"]
    assert injected == ["The caller pressed 5 on the phone keypad.", "The caller pressed 1 2 # on the phone keypad."]
    events = await events_of(listener, result.call_sid)
    assert [e["digit"] for e in of_type(events, "dtmf")] == ["5", "1", "2", "#"]
    assert reply_audio("You said something.", 0.5) in bytes(result.heard)  # the agent answered
    assert session.violations == []


TOOLS = '''
import asyncio
from agent.tools import CallContext


def lookup_order(order_id: str, call: CallContext) -> dict:
    """Look up an order."""
    return {"order": order_id, "status": "shipped", "tenant": call.parameters.get("tenant")}


def broken(order_id: str) -> str:
    """Always raises."""
    raise RuntimeError("database down")


async def hangs() -> str:
    """Never answers."""
    await asyncio.sleep(60)
'''


async def test_tools_run_and_one_that_raises_or_hangs_becomes_an_error_for_the_model(agents, tmp_path):
    path = tmp_path / "tools.py"
    path.write_text(TOOLS)
    script = Script(greet=False, reply_to_text=True, replies=[
        Reply("Your order: {result}", 0.3, ("lookup_order", {"order_id": "A17"})),
        Reply("Broken: {result}", 0.3, ("broken", {"order_id": "A17"})),
        Reply("Hung: {result}", 0.3, ("hangs", {})),
        Reply("Typo: {result}", 0.3, ("lookup_order", {"order": "A17"})),
    ])
    stack, fake = await agents(script=script, agent_tools=load_tools(str(path)), agent_tool_timeout=0.3)
    listener = await subscriber(stack)
    dtmf = [(0.2, "1#"), (1.4, "2#"), (2.6, "3#"), (3.8, "4#")]
    result = await run_agent_call(stack.url("/agent"), quiet(4.5), dtmf=dtmf, tail=0.8, params={"tenant": "acme"})
    session = fake.sessions[0]
    responses = [m for m in session.messages if m["type"] == "FunctionCallResponse"]
    assert [r["name"] for r in responses] == ["lookup_order", "broken", "hangs", "lookup_order"]
    assert json.loads(responses[0]["content"]) == {"order": "A17", "status": "shipped", "tenant": "acme"}
    assert json.loads(responses[1]["content"]) == {"error": "broken failed: RuntimeError: database down"}
    assert json.loads(responses[2]["content"]) == {"error": "hangs did not answer within 0.3 s"}
    assert ("order_id: Field required; order: Extra inputs are not permitted"
            in json.loads(responses[3]["content"])["error"])
    assert all(set(r) == {"type", "id", "name", "content"} for r in responses) and session.violations == []
    # The call went on: the reply after the hung tool was heard.
    hung_reply = [audio for text, audio in session.replies if text.startswith("Hung")][0]
    assert hung_reply in bytes(result.heard)
    events = await events_of(listener, result.call_sid)
    calls, results = of_type(events, "tool_call"), of_type(events, "tool_result")
    assert [c["arguments"] for c in calls][0] == {"order_id": "A17"}
    assert [(r["name"], r["ok"], r["error"]) for r in results] == [
        ("lookup_order", True, None), ("broken", False, "exception"), ("hangs", False, "timeout"),
        ("lookup_order", False, "bad_arguments")]
    assert of_type(events, "call_ended")[0]["agent"]["toolFailures"] == 3


@pytest.mark.parametrize("goodbye_first", [True, False], ids=["goodbye-then-end_call", "end_call-then-goodbye"])
async def test_end_call_closes_the_socket_only_after_the_goodbye_has_played(agents, goodbye_first):
    stack, fake = await agents(script=Script(greet=False, reply_to_text=False))
    listener = await subscriber(stack)
    call = asyncio.create_task(run_agent_call(stack.url("/agent"), quiet(8.0), tail=8.0))
    session = await fake.session()
    goodbye = "Thank you for calling, goodbye!"
    if goodbye_first:
        speaking = asyncio.create_task(session.say(goodbye, 1.5))
        await asyncio.sleep(0.2)
        response = await session.request_function("end_call", {"reason": "caller is done"})
        await speaking
    else:
        response = await session.request_function("end_call", {"reason": "caller is done"})
        await asyncio.sleep(0.3)
        await session.say(goodbye, 1.5)
    result = await call
    assert "call will end" in response["content"]
    assert result.closed_by_server and result.close_code == 1000
    audio = reply_audio(goodbye, 1.5)
    assert audio in bytes(result.heard)  # heard to the end
    last_mark = result.echoed[-1][0]
    assert result.closed_at >= last_mark
    assert result.closed_at < last_mark + END_CALL_SETTLE + 1.5  # then promptly
    events = await events_of(listener, result.call_sid)
    ended = of_type(events, "call_ended")[0]
    assert ended["endOfCall"] == "end_call" and ended["endReason"] == "caller is done"


# --- provider failures: fallback close within 2 s ---------------------------------------------------


@pytest.mark.parametrize("faults, message", [
    (Faults(refuse=401), "Deepgram refused the connection: HTTP 401 Invalid credentials."),
    (Faults(settings_error=True), "Deepgram refused the settings: INVALID_SETTINGS think provider rejected"),
    (Faults(error_after=1.0), "Deepgram error: INTERNAL_SERVER_ERROR Something went wrong"),
    (Faults(drop_after=1.0), "Deepgram connection lost: no close frame"),
], ids=["401", "settings-refused", "Error-mid-call", "dropped-mid-call"])
async def test_a_failing_provider_closes_the_twilio_socket_within_2_s_and_says_why(agents, caplog, faults, message):
    caplog.set_level(logging.INFO, logger="agent.bridge")
    stack, fake = await agents(faults=faults)
    listener = await subscriber(stack)
    before = await metric_values(stack.port)
    result = await run_agent_call(stack.url("/agent"), quiet(6.0), tail=6.0)
    failed_at = fake.sessions[0].faulted_at if fake.sessions and fake.sessions[0].faulted_at else result.started_at
    assert result.closed_by_server and result.close_code == 1000
    assert result.started_at + result.closed_at - failed_at < 2.0
    events = await events_of(listener, result.call_sid)
    error = of_type(events, "error")[0]
    assert (error["source"], error["fatal"]) == ("provider", True) and error["message"].startswith(message)
    ended = of_type(events, "call_ended")[0]
    assert ended["endOfCall"] == "failed" and ended["error"] == error["message"]
    after = await metric_values(stack.port)
    failed = 'agent_end_of_call_total{outcome="failed"}'
    assert after[failed] - before.get(failed, 0) == 1
    logged = [r for r in caplog.records if r.levelname == "ERROR" and result.call_sid in r.getMessage()]
    assert len(logged) == 1 and message in logged[0].getMessage()
    assert any(f"agent call ended callSid={result.call_sid}" in r.getMessage() and "outcome=failed" in r.getMessage()
               for r in caplog.records)


async def test_an_unreachable_provider_fails_fast_with_its_reason(stacks):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here
    stack = await stacks(deepgram_agent_url=f"ws://127.0.0.1:{port}/v1/agent/converse", agent_provider="deepgram")
    listener = await subscriber(stack)
    result = await run_agent_call(stack.url("/agent"), quiet(5.0), tail=5.0)
    assert result.closed_by_server and result.closed_at < 2.0
    error = of_type(await events_of(listener, result.call_sid), "error")[0]
    assert error["message"].startswith("cannot reach Deepgram")


async def test_garbage_from_the_provider_is_counted_and_the_call_goes_on(agents):
    stack, fake = await agents(faults=Faults(garbage=True))
    before = await metric_values(stack.port)
    result = await run_agent_call(stack.url("/agent"), quiet(0.5), tail=0.5)
    assert bytes(result.received) == padded(reply_audio(GREETING))
    assert not result.closed_by_server
    after = await metric_values(stack.port)
    key = 'agent_provider_bad_messages_total{provider="deepgram"}'
    assert after[key] - before.get(key, 0) == 6


# --- subscribers, isolation, protection, shutdown ------------------------------------------------------


async def test_an_agent_line_that_comes_after_its_audio_still_belongs_to_that_reply(agents):
    stack, fake = await agents(script=Script(greet=False))
    listener = await subscriber(stack)
    call = asyncio.create_task(run_agent_call(stack.url("/agent"), quiet(2.5), tail=1.0))
    session = await fake.session()
    audio = reply_audio("late line", 0.4)
    await session.send_json({"type": "AgentStartedSpeaking", "total_latency": 0.5, "tts_latency": 0.2,
                             "ttt_latency": 0.3})
    await session.ws.send(audio)
    await session.send_json({"type": "AgentAudioDone"})
    await session.send_json({"type": "ConversationText", "role": "assistant", "content": "Sorry for the wait."})
    await session.say("And this is the next reply.", 0.4)  # its line comes first, as Deepgram sends it
    result = await call
    lines = [e for e in of_type(await events_of(listener, result.call_sid), "conversation") if e["role"] == "agent"]
    assert [(e["segment"], e["text"]) for e in lines] == [("r1", "Sorry for the wait."),
                                                          ("r2", "And this is the next reply.")]
    assert all("interrupted" not in e for e in lines)


async def test_raw_subscribers_get_the_providers_conversation_text_verbatim(agents):
    stack, fake = await agents(script=Script(greet=False))
    call = asyncio.create_task(run_agent_call(stack.url("/agent"), quiet(1.5), tail=0.5))
    await wait_for(lambda: stack.proxy.hub.call_sids(), what="the call")
    call_sid = stack.proxy.hub.call_sids()[0]
    websocat = websocat_subscriber(stack.url("/client"), call_sid)
    await stack.wait_for_subscribers(1)
    session = await fake.session()
    await session.user_said("where is my order")
    await session.say("It shipped on Monday.", 0.3)
    await call
    out, _ = await asyncio.to_thread(websocat.communicate, timeout=20)
    lines = out.splitlines()[1:]
    sent = [text for _, text in session.sent if '"ConversationText"' in text]
    assert lines == sent and len(sent) == 2


async def test_two_agent_calls_at_once_stay_isolated(agents):
    stack, fake = await agents(agent_greeting="Hello {name}, welcome.")
    listener = await subscriber(stack)
    a, b = await asyncio.gather(
        run_agent_call(stack.url("/agent"), quiet(1.0) + tone(0.4) + quiet(0.2), tail=1.0, params={"name": "Ada"}),
        run_agent_call(stack.url("/agent"), quiet(2.5), tail=0.5, params={"name": "Bob"}))
    ada, bob = reply_audio("Hello Ada, welcome."), reply_audio("Hello Bob, welcome.")
    assert bytes(b.received) == padded(bob) and ada[:800] not in bytes(b.heard)
    assert bob[:800] not in bytes(a.received) and ada[:800] in bytes(a.heard)
    assert len(b.clears) == 0  # a's barge-in cleared a only
    events_a, events_b = await events_of(listener, a.call_sid), await events_of(listener, b.call_sid)
    assert of_type(events_a, "barge_in") and not of_type(events_b, "barge_in")
    assert {s.settings["agent"]["greeting"] for s in fake.sessions} == {"Hello Ada, welcome.", "Hello Bob, welcome."}


async def test_agent_streams_need_twilios_signature_and_the_call_token_like_twilio_streams(agents):
    stack, fake = await agents(twilio_auth_token=AUTH_TOKEN, public_url=PUBLIC_URL,
                               call_token="call-token-2b7e9a4c1f6d")
    status, _, _ = await refusal(stack.url("/agent"))
    assert status == 403
    status, _, _ = await refusal(stack.url("/agent"), {"X-Twilio-Signature": sign(PUBLIC_URL + "/twilio")})
    assert status == 403  # a signature for another route
    signature = sign(PUBLIC_URL + "/agent")
    assert RequestValidator(AUTH_TOKEN).validate(PUBLIC_URL + "/agent", {}, signature)
    no_token = await run_agent_call(stack.url("/agent"), quiet(0.3), tail=0.3,
                                    additional_headers={"X-Twilio-Signature": signature})
    assert no_token.close_code == 1008 and fake.sessions == []
    ok = await run_agent_call(stack.url("/agent"), quiet(0.3), tail=0.5, params={"token": "call-token-2b7e9a4c1f6d"},
                              additional_headers={"X-Twilio-Signature": signature})
    assert bytes(ok.received) == padded(reply_audio(GREETING))
    assert "token" not in json.dumps(fake.sessions[0].settings)


async def test_max_calls_counts_agent_and_transcription_streams_together(agents):
    stack, fake = await agents(max_calls=1)
    call = asyncio.create_task(run_agent_call(stack.url("/agent"), quiet(1.5), tail=0.2))
    await fake.session()
    assert (await refusal(stack.url("/twilio")))[0] == 503
    assert (await refusal(stack.url("/agent")))[0] == 503
    await call


async def test_bad_twilio_messages_on_an_agent_stream_are_counted_and_the_call_goes_on(agents):
    stack, fake = await agents()
    before = await metric_values(stack.port)
    async with connect(stack.url("/agent")) as ws:
        from simulate import TwilioStream
        stream = TwilioStream()
        await ws.send(stream.connected())
        await ws.send(stream.start())
        await ws.send("{not json")
        await ws.send(b"\x00\x01")
        await ws.send(stream.media("inbound", 0, b"\xff" * 160))
        session = await fake.session()
        await wait_for(lambda: len(session.audio) == 160, what="caller audio at the agent")
        await ws.send(stream.stop())
    after = await metric_values(stack.port)
    for kind in ("malformed_json", "binary_frame"):
        key = f'bad_frames_total{{kind="{kind}"}}'
        assert after[key] - before.get(key, 0) == 1


async def test_sigterm_ends_agent_calls_cleanly_and_the_key_never_reaches_the_log(tmp_path):
    stt = LocalSTT(api_key=STT_KEY)
    await stt.start()
    log_file = tmp_path / "server.log"  # a file, not a pipe: DEBUG output would fill a pipe nobody reads
    async with FakeAgent(STT_KEY) as fake:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        env = {**os.environ, "PROXY_URL": f"127.0.0.1:{port}", "DEEPGRAM_API_KEY": STT_KEY,
               "DEEPGRAM_URL": f"{stt.url}?{LISTEN_QUERY}", "DEEPGRAM_AGENT_URL": fake.url, "LOG_LEVEL": "DEBUG"}
        server_py = Path(__file__).resolve().parent.parent / "server.py"
        with log_file.open("w") as stderr:
            process = await asyncio.create_subprocess_exec(sys.executable, str(server_py), cwd=tmp_path, env=env,
                                                           stderr=stderr)
        try:
            await wait_for(lambda: _reachable(port), timeout=30, what="server up")
            call = asyncio.create_task(run_agent_call(f"ws://127.0.0.1:{port}/agent", quiet(10.0), tail=10.0))
            session = await fake.session()
            await asyncio.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            result = await asyncio.wait_for(call, 15)
            code = await asyncio.wait_for(process.wait(), 30)
        finally:
            if process.returncode is None:
                process.kill()
        await asyncio.wait_for(session.closed.wait(), 5)
    await stt.stop()
    log = log_file.read_text()
    assert code == 0
    assert result.closed_by_server and result.close_code == 1001
    assert f"agent call ended callSid={result.call_sid}" in log and "outcome=shutdown" in log
    assert "Authorization: Token [redacted]" in log  # the agent's handshake, still debuggable
    assert STT_KEY not in log


async def test_the_simulator_command_line_records_what_the_caller_heard(agents, tmp_path):
    import wave

    stack, fake = await agents(script=Script(greet=True, reply_to_text=True))
    caller = tmp_path / "caller.wav"
    with wave.open(str(caller), "wb") as out:  # 0.4 s of PCM16 silence at 16 kHz: converted by the simulator
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(b"\x00\x00" * 6400)
    heard = tmp_path / "heard.wav"
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__).resolve().parent.parent / "simulate.py"), "--agent", stack.url("/agent"),
        str(caller), "--record", str(heard), "--dtmf", "7@0.2", "--tail", "0.6", stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0
    call_sid, summary = out.decode().splitlines()
    assert call_sid.startswith("CA") and summary.startswith(call_sid) and "clears 0, dtmf 1" in summary
    with wave.open(str(heard)) as recording:
        assert (recording.getnchannels(), recording.getframerate(), recording.getsampwidth()) == (1, 8000, 2)
        pcm = np.frombuffer(recording.readframes(recording.getnframes()), dtype="<i2")
    greeting = codec.ulaw_to_pcm16(reply_audio(GREETING))
    assert greeting.tobytes() in pcm.tobytes()  # the greeting, then the reply to the keypress
    assert codec.ulaw_to_pcm16(reply_audio("You said something.", 0.5)).tobytes() in pcm.tobytes()
    assert fake.sessions[0].messages[0] == {"type": "InjectUserMessage",
                                            "content": "The caller pressed 7 on the phone keypad."}


async def test_the_simulator_command_line_lets_the_caller_speak_after_a_silence(agents, tmp_path):
    stack, fake = await agents(script=Script(greet=False))
    caller = tmp_path / "caller.ulaw"
    caller.write_bytes(tone(0.2))
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__).resolve().parent.parent / "simulate.py"), "--agent", stack.url("/agent"),
        str(caller), "--raw", "--speak-at", "0.5", "--tail", "0.2", stdout=asyncio.subprocess.PIPE)
    await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0
    # 0.5 s of silence, then the words (then the silence of the line while the caller listens)
    assert bytes(fake.sessions[0].audio).startswith(b"\xff" * 4000 + tone(0.2))
