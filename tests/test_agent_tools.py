"""Agent tools: schemas derived from plain functions, and every way a tool call can go wrong."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from agent.tools import CallContext, Tool, ToolError, load_tools
from config import ConfigError, load_settings

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = str(ROOT / "examples" / "tools.py")


def context(**params) -> CallContext:
    return CallContext(call_sid="CAtest", stream_sid="MZtest", parameters=params)


def test_the_example_tools_get_schemas_from_their_hints_and_docstrings():
    registry = load_tools(EXAMPLE)
    schemas = {s["name"]: s for s in registry.schemas()}
    assert list(schemas) == ["end_call", "lookup_order", "opening_hours"]
    assert schemas["lookup_order"] == {
        "name": "lookup_order",
        "description": "Look up the status of an order by its number.",
        "parameters": {
            "type": "object",
            "properties": {"order_id": {"type": "string",
                                        "description": 'the order number as the caller says it, for example "A17".'}},
            "required": ["order_id"],
        },
    }
    assert schemas["opening_hours"]["parameters"] == {
        "type": "object",
        "properties": {"day": {"type": "string", "enum": ["today", "tomorrow"], "default": "today",
                               "description": "which day the caller asks about."}},
    }


async def test_sync_and_async_tools_run_and_the_call_context_reaches_them():
    registry = load_tools(EXAMPLE)
    result = await registry.run("lookup_order", '{"order_id": "a17"}', context(tenant="acme"))
    assert result.ok and json.loads(result.content) == {
        "found": True, "order_id": "a17", "status": "shipped on Monday", "tenant": "acme"}
    result = await registry.run("opening_hours", "{}", context())
    assert result.ok and result.content in ("9 am to 6 pm", "closed")



async def _sleepy(seconds: float = 30) -> str:
    """Sleeps for a long time.

    Args:
        seconds: how long.
    """
    await asyncio.sleep(seconds)
    return "woke"


def _blocking(seconds: float = 30) -> str:
    """Blocks its thread."""
    time.sleep(seconds)
    return "woke"


def _raises(order_id: str) -> str:
    """Always fails."""
    raise RuntimeError(f"database down for {order_id}")


@pytest.mark.parametrize("function", [_sleepy, _blocking])
async def test_a_tool_that_hangs_becomes_a_timeout_result(function):
    registry = load_tools(None)
    registry.tools[function.__name__] = Tool.from_function(function)
    started = time.monotonic()
    result = await registry.run(function.__name__, '{"seconds": 3}', context(), timeout=0.2)
    assert time.monotonic() - started < 1.0
    assert (result.ok, result.error) == (False, "timeout")
    assert json.loads(result.content) == {"error": f"{function.__name__} did not answer within 0.2 s"}


async def test_a_tool_that_raises_becomes_an_error_result():
    registry = load_tools(None)
    registry.tools["_raises"] = Tool.from_function(_raises)
    result = await registry.run("_raises", '{"order_id": "A1"}', context())
    assert (result.ok, result.error) == (False, "exception")
    assert json.loads(result.content) == {"error": "_raises failed: RuntimeError: database down for A1"}


@pytest.mark.parametrize("arguments, problem", [
    ('{"order_id": 17}', "order_id: Input should be a valid string"),
    ("{}", "order_id: Field required"),
    ('{"order_id": "A1", "extra": 1}', "extra: Extra inputs are not permitted"),
    ("not json", "Invalid JSON"),
])
async def test_bad_arguments_from_the_model_become_an_error_result(arguments, problem):
    registry = load_tools(EXAMPLE)
    result = await registry.run("lookup_order", arguments, context())
    assert (result.ok, result.error) == (False, "bad_arguments")
    assert problem in json.loads(result.content)["error"]


async def test_an_unknown_tool_becomes_an_error_result():
    result = await load_tools(None).run("transfer", "{}", context())
    assert (result.ok, result.error, json.loads(result.content)) == (
        False, "unknown_tool", {"error": "there is no function named 'transfer'"})


async def test_end_call_asks_the_bridge_to_hang_up():
    asked = []
    call = CallContext(call_sid="CA1", _end_call=asked.append)
    result = await load_tools(None).run("end_call", '{"reason": "caller said bye"}', call)
    assert result.ok and asked == ["caller said bye"]


def _write(tmp_path: Path, source: str) -> str:
    path = tmp_path / "my_tools.py"
    path.write_text(source)
    return str(path)


@pytest.mark.parametrize("source, message", [
    ("def f(x: int):\n    return x\n", "tool f: needs a docstring"),
    ('def f(x):\n    """Doc."""\n', "tool f: parameter x needs a type hint"),
    ('def f(*xs: int):\n    """Doc."""\n', "tool f: parameter xs must be a plain named parameter"),
    ('def end_call():\n    """Doc."""\n', "end_call is a built-in tool name"),
    ("import nonexistent_module_xyz\n", "cannot import"),
    ('__all__ = ["missing"]\n', "__all__ names something that is not a function"),
])
def test_unusable_tools_are_refused_at_start_up_with_the_reason(tmp_path, source, message):
    with pytest.raises(ToolError, match=message):
        load_tools(_write(tmp_path, source))
    with pytest.raises(ConfigError) as caught:
        load_settings({"AGENT_TOOLS": _write(tmp_path, source)})
    assert caught.value.variable == "AGENT_TOOLS" and message in str(caught.value)


def test_all_limits_what_is_offered_and_helpers_stay_private(tmp_path):
    source = ('__all__ = ["a"]\n'
              'def a() -> str:\n    """A."""\n    return b()\n'
              'def b() -> str:\n    """B."""\n    return "b"\n')
    assert list(load_tools(_write(tmp_path, source)).tools) == ["end_call", "a"]


def test_a_module_name_works_as_well_as_a_path():
    assert "lookup_order" in load_tools("examples.tools")
