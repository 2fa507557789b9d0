"""Attacks on the proxy over real sockets: who may connect, how much, and what reaches the logs.

Twilio signatures are made with the official `twilio` SDK (`RequestValidator`), never with our
own code, so a mistake in `security.py` cannot be mirrored by the test. Each test names the
protection it checks; README "Security" lists them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from twilio.request_validator import RequestValidator
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

import security
from conftest import LISTEN_QUERY, Listener, wait_for, websocat_path, websocat_subscriber
from local_stt import LocalSTT
from simulate import CallOptions, CallRefused, TwilioStream, run_call
from test_integration import _reachable, metric_values, until_closed

AUTH_TOKEN = "0b5e1c7a9d3f4e2a8c6b1d0e9f7a3c5b"  # the shape of a Twilio auth token (32 hex digits)
PUBLIC_URL = "wss://proxy.example.com"  # what the TwiML says; the tests connect to 127.0.0.1
CLIENT_TOKENS = ("sub-token-alice-4f9c2e7b1a", "sub-token-bob-8d3a6f0c5e")
CALL_TOKEN = "call-token-2b7e9a4c1f6d"
GUESS = "sub-token-guessed-7c1d9e2f"  # a wrong token someone tried: kept out of the logs too
AUDIO = bytes(range(1, 255)) * 10  # 0.3 s


def sign(url: str, auth_token: str = AUTH_TOKEN) -> str:
    """The header Twilio would send for a websocket to `url`, computed by Twilio's own SDK."""
    return RequestValidator(auth_token).compute_signature(url, {})


async def refusal(url: str, headers=(), **kwargs) -> tuple[int, str, dict]:
    """Open a websocket that must be refused: (HTTP status, body, headers)."""
    try:
        async with connect(url, additional_headers=headers, **kwargs):
            pass
    except InvalidStatus as exc:
        response = exc.response
        return response.status_code, response.body.decode(), dict(response.headers.raw_items())
    raise AssertionError(f"{url} was upgraded")


def delta(before: dict, after: dict, name: str) -> float:
    return after.get(name, 0) - before.get(name, 0)


# --- Twilio signature on /twilio --------------------------------------------------------------


async def test_a_stream_signed_by_twilio_is_transcribed(stacks):
    stack = await stacks(twilio_auth_token=AUTH_TOKEN, public_url=PUBLIC_URL)
    signature = sign(PUBLIC_URL + "/twilio")
    assert RequestValidator(AUTH_TOKEN).validate(PUBLIC_URL + "/twilio", {}, signature)
    result = await run_call(stack.url("/twilio"), CallOptions(
        inbound=AUDIO, speed=0, additional_headers={"X-Twilio-Signature": signature}))
    assert result.close_code == 1000 and result.error is None
    await wait_for(lambda: stack.stt.connections and stack.stt.connections[-1].closed, what="end of call")
    assert bytes(stack.stt.connections[-1].audio[0]) == AUDIO


ATTACKS_ON_TWILIO = {
    "no signature": {},
    "signed with another account's token": {"X-Twilio-Signature": sign(PUBLIC_URL + "/twilio", "f" * 32)},
    "signed for another host": {"X-Twilio-Signature": sign("wss://attacker.example.net/twilio")},
    "signed for the https:// URL": {"X-Twilio-Signature": sign("https://proxy.example.com/twilio")},
    "signed for the URL the socket reaches (Host header)": {"X-Twilio-Signature": sign("ws://127.0.0.1/twilio")},
    "replayed from another path": {"X-Twilio-Signature": sign(PUBLIC_URL + "/client")},
    "garbage": {"X-Twilio-Signature": "not base64 at all ✓".encode().decode("latin-1")},
}


@pytest.mark.parametrize("headers", ATTACKS_ON_TWILIO.values(), ids=ATTACKS_ON_TWILIO.keys())
async def test_an_unsigned_or_missigned_stream_is_refused_with_403_before_the_upgrade(stacks, headers, caplog):
    stack = await stacks(twilio_auth_token=AUTH_TOKEN, public_url=PUBLIC_URL)
    before = await metric_values(stack.port)
    with pytest.raises(CallRefused, match="HTTP 403"):
        await run_call(stack.url("/twilio"), CallOptions(inbound=AUDIO, speed=0, additional_headers=headers))
    assert not stack.stt.connections and stack.proxy.hub.call_sids() == []  # nothing reached Deepgram
    reason = "missing_signature" if not headers else "bad_signature"
    after = await metric_values(stack.port)
    assert delta(before, after, f'auth_failures_total{{endpoint="twilio",reason="{reason}"}}') == 1
    assert any("refused /twilio" in r.getMessage() and reason in r.getMessage() for r in caplog.records)


async def test_a_valid_signature_does_not_cover_a_query_string_or_a_second_copy(stacks):
    """Replays of a genuine signature: the same URL plus a query; and two headers, one genuine."""
    stack = await stacks(twilio_auth_token=AUTH_TOKEN, public_url=PUBLIC_URL)
    genuine = sign(PUBLIC_URL + "/twilio")
    status, body, _ = await refusal(stack.url("/twilio?callSid=CAother"), {"X-Twilio-Signature": genuine})
    assert status == 403 and "X-Twilio-Signature" in body
    status, _, _ = await refusal(stack.url("/twilio"), [("X-Twilio-Signature", genuine),
                                                       ("X-Twilio-Signature", sign(PUBLIC_URL + "/x"))])
    assert status == 403


async def test_public_url_with_a_path_prefix_is_what_gets_signed(stacks):
    """Behind a proxy that maps https://host/transcribe/* to us, Twilio signs the prefixed URL."""
    stack = await stacks(twilio_auth_token=AUTH_TOKEN, public_url="wss://host.example.com/transcribe")
    with pytest.raises(CallRefused, match="HTTP 403"):
        await run_call(stack.url("/twilio"), CallOptions(
            inbound=AUDIO, speed=0, additional_headers={"X-Twilio-Signature": sign("wss://host.example.com/twilio")}))
    result = await run_call(stack.url("/twilio"), CallOptions(
        inbound=AUDIO, speed=0,
        additional_headers={"X-Twilio-Signature": sign("wss://host.example.com/transcribe/twilio")}))
    assert result.close_code == 1000


# --- subscriber tokens on /client -------------------------------------------------------------


async def test_subscribers_with_a_token_in_the_header_or_the_query_are_let_in(stacks):
    stack = await stacks(client_tokens=CLIENT_TOKENS)
    async with connect(stack.url("/client"), additional_headers={"Authorization": f"Bearer {CLIENT_TOKENS[0]}"}) as ws:
        assert json.loads(await ws.recv()) == []
    async with connect(stack.url(f"/client?token={CLIENT_TOKENS[1]}")) as ws:
        assert json.loads(await ws.recv()) == []
    async with connect(stack.url("/client"), additional_headers={"Authorization": f"bearer {CLIENT_TOKENS[1]}"}) as ws:
        assert json.loads(await ws.recv()) == []  # the scheme is case-insensitive (RFC 7235)


ATTACKS_ON_CLIENT = {
    "no token": ("/client", {}),
    "wrong token": ("/client", {"Authorization": "Bearer sub-token-mallory-000000"}),
    "a valid token's prefix": ("/client", {"Authorization": f"Bearer {CLIENT_TOKENS[0][:-1]}"}),
    "a valid token in other case": ("/client", {"Authorization": f"Bearer {CLIENT_TOKENS[0].upper()}"}),
    "a valid token, Basic scheme": ("/client", {"Authorization": "Basic " + base64.b64encode(
        f"x:{CLIENT_TOKENS[0]}".encode()).decode()}),
    "an empty bearer": ("/client", {"Authorization": "Bearer "}),
    "wrong token in the query": ("/client?token=nope", {}),
    "two query tokens, one valid": (f"/client?token=nope&token={CLIENT_TOKENS[0]}", {}),
    "wrong header, valid query": (f"/client?token={CLIENT_TOKENS[0]}", {"Authorization": "Bearer nope"}),
    "a Twilio signature instead": ("/client", {"X-Twilio-Signature": sign(PUBLIC_URL + "/client")}),
}


@pytest.mark.parametrize("path, headers", ATTACKS_ON_CLIENT.values(), ids=ATTACKS_ON_CLIENT.keys())
async def test_a_subscriber_without_a_valid_token_is_refused_with_401_before_the_upgrade(stacks, path, headers):
    stack = await stacks(client_tokens=CLIENT_TOKENS)
    before = await metric_values(stack.port)
    status, body, response_headers = await refusal(stack.url(path), headers)
    assert status == 401 and "token" in body
    assert response_headers["WWW-Authenticate"].startswith("Bearer")
    assert stack.proxy.hub.subscriber_count() == 0
    after = await metric_values(stack.port)
    assert sum(delta(before, after, f'auth_failures_total{{endpoint="client",reason="{r}"}}')
               for r in ("missing_token", "bad_token", "several_tokens")) == 1


# A browser's WebSocket can set no header but Sec-WebSocket-Protocol, and the dashboard must not
# put its token in a URL: it offers ["twilio-transcribe", "bearer.<token>"] (README "Dashboard").


async def test_a_token_offered_as_a_subprotocol_lets_the_subscriber_in_and_is_never_echoed(stacks):
    stack = await stacks(client_tokens=CLIENT_TOKENS)
    async with connect(stack.url("/client"), subprotocols=[security.SUBPROTOCOL, f"bearer.{CLIENT_TOKENS[1]}"]) as ws:
        assert json.loads(await ws.recv()) == []
        assert ws.subprotocol == security.SUBPROTOCOL
        assert ws.response.headers.get_all("Sec-WebSocket-Protocol") == [security.SUBPROTOCOL]
        assert CLIENT_TOKENS[1] not in str(ws.response.headers)
    # The same, with the token on a second header line (RFC 6455 allows either).
    async with connect(stack.url("/client"), subprotocols=[security.SUBPROTOCOL],
                       additional_headers=[("Sec-WebSocket-Protocol", f"bearer.{CLIENT_TOKENS[0]}")]) as ws:
        assert json.loads(await ws.recv()) == [] and ws.subprotocol == security.SUBPROTOCOL


async def test_subprotocols_change_nothing_for_clients_that_offer_none_or_others(stack):
    """Without CLIENT_TOKENS: websocat and programs offer no subprotocol and get none; a client
    offering only others (and no token) goes on without one, as before."""
    async with connect(stack.url("/client")) as ws:
        assert json.loads(await ws.recv()) == [] and ws.subprotocol is None
    async with connect(stack.url("/client"), subprotocols=["chat"]) as ws:  # type: ignore[list-item]
        assert json.loads(await ws.recv()) == [] and ws.subprotocol is None
    async with connect(stack.url("/client"), subprotocols=[security.SUBPROTOCOL]) as ws:
        assert json.loads(await ws.recv()) == [] and ws.subprotocol == security.SUBPROTOCOL


VALID = CLIENT_TOKENS[0]
ATTACKS_BY_SUBPROTOCOL = {
    "wrong token": ("/client", [security.SUBPROTOCOL, "bearer.sub-token-mallory-000000"], {}, "bad_token"),
    "a valid token's prefix": ("/client", [security.SUBPROTOCOL, f"bearer.{VALID[:-1]}"], {}, "bad_token"),
    "a valid token with a suffix": ("/client", [security.SUBPROTOCOL, f"bearer.{VALID}x"], {}, "bad_token"),
    "a valid token in other case": ("/client", [security.SUBPROTOCOL, f"bearer.{VALID.upper()}"], {}, "bad_token"),
    "an empty token": ("/client", [security.SUBPROTOCOL, "bearer."], {}, "bad_token"),
    "a valid token without the bearer. prefix": ("/client", [security.SUBPROTOCOL, VALID], {}, "missing_token"),
    "a valid token under another prefix": ("/client", [security.SUBPROTOCOL, f"Bearer.{VALID}"], {}, "missing_token"),
    "only our subprotocol": ("/client", [security.SUBPROTOCOL], {}, "missing_token"),
    "two tokens, one valid": ("/client", [security.SUBPROTOCOL, "bearer.nope-nope-nope-nope", f"bearer.{VALID}"], {},
                              "several_tokens"),
    "the valid token twice": ("/client", [security.SUBPROTOCOL, f"bearer.{VALID}", f"bearer.{VALID}"], {},
                              "several_tokens"),
    "valid subprotocol, wrong header": ("/client", [security.SUBPROTOCOL, f"bearer.{VALID}"],
                                        {"Authorization": "Bearer nope"}, "several_tokens"),
    "valid subprotocol, wrong query": ("/client?token=nope", [security.SUBPROTOCOL, f"bearer.{VALID}"], {},
                                       "several_tokens"),
    "valid query, wrong subprotocol": (f"/client?token={VALID}", [security.SUBPROTOCOL, "bearer.nope"], {},
                                       "several_tokens"),
}


@pytest.mark.parametrize("path, subprotocols, headers, reason", ATTACKS_BY_SUBPROTOCOL.values(),
                         ids=ATTACKS_BY_SUBPROTOCOL.keys())
async def test_a_wrong_missing_or_doubled_subprotocol_token_is_refused_with_401_before_the_upgrade(
        stacks, path, subprotocols, headers, reason, caplog):
    stack = await stacks(client_tokens=CLIENT_TOKENS)
    before = await metric_values(stack.port)
    status, body, response_headers = await refusal(stack.url(path), headers, subprotocols=subprotocols)
    assert status == 401 and "token" in body and response_headers["WWW-Authenticate"].startswith("Bearer")
    assert "Sec-WebSocket-Protocol" not in response_headers  # nothing offered is echoed on a refusal
    assert stack.proxy.hub.subscriber_count() == 0
    after = await metric_values(stack.port)
    assert delta(before, after, f'auth_failures_total{{endpoint="client",reason="{reason}"}}') == 1
    refused = [r.getMessage() for r in caplog.records if "refused /client" in r.getMessage()]
    assert refused and reason in refused[-1] and VALID not in refused[-1]


def test_presented_tokens_finds_every_token_wherever_it_is():
    """Pure: every place a subscriber token can travel, and what is not one."""
    from websockets.datastructures import Headers

    def found(path="/client", **headers):
        return security.presented_tokens(Headers([(k.replace("_", "-"), v) for k, v in headers.items()]), path)

    assert found() == []
    assert found(Authorization="Bearer abc") == ["abc"]
    assert found(Authorization="Basic eDp5") == []  # a proxy's credentials, not a subscriber token
    assert found(Sec_WebSocket_Protocol="twilio-transcribe, bearer.abc") == ["abc"]
    assert found(Sec_WebSocket_Protocol="bearer.abc,bearer.def") == ["abc", "def"]
    assert found("/client?token=abc&token=") == ["abc", ""]
    assert found("/client?token=q", Authorization="Bearer h", Sec_WebSocket_Protocol="bearer.s") == ["h", "s", "q"]
    assert security.select_subprotocol(["chat", security.SUBPROTOCOL]) == security.SUBPROTOCOL
    assert security.select_subprotocol(["chat"]) is None and security.select_subprotocol([]) is None


def test_tokens_and_signatures_are_compared_in_constant_time(monkeypatch):
    """Every comparison with a secret goes through hmac.compare_digest, for every token (no
    early exit once one matched, which would tell an attacker which token they hit)."""
    compared = []

    def recording(a, b):
        compared.append((a, b))
        return a == b

    monkeypatch.setattr(security.hmac, "compare_digest", recording)
    assert security.token_valid(CLIENT_TOKENS[0], CLIENT_TOKENS)
    assert len(compared) == len(CLIENT_TOKENS)
    assert not security.token_valid("guess", CLIENT_TOKENS) and len(compared) == 2 * len(CLIENT_TOKENS)
    compared.clear()
    assert security.twilio_signature_valid(AUTH_TOKEN, PUBLIC_URL + "/twilio", sign(PUBLIC_URL + "/twilio"))
    assert len(compared) == 1


# --- per-call token in <Parameter> ------------------------------------------------------------


async def test_a_stream_with_the_call_token_is_accepted_and_subscribers_never_see_the_token(stacks):
    stack = await stacks(call_token=CALL_TOKEN)
    everything = await Listener(stack.url("/client"), '{"type":"subscribe","callSid":"*"}').start()
    await stack.wait_for_subscribers(1)
    result = await run_call(stack.url("/twilio"), CallOptions(
        inbound=AUDIO, speed=0, params={"token": CALL_TOKEN, "tenant": "acme"}))
    assert result.close_code == 1000
    await wait_for(lambda: any('"call_ended"' in m for m in everything.messages), what="call_ended")
    started = json.loads(everything.messages[0])
    assert started["type"] == "call_started" and started["customParameters"] == {"tenant": "acme"}
    assert not any(CALL_TOKEN in m for m in everything.messages)


@pytest.mark.parametrize("params", [{}, {"token": "call-token-wrong-000000"}, {"tenant": CALL_TOKEN}],
                         ids=["no token", "wrong token", "token under another name"])
async def test_a_stream_without_the_call_token_is_closed_with_1008_before_any_audio_goes_upstream(stacks, params):
    stack = await stacks(call_token=CALL_TOKEN)
    before = await metric_values(stack.port)
    result = await run_call(stack.url("/twilio"), CallOptions(inbound=AUDIO, speed=0, params=params))
    assert result.close_code == 1008 and "call token" in result.close_reason
    assert not stack.stt.connections and stack.proxy.hub.call_sids() == []
    after = await metric_values(stack.port)
    assert delta(before, after, 'auth_failures_total{endpoint="twilio",reason="call_token"}') == 1


# --- TLS ----------------------------------------------------------------------------------------


async def test_over_wss_the_simulator_and_websocat_verify_the_certificate_and_present_credentials(
        stacks, test_certificate):
    cert, key = test_certificate
    stack = await stacks(cert_pem=str(cert), key_pem=str(key), twilio_auth_token=AUTH_TOKEN, public_url=PUBLIC_URL,
                         client_tokens=CLIENT_TOKENS)
    base = f"wss://127.0.0.1:{stack.port}"
    trusting = {**os.environ, "SSL_CERT_FILE": str(cert)}  # websocat (OpenSSL) trusts only this file
    stream = TwilioStream(tracks=["inbound"])
    async with connect(base + "/twilio", ssl=ssl.create_default_context(cafile=str(cert)),
                       additional_headers={"X-Twilio-Signature": sign(PUBLIC_URL + "/twilio")}) as twilio:
        await twilio.send(stream.start())
        await stack.wait_for_call(stream.call_sid)
        # README: websocat with the token in a header, and in the query string.
        by_header = websocat_subscriber(base + "/client", stream.call_sid,
                                        f"-H=Authorization: Bearer {CLIENT_TOKENS[0]}", env=trusting)
        by_query = websocat_subscriber(f"{base}/client?token={CLIENT_TOKENS[1]}", stream.call_sid, env=trusting)
        await stack.wait_for_subscribers(2)
        for i in range(30):
            await twilio.send(stream.media("inbound", 20 * i, b"\x42" * 160))
        await twilio.send(stream.stop())
    # websocat hangs up when its stdin closes: let the call end and reach both first.
    await wait_for(lambda: stack.proxy.hub.subscriber_count() == 0, what="call delivered and ended")
    outputs = [await asyncio.to_thread(websocat.communicate, timeout=30) for websocat in (by_header, by_query)]
    sent = [text for _, text in stack.stt.connections[-1].sent]
    for websocat, (out, _) in zip((by_header, by_query), outputs):
        assert out.splitlines() == [json.dumps([stream.call_sid])] + sent and websocat.returncode == 0

    # Without the test CA, websocat refuses the self-signed certificate: verification is on.
    untrusting = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    refused = await asyncio.to_thread(
        subprocess.run, [websocat_path(), "-1", f"{base}/client?token={CLIENT_TOKENS[0]}"],
        input="", capture_output=True, text=True, env=untrusting, timeout=30)
    assert refused.returncode != 0 and "certificate" in refused.stderr.lower()


# --- limits -------------------------------------------------------------------------------------


async def test_max_calls_refuses_the_next_stream_with_503_until_one_ends(stacks):
    stack = await stacks(max_calls=1)
    before = await metric_values(stack.port)
    first = await connect(stack.url("/twilio"))
    status, body, _ = await refusal(stack.url("/twilio"))
    assert status == 503 and "MAX_CALLS=1" in body
    await first.close()
    result = await run_call(stack.url("/twilio"), CallOptions(inbound=AUDIO, speed=0))
    assert result.close_code == 1000
    after = await metric_values(stack.port)
    assert delta(before, after, 'limit_refusals_total{limit="calls"}') == 1


async def test_max_subscribers_refuses_the_next_subscriber_with_503(stacks):
    stack = await stacks(max_subscribers=2)
    listeners = [await Listener(stack.url("/client"), '{"type":"subscribe","callSid":"*"}').start() for _ in range(2)]
    status, body, _ = await refusal(stack.url("/client"))
    assert status == 503 and "MAX_SUBSCRIBERS=2" in body
    assert all(not listener.task.done() for listener in listeners)


async def test_max_subscribers_per_call_closes_the_extra_subscriber_with_4503(stacks):
    stack = await stacks(max_subscribers_per_call=1)
    stream = TwilioStream(tracks=["inbound"])
    async with connect(stack.url("/twilio")) as twilio:
        await twilio.send(stream.start())
        await stack.wait_for_call(stream.call_sid)
        first = await Listener(stack.url("/client"), stream.call_sid).start()
        await stack.wait_for_subscribers(1)
        second = await Listener(stack.url("/client"), stream.call_sid).start()
        await second.finished()
        assert second.close_code == 4503 and "MAX_SUBSCRIBERS_PER_CALL" in second.close_reason
        wildcard = await Listener(stack.url("/client"), '{"type":"subscribe","callSid":"*"}').start()
        await stack.wait_for_subscribers(2)  # a wildcard subscriber is not one of the call's
        await twilio.send(stream.stop())
    await first.finished()
    assert first.close_code == 1000 and not wildcard.task.done()


async def test_a_subscriber_that_keeps_talking_is_closed_with_4413(stacks):
    stack = await stacks(max_subscriber_messages=3)
    async with connect(stack.url("/client")) as ws:
        await ws.recv()
        await ws.send('{"type":"subscribe","callSid":"*"}')
        for _ in range(3):
            await ws.send("ping")
        await asyncio.sleep(0.2)
        assert ws.close_code is None  # up to the limit, messages are ignored
        await ws.send("one too many")
        await asyncio.wait_for(until_closed(ws), 3)
    assert ws.close_code == 4413


async def test_a_subscriber_that_never_subscribes_is_closed_with_4408(stacks):
    stack = await stacks(handshake_timeout=0.3)
    async with connect(stack.url("/client")) as ws:
        await ws.recv()
        await asyncio.wait_for(until_closed(ws), 3)
    assert ws.close_code == 4408


async def test_an_incomplete_handshake_is_dropped_after_handshake_timeout(stacks):
    stack = await stacks(handshake_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
    writer.write(b"GET /twilio HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and then nothing (slowloris)
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 3) == b""  # the server hung up
    writer.close()


async def test_a_peer_that_does_not_answer_pings_is_closed_with_1011(stacks):
    stack = await stacks(ping_interval=0.2, ping_timeout=0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(f"GET /twilio HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
    opcodes = []
    async with asyncio.timeout(3):  # read frames, never answering a ping, until the close frame
        while not opcodes or opcodes[-1] != 0x8:
            first, length = await reader.readexactly(2)
            payload = await reader.readexactly(length & 0x7F)  # server frames: unmasked, short
            opcodes.append(first & 0x0F)
    writer.close()
    assert opcodes[0] == 0x9  # ping
    assert int.from_bytes(payload[:2], "big") == 1011 and b"keepalive" in payload


async def test_an_oversized_subscription_closes_with_1009(stack):
    async with connect(stack.url("/client")) as ws:
        await ws.recv()
        await ws.send("x" * 70_000)
        await asyncio.wait_for(until_closed(ws), 3)
    assert ws.close_code == 1009


# --- secrets in logs ------------------------------------------------------------------------------


async def test_no_secret_reaches_the_log_of_a_call_at_debug_level(tmp_path):
    """The real server process at LOG_LEVEL=DEBUG: a signed call, subscribers with tokens (header
    and query), failed attempts; then every secret is searched for in what it logged."""
    deepgram_key = "dg-secret-key-5a4b3c2d1e0f"
    stt = LocalSTT(api_key=deepgram_key)
    await stt.start()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PROXY_URL": f"127.0.0.1:{port}", "LOG_LEVEL": "DEBUG", "STT_ENGINE": "deepgram",
           "DEEPGRAM_API_KEY": deepgram_key, "DEEPGRAM_URL": f"{stt.url}?{LISTEN_QUERY}",
           "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "PUBLIC_URL": PUBLIC_URL, "CLIENT_TOKENS": ",".join(CLIENT_TOKENS),
           "CALL_TOKEN": CALL_TOKEN}
    server_py = Path(__file__).resolve().parent.parent / "server.py"
    log_file = tmp_path / "server.log"  # a file, not a pipe: DEBUG output would fill a pipe nobody reads
    with log_file.open("w") as stderr:
        process = await asyncio.create_subprocess_exec(sys.executable, str(server_py), cwd=tmp_path, env=env,
                                                       stderr=stderr)
    signature = sign(PUBLIC_URL + "/twilio")
    url = f"ws://127.0.0.1:{port}"
    try:
        await wait_for(lambda: _reachable(port), timeout=30, what="server up")
        stream = TwilioStream(tracks=["inbound"], custom_parameters={"token": CALL_TOKEN})
        async with connect(url + "/twilio", additional_headers={"X-Twilio-Signature": signature}) as twilio:
            await twilio.send(stream.start())
            for _ in range(100):  # until the call is in progress
                async with connect(url + "/client", additional_headers={"Authorization": f"Bearer {CLIENT_TOKENS[0]}"}) as ws:
                    if json.loads(await ws.recv()) == [stream.call_sid]:
                        break
            by_query = await Listener(f"{url}/client?token={CLIENT_TOKENS[1]}", stream.call_sid).start()
            async with connect(url + "/client", subprotocols=[security.SUBPROTOCOL, f"bearer.{CLIENT_TOKENS[0]}"]) as ws:
                assert json.loads(await ws.recv()) == [stream.call_sid]  # the dashboard's way in
            await refusal(url + "/client", {"Authorization": f"Bearer {CLIENT_TOKENS[0]}x"})
            await refusal(url + "/client", subprotocols=[security.SUBPROTOCOL, f"bearer.{GUESS}"])
            await refusal(url + "/twilio", {"X-Twilio-Signature": signature[:-2]})
            for i in range(60):
                await twilio.send(stream.media("inbound", 20 * i, b"\x42" * 160))
            await twilio.send(stream.stop())
        await by_query.finished()
        assert by_query.messages  # transcripts flowed: the log covers a whole call
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 30)
    finally:
        if process.returncode is None:
            process.kill()
        await stt.stop()
    log = log_file.read_text()
    assert "Authorization: Token [redacted]" in log  # the header lines are still there to debug with
    assert "call ended callSid=" + stream.call_sid in log
    assert "bearer.[redacted]" in log  # the subprotocol line is still there, without its token
    for secret in (deepgram_key, AUTH_TOKEN, *CLIENT_TOKENS, CALL_TOKEN, signature, signature[:-2], GUESS):
        assert secret not in log, f"a secret leaked: {secret[:4]}…"


def test_redaction_covers_header_lines_query_tokens_known_values_and_tracebacks():
    redactor = security.RedactSecrets(["dg-key-123", None])
    assert redactor.redact("> Authorization: Token abc") == "> Authorization: Token [redacted]"
    assert redactor.redact("< x-twilio-signature: abc+/=") == "< x-twilio-signature: [redacted]"
    assert redactor.redact("< GET /client?a=1&token=abc HTTP/1.1") == "< GET /client?a=1&token=[redacted] HTTP/1.1"
    assert redactor.redact("the key is dg-key-123.") == "the key is [redacted]."
    assert (redactor.redact("< Sec-WebSocket-Protocol: twilio-transcribe, bearer.a-guess_1~x")
            == "< Sec-WebSocket-Protocol: twilio-transcribe, bearer.[redacted]")
    assert redactor.redact("offered ['twilio-transcribe', 'bearer.abc']") == "offered ['twilio-transcribe', 'bearer.[redacted]']"
    try:
        raise ValueError("bad key dg-key-123")
    except ValueError:
        import logging

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed: %s", ("dg-key-123",), sys.exc_info())
    assert redactor.filter(record)
    assert "dg-key-123" not in record.getMessage() and "dg-key-123" not in record.exc_text
