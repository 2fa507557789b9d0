"""The TwiML webhook (/twiml, /twiml/action), per-call tokens, pre-connect, provider choice and transfers,
over real sockets: Twilio's requests are plain HTTP GETs signed with the `twilio` package's
`RequestValidator`, and the calls the TwiML describes are played by `simulate.run_agent_call`."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from urllib.parse import urlencode, urlsplit

import pytest
from twilio.request_validator import RequestValidator

from agent.openai_realtime import greeting_instructions
from conftest import STT_KEY
from fake_agent import FakeAgent, Reply, reply_audio
from fake_agent import Script as AgentScript
from fake_openai import Faults, FakeRealtime, Script
from simulate import run_agent_call
from test_agent import events_of, of_type, quiet, subscriber, tone
from test_agent_openai import KEY, realtime  # noqa: F401 (a fixture)
from test_integration import metric_values
from test_security import AUTH_TOKEN, PUBLIC_URL

CALL = "CA" + "0123456789abcdef" * 2
TARGETS = {"+15550001111": "the sales desk", "sip:support@pbx.example.com;transport=tls": "technical support"}


def new_call(n: int) -> str:
    return f"CA{n:032x}"


async def get(port: int, path: str, headers: dict | None = None) -> tuple[int, str, dict]:
    """(status, body, headers) of a plain HTTP GET to the proxy."""
    def fetch():
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode(), dict(response.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(), dict(exc.headers)
    return await asyncio.to_thread(fetch)


def twilio_query(call_sid: str = CALL, **ours: str) -> str:
    """Our query parameters, then the ones Twilio appends to a GET webhook."""
    return urlencode({**ours, "CallSid": call_sid, "AccountSid": "AC" + "f" * 32, "From": "+15557654321",
                      "To": "+15551234567", "CallStatus": "ringing", "Direction": "inbound",
                      "ApiVersion": "2010-04-01"})


def stream_of(twiml: str) -> tuple[ET.Element, str, dict[str, str]]:
    """(the document, the Stream's url, its Parameters)."""
    root = ET.fromstring(twiml)
    [stream] = root.iter("Stream")
    return root, stream.get("url"), {p.get("name"): p.get("value") for p in stream.iter("Parameter")}


# --- the TwiML -----------------------------------------------------------------------------------------


async def test_an_agent_call_gets_connect_with_action_a_stream_and_a_fresh_token(realtime):
    stack, fake = await realtime(agent_greeting="Hi.")
    status, body, headers = await get(stack.port, "/twiml?" + twilio_query(tenant="acme", dial="+15550001111"),
                                      {"Host": "proxy.example.com"})
    assert status == 200 and headers["Content-Type"].startswith("text/xml")
    root, url, parameters = stream_of(body)
    assert root.tag == "Response" and [c.tag for c in root] == ["Connect"]
    connect = root.find("Connect")
    assert connect.get("method") == "GET"
    assert connect.get("action") == "https://proxy.example.com/twiml/action?dial=%2B15550001111"
    assert url == "wss://proxy.example.com/agent"  # from Host, since PUBLIC_URL is not set
    assert set(parameters) == {"token", "tenant"} and parameters["tenant"] == "acme"
    assert len(parameters["token"]) >= 32
    _, _, again = stream_of((await get(stack.port, "/twiml?" + twilio_query(new_call(2))))[1])
    assert again["token"] != parameters["token"]  # one per call


async def test_the_webhooks_twiml_drives_the_call_and_its_provider_session_was_opened_by_the_webhook(realtime):
    stack, fake = await realtime(agent_greeting="Hi {tenant}.", require_webhook_token=True)
    listener = await subscriber(stack)
    _, body, _ = await get(stack.port, "/twiml?" + twilio_query(tenant="acme"))
    _, url, parameters = stream_of(body)
    session = await fake.session()  # opened by the webhook, before any stream
    await asyncio.sleep(0.3)
    result = await run_agent_call(stack.url(urlsplit(url).path), quiet(0.5), tail=0.5, params=parameters,
                                  call_sid=CALL)
    assert len(fake.sessions) == 1 and session.created_at < result.started_at
    greeting = reply_audio(greeting_instructions("Hi acme."))
    assert greeting in bytes(result.heard)
    events = await events_of(listener, CALL)
    assert of_type(events, "call_started")[0]["customParameters"] == {"tenant": "acme"}  # the token is not shown
    assert (await metric_values(stack.port))['agent_preconnects_total{result="used"}'] >= 1


@pytest.mark.parametrize("token", ["none", "wrong", "another-calls"])
async def test_with_require_webhook_token_a_stream_without_its_calls_token_is_refused(realtime, token):
    stack, fake = await realtime(require_webhook_token=True)
    _, body, _ = await get(stack.port, "/twiml?" + twilio_query())
    _, _, parameters = stream_of(body)
    _, other_body, _ = await get(stack.port, "/twiml?" + twilio_query(new_call(7)))
    presented = {"none": {}, "wrong": {"token": "x" * 32},
                 "another-calls": {"token": stream_of(other_body)[2]["token"]}}[token]
    result = await run_agent_call(stack.url("/agent"), quiet(0.3), tail=0.3, params=presented, call_sid=CALL)
    assert result.close_code == 1008 and result.received == b""


async def test_transcribe_mode_starts_a_both_tracks_stream_and_dials(realtime):
    stack, fake = await realtime(public_url=PUBLIC_URL)
    status, body, _ = await get(stack.port, "/twiml?" + twilio_query(mode="transcribe", dial="+15550001111",
                                                                     tenant="acme"))
    root, url, parameters = stream_of(body)
    assert status == 200 and [c.tag for c in root] == ["Start", "Dial"]
    assert root.find("Start/Stream").get("track") == "both_tracks" and url == PUBLIC_URL + "/twilio"
    assert root.find("Dial/Number").text == "+15550001111" and set(parameters) == {"token", "tenant"}
    sip = stream_of((await get(stack.port, "/twiml?" + twilio_query(new_call(3), mode="transcribe",
                                                                    dial="sip:desk@pbx.example.com")))[1])[0]
    assert sip.find("Dial/Sip").text == "sip:desk@pbx.example.com"


@pytest.mark.parametrize("query, reason", [
    ({"mode": "transcribe"}, "needs dial"),
    ({"mode": "transcribe", "dial": "+15550001111</Number></Dial><Dial>+19005550000"}, "neither a phone number"),
    ({"dial": "sip:a@b.com\"/><Hangup/>"}, "neither a phone number"),
    ({"dial": "5550001111"}, "neither a phone number"),
    ({"mode": "record"}, "mode must be"),
    ({"token": "mine"}, "cannot be a <Parameter> name"),
    ({"agent": "watson"}, "not allowed here"),
    ({"tenant": "x" * 500}, "under 500"),
], ids=["no-dial", "dial-injection", "sip-injection", "not-e164", "bad-mode", "token-param", "agent-not-allowed",
        "long-parameter"])
async def test_a_query_that_cannot_make_safe_twiml_is_refused_with_400(realtime, query, reason):
    stack, fake = await realtime()
    status, body, _ = await get(stack.port, "/twiml?" + twilio_query(**query))
    assert status == 400 and reason in body


async def test_parameter_values_are_escaped_so_they_cannot_inject_twiml(realtime):
    stack, fake = await realtime()
    nasty = 'acme"/></Stream></Connect><Dial>+19005550000</Dial><Connect><Stream url="x&amp;'
    status, body, _ = await get(stack.port, "/twiml?" + twilio_query(tenant=nasty))
    root, _, parameters = stream_of(body)
    assert status == 200 and parameters["tenant"] == nasty  # a value, exactly as given
    assert not list(root.iter("Dial")) and len(list(root.iter("Stream"))) == 1


async def test_no_call_sid_means_the_url_is_not_twilios_webhook(realtime):
    stack, fake = await realtime()
    status, body, _ = await get(stack.port, "/twiml?tenant=acme")
    assert status == 400 and "CallSid" in body


# --- Twilio's signature over the full URL ---------------------------------------------------------------


@pytest.mark.parametrize("case", ["valid", "missing", "wrong", "other-url"])
async def test_the_webhook_checks_twilios_signature_over_the_full_url_with_its_query(realtime, case):
    stack, fake = await realtime(twilio_auth_token=AUTH_TOKEN, public_url=PUBLIC_URL)
    path = "/twiml?" + twilio_query(tenant="acme")
    url = "https://proxy.example.com" + path  # what Twilio requested, as configured in its console
    validator = RequestValidator(AUTH_TOKEN)
    signature = validator.compute_signature(url, {})
    assert validator.validate(url, {}, signature)
    headers = {"valid": {"X-Twilio-Signature": signature}, "missing": {},
               "wrong": {"X-Twilio-Signature": validator.compute_signature(url, {}) [:-4] + "AAA="},
               "other-url": {"X-Twilio-Signature": validator.compute_signature(
                   "https://proxy.example.com/twiml?" + twilio_query(tenant="other"), {})}}[case]
    before = await metric_values(stack.port)
    status, body, _ = await get(stack.port, path, headers)
    if case == "valid":
        assert status == 200 and stream_of(body)[1] == PUBLIC_URL + "/agent"
        return
    assert status == 403 and fake.sessions == []  # nothing opened for an unsigned request
    after = await metric_values(stack.port)
    assert sum(v for k, v in after.items() if k.startswith('auth_failures_total{') and 'endpoint="twiml"' in k) - sum(
        v for k, v in before.items() if k.startswith('auth_failures_total{') and 'endpoint="twiml"' in k) == 1


# --- pre-connect ------------------------------------------------------------------------------------------


async def test_a_session_opened_by_the_webhook_is_closed_if_no_stream_comes(realtime):
    stack, fake = await realtime(agent_preconnect_seconds=0.5)
    await get(stack.port, "/twiml?" + twilio_query())
    session = await fake.session()
    await asyncio.wait_for(session.closed.wait(), 5)
    assert (await metric_values(stack.port))['agent_preconnects_total{result="expired"}'] >= 1
    _, body, _ = await get(stack.port, "/twiml?" + twilio_query(new_call(9)))
    await asyncio.wait_for((await fake.session()).closed.wait(), 5)
    result = await run_agent_call(stack.url("/agent"), quiet(0.3), tail=0.3, call_sid=new_call(9),
                                  params=stream_of(body)[2])  # a late stream
    assert len(fake.sessions) == 3 and result.received  # still served, by a new session


async def test_a_webhook_for_a_refused_provider_key_falls_back_when_the_stream_comes(realtime):
    stack, fake = await realtime(faults=Faults(refuse=401))
    _, body, _ = await get(stack.port, "/twiml?" + twilio_query(dial="+15550001111"))
    _, url, parameters = stream_of(body)
    result = await run_agent_call(stack.url("/agent"), quiet(3.0), tail=3.0, params=parameters, call_sid=CALL)
    assert result.closed_by_server and result.closed_at < 2.0
    status, action, _ = await get(stack.port, "/twiml/action?" + twilio_query(dial="+15550001111"))
    root = ET.fromstring(action)
    assert [c.tag for c in root] == ["Say", "Dial"] and root.find("Dial/Number").text == "+15550001111"


# --- per-call provider choice -----------------------------------------------------------------------------


async def test_a_call_picks_its_provider_among_the_allowed_ones(stacks, caplog):
    caplog.set_level(logging.WARNING, logger="agent.providers")
    async with FakeAgent(STT_KEY, AgentScript(greet=True)) as deepgram, FakeRealtime(KEY, Script()) as openai:
        stack = await stacks(deepgram_agent_url=deepgram.url, agent_provider="deepgram", openai_api_key=KEY,
                             openai_realtime_url=openai.url, agent_allowed_providers=("deepgram", "openai"),
                             agent_greeting="Hi.",
                             agent_provider_settings={"openai": {"max_output_tokens": 200},
                                                      "deepgram": {"agent": {"language": "en"}}})
        listener = await subscriber(stack)
        a = await run_agent_call(stack.url("/agent"), quiet(0.4), tail=0.5, params={"agent": "openai"})
        b = await run_agent_call(stack.url("/agent"), quiet(0.4), tail=0.5)
        c = await run_agent_call(stack.url("/agent"), quiet(0.4), tail=0.5, params={"agent": "embedded"})
        assert len(openai.sessions) == 1 and len(deepgram.sessions) == 2
        assert openai.sessions[0].update["session"]["max_output_tokens"] == 200  # its section of the file
        assert deepgram.sessions[0].settings["agent"]["language"] == "en"
        assert "max_output_tokens" not in json.dumps(deepgram.sessions[0].settings)
        providers = [of_type(await events_of(listener, r.call_sid), "call_started")[0]["provider"] for r in (a, b, c)]
    assert providers == ["openai", "deepgram", "deepgram"]
    assert any("asked for agent provider 'embedded'" in r.getMessage() for r in caplog.records)


# --- transfer to a person ---------------------------------------------------------------------------------


async def test_transfer_call_plays_the_goodbye_closes_the_stream_and_the_action_dials_the_target(realtime):
    script = Script(greet=False, replies=[Reply("Transferring you now.", 0.8,
                                                ("transfer_call", {"target": "+15550001111"}))])
    stack, fake = await realtime(script=script, transfer_targets=TARGETS, agent_greeting="")
    listener = await subscriber(stack)
    _, body, _ = await get(stack.port, "/twiml?" + twilio_query(dial="+15559999999"))
    _, url, parameters = stream_of(body)
    result = await run_agent_call(stack.url("/agent"), quiet(0.3) + tone(0.4) + quiet(8.0), tail=8.0,
                                  params=parameters, call_sid=CALL)
    session = fake.sessions[0]
    schema = next(t for t in session.update["session"]["tools"] if t["name"] == "transfer_call")
    assert schema["parameters"]["properties"]["target"]["enum"] == list(TARGETS)
    assert result.closed_by_server and result.close_code == 1000
    assert reply_audio("Transferring you now.", 0.8) in bytes(result.heard)  # the goodbye, to the end
    assert result.closed_at >= result.echoed[-1][0]
    status, action, _ = await get(stack.port, "/twiml/action?" + twilio_query(dial="+15559999999"))
    root = ET.fromstring(action)
    assert [c.tag for c in root] == ["Dial"] and root.find("Dial/Number").text == "+15550001111"
    events = await events_of(listener, CALL)
    call = of_type(events, "tool_call")[0]
    assert (call["name"], call["arguments"]) == ("transfer_call", {"target": "+15550001111"})
    ended = of_type(events, "call_ended")[0]
    assert ended["endOfCall"] == "end_call" and ended["endReason"] == "transfer to +15550001111"


async def test_a_target_not_on_the_list_is_refused_to_the_model_and_never_dialled(realtime):
    script = Script(greet=False, replies=[Reply("Sorry, I cannot: {result}", 0.4,
                                                ("transfer_call", {"target": "+19005550000"}))])
    stack, fake = await realtime(script=script, transfer_targets=TARGETS, agent_greeting="")
    listener = await subscriber(stack)
    _, body, _ = await get(stack.port, "/twiml?" + twilio_query())
    _, _, parameters = stream_of(body)
    result = await run_agent_call(stack.url("/agent"), quiet(0.3) + tone(0.4) + quiet(1.5), tail=1.0,
                                  params=parameters, call_sid=CALL)
    output = next(m for m in fake.sessions[0].messages if m["type"] == "conversation.item.create")["item"]["output"]
    assert "invalid arguments for transfer_call" in json.loads(output)["error"]
    assert not result.closed_by_server  # the call went on
    _, action, _ = await get(stack.port, "/twiml/action?" + twilio_query())
    assert "+19005550000" not in action and ET.fromstring(action).find("Dial") is None
    result_event = of_type(await events_of(listener, CALL), "tool_result")[0]
    assert (result_event["ok"], result_event["error"]) == (False, "bad_arguments")


async def test_after_end_call_the_action_hangs_up(realtime):
    script = Script(greet=False, replies=[Reply("Goodbye.", 0.4, ("end_call", {"reason": "done"}))])
    stack, fake = await realtime(script=script, agent_greeting="")
    _, body, _ = await get(stack.port, "/twiml?" + twilio_query(dial="+15559999999"))
    result = await run_agent_call(stack.url("/agent"), quiet(0.3) + tone(0.4) + quiet(6.0), tail=6.0,
                                  params=stream_of(body)[2], call_sid=CALL)
    assert result.closed_by_server
    _, action, _ = await get(stack.port, "/twiml/action?" + twilio_query(dial="+15559999999"))
    assert [c.tag for c in ET.fromstring(action)] == ["Hangup"]
