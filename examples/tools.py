"""Example tools for a voice agent: `AGENT_TOOLS=examples/tools.py make run`.

Every public function here is offered to the agent. The model reads the docstring to decide when
to call a function and the type hints (with the `Args:` lines) to know what to pass; a parameter
annotated `CallContext` is not shown to the model and receives the call instead (its callSid and
the TwiML <Parameter>s). Return a string, or anything JSON can encode. Exceptions and slow
answers (AGENT_TOOL_TIMEOUT) become error results the agent can apologise for.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Literal

from agent.tools import CallContext

ORDERS = {"A17": "shipped on Monday", "B42": "being packed", "C99": "delivered yesterday"}


def lookup_order(order_id: str, call: CallContext) -> dict:
    """Look up the status of an order by its number.

    Args:
        order_id: the order number as the caller says it, for example "A17".
    """
    status = ORDERS.get(order_id.strip().upper().replace(" ", ""))
    if status is None:
        return {"found": False, "order_id": order_id}
    return {"found": True, "order_id": order_id, "status": status, "tenant": call.parameters.get("tenant", "")}


async def opening_hours(day: Literal["today", "tomorrow"] = "today") -> str:
    """Tell the shop's opening hours.

    Args:
        day: which day the caller asks about.
    """
    await asyncio.sleep(0)  # an async tool would await its database or HTTP call here
    weekday = (datetime.now().weekday() + (day == "tomorrow")) % 7
    return "closed" if weekday == 6 else "9 am to 6 pm"
