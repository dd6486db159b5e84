"""parse_body and validate_message: the only code that sees a client's raw bytes."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from mcp_sse.protocol.jsonrpc import (
    INVALID_REQUEST,
    MAX_DEPTH,
    MAX_ID_LENGTH,
    PARSE_ERROR,
    ProtocolError,
    parse_body,
    validate_message,
)

# -- parse_body ---------------------------------------------------------------------------------


def _parse_error(body: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_body(body)
    assert info.value.code == PARSE_ERROR
    return info.value


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"jsonrpc":"2.0","id":1,"method":"ping"}', {"jsonrpc": "2.0", "id": 1, "method": "ping"}),
        (b'  \n{"a": [1, 2, {"b": null}]}\n ', {"a": [1, 2, {"b": None}]}),
        ('{"text":"héllo ✓"}'.encode(), {"text": "héllo ✓"}),
        (b'[{"jsonrpc":"2.0","method":"x"}]', [{"jsonrpc": "2.0", "method": "x"}]),
    ],
)
def test_parse_body_valid(body: bytes, expected: Any) -> None:
    assert parse_body(body) == expected


@pytest.mark.parametrize("body", [b"", b"   ", b"\n\t\r\n"])
def test_parse_body_empty(body: bytes) -> None:
    assert "empty" in _parse_error(body).message


@pytest.mark.parametrize("body", [b'{"a": "\xff"}', b"\xc3\x28", b'{"a":"\xed\xa0\x80"}', b"\x80{}"])
def test_parse_body_invalid_utf8(body: bytes) -> None:
    assert "UTF-8" in _parse_error(body).message


@pytest.mark.parametrize(
    "body", [b"{", b'{"a":}', b"{'a': 1}", b'{"a": 1,}', b"nope", b'{"a": 1} trailing', b"NaN x"]
)
def test_parse_body_invalid_json(body: bytes) -> None:
    error = _parse_error(body)
    assert "not valid JSON" in error.message
    assert body.decode(errors="replace") not in error.message  # the error never echoes input


# Speed without a clock: the inputs are as large as a body may be, so a linear parser finishes in
# milliseconds and a super-linear one would not finish within the test's timeout (hours at 4 MB).


@pytest.mark.timeout(60)
def test_parse_body_deep_nesting_refused_fast_without_recursion_error() -> None:
    n = 1_000_000  # 2 MB bodies, under MAX_BODY_BYTES
    for body in (b"[" * n + b"]" * n, b'{"a":' * (n // 4) + b"1" + b"}" * (n // 4)):
        error = _parse_error(body)
        assert "nested" in error.message


def test_parse_body_deep_nesting_even_when_unbalanced() -> None:
    # A body that only opens brackets must not reach json.loads' recursion either.
    _parse_error(b"[" * 100_000)


def test_parse_body_depth_limit_is_exact() -> None:
    at_limit = b"[" * MAX_DEPTH + b"]" * MAX_DEPTH
    over = b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1)
    assert isinstance(parse_body(at_limit), list)
    _parse_error(over)


def test_parse_body_brackets_inside_strings_do_not_count() -> None:
    body = json.dumps({"text": "[" * 5000 + "{" * 5000, "esc": '\\"[[[', "q": '"{{{'}).encode()
    assert parse_body(body)["text"].startswith("[[[")


def test_parse_body_escaped_quote_does_not_hide_real_nesting() -> None:
    # `"\\"` is a complete string (an escaped backslash); what follows is real structure.
    body = b'["\\\\",' + b"[" * 100 + b"]" * 100 + b"]"
    _parse_error(body)


def test_parse_body_huge_integer_literal_is_a_parse_error() -> None:
    # Python refuses int literals over sys.get_int_max_str_digits() with ValueError.
    _parse_error(b'{"id": ' + b"9" * (sys.get_int_max_str_digits() + 10) + b"}")


@pytest.mark.timeout(60)
def test_parse_body_unterminated_escaped_string_is_linear() -> None:
    body = b"[" * (MAX_DEPTH + 1) + b'"' + b'\\"' * 1_500_000  # 3 MB, under the 4 MB body limit
    with pytest.raises(ProtocolError) as info:
        parse_body(body)
    assert info.value.code == PARSE_ERROR


# -- validate_message ---------------------------------------------------------------------------

VALID = [
    {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
    {"jsonrpc": "2.0", "id": "abc", "method": "tools/call", "params": {"name": "x", "arguments": {}}},
    {"jsonrpc": "2.0", "id": 0, "method": "ping", "params": {}},
    {"jsonrpc": "2.0", "id": -(2**63), "method": "ping"},
    {"jsonrpc": "2.0", "id": 2**63 - 1, "method": "ping"},
    {"jsonrpc": "2.0", "id": "x" * MAX_ID_LENGTH, "method": "ping"},
    {"jsonrpc": "2.0", "id": "", "method": "ping"},
    {"jsonrpc": "2.0", "method": "notifications/initialized"},
    {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}},
    {"jsonrpc": "2.0", "id": 7, "result": {}},
    {"jsonrpc": "2.0", "id": "s", "result": {"content": []}},
    {"jsonrpc": "2.0", "id": 7, "error": {"code": -32601, "message": "nope"}},
    {"jsonrpc": "2.0", "id": 7, "method": "x", "extra": "forwarded as is"},
]


@pytest.mark.parametrize("message", VALID)
def test_validate_message_valid_returns_same_object(message: dict[str, Any]) -> None:
    assert validate_message(message) is message


def _invalid(message: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        validate_message(message)
    assert info.value.code == INVALID_REQUEST
    return info.value


@pytest.mark.parametrize("message", [[], "x", 1, None, True, [{"jsonrpc": "2.0", "method": "x"}]])
def test_validate_message_not_an_object(message: Any) -> None:
    _invalid(message)


@pytest.mark.parametrize(
    "bad_id",
    [None, True, False, 1.5, 1.0, 2**63, -(2**63) - 1, 10**30, "x" * (MAX_ID_LENGTH + 1), [1], {"a": 1}],
)
def test_validate_message_bad_ids(bad_id: Any) -> None:
    for message in (
        {"jsonrpc": "2.0", "id": bad_id, "method": "ping"},
        {"jsonrpc": "2.0", "id": bad_id, "result": {}},
    ):
        error = _invalid(message)
        assert error.request_id is None  # an invalid id is never echoed back
        assert error.to_message()["id"] is None


@pytest.mark.parametrize(
    "message",
    [
        {"id": 1, "method": "ping"},
        {"jsonrpc": "1.0", "id": 1, "method": "ping"},
        {"jsonrpc": 2.0, "id": 1, "method": "ping"},
        {"jsonrpc": "2.0", "id": 1, "method": ""},
        {"jsonrpc": "2.0", "id": 1, "method": 5},
        {"jsonrpc": "2.0", "id": 1, "method": None},
    ],
)
def test_validate_message_bad_envelope_keeps_a_valid_id(message: dict[str, Any]) -> None:
    # With a usable id the client can match the error to its request.
    assert _invalid(message).request_id == 1


@pytest.mark.parametrize("params", [[], [1, 2], "x", 1, None, True])
def test_validate_message_params_not_an_object(params: Any) -> None:
    error = _invalid({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": params})
    assert "params" in error.message
    assert error.request_id == 3


def test_validate_message_request_with_result_or_error() -> None:
    _invalid({"jsonrpc": "2.0", "id": 1, "method": "x", "result": {}})
    _invalid({"jsonrpc": "2.0", "id": 1, "method": "x", "error": {"code": 1, "message": "m"}})


def test_validate_message_both_result_and_error() -> None:
    error = _invalid({"jsonrpc": "2.0", "id": 1, "result": {}, "error": {"code": 1, "message": "m"}})
    assert "exactly one" in error.message


def test_validate_message_neither_method_nor_id_nor_result() -> None:
    _invalid({"jsonrpc": "2.0"})
    _invalid({"jsonrpc": "2.0", "result": {}})
    _invalid({"jsonrpc": "2.0", "id": 1})


@pytest.mark.parametrize(
    "error",
    [
        {"message": "no code"},
        {"code": "-32600", "message": "string code"},
        {"code": 1.5, "message": "float code"},
        {"code": None, "message": "null code"},
        "just a string",
        [1],
        None,
    ],
)
def test_validate_message_error_without_integer_code(error: Any) -> None:
    assert "code" in _invalid({"jsonrpc": "2.0", "id": 1, "error": error}).message


def test_validate_message_error_code_boolean_is_not_an_integer() -> None:
    _invalid({"jsonrpc": "2.0", "id": 1, "error": {"code": True, "message": "m"}})


@pytest.mark.parametrize("result", [[], "ok", 1, None, True])
def test_validate_message_result_not_an_object(result: Any) -> None:
    _invalid({"jsonrpc": "2.0", "id": 1, "result": result})


# -- properties ---------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
# Messages that look like JSON-RPC more often than arbitrary values would.
envelopes = st.fixed_dictionaries(
    {},
    optional={
        "jsonrpc": st.sampled_from(["2.0", "1.0", 2.0]) | json_values,
        "id": st.integers() | st.text(max_size=300) | json_values,
        "method": st.text(max_size=10) | json_values,
        "params": json_values,
        "result": json_values,
        "error": st.fixed_dictionaries({"code": json_values, "message": json_values}) | json_values,
    },
)
fuzz = hsettings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@fuzz
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_parse_body_only_raises_protocol_error(body: bytes) -> None:
    try:
        parse_body(body)
    except ProtocolError as exc:
        assert exc.code == PARSE_ERROR


@fuzz
@given(
    st.lists(
        st.sampled_from([b"[", b"]", b"{", b"}", b'"', b"\\", b":", b",", b"1", b"a"]), max_size=400
    ).map(b"".join)
)
def test_parse_body_bracket_soup_only_raises_protocol_error(body: bytes) -> None:
    try:
        parse_body(body)
    except ProtocolError as exc:
        assert exc.code == PARSE_ERROR


@fuzz
@given(json_values | envelopes)
def test_validate_message_returns_same_object_or_protocol_error(message: Any) -> None:
    try:
        result = validate_message(message)
    except ProtocolError as exc:
        assert exc.code in {INVALID_REQUEST, PARSE_ERROR}
        assert exc.request_id is None or exc.request_id == message.get("id")
    else:
        assert result is message
        assert isinstance(result, dict) and result["jsonrpc"] == "2.0"
