"""Who a call may be connected to: a phone number or a SIP URI, checked before it goes into TwiML.

Targets come from the webhook's `?dial=` and from TRANSFER_TARGETS. Only two shapes are accepted,
both narrow enough that nothing else can ride along (no spaces, quotes, `<` or `&`), so a target
can never change the TwiML around it even before XML escaping (which is applied anyway):

- an E.164 phone number: `+` and 2 to 15 digits, the first not 0 (`+15550001111`);
- a SIP URI: `sip:` or `sips:`, a user part, `@`, a host name or IPv4 address, an optional port
  and `;name=value` parameters (`sip:support@pbx.example.com;transport=tls`).
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"\+[1-9][0-9]{1,14}")
_SIP = re.compile(r"sips?:[A-Za-z0-9_.!~*%+-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9.-]{0,253}[A-Za-z0-9])?(?::[0-9]{1,5})?"
                  r"(?:;[A-Za-z0-9_.-]{1,32}(?:=[A-Za-z0-9_.-]{1,64})?){0,8}")


def kind(target: str) -> str | None:
    """"number", "sip", or None when `target` is neither."""
    if not isinstance(target, str):
        return None
    if _NUMBER.fullmatch(target):
        return "number"
    if _SIP.fullmatch(target):
        return "sip"
    return None


def problem(target: str) -> str | None:
    """None for a usable target, else a sentence saying why not (the target is quoted, cut short)."""
    if kind(target) is not None:
        return None
    return (f"{str(target)[:80]!r} is neither a phone number in E.164 form (+15550001111) nor a SIP URI "
            "(sip:user@host)")
