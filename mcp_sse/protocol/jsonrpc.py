"""JSON-RPC 2.0 as MCP uses it: parsing with limits, envelope validation, error shapes.

No HTTP here. Every function that sees client bytes raises `ProtocolError`, which carries
a JSON-RPC error code and a message that is safe to send back (it never echoes input).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from json.encoder import c_make_encoder, encode_basestring, encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any, Final

__all__ = [
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "METHOD_NOT_FOUND",
    "PARSE_ERROR",
    "Message",
    "ProtocolError",
    "dumps",
    "error_response",
    "id_key",
    "is_notification",
    "is_request",
    "is_response",
    "parse_body",
    "result_response",
    "validate_message",
]

PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603

Message = dict[str, Any]
"""One JSON-RPC message as decoded JSON. Kept as a plain dict: the gateway forwards
messages it does not need to understand, and rebuilding models would cost time and
drop fields that newer protocol revisions add."""

MAX_DEPTH: Final = 64
MAX_ID_LENGTH: Final = 256


class ProtocolError(Exception):
    """A message the gateway refuses; `code` is the JSON-RPC error code to answer with."""

    def __init__(self, code: int, message: str, request_id: str | int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id

    def to_message(self) -> Message:
        return error_response(self.request_id, self.code, self.message)


def encoder(
    *,
    separators: tuple[str, str] = (",", ":"),
    ensure_ascii: bool = False,
    sort_keys: bool = False,
    default: Callable[[Any], Any] | None = None,
) -> Callable[[Any], str]:
    """A JSON encoder built once and called directly: `JSONEncoder.encode` (and so `json.dumps`)
    rebuilds the C encoder on every call, a tenth of a small message's cost. No circular-reference
    markers: every value here comes from parsed JSON or our own dicts, and a cycle still ends in
    RecursionError. Otherwise the stdlib's output, byte for byte."""
    options = json.JSONEncoder(
        separators=separators, ensure_ascii=ensure_ascii, sort_keys=sort_keys, default=default
    )
    make = c_make_encoder
    if make is None:  # an interpreter without the C accelerator
        return options.encode
    strings = encode_basestring_ascii if ensure_ascii else encode_basestring
    item, key = separators
    fast = make(None, options.default, strings, None, key, item, sort_keys, False, True)

    def encode(value: Any) -> str:
        return "".join(fast(value, 0))

    return encode


_ENCODE: Final = encoder()


def dumps(message: Any) -> str:
    return _ENCODE(message)


_LONE_SURROGATE = re.compile(
    r"\\ud[89ab][0-9a-f]{2}(?!\\ud[c-f])|(?<!\\ud[89ab][0-9a-f]{2})\\ud[c-f][0-9a-f]{2}"
)


def _refuse_constant(name: str) -> Any:
    # NaN and Infinity are not JSON (RFC 8259); forwarding them would break strict peers.
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text[:20]} overflows a double")
    return value


def _depth(value: Any) -> int:
    """Nesting depth of a decoded JSON value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


_DECODE: Final = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float).decode


def parse_body(body: bytes, *, max_depth: int = MAX_DEPTH) -> Any:
    """Decode a request body, refusing invalid UTF-8, invalid JSON and hostile nesting."""
    if not body.strip():
        raise ProtocolError(PARSE_ERROR, "Parse error: empty body")
    try:
        text = body.decode("utf-8")
        value = _DECODE(text)
    except UnicodeDecodeError:
        raise ProtocolError(PARSE_ERROR, "Parse error: body is not valid UTF-8") from None
    except RecursionError:
        # The C decoder stops at the interpreter's recursion limit: linear time, no crash.
        raise ProtocolError(PARSE_ERROR, f"Parse error: JSON nested deeper than {max_depth} levels") from None
    except ValueError:
        raise ProtocolError(PARSE_ERROR, "Parse error: body is not valid JSON") from None
    if "\\u" in text and _LONE_SURROGATE.search(json.dumps(value)):
        # Lone surrogates decode, but cannot be encoded again as UTF-8: refuse them at the door.
        raise ProtocolError(PARSE_ERROR, "Parse error: string with a lone UTF-16 surrogate")
    # Depth can never exceed the number of opening brackets, so most bodies skip the walk.
    if body.count(b"{") + body.count(b"[") > max_depth and _depth(value) > max_depth:
        raise ProtocolError(PARSE_ERROR, f"Parse error: JSON nested deeper than {max_depth} levels")
    return value


def _valid_id(value: Any) -> bool:
    kind = type(value)  # exact types: what JSON decodes to (bool, an int subclass, is no id)
    if kind is int:
        return bool(-(2**63) <= value < 2**63)
    return kind is str and len(value) <= MAX_ID_LENGTH


def validate_message(message: Any) -> Message:
    """Check the JSON-RPC envelope of one message; return it unchanged when valid."""
    if not isinstance(message, dict):
        raise ProtocolError(INVALID_REQUEST, "Invalid Request: a message must be a JSON object")
    raw_id = message.get("id")
    valid_id = _valid_id(raw_id)
    request_id = raw_id if valid_id else None
    if message.get("jsonrpc") != "2.0":
        raise ProtocolError(INVALID_REQUEST, 'Invalid Request: "jsonrpc" must be "2.0"', request_id)
    if not valid_id and "id" in message:
        raise ProtocolError(
            INVALID_REQUEST, 'Invalid Request: "id" must be a string or an integer (not null)'
        )
    if "method" in message:
        if not isinstance(message["method"], str) or not message["method"]:
            raise ProtocolError(INVALID_REQUEST, 'Invalid Request: "method" must be a string', request_id)
        if "result" in message or "error" in message:
            raise ProtocolError(
                INVALID_REQUEST, 'Invalid Request: a request has no "result" or "error"', request_id
            )
        if "params" in message and not isinstance(message["params"], dict):
            raise ProtocolError(INVALID_REQUEST, 'Invalid Request: "params" must be an object', request_id)
        return message
    if "id" not in message:
        raise ProtocolError(INVALID_REQUEST, 'Invalid Request: no "method" and no "id"')
    if ("result" in message) == ("error" in message):
        raise ProtocolError(
            INVALID_REQUEST, 'Invalid Request: a response has exactly one of "result" or "error"'
        )
    if "error" in message:
        error = message["error"]
        code = error.get("code") if isinstance(error, dict) else None
        if not isinstance(code, int) or isinstance(code, bool):
            raise ProtocolError(INVALID_REQUEST, 'Invalid Request: "error" needs an integer "code"')
    elif not isinstance(message["result"], dict):
        raise ProtocolError(INVALID_REQUEST, 'Invalid Request: "result" must be an object')
    return message


def is_request(message: Message) -> bool:
    return "method" in message and "id" in message


def is_notification(message: Message) -> bool:
    return "method" in message and "id" not in message


def is_response(message: Message) -> bool:
    return "method" not in message


def id_key(request_id: str | int) -> tuple[bool, str | int]:
    """A dict key that keeps "1" and 1 apart, as JSON-RPC does."""
    return (isinstance(request_id, str), request_id)


def error_response(request_id: str | int | None, code: int, message: str, data: Any = None) -> Message:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": request_id, "error": error}


def result_response(request_id: str | int, result: dict[str, Any]) -> Message:
    return {"jsonrpc": "2.0", "id": request_id, "result": result}
