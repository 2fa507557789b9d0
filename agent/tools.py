"""Functions the agent may call: the built-in `end_call` and those of AGENT_TOOLS.

A tool is a plain Python function, sync or async, with type hints and a docstring:

    def lookup_order(order_id: str, call: CallContext) -> dict:
        '''Look up an order's status.

        Args:
            order_id: the order number the caller reads out, e.g. "A17".
        '''
        return {"status": "shipped", "tenant": call.parameters.get("tenant")}

Its JSON schema (what the model sees) is derived from the signature with pydantic: the first
paragraph of the docstring is the description, the `Args:` lines describe the parameters, and a
parameter annotated `CallContext` is left out of the schema and receives the call's ids and
`customParameters` instead. The model's arguments are validated against the same model, so a
wrong type becomes a clear error for the model rather than an exception in the tool.

Running a tool never endangers the call: each call has a timeout (AGENT_TOOL_TIMEOUT, 5 s by
default); an exception, a timeout or bad arguments become an error result the model can talk
about. Sync functions run in a small thread pool so they cannot stall the event loop (a hung sync
function keeps its thread; prefer async functions for I/O).
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import json
import logging
import re
import sys
import time
import typing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import pydantic

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 5.0
TOOL_THREADS = 8
_executor: ThreadPoolExecutor | None = None


class ToolError(ValueError):
    """A function that cannot be offered to the model (raised when tools are loaded)."""


@dataclass(frozen=True)
class CallContext:
    """What a tool may know about its call; annotate a parameter with it to receive it."""

    call_sid: str
    stream_sid: str = ""
    account_sid: str = ""
    parameters: Mapping[str, str] = field(default_factory=dict)  # the TwiML <Parameter>s
    _end_call: Callable[[str], None] = field(default=lambda reason: None, repr=False, compare=False)

    def end_call(self, reason: str = "") -> None:
        """Hang up once the agent's last words have been played (the bridge does it).

        Safe to call from a sync tool's thread as well as from the event loop."""
        self._end_call(reason)


@dataclass(frozen=True)
class ToolResult:
    ok: bool
    content: str  # what the model receives: the return value as text or JSON, or {"error": ...}
    error: str = ""  # "", "unknown_tool", "bad_arguments", "timeout", "exception"
    seconds: float = 0.0


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments object
    function: Callable = field(repr=False)
    arguments: type[pydantic.BaseModel] = field(repr=False)
    context_parameter: str | None = None

    @classmethod
    def from_function(cls, function: Callable) -> "Tool":
        name = function.__name__
        doc = inspect.getdoc(function)
        if not doc:
            raise ToolError(f"tool {name}: needs a docstring (the model reads it to know when to call it)")
        description, parameter_docs = _parse_docstring(doc)
        try:
            hints = typing.get_type_hints(function, include_extras=True)
        except Exception as exc:  # a hint that names something undefined
            raise ToolError(f"tool {name}: cannot read its type hints: {exc}") from None
        fields: dict[str, Any] = {}
        context_parameter = None
        for pname, parameter in inspect.signature(function).parameters.items():
            if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD, parameter.POSITIONAL_ONLY):
                raise ToolError(f"tool {name}: parameter {pname} must be a plain named parameter")
            hint = hints.get(pname)
            if hint is CallContext:
                context_parameter = pname
                continue
            if hint is None:
                raise ToolError(f"tool {name}: parameter {pname} needs a type hint")
            default = ... if parameter.default is parameter.empty else parameter.default
            fields[pname] = (hint, pydantic.Field(default, description=parameter_docs.get(pname)))
        try:
            model = pydantic.create_model(f"{name}_arguments", __config__=pydantic.ConfigDict(extra="forbid"),
                                          **fields)
            schema = _without_titles(model.model_json_schema())
        except Exception as exc:  # a type pydantic cannot describe
            raise ToolError(f"tool {name}: its parameters cannot be described as JSON: {exc}") from None
        schema.pop("additionalProperties", None)
        schema.setdefault("properties", {})
        return cls(name, description, schema, function, model, context_parameter)

    def schema(self) -> dict:
        """Name, description and JSON-schema parameters: the shape both Deepgram and OpenAI take."""
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


class ToolRegistry:
    """The tools offered on every agent call."""

    def __init__(self, tools: list[Tool]):
        self.tools = {tool.name: tool for tool in tools}
        if len(self.tools) != len(tools):
            raise ToolError("two tools have the same name")

    def __contains__(self, name: str) -> bool:
        return name in self.tools

    def schemas(self) -> list[dict]:
        return [tool.schema() for tool in self.tools.values()]

    async def run(self, name: str, arguments: str, context: CallContext,
                  timeout: float = DEFAULT_TIMEOUT) -> ToolResult:
        """Run one call of a tool; every failure becomes an error result, never an exception."""
        started = time.monotonic()

        def failed(kind: str, message: str) -> ToolResult:
            return ToolResult(False, json.dumps({"error": message}), kind, time.monotonic() - started)

        tool = self.tools.get(name)
        if tool is None:
            return failed("unknown_tool", f"there is no function named {name!r}")
        try:
            parsed = tool.arguments.model_validate_json(arguments or "{}")
        except pydantic.ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'arguments'}: {e['msg']}" for e in exc.errors())
            return failed("bad_arguments", f"invalid arguments for {name}: {problems}")
        kwargs = {key: getattr(parsed, key) for key in type(parsed).model_fields}
        if tool.context_parameter:
            kwargs[tool.context_parameter] = context
        try:
            async with asyncio.timeout(timeout) as deadline:
                if inspect.iscoroutinefunction(tool.function):
                    value = await tool.function(**kwargs)
                else:
                    value = await asyncio.get_running_loop().run_in_executor(
                        _threads(), lambda: tool.function(**kwargs))
        except TimeoutError:
            if deadline.expired():
                return failed("timeout", f"{name} did not answer within {timeout:g} s")
            return failed("exception", f"{name} failed: TimeoutError")
        except Exception as exc:
            log.warning("call %s: tool %s raised %s: %s", context.call_sid, name, type(exc).__name__, exc)
            return failed("exception", f"{name} failed: {type(exc).__name__}: {exc}")
        content = value if isinstance(value, str) else json.dumps(value, default=str)
        return ToolResult(True, content, "", time.monotonic() - started)


def _threads() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(TOOL_THREADS, thread_name_prefix="agent-tool")
    return _executor


# --- built-in tools --------------------------------------------------------------------------


async def end_call(call: CallContext, reason: str = "") -> str:
    """End the phone call. Say goodbye first: the call ends once your last words have been played.

    Args:
        reason: why the call is ending, in a few words (kept in the call's log).
    """
    call.end_call(reason)
    return "The call will end once your last words have been played."


BUILT_IN = (end_call,)


# --- loading AGENT_TOOLS ---------------------------------------------------------------------


def load_tools(spec: str | None) -> ToolRegistry:
    """The built-in tools plus those of `spec`: a Python file path or an importable module name.

    The module's tools are the names in its `__all__`, or else every public function defined in
    it. Raises ToolError with a readable reason when the module or a function is unusable.
    """
    functions = list(BUILT_IN)
    if spec:
        module = _import(spec)
        exported = getattr(module, "__all__", None)
        if exported is None:
            found = [obj for key, obj in vars(module).items() if not key.startswith("_")
                     and inspect.isfunction(obj) and obj.__module__ == module.__name__]
        else:
            found = [getattr(module, key, None) for key in exported]
            if not all(callable(obj) for obj in found):
                raise ToolError(f"{spec}: __all__ names something that is not a function")
        taken = {f.__name__ for f in functions}
        for function in found:
            if function.__name__ in taken:
                raise ToolError(f"{spec}: {function.__name__} is a built-in tool name")
            functions.append(function)
    return ToolRegistry([Tool.from_function(f) for f in functions])


def _import(spec: str):
    try:
        if spec.endswith(".py") or "/" in spec:
            path = Path(spec).resolve()
            if not path.is_file():
                raise ToolError(f"no such file: {spec}")
            name = f"agent_tools_{re.sub(r'[^A-Za-z0-9_]', '_', path.stem)}"
            loader = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(loader)
            sys.modules[name] = module  # so pydantic and dataclasses can resolve its names
            loader.loader.exec_module(module)
            return module
        return importlib.import_module(spec)
    except ToolError:
        raise
    except Exception as exc:
        raise ToolError(f"cannot import {spec}: {type(exc).__name__}: {exc}") from None


# --- schema helpers --------------------------------------------------------------------------

_SECTION = re.compile(r"^(Args|Arguments|Parameters|Returns|Raises|Yields|Examples?|Notes?):\s*$")
_ARG_LINE = re.compile(r"^\s+(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(description, {parameter: description}) from a Google-style docstring."""
    lines = doc.splitlines()
    description: list[str] = []
    for line in lines:
        if not line.strip() or _SECTION.match(line.strip()):
            break
        description.append(line.strip())
    params: dict[str, str] = {}
    section, current = None, None
    for line in lines:
        header = _SECTION.match(line.strip())
        if header and not line.startswith(" "):
            section, current = header.group(1), None
            continue
        if section not in ("Args", "Arguments", "Parameters"):
            continue
        match = _ARG_LINE.match(line)
        if match and len(line) - len(line.lstrip()) <= 4:
            current = match.group(1)
            params[current] = match.group(2).strip()
        elif current and line.strip():
            params[current] += " " + line.strip()
    return " ".join(description), params


def _without_titles(schema: Any) -> Any:
    """pydantic's JSON schema minus its generated `title`s (noise for the model)."""
    if isinstance(schema, list):
        return [_without_titles(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "title" and isinstance(value, str):
            continue
        if key in ("properties", "$defs") and isinstance(value, dict):
            out[key] = {name: _without_titles(sub) for name, sub in value.items()}
        else:
            out[key] = _without_titles(value)
    return out
