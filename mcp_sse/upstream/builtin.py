"""In-process tools: plain or async Python functions served as MCP tools, no child process.

    tools = ToolSet("my-tools")

    @tools.tool
    def add(a: int, b: int = 0) -> int:
        '''Add two numbers.'''
        return a + b

The input schema is derived from the type hints; arguments are checked against it
before the function runs, and a bad one is answered with -32602 naming the field.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, overload

from .. import __version__
from ..protocol.jsonrpc import INVALID_PARAMS, METHOD_NOT_FOUND, Message, error_response, result_response
from ..protocol.session import Session
from .backend import Backend
from .config import ConfigError

__all__ = ["BuiltinBackend", "Tool", "ToolSet", "load_toolset"]

log = logging.getLogger("mcp_sse.builtin")
_JSON_TYPES: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _schema(hint: Any) -> dict[str, Any]:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint in _JSON_TYPES:
        return {"type": _JSON_TYPES[hint]}
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        return _schema(options[0]) if len(options) == 1 else {"anyOf": [_schema(a) for a in options]}
    if origin is Literal:
        return {"enum": list(args)}
    if hint is list or origin is list:
        return {"type": "array", **({"items": _schema(args[0])} if args else {})}
    if hint is dict or origin is dict:
        return {"type": "object"}
    if hint is Any or hint is inspect.Parameter.empty:
        return {}
    raise TypeError(f"unsupported parameter type {hint!r} for an MCP tool")


def _matches(schema: dict[str, Any], value: Any) -> bool:
    kind = schema.get("type")
    if "enum" in schema:
        return value in schema["enum"]
    if "anyOf" in schema:
        return any(_matches(s, value) for s in schema["anyOf"])
    if kind == "string":
        return isinstance(value, str)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "array":
        items = schema.get("items", {})
        return isinstance(value, list) and all(_matches(items, v) for v in value)
    if kind == "object":
        return isinstance(value, dict)
    return True


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    fn: Callable[..., Any]
    input_schema: dict[str, Any]

    @classmethod
    def from_function(cls, fn: Callable[..., Any], name: str | None = None) -> Tool:
        hints = typing.get_type_hints(fn)
        properties: dict[str, Any] = {}
        required: list[str] = []
        for param in inspect.signature(fn).parameters.values():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise TypeError(f"{fn.__name__}: *args and **kwargs cannot be described to MCP clients")
            properties[param.name] = _schema(hints.get(param.name, Any))
            if param.default is param.empty:
                required.append(param.name)
            elif param.default is not None:
                properties[param.name]["default"] = param.default
        schema: dict[str, Any] = {"type": "object", "properties": properties}
        if required:
            schema["required"] = required
        doc = inspect.getdoc(fn) or ""
        return cls(name or fn.__name__, doc.split("\n\n")[0].strip(), fn, schema)

    def check(self, arguments: dict[str, Any]) -> str | None:
        """What is wrong with the arguments, or None."""
        properties = self.input_schema["properties"]
        for field in self.input_schema.get("required", []):
            if field not in arguments:
                return f"missing required argument {field!r}"
        for field, value in arguments.items():
            if field not in properties:
                return f"unknown argument {field!r}"
            if not _matches(properties[field], value):
                return f"argument {field!r} does not match its schema {json.dumps(properties[field])}"
        return None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "inputSchema": self.input_schema}


class ToolSet:
    """A named collection of in-process tools: the public API for Python tools."""

    def __init__(self, name: str, *, version: str = __version__, instructions: str | None = None) -> None:
        self.name = name
        self.version = version
        self.instructions = instructions
        self.tools: dict[str, Tool] = {}

    @overload
    def tool(self, fn: Callable[..., Any], /) -> Callable[..., Any]: ...
    @overload
    def tool(self, *, name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]: ...

    def tool(self, fn: Callable[..., Any] | None = None, /, *, name: str | None = None) -> Any:  # type: ignore[misc]
        def register(function: Callable[..., Any]) -> Callable[..., Any]:
            tool = Tool.from_function(function, name)
            if tool.name in self.tools:
                raise ValueError(f"tool {tool.name!r} is already registered in {self.name!r}")
            self.tools[tool.name] = tool
            return function

        return register(fn) if fn is not None else register


def _content(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        return {"content": [{"type": "text", "text": value}]}
    text = json.dumps(value, default=str)
    result: dict[str, Any] = {"content": [{"type": "text", "text": text}]}
    if isinstance(value, dict):
        result["structuredContent"] = value
    return result


def load_toolset(reference: str) -> ToolSet:
    """`package.module:attribute` -> the ToolSet it names (a servers-file "module" entry)."""
    module_name, _, attribute = reference.partition(":")
    try:
        toolset = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load in-process tools {reference!r}: {exc}") from None
    if not isinstance(toolset, ToolSet):
        raise ConfigError(f"{reference!r} is a {type(toolset).__name__}, not a mcp_sse ToolSet")
    return toolset


class BuiltinBackend(Backend):
    def __init__(self, toolset: ToolSet, *, name: str | None = None) -> None:
        super().__init__()
        self.toolset = toolset
        self.name = name or toolset.name
        self.capabilities = {"tools": {"listChanged": False}}
        self.server_info = {"name": toolset.name, "version": toolset.version}
        self.instructions = toolset.instructions
        self.state = "running"
        self._ready.set()

    async def request(self, session: Session, message: Message) -> Message:
        request_id = message["id"]
        params = message.get("params") or {}
        method = message["method"]
        if method == "tools/list":
            return result_response(request_id, {"tools": [t.describe() for t in self.toolset.tools.values()]})
        if method != "tools/call":
            return error_response(request_id, METHOD_NOT_FOUND, f"Method not found: {method}")
        tool = self.toolset.tools.get(params.get("name"))  # type: ignore[arg-type]
        if tool is None:
            return error_response(request_id, INVALID_PARAMS, f"Unknown tool: {params.get('name')!s:.100}")
        arguments = params.get("arguments") or {}
        problem = "arguments must be an object" if not isinstance(arguments, dict) else tool.check(arguments)
        if problem:
            return error_response(request_id, INVALID_PARAMS, f"{tool.name}: {problem}")
        try:
            value = tool.fn(**arguments)
            if inspect.isawaitable(value):
                value = await value
        except Exception as exc:
            # A tool's failure is a result the model should see, not a protocol error (MCP spec).
            log.warning("tool %s raised %s", tool.name, type(exc).__name__)
            return result_response(
                request_id,
                {"content": [{"type": "text", "text": f"{type(exc).__name__}: {exc}"}], "isError": True},
            )
        return result_response(request_id, _content(value))
