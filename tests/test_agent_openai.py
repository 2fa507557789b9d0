"""OpenAI Realtime agents over real sockets: simulated caller -> server -> fake OpenAI Realtime server.

The caller is `simulate.run_agent_call` (Twilio's side of a <Connect><Stream>: real-time playback,
mark echoes, `clear`); the provider is `tests/fake_openai.FakeRealtime`, which validates every
event both ways against the `openai` package's classes (`session.violations` must stay empty),
keeps the conversation as the API does, and refuses a truncate beyond an item's audio with the
API's words (`session.rejected` must stay empty). The central check: after a barge-in, the
assistant item in the fake's conversation is cut where the caller stopped hearing it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging

import pytest
from websockets.asyncio.client import connect

from agent.openai_realtime import OpenAIRealtime, greeting_instructions, session_update
from agent.provider import AgentAudio, AgentAudioDone, AgentSetup
from agent.tools import CallContext, load_tools
from conftest import wait_for
from fake_agent import Reply, check, reply_audio
from fake_openai import CLIENT_MODELS, Faults, FakeRealtime, Script
from simulate import run_agent_call
from test_agent import TOOLS, codec_b64, events_of, of_type, padded, prefix_heard, quiet, subscriber, tone
from test_integration import metric_values

KEY = "sk-test-openai-key-0123456789"
GREETING = "Hello! How can I help you today?"
LONG_GREETING = "Thank you for calling the Acme support line, how may I help you with your order today?"


def spoken(greeting: str) -> bytes:
    """The fake speaks a response.create's instructions: the greeting's audio."""
    return reply_audio(greeting_instructions(greeting))


@pytest.fixture
async def realtime(stacks):
    """Factory: `stack, fake = await realtime(script=..., faults=..., **settings)`."""
    fakes = []

    async def make(script: Script | None = None, faults: Faults | None = None, **settings):
        fake = await FakeRealtime(KEY, script, faults).__aenter__()
        fakes.append(fake)
        values = dict(openai_realtime_url=fake.url, openai_api_key=KEY, agent_provider="openai")
        stack = await stacks(**{**values, **settings})
        return stack, fake

    yield make
    for fake in fakes:
        await fake.__aexit__()


def assert_clean(result, session) -> None:
    assert result.violations == [] and session.violations == [] and session.rejected == []


def assert_cut_where_heard(audio_end_ms: int, heard_bytes: int) -> None:
    """Truncated within one 20 ms frame of what the caller heard. The simulated caller plays whole
    20 ms frames, so what it heard is a multiple of 20 ms, counting the frame in progress when the
    `clear` arrived; the ledger's estimate is continuous and lags by the sockets' latency (a mark
    echo's and the clear's trip): below by up to one frame plus 5 ms for those."""
    assert -25 <= audio_end_ms - heard_bytes / 8 <= 20, (audio_end_ms, heard_bytes / 8)


# --- the session contract and the greeting ---------------------------------------------------------


async def test_the_session_is_configured_for_twilio_and_the_greeting_is_heard_byte_exact(realtime):
    stack, fake = await realtime(agent_greeting=GREETING, agent_voice="cedar")
    listener = await subscriber(stack)
    result = await run_agent_call(stack.url("/agent"), quiet(0.5), tail=0.5, params={"tenant": "acme"})
    session = fake.sessions[0]
    assert_clean(result, session)
    assert session.headers["Authorization"] == f"Bearer {KEY}" and "OpenAI-Beta" not in session.headers
    update = session.update
    assert check(update, CLIENT_MODELS) is None  # valid, no unknown field anywhere
    s = update["session"]
    assert s["type"] == "realtime" and s["output_modalities"] == ["audio"]
    assert s["audio"]["input"]["format"] == {"type": "audio/pcmu"} == s["audio"]["output"]["format"]
    assert s["audio"]["output"]["voice"] == "cedar"
    assert s["audio"]["input"]["turn_detection"] == {"type": "server_vad"}
    assert s["tools"] == [{"type": "function", **schema} for schema in load_tools(None).schemas()]
    first = session.messages[0]
    assert first["type"] == "response.create" and first["response"] == {"instructions": greeting_instructions(GREETING)}
    assert bytes(result.received) == padded(spoken(GREETING))  # every byte, in order, padded only at its end
    marks = [m["mark"]["name"] for _, m in result.messages if m["event"] == "mark"]
    item_id = session.replies[0][2]
    assert marks and all(name.startswith(item_id + "/") for name in marks)  # the segment is the item

    events = await events_of(listener, result.call_sid)
    started = events[0]
    assert (started["mode"], started["provider"]) == ("agent", "openai")
    line = [e for e in of_type(events, "conversation") if e["role"] == "agent"][0]
    assert (line["text"], line["segment"]) == (greeting_instructions(GREETING), item_id) and "interrupted" not in line
    totals = {"input": sum(u["input_tokens"] for u in session.usages),
              "output": sum(u["output_tokens"] for u in session.usages),
              "outputAudio": sum(u["output_token_details"]["audio_tokens"] for u in session.usages)}
    usage = of_type(events, "usage")[-1]["tokens"]
    assert {k: usage[k] for k in totals} == totals and totals["outputAudio"] > 0
    assert of_type(events, "call_ended")[0]["agent"]["tokens"] == usage


def test_the_contract_check_catches_a_misspelled_field_the_beta_format_and_a_fractional_truncate():
    setup = AgentSetup(CallContext("CA1"), "prompt", "hi", load_tools(None),
                       {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}}}, "max_output_tokens": 300})
    update = session_update(setup, voice="marin", turn_detection={"type": "semantic_vad", "eagerness": "low"})
    assert check(update, CLIENT_MODELS) is None
    assert update["session"]["audio"]["input"]["format"] == {"type": "audio/pcmu"}  # ours, whatever the file says
    assert update["session"]["max_output_tokens"] == 300  # the rest of the file is merged in
    update["session"]["instructoins"] = "typo"
    assert "unknown fields ['$.session.instructoins']" in check(update, CLIENT_MODELS)
    beta = {"type": "session.update", "session": {"type": "realtime", "audio": {"input": {"format": "g711_ulaw"}}}}
    assert check(beta, CLIENT_MODELS) is not None
    truncate = {"type": "conversation.item.truncate", "item_id": "item_1", "content_index": 0, "audio_end_ms": 1250}
    assert check(truncate, CLIENT_MODELS) is None
    assert check({**truncate, "audio_end_ms": 1250.5}, CLIENT_MODELS) is not None


async def test_the_fake_refuses_a_truncate_beyond_the_items_audio_in_the_apis_words():
    """The fake can fail: a bridge that truncates at its own clock gets the error public bridges get."""
    async with FakeRealtime(KEY, Script(greet=True)) as fake:
        async with connect(fake.url, additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
            await ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime"}}))
            await ws.send(json.dumps({"type": "response.create", "response": {"instructions": "Hi"}}))
            events = []
            while not any(e["type"] == "response.done" for e in events):
                events.append(json.loads(await ws.recv()))
            item = next(e["item_id"] for e in events if e["type"] == "response.output_audio.delta")
            audio = sum(len(base64.b64decode(e["delta"])) for e in events if e["type"] == "response.output_audio.delta")
            await ws.send(json.dumps({"type": "conversation.item.truncate", "event_id": "t1", "item_id": item,
                                      "content_index": 0, "audio_end_ms": audio // 8 + 1}))
            error = json.loads(await ws.recv())
            await ws.send(json.dumps({"type": "conversation.item.truncate", "item_id": item, "content_index": 0,
                                      "audio_end_ms": audio // 8}))
            truncated = json.loads(await ws.recv())
        session = fake.sessions[0]
    assert error["type"] == "error" and error["error"]["event_id"] == "t1"
    assert error["error"]["message"] == f"Audio content of {audio // 8}ms is already shorter than {audio // 8 + 1}ms"
    assert truncated["type"] == "conversation.item.truncated" and truncated["audio_end_ms"] == audio // 8
    assert session.truncations == [(item, audio // 8)] and len(session.rejected) == 1


async def test_the_provider_never_truncates_beyond_the_audio_it_received_and_unheard_items_go_to_zero():
    """Defence in depth: whatever heard_ms the bridge passes, audio_end_ms stays within the item."""
    async with FakeRealtime(KEY, Script(greet=False, vad=False)) as fake:
        setup = AgentSetup(CallContext("CAtr"), "prompt", "", load_tools(None))
        provider = OpenAIRealtime(setup, url=fake.url, api_key=KEY)
        await provider.start()
        session = await fake.session()
        done = []

        async def read() -> None:
            async for event in provider.events():
                if isinstance(event, AgentAudioDone):
                    done.append(event.segment)

        reader = asyncio.create_task(read())
        await session.say("first", 1.0)
        await session.say("second", 0.5)
        await wait_for(lambda: len(done) == 2, what="both items")
        provider.interrupted(done[0], 10_000)  # more than the item's 1000 ms
        await wait_for(lambda: len(session.truncations) == 2, what="the truncates")
        reader.cancel()
        await provider.close()
    assert session.truncations == [(done[0], 1000), (done[1], 0)] and session.rejected == []
    assert session.violations == []


# --- barge-in: the item is cut where the caller stopped hearing it ---------------------------------


@pytest.mark.parametrize("speed, speak_at", [(0.0, 1.0), (0.0, 2.5), (2.0, 1.0), (2.0, 1.8)],
                         ids=["all-sent-still-playing-1s", "all-sent-still-playing-2.5s", "still-arriving-1s",
                              "still-arriving-1.8s"])
async def test_barge_in_truncates_the_item_exactly_where_the_caller_stopped_hearing_it(realtime, speed, speak_at):
    stack, fake = await realtime(script=Script(speed=speed), agent_greeting=LONG_GREETING)
    listener = await subscriber(stack)
    result = await run_agent_call(stack.url("/agent"), quiet(speak_at) + tone(0.5) + quiet(0.3), tail=1.0)
    session = fake.sessions[0]
    assert_clean(result, session)
    greeting, item_id = spoken(LONG_GREETING), session.replies[0][2]
    if speed == 0:  # everything had been sent before the caller spoke: the clear must still come
        done_at = next(t for t, text in session.sent if '"response.output_audio.done"' in text)
        assert done_at < session.barge_ins[0]
    assert len(result.clears) == 1
    heard = prefix_heard(bytes(result.heard), greeting)
    assert greeting[heard:heard + 1600] not in bytes(result.heard)  # nothing more of it after the clear
    [(truncated_item, audio_end_ms)] = session.truncations
    assert truncated_item == item_id
    assert_cut_where_heard(audio_end_ms, heard)
    item = session.items[item_id]
    assert item.truncated_ms == audio_end_ms and len(item.audio) == audio_end_ms * 8  # the conversation is cut there
    events = await events_of(listener, result.call_sid)
    barge = of_type(events, "barge_in")[0]
    assert barge["segment"] == item_id and barge["heardSeconds"] == pytest.approx(audio_end_ms / 1000, abs=0.002)
    cut = [e for e in of_type(events, "conversation") if e["role"] == "agent"][0]
    assert cut["interrupted"] and cut["segment"] == item_id
    assert reply_audio("You said something.", 0.5) in bytes(result.heard)  # the next reply plays


async def test_a_barge_in_on_the_second_reply_truncates_that_reply(realtime):
    long_reply = "Your order A17 left our warehouse on Monday and should reach you by Thursday afternoon."
    stack, fake = await realtime(script=Script(replies=[Reply(long_reply), Reply("Sure.", 0.4)]),
                                 agent_greeting="Hi.")
    after_greeting = len(spoken("Hi.")) / 8000 + 0.3
    result = await run_agent_call(stack.url("/agent"), quiet(after_greeting) + tone(0.4) + quiet(2.0) + tone(0.4)
                                  + quiet(0.3), tail=1.0)
    session = fake.sessions[0]
    assert_clean(result, session)
    reply_item = next(item_id for text, _, item_id in session.replies if text == long_reply)
    heard = prefix_heard(bytes(result.heard), reply_audio(long_reply))
    assert [item for item, _ in session.truncations] == [reply_item]  # the greeting had played in full
    assert_cut_where_heard(session.truncations[0][1], heard)
    assert reply_audio("Sure.", 0.4) in bytes(result.heard)


async def test_a_barge_in_before_any_audio_truncates_nothing(realtime):
    stack, fake = await realtime(script=Script(first_audio_delay=1.5), agent_greeting=GREETING)
    result = await run_agent_call(stack.url("/agent"), quiet(0.4) + tone(0.4) + quiet(0.3), tail=3.0)
    session = fake.sessions[0]
    assert_clean(result, session)
    assert session.barge_ins and session.truncations == []  # the caller spoke before the greeting's first audio
    assert result.clears == []  # nothing was playing
    cancelled = [json.loads(text) for _, text in session.sent if '"response.done"' in text]
    assert cancelled[0]["response"]["status"] == "cancelled"  # the server cancelled it (interrupt_response)
    assert spoken(GREETING)[:800] not in bytes(result.received)
    assert reply_audio("You said something.", 0.5) in bytes(result.heard)  # the answer to the caller plays


async def test_late_audio_of_an_interrupted_response_never_reaches_the_caller(realtime):
    stack, fake = await realtime(faults=Faults(late_audio=True), agent_greeting=LONG_GREETING)
    result = await run_agent_call(stack.url("/agent"), quiet(1.0) + tone(0.4) + quiet(0.2), tail=1.0)
    clear_at = result.clears[0]
    after_clear = b"".join(codec_b64(m) for t, m in result.messages if t > clear_at and m["event"] == "media")
    assert spoken(LONG_GREETING)[:500] not in after_clear and fake.sessions[0].rejected == []


# --- tools, DTMF ---------------------------------------------------------------------------------------


async def test_tools_run_their_outputs_go_back_and_the_model_answers_once_per_response(realtime, tmp_path):
    path = tmp_path / "tools.py"
    path.write_text(TOOLS)
    script = Script(greet=False, replies=[
        Reply("Your order: {result}", 0.3, ("lookup_order", {"order_id": "A17"})),
        Reply("That failed: {result}", 0.3, ("broken", {"order_id": "A17"}))])
    stack, fake = await realtime(script=script, agent_tools=load_tools(str(path)), agent_greeting="")
    listener = await subscriber(stack)
    result = await run_agent_call(stack.url("/agent"), quiet(0.3) + tone(0.4) + quiet(1.5) + tone(0.4) + quiet(0.3),
                                  tail=1.0, params={"tenant": "acme"})
    session = fake.sessions[0]
    assert_clean(result, session)
    outputs = [m for m in session.messages if m["type"] == "conversation.item.create"]
    assert [json.loads(m["item"]["output"]).get("status") for m in outputs] == ["shipped", None]
    assert "database down" in json.loads(outputs[1]["item"]["output"])["error"]
    creates = [m for m in session.messages if m["type"] == "response.create"]
    assert len(creates) == 2  # one answer per function call, after its output
    spoken_text = [text for text, _, _ in session.replies]
    assert spoken_text[0].startswith("Your order: {") and "acme" in spoken_text[0]
    assert reply_audio(spoken_text[0], 0.3) in bytes(result.heard)
    assert len(result.received) == sum(len(padded(audio)) for _, audio, _ in session.replies)
    events = await events_of(listener, result.call_sid)
    assert [(r["name"], r["ok"], r["error"]) for r in of_type(events, "tool_result")] == [
        ("lookup_order", True, None), ("broken", False, "exception")]
    assert not any(e.get("fatal") is False for e in of_type(events, "error"))  # no refused response.create


async def test_keypresses_become_a_user_message_and_an_answer(realtime):
    stack, fake = await realtime(script=Script(greet=False), agent_greeting="")
    listener = await subscriber(stack)
    result = await run_agent_call(stack.url("/agent"), quiet(1.5), dtmf=[(0.3, "42#")], tail=1.0)
    session = fake.sessions[0]
    assert_clean(result, session)
    item = next(m for m in session.messages if m["type"] == "conversation.item.create")["item"]
    assert item == {"type": "message", "role": "user",
                    "content": [{"type": "input_text", "text": "The caller pressed 4 2 # on the phone keypad."}]}
    assert [m["type"] for m in session.messages] == ["conversation.item.create", "response.create"]
    assert reply_audio("You said something.", 0.5) in bytes(result.heard)
    assert [e["digit"] for e in of_type(await events_of(listener, result.call_sid), "dtmf")] == ["4", "2", "#"]


async def test_usage_reaches_metrics_and_the_end_of_call_line(realtime, caplog):
    caplog.set_level(logging.INFO, logger="agent.bridge")
    stack, fake = await realtime(agent_greeting=GREETING)
    before = await metric_values(stack.port)
    result = await run_agent_call(stack.url("/agent"), quiet(0.5) + tone(0.4) + quiet(0.3), tail=1.0)
    ended = f"agent call ended callSid={result.call_sid}"
    await wait_for(lambda: any(ended in r.getMessage() for r in caplog.records), what="the end-of-call line")
    line = next(r.getMessage() for r in caplog.records if ended in r.getMessage())
    after = await metric_values(stack.port)
    out_audio = sum(u["output_token_details"]["audio_tokens"] for u in fake.sessions[0].usages)
    key = 'agent_tokens_total{kind="outputAudio",provider="openai"}'
    assert after[key] - before.get(key, 0) == out_audio > 0
    assert f"outputAudio:{out_audio}" in line and "provider=openai" in line


# --- failures: fallback close within 2 s ------------------------------------------------------------


@pytest.mark.parametrize("faults, message", [
    (Faults(refuse=401), "OpenAI refused the connection: HTTP 401 Incorrect API key provided"),
    (Faults(settings_error=True), "OpenAI refused the session settings: invalid_request_error invalid_value: "
                                  "Invalid value: 'nova'."),
    (Faults(error_after=1.0), "OpenAI error: server_error server_error: The server had an error"),
    (Faults(drop_after=1.0), "OpenAI connection lost: no close frame"),
], ids=["401", "settings-refused", "error-mid-call", "dropped-mid-call"])
async def test_a_failing_provider_closes_the_twilio_socket_within_2_s_and_says_why(realtime, caplog, faults, message):
    caplog.set_level(logging.INFO, logger="agent.bridge")
    stack, fake = await realtime(faults=faults)
    listener = await subscriber(stack)
    result = await run_agent_call(stack.url("/agent"), quiet(6.0), tail=6.0)
    failed_at = fake.sessions[0].faulted_at if fake.sessions and fake.sessions[0].faulted_at else result.started_at
    assert result.closed_by_server and result.close_code == 1000
    assert result.started_at + result.closed_at - failed_at < 2.0
    events = await events_of(listener, result.call_sid)
    error = of_type(events, "error")[0]
    assert error["fatal"] and error["message"].startswith(message)
    assert of_type(events, "call_ended")[0]["endOfCall"] == "failed"
    assert any(r.levelname == "ERROR" and message in r.getMessage() for r in caplog.records)
    assert KEY not in caplog.text


async def test_a_provider_handshake_slower_than_the_connect_timeout_falls_back_within_2_s(realtime):
    stack, fake = await realtime(faults=Faults(handshake_delay=5.0), agent_connect_timeout=1.0)
    listener = await subscriber(stack)
    result = await run_agent_call(stack.url("/agent"), quiet(4.0), tail=4.0)
    assert result.closed_by_server and result.closed_at < 2.0
    error = of_type(await events_of(listener, result.call_sid), "error")[0]
    assert (error["code"], error["message"]) == ("timeout", "no OpenAI Realtime session within 1 s")


async def test_garbage_from_the_provider_is_counted_and_the_call_goes_on(realtime):
    stack, fake = await realtime(faults=Faults(garbage=True), agent_greeting=GREETING)
    before = await metric_values(stack.port)
    result = await run_agent_call(stack.url("/agent"), quiet(0.5), tail=0.5)
    assert bytes(result.received) == padded(spoken(GREETING)) and not result.closed_by_server
    after = await metric_values(stack.port)
    key = 'agent_provider_bad_messages_total{provider="openai"}'
    assert after[key] - before.get(key, 0) == 6


async def test_a_refused_response_create_is_a_warning_and_the_call_goes_on():
    """A keypress while the model speaks waits for response.done instead of being refused."""
    async with FakeRealtime(KEY, Script(greet=True, vad=False)) as fake:
        setup = AgentSetup(CallContext("CAdt"), "prompt", "Hi there.", load_tools(None))
        provider = OpenAIRealtime(setup, url=fake.url, api_key=KEY)
        await provider.start()
        session = await fake.session()
        segments = []

        async def read() -> None:
            async for event in provider.events():
                if isinstance(event, AgentAudio) and event.segment not in segments:
                    segments.append(event.segment)

        reader = asyncio.create_task(read())
        await wait_for(lambda: segments, what="the greeting's audio")
        provider.send_user_text("The caller pressed 1 on the phone keypad.")  # the greeting is still being made
        await wait_for(lambda: len(segments) == 2, what="the answer")
        reader.cancel()
        await provider.close()
    errors = [text for _, text in session.sent if '"type": "error"' in text]
    assert errors == [] and session.violations == []
