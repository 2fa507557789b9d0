"""Who may connect: Twilio's signature on /twilio, subscriber tokens on /client, and log redaction.

Call audio and transcripts are private, so both websocket routes can be closed to strangers
(README "Security"). Everything here is a pure function of its arguments, so `config.py` and
`server.py` can call it and tests can try it without sockets:

- `twilio_signature_valid`: the `X-Twilio-Signature` of a websocket upgrade is
  base64(HMAC-SHA1(auth token, the public wss:// URL)) — protocols.md A.6. The URL is the one
  Twilio dialled (PUBLIC_URL + path), never one rebuilt from the Host header, which a TLS proxy
  or ngrok rewrites and a client chooses.
- `presented_tokens` / `token_valid`: the bearer tokens a subscriber presents, in the
  `Authorization` header, in `Sec-WebSocket-Protocol` (browsers: their `WebSocket` can set no
  header but that one, and the dashboard must not put a token in a URL), or in a `token` query
  parameter (other clients that cannot set headers).
- `exposure_problem`: the safe-by-default rule for the bind address.
- `RedactSecrets`: a logging filter, because `websockets` logs every request header at DEBUG
  (our `Authorization: Token <Deepgram key>` included).

Every comparison with a secret goes through `hmac.compare_digest`, so the time it takes does not
tell an attacker how many leading characters were right.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import re
from typing import Iterable, Sequence
from urllib.parse import parse_qs, urlsplit

from websockets.datastructures import Headers

REDACTED = "[redacted]"


def twilio_signature(auth_token: str, url: str) -> str:
    """What Twilio puts in `X-Twilio-Signature` for a websocket upgrade to `url` (no body, no params)."""
    mac = hmac.new(auth_token.encode(), url.encode(), hashlib.sha1)
    return base64.b64encode(mac.digest()).decode()


def twilio_signature_valid(auth_token: str, url: str, signature: str) -> bool:
    return hmac.compare_digest(twilio_signature(auth_token, url).encode(), signature.encode())


def single_header(headers: Headers, name: str) -> str | None:
    """The header's value if it is sent exactly once; None if absent or repeated.

    A repeated credential header is refused rather than guessed at: a proxy and the client could
    each pick a different copy.
    """
    values = headers.get_all(name)
    return values[0] if len(values) == 1 else None


# A browser's `new WebSocket(url, ["twilio-transcribe", "bearer.<token>"])`: the server picks
# SUBPROTOCOL (a browser drops a connection whose server picks none of those it offered), so the
# token is never echoed back. Subscriber tokens are made of characters a subprotocol may hold.
SUBPROTOCOL = "twilio-transcribe"
TOKEN_SUBPROTOCOL_PREFIX = "bearer."


def presented_tokens(headers: Headers, path: str) -> list[str]:
    """Every subscriber token the request carries, wherever it is: `Authorization: Bearer <token>`,
    a `bearer.<token>` subprotocol in `Sec-WebSocket-Protocol`, or `?token=<token>`.

    All of them, so the caller can refuse a request presenting more than one rather than guess
    which one counts (a proxy and the server could pick different ones). An `Authorization` of
    another scheme (a proxy's Basic credentials) is not a subscriber token.
    """
    tokens = []
    for authorization in headers.get_all("Authorization"):
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer":
            tokens.append(token.strip())
    for value in headers.get_all("Sec-WebSocket-Protocol"):
        for offered in value.split(","):
            offered = offered.strip()
            if offered.startswith(TOKEN_SUBPROTOCOL_PREFIX):
                tokens.append(offered[len(TOKEN_SUBPROTOCOL_PREFIX):])
    tokens.extend(parse_qs(urlsplit(path).query, keep_blank_values=True).get("token", []))
    return tokens


def select_subprotocol(offered: Sequence[str]) -> str | None:
    """SUBPROTOCOL when the client offers it (the dashboard does), else none: clients that offer
    nothing (websocat, programs, Twilio) go on without one, as before."""
    return SUBPROTOCOL if SUBPROTOCOL in offered else None


def token_valid(presented: str, tokens: Iterable[str]) -> bool:
    """Whether `presented` is one of `tokens`, comparing with every one (no early exit)."""
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(presented.encode(), token.encode())
    return matched


def is_loopback(host: str) -> bool:
    """True only for addresses no other machine can reach (127.0.0.0/8, ::1, "localhost")."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def exposure_problem(host: str, *, twilio_protected: bool, clients_protected: bool,
                     allow_open: bool) -> str | None:
    """Why the server must not start on `host` as configured, or None if it may.

    Loopback is always fine: that is the first local trial. Any other address is reachable from
    elsewhere, so both routes need a credential unless the operator says otherwise.
    """
    if is_loopback(host) or allow_open or (twilio_protected and clients_protected):
        return None
    missing = []
    if not twilio_protected:
        missing.append("TWILIO_AUTH_TOKEN and PUBLIC_URL (or CALL_TOKEN) to protect /twilio")
    if not clients_protected:
        missing.append("CLIENT_TOKENS to protect /client")
    return (f"{host or 'every interface'} is reachable from other machines; set "
            + " and ".join(missing) + ", or ALLOW_OPEN_SERVER=true to run without them")


class RedactSecrets(logging.Filter):
    """Replace secrets in log records before any handler writes them.

    Two nets: the known secret values (keys and tokens from the settings), and the places
    credentials travel whatever their value (`Authorization` and `X-Twilio-Signature` header
    lines, a `bearer.` subprotocol, `token=` in a URL), which also covers signatures and guesses
    presented by clients.
    Everything else stays, so DEBUG logs remain useful for debugging handshakes.
    """

    _HEADER = re.compile(r"(?im)^([<>] )?(authorization|x-twilio-signature)(\s*:\s*)(\S+ )?(.*)$")
    _QUERY = re.compile(r"([?&;]token=)[^&;\s'\"]*", re.IGNORECASE)
    # A token offered as a subprotocol: in the Sec-WebSocket-Protocol line, or in a list's repr.
    _SUBPROTOCOL = re.compile(r"(?<![\w.-])(" + re.escape(TOKEN_SUBPROTOCOL_PREFIX) + r")[^\s,'\"\]]+", re.IGNORECASE)

    def __init__(self, secrets: Iterable[str | None]):
        super().__init__()
        # Longest first, so a secret containing another is replaced whole.
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        text = self._HEADER.sub(self._header_line, text)
        text = self._SUBPROTOCOL.sub(r"\1" + REDACTED, text)
        return self._QUERY.sub(r"\1" + REDACTED, text)

    @staticmethod
    def _header_line(match: re.Match) -> str:
        prefix, name, colon, scheme, _value = match.groups()
        # Keep the Authorization scheme ("Token", "Bearer"): it is what one debugs.
        return f"{prefix or ''}{name}{colon}{scheme if name.lower() == 'authorization' and scheme else ''}{REDACTED}"

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = self.redact(message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        return True


def redact_logs(secrets: Iterable[str | None]) -> None:
    """Install `RedactSecrets` on every handler of the root logger (call after configuring it).

    On handlers, not loggers: a logger's filter does not see records from its child loggers,
    and `websockets` logs through "websockets.server" and "websockets.client".
    """
    redactor = RedactSecrets(secrets)
    for handler in logging.getLogger().handlers:
        handler.addFilter(redactor)
