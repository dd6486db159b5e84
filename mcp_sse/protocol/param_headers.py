"""`Mcp-Param-*` headers (MCP 2026-07-28): tool arguments mirrored into HTTP headers.

A tool's inputSchema may mark a string, integer or boolean property with `x-mcp-header: Name`;
a client then sends that argument's value as `Mcp-Param-Name` too, so load balancers and
gateways can route on it without reading the body. A request whose headers and body disagree
is refused (-32020): an intermediary would act on one value while the tool runs with the other.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator, Mapping
from typing import Any, Final

from multidict import CIMultiDictProxy

__all__ = ["decode_header_value", "encode_header_value", "param_header_problem", "param_headers"]

ANNOTATION: Final = "x-mcp-header"
PREFIX: Final = "Mcp-Param-"
_TOKEN: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token
_SENTINEL: Final = re.compile(r"=\?base64\?(.*)\?=")
_INTEGRAL: Final = re.compile(r"-?\d+(\.0+)?")
_PRIMITIVES: Final = ("string", "integer", "boolean")
_MISSING: Final = object()


def decode_header_value(raw: str | None) -> str | None:
    """A header value, decoding the `=?base64?...?=` form used for values HTTP cannot carry;
    None when that form does not decode."""
    if raw is None or (match := _SENTINEL.fullmatch(raw)) is None:
        return raw
    try:
        return base64.b64decode(match.group(1), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


def _annotations(
    schema: Mapping[str, Any], path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], Any, Any]]:
    """(argument path, header name, type) of each annotated property, through nested objects."""
    properties = schema.get("properties")
    if not isinstance(properties, Mapping):
        return
    for name, node in properties.items():
        if isinstance(node, Mapping):
            if ANNOTATION in node:
                yield (*path, str(name)), node[ANNOTATION], node.get("type")
            yield from _annotations(node, (*path, str(name)))


def _headers_of(schema: Mapping[str, Any]) -> list[tuple[tuple[str, ...], str, str]] | None:
    """The schema's header bindings; None when an annotation is invalid (a conforming client then
    drops the tool and sends no headers, so nothing can be checked against them)."""
    bindings, seen = [], set()
    for path, header, kind in _annotations(schema):
        valid = isinstance(header, str) and _TOKEN.fullmatch(header) and kind in _PRIMITIVES
        if not valid or header.lower() in seen:
            return None
        seen.add(header.lower())
        bindings.append((path, header, kind))
    return bindings


def _argument(arguments: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(arguments, Mapping) or key not in arguments:
            return _MISSING
        arguments = arguments[key]
    return _MISSING if arguments is None else arguments  # null counts as absent


def _agrees(kind: str, value: Any, text: str) -> bool | None:
    """Does header text `text` say `value`? None when `value` is not of the declared type (the
    argument check reports that)."""
    if kind == "boolean":
        return text == ("true" if value else "false") if isinstance(value, bool) else None
    if kind == "integer":
        integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not integral:
            return None
        # Compared as integers, never through a float: 42 matches "42" and "42.0", exactly at any size.
        return _INTEGRAL.fullmatch(text) is not None and int(text.partition(".")[0]) == int(value)
    return text == value if isinstance(value, str) else None


def param_header_problem(
    schema: Mapping[str, Any], arguments: Any, headers: CIMultiDictProxy[str]
) -> str | None:
    """Why this tools/call's `Mcp-Param-*` headers disagree with its arguments, or None."""
    for path, header, kind in _headers_of(schema) or ():
        name = PREFIX + header
        sent = headers.getall(name, [])
        if len(sent) > 1:
            return f"{name} header appears more than once"
        value = _argument(arguments, path)
        where = ".".join(path)
        if not sent:
            if value is not _MISSING:
                return f"{name} header is missing for argument {where!r}"
            continue
        text = decode_header_value(sent[0])
        if text is None:
            return f"{name} header is not valid base64"
        if value is _MISSING:
            return f"{name} header names argument {where!r}, which the request does not carry"
        if _agrees(kind, value, text) is False:
            return f"{name} header does not match argument {where!r}"
    return None


def encode_header_value(text: str) -> str:
    """`text` as a header value: as is when HTTP can carry it, else in the `=?base64?...?=` form."""
    plain = text.isascii() and text.isprintable() and text == text.strip() and not _SENTINEL.fullmatch(text)
    return text if plain else f"=?base64?{base64.b64encode(text.encode()).decode()}?="


def param_headers(schema: Mapping[str, Any], arguments: Any) -> dict[str, str]:
    """The `Mcp-Param-*` headers a conforming client sends with this tools/call (the gateway as the
    client of a 2026-07-28 remote); none for a schema whose annotations are invalid."""
    headers = {}
    for path, header, kind in _headers_of(schema) or ():
        value = _argument(arguments, path)
        if value is _MISSING:
            continue
        if kind == "boolean" and isinstance(value, bool):
            headers[PREFIX + header] = "true" if value else "false"
        elif kind == "integer" and isinstance(value, int | float) and not isinstance(value, bool):
            headers[PREFIX + header] = str(int(value))
        elif isinstance(value, str):
            headers[PREFIX + header] = encode_header_value(value)
    return headers
