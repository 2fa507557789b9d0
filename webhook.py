"""The TwiML webhook: Twilio's "A call comes in" request (HTTP GET) answered with the TwiML of a call.

    GET /twiml?CallSid=CA…&From=…                      an agent call: <Connect action><Stream url=/agent>
    GET /twiml?agent=openai&tenant=acme&dial=+1555…    …with a provider, a <Parameter>, a fallback person
    GET /twiml?mode=transcribe&dial=+15550001111       a transcribed call: <Start><Stream both_tracks> + <Dial>
    GET /twiml/action?CallSid=CA…                      Twilio, when an agent call's stream has ended

Set the number's webhook method to GET: the `websockets` server cannot read a POST body
(protocols.md E.2), and with GET Twilio's parameters arrive in the query, which the signature
covers. With TWILIO_AUTH_TOKEN set, `X-Twilio-Signature` is checked over the full https URL with
its query (PUBLIC_URL's host, this path), else 403.

Every agent or transcription TwiML carries a fresh per-call `<Parameter name="token">`, checked
by /agent and /twilio against the CallSid it was minted for (`CallTokens`); with
REQUIRE_WEBHOOK_TOKEN=true a stream without one is refused, so a leaked stream URL is useless
without the webhook. Query parameters with lower-case names (other than `mode`, `dial`, `agent`)
become `<Parameter>`s (prompt placeholders, tools); Twilio's own are capitalised. Everything
interpolated is XML-escaped (ElementTree builds the document), and `dial` must be a phone number
or a SIP URI (dial.py), so no query can inject TwiML.

An agent call's provider session is opened here (`Preconnect`), a second before Twilio opens
the stream, so that the greeting does not wait for the provider's handshake.

`<Connect action>`: when the stream ends Twilio requests /twiml/action. A call the agent
transferred (`transfer_call`) gets `<Dial>` to its target; a call whose agent failed, or whose
stream never reached us, gets an apology and `<Dial>` to the webhook's `dial` (or a hang-up);
a call the agent ended gets `<Hangup/>`.
"""

from __future__ import annotations

import http
import logging
import re
import secrets
import time
import xml.etree.ElementTree as ET
from collections import OrderedDict
from typing import Callable
from urllib.parse import parse_qs, quote, urlsplit

from prometheus_client import Counter
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

import dial
import metrics
import security
from agent.provider import AgentSetup, fill_placeholders
from agent.providers import CHOICE_PARAMETER, Preconnect, ProviderChoice
from agent.tools import CallContext
from agent.transfer import Transfers
from config import Settings

log = logging.getLogger(__name__)

TOKEN_SECONDS = 600.0  # a stream must start within this long after its webhook request
MAX_TOKENS = 20_000
OUR_PARAMETERS = ("mode", "dial")  # query parameters that shape the TwiML (`agent` becomes a <Parameter>)
_PARAMETER_NAME = re.compile(r"[a-z][A-Za-z0-9_]{0,39}")
_HOST = re.compile(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")
MAX_PARAMETER_CHARS = 500  # Twilio: a <Parameter>'s name and value together
APOLOGY = "Sorry, our assistant is not available right now."

requests_total = Counter("webhook_requests", "TwiML webhook requests, by route and answer", ["route", "answer"],
                         registry=metrics.REGISTRY)


class BadRequest(ValueError):
    """The webhook's query cannot make a call's TwiML: answered 400 with this reason."""


class CallTokens:
    """Per-call tokens minted in the TwiML, by CallSid (bounded, expiring)."""

    def __init__(self, seconds: float = TOKEN_SECONDS, max_entries: int = MAX_TOKENS):
        self.seconds = seconds
        self.max_entries = max_entries
        self._tokens: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def mint(self, call_sid: str) -> str:
        token = secrets.token_urlsafe(24)
        self._tokens.pop(call_sid, None)
        self._tokens[call_sid] = (token, time.monotonic() + self.seconds)
        while len(self._tokens) > self.max_entries:
            self._tokens.popitem(last=False)
        return token

    def check(self, call_sid: str, presented: str | None) -> bool | None:
        """True: the token minted for this call; False: not it; None: no token was minted for it."""
        now = time.monotonic()
        while self._tokens and next(iter(self._tokens.values()))[1] < now:
            self._tokens.popitem(last=False)
        entry = self._tokens.get(call_sid)
        if entry is None:
            return None
        return presented is not None and security.token_valid(presented, [entry[0]])


class Webhook:
    """/twiml and /twiml/action (see the module docstring)."""

    def __init__(self, settings: Settings, *, providers: ProviderChoice | None, preconnect: Preconnect | None,
                 transfers: Transfers, tokens: CallTokens | None = None):
        self.settings = settings
        self.providers = providers
        self.preconnect = preconnect
        self.transfers = transfers
        self.tokens = tokens or CallTokens()
        self._outcomes: OrderedDict[str, Callable[[], str]] = OrderedDict()

    def track(self, call_sid: str, outcome: Callable[[], str]) -> None:
        """Remember how to learn an agent call's outcome (for its action request)."""
        self._outcomes.pop(call_sid, None)
        self._outcomes[call_sid] = outcome
        while len(self._outcomes) > MAX_TOKENS:
            self._outcomes.popitem(last=False)

    def respond(self, connection: ServerConnection, request: Request) -> Response:
        path = urlsplit(request.path).path
        route = "action" if path == "/twiml/action" else "twiml"
        refusal = self._authenticate(connection, request, path)
        if refusal is not None:
            requests_total.labels(route, "forbidden").inc()
            return refusal
        query = {k: v[-1] for k, v in parse_qs(urlsplit(request.path).query, keep_blank_values=True).items()}
        try:
            answer, twiml = self._action(query) if route == "action" else self._twiml(query, request.headers)
        except BadRequest as exc:
            requests_total.labels(route, "bad_request").inc()
            log.warning("webhook %s refused: %s", path, exc)
            return connection.respond(http.HTTPStatus.BAD_REQUEST, f"{exc}\n")
        requests_total.labels(route, answer).inc()
        body = twiml.encode()
        headers = Headers({"Content-Type": "text/xml; charset=utf-8", "Content-Length": str(len(body))})
        return Response(http.HTTPStatus.OK, "OK", headers, body)

    def _authenticate(self, connection: ServerConnection, request: Request, path: str) -> Response | None:
        s = self.settings
        if not s.twilio_auth_token:
            return None
        url = _https(s.public_url) + request.path  # the URL Twilio requested, query included
        signature = security.single_header(request.headers, "X-Twilio-Signature")
        if signature is not None and security.twilio_signature_valid(s.twilio_auth_token, url, signature):
            return None
        reason = "missing_signature" if signature is None else "bad_signature"
        metrics.auth_failures_total.labels(path.strip("/"), reason).inc()
        log.warning("refused %s: %s (signed URL expected: %s)", path, reason, _https(s.public_url) + path + "?…")
        return connection.respond(http.HTTPStatus.FORBIDDEN, "missing or invalid X-Twilio-Signature\n")

    # --- "A call comes in" ---------------------------------------------------------------------

    def _twiml(self, query: dict[str, str], headers: Headers) -> tuple[str, str]:
        call_sid = query.get("CallSid", "")
        if not re.fullmatch(r"CA[0-9a-fA-F]{32}", call_sid):
            raise BadRequest("no CallSid: set this URL as the number's \"A call comes in\" webhook, method GET")
        mode = query.get("mode", "agent")
        if mode not in ("agent", "transcribe"):
            raise BadRequest(f"mode must be agent or transcribe, got {mode[:40]!r}")
        target = query.get("dial") or None
        if target is not None and dial.problem(target):
            raise BadRequest(f"dial: {dial.problem(target)}")
        parameters = self._parameters(query)
        wss, https = self._bases(headers)
        token = self.tokens.mint(call_sid)
        stream_parameters = {self.settings.call_token_param: token, **parameters}
        if mode == "transcribe":
            if target is None:
                raise BadRequest("mode=transcribe needs dial=<the number or SIP URI to connect the caller to>")
            return "transcribe", transcribe_twiml(wss + "/twilio", stream_parameters, target)
        if self.providers is None:
            return "fallback", fallback_twiml(target)  # no agent provider: straight to the person, or goodbye
        self._preconnect(call_sid, query.get("AccountSid", ""), parameters)
        action = https + "/twiml/action" + (f"?dial={quote(target, safe='')}" if target else "")
        return "agent", agent_twiml(wss + "/agent", action, stream_parameters)

    def _parameters(self, query: dict[str, str]) -> dict[str, str]:
        """The operator's <Parameter>s: lower-case query names, `agent` checked against the allowed."""
        parameters = {}
        for name, value in query.items():
            if name in OUR_PARAMETERS or not name[:1].islower():
                continue
            if not _PARAMETER_NAME.fullmatch(name) or name == self.settings.call_token_param:
                raise BadRequest(f"query parameter {name[:40]!r} cannot be a <Parameter> name")
            if len(name) + len(value) >= MAX_PARAMETER_CHARS:
                raise BadRequest(f"<Parameter> {name}: name and value must stay under {MAX_PARAMETER_CHARS} characters")
            parameters[name] = value
        asked = parameters.get(CHOICE_PARAMETER)
        if asked is not None and self.providers is not None and asked not in (self.providers.default,
                                                                                *self.providers.allowed):
            raise BadRequest(f"agent={asked[:40]!r} is not allowed here; AGENT_ALLOWED_PROVIDERS: "
                             + ", ".join(self.providers.allowed))
        return parameters

    def _bases(self, headers: Headers) -> tuple[str, str]:
        """(wss://host[/prefix], https://host[/prefix]): PUBLIC_URL, else the request's Host."""
        if self.settings.public_url:
            return self.settings.public_url, _https(self.settings.public_url)
        host = headers.get("Host", "")
        if not _HOST.fullmatch(host):
            raise BadRequest("no usable Host header; set PUBLIC_URL")
        return f"wss://{host}", f"https://{host}"

    def _preconnect(self, call_sid: str, account_sid: str, parameters: dict[str, str]) -> None:
        """Open the provider session now, with the setup the stream's `start` will have."""
        if self.preconnect is None:
            return
        s = self.settings
        prompt, _ = fill_placeholders(s.agent_prompt, parameters)
        greeting, _ = fill_placeholders(s.agent_greeting, parameters)
        setup = AgentSetup(CallContext(call_sid, "", account_sid, dict(parameters)), prompt, greeting, s.agent_tools,
                           s.agent_provider_settings)
        self.preconnect.open(setup)

    # --- the stream has ended -------------------------------------------------------------------

    def _action(self, query: dict[str, str]) -> tuple[str, str]:
        call_sid = query.get("CallSid", "")
        target = self.transfers.take(call_sid)
        if target is not None:
            log.info("call %s: transferring to %s", call_sid, target)
            return "transfer", dial_twiml(target)
        outcome_of = self._outcomes.pop(call_sid, None)
        outcome = outcome_of() if outcome_of is not None else ""
        if outcome in ("end_call", "caller_hung_up"):
            return "hangup", hangup_twiml()
        fallback = query.get("dial") or None
        if fallback is not None and dial.problem(fallback):
            fallback = None
        log.info("call %s: the agent did not finish the call (%s); %s", call_sid, outcome or "no stream",
                 f"connecting {fallback}" if fallback else "hanging up")
        return "fallback", fallback_twiml(fallback)


def _https(wss_url: str) -> str:
    return "https://" + wss_url.split("://", 1)[1]


# --- TwiML (ElementTree escapes every attribute and text) -------------------------------------------


def _document(response: ET.Element) -> str:
    return '<?xml version="1.0" encoding="UTF-8"?>' + ET.tostring(response, encoding="unicode")


def _stream(parent: ET.Element, url: str, parameters: dict[str, str], **attributes: str) -> None:
    stream = ET.SubElement(parent, "Stream", url=url, **attributes)
    for name, value in parameters.items():
        ET.SubElement(stream, "Parameter", name=name, value=value)


def _dial(parent: ET.Element, target: str) -> None:
    verb = ET.SubElement(parent, "Dial")
    noun = ET.SubElement(verb, "Sip" if dial.kind(target) == "sip" else "Number")
    noun.text = target


def agent_twiml(stream_url: str, action_url: str, parameters: dict[str, str]) -> str:
    response = ET.Element("Response")
    connect = ET.SubElement(response, "Connect", action=action_url, method="GET")
    _stream(connect, stream_url, parameters)
    return _document(response)


def transcribe_twiml(stream_url: str, parameters: dict[str, str], target: str) -> str:
    response = ET.Element("Response")
    start = ET.SubElement(response, "Start")
    _stream(start, stream_url, parameters, track="both_tracks")
    _dial(response, target)
    return _document(response)


def dial_twiml(target: str) -> str:
    response = ET.Element("Response")
    _dial(response, target)
    return _document(response)


def fallback_twiml(target: str | None) -> str:
    response = ET.Element("Response")
    ET.SubElement(response, "Say").text = APOLOGY
    if target is not None:
        _dial(response, target)
    else:
        ET.SubElement(response, "Hangup")
    return _document(response)


def hangup_twiml() -> str:
    response = ET.Element("Response")
    ET.SubElement(response, "Hangup")
    return _document(response)
