"""Transfer to a person: the built-in `transfer_call` tool, offered when TRANSFER_TARGETS is set.

    TRANSFER_TARGETS='{"+15550001111": "the sales desk", "sip:support@pbx.example.com": "technical support"}'

The model sees one function whose `target` is an enum of exactly those numbers and SIP URIs, each
described, so a target that is not on the list fails argument validation (`bad_arguments`, an
error result for the model) before the function runs: it is never dialled. An allowed target is
remembered for the call (`Transfers`), and the tool ends the call the way `end_call` does: the
agent's words are played to their last mark, then the stream is closed. Twilio then requests the
`<Connect action>` URL of the webhook's TwiML, and /twiml/action answers `<Dial>` to the target
(webhook.py). Subscribers see the `tool_call` (with the target), its `tool_result`, and
`call_ended` with `endReason: "transfer to <target>"`.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Literal, Mapping

from agent.tools import CallContext, Tool

TRANSFER_SECONDS = 600.0  # how long a chosen target waits for Twilio's action request
MAX_TRANSFERS = 10_000


class Transfers:
    """Targets chosen by calls, by CallSid, until Twilio asks the action URL (bounded, expiring)."""

    def __init__(self, seconds: float = TRANSFER_SECONDS, max_entries: int = MAX_TRANSFERS):
        self.seconds = seconds
        self.max_entries = max_entries
        self._targets: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def add(self, call_sid: str, target: str) -> None:
        self._targets.pop(call_sid, None)
        self._targets[call_sid] = (target, time.monotonic() + self.seconds)
        while len(self._targets) > self.max_entries:
            self._targets.popitem(last=False)

    def take(self, call_sid: str) -> str | None:
        """The call's chosen target, once (None if none, or if it expired)."""
        now = time.monotonic()
        while self._targets and next(iter(self._targets.values()))[1] < now:
            self._targets.popitem(last=False)
        entry = self._targets.pop(call_sid, None)
        return entry[0] if entry is not None else None


def transfer_tool(targets: Mapping[str, str], transfers: Transfers) -> Tool:
    """The `transfer_call` tool for these targets (number or SIP URI -> description for the model)."""
    choices = "; ".join(f"{target} ({description})" for target, description in targets.items())

    async def transfer_call(call: CallContext, target: str) -> str:
        transfers.add(call.call_sid, target)
        call.end_call(f"transfer to {target}")
        return (f"The caller will be transferred to {targets[target]} once your last words have been played. "
                "Tell them now, in one short sentence.")

    transfer_call.__doc__ = f"""Transfer the caller to a person, when they ask for one or you cannot help. Tell
        them first: the transfer starts once your words have been played. The people you can
        transfer to: {choices}.

        Args:
            target: who to transfer to, exactly as listed.
        """
    transfer_call.__annotations__ = {"call": CallContext, "target": Literal[tuple(targets)], "return": str}
    return Tool.from_function(transfer_call)
