"""Property-based fuzzing of the parsers that see client bytes first.

tests/protocol/test_jsonrpc.py already fuzzes parse_body and validate_message for "only
ProtocolError escapes"; here are the stronger properties (round trips, exact depth, what an
accepted message can be turned back into, the shape of every error), and the header parsers:
X-Forwarded-For, Origin and Host, and Streamable HTTP's Accept check.
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from mcp_sse.protocol.jsonrpc import (
    INVALID_REQUEST,
    MAX_DEPTH,
    PARSE_ERROR,
    ProtocolError,
    dumps,
    is_notification,
    is_request,
    is_response,
    parse_body,
    validate_message,
)
from mcp_sse.security import client_ip
from mcp_sse.security.client_ip import MAX_HOPS, normalise, parse_forwarded_for, parse_network
from mcp_sse.security.origin import normalise_host, normalise_origin
from mcp_sse.transport.streamable import _accepts

pytestmark = pytest.mark.slow  # long: `pytest -m 'not slow'` skips it in a quick local loop; CI runs it

fuzz = hsettings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# -- JSON-RPC -----------------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)
ids = st.integers(-(2**63), 2**63 - 1) | st.text(max_size=256)
bad_ids = (
    st.none()
    | st.booleans()
    | st.floats()
    | st.integers(2**63, 2**80)
    | st.integers(-(2**80), -(2**63) - 1)
    | st.text(min_size=257, max_size=300)
    | st.lists(scalars, max_size=2)
    | st.dictionaries(st.text(max_size=3), scalars, max_size=2)
)
methods = st.text(min_size=1, max_size=40)
params = st.dictionaries(st.text(max_size=10), json_values, max_size=5)
requests = st.builds(
    lambda i, m, p: {"jsonrpc": "2.0", "id": i, "method": m, **({"params": p} if p is not None else {})},
    ids,
    methods,
    st.none() | params,
)
notifications = st.builds(lambda m, p: {"jsonrpc": "2.0", "method": m, "params": p}, methods, params)
responses = st.builds(lambda i, r: {"jsonrpc": "2.0", "id": i, "result": r}, ids, params) | st.builds(
    lambda i, c, msg: {"jsonrpc": "2.0", "id": i, "error": {"code": c, "message": msg}},
    ids,
    st.integers(-(2**40), 2**40),
    st.text(max_size=20),
)
valid_messages = requests | notifications | responses


def _nesting(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_nesting(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_nesting(v) for v in value), default=0)
    return 0


@fuzz
@given(json_values)
def test_parse_body_round_trips_every_json_value_within_the_depth_limit(value: Any) -> None:
    assert _nesting(value) <= MAX_DEPTH
    for encoded in (json.dumps(value), dumps(value), json.dumps(value, indent=2)):
        assert parse_body(encoded.encode()) == value


@fuzz
@given(st.integers(1, 3 * MAX_DEPTH), st.sampled_from(["[", '{"k":']), st.booleans())
def test_parse_body_depth_limit_is_exact(depth: int, opener: str, wrapped: bool) -> None:
    closer = "]" if opener == "[" else "}"
    nest = opener * depth + "0" + closer * depth
    body = f'{{"jsonrpc":"2.0","method":"m","params":{{"x":{nest}}}}}' if wrapped else nest
    total = depth + (2 if wrapped else 0)
    if total <= MAX_DEPTH:
        assert _nesting(parse_body(body.encode())) == total
    else:
        with pytest.raises(ProtocolError) as info:
            parse_body(body.encode())
        assert info.value.code == PARSE_ERROR


@fuzz
@given(valid_messages)
def test_validate_message_accepts_every_well_formed_message_and_classifies_it_once(message: Any) -> None:
    assert validate_message(message) is message
    kinds = [is_request(message), is_notification(message), is_response(message)]
    assert kinds.count(True) == 1
    # And so does the whole path from bytes.
    assert validate_message(parse_body(dumps(message).encode())) == message


@fuzz
@given(valid_messages, bad_ids)
def test_validate_message_refuses_every_bad_id(message: Any, bad_id: Any) -> None:
    with pytest.raises(ProtocolError) as info:
        validate_message({**message, "id": bad_id})
    assert info.value.code == INVALID_REQUEST
    assert info.value.request_id is None  # an unusable id is never echoed back


MARKER = "zq-marker-7f3a"


@fuzz
@given(
    json_values | requests | responses,
    st.sampled_from(["id", "method", "jsonrpc", "params", "result", "error"]),
)
def test_every_refusal_is_a_well_formed_error_that_echoes_no_input(message: Any, key: str) -> None:
    if isinstance(message, dict):
        message = {**message, key: MARKER}  # client text where the gateway reads
    try:
        validate_message(message)
    except ProtocolError as exc:
        error = exc.to_message()
        assert MARKER not in exc.message
        assert set(error) == {"jsonrpc", "id", "error"} and error["jsonrpc"] == "2.0"
        assert error["id"] is None or isinstance(error["id"], int | str)
        assert isinstance(error["error"]["code"], int) and error["error"]["message"]
        assert json.loads(dumps(error)) == error


@fuzz
@example(b'{"jsonrpc":"2.0","id":"\\ud800","method":"ping"}')
@example(b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":NaN}}')
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_what_parse_body_accepts_can_be_written_as_strict_utf8_json(body: bytes) -> None:
    try:
        value = parse_body(body)
    except ProtocolError:
        return
    text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    assert json.loads(text.encode("utf-8")) == value


# -- X-Forwarded-For ----------------------------------------------------------------------------

addresses = st.ip_addresses(v=4) | st.ip_addresses(v=6)
peers = addresses.map(normalise)  # as the middleware hands them over
networks = st.builds(
    lambda a, bits: parse_network(f"{a}/{bits if a.version == 4 else bits * 4}", setting="test"),
    addresses,
    st.integers(1, 32),
)
hop_text = st.one_of(
    addresses.map(str),
    addresses.map(lambda a: f"[{a}]:443" if a.version == 6 else f"{a}:8080"),
    st.sampled_from(["unknown", "_hidden", "", " ", "1.2.3", "::ffff:1.2.3.4", "[::1", "999.1.1.1"]),
    st.text(max_size=20),
)


def _parsed(entry: str) -> Any:
    text = entry.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return address.ipv4_mapped if getattr(address, "ipv4_mapped", None) else address


@fuzz
@given(
    peers, st.lists(st.lists(hop_text, max_size=6).map(",".join), max_size=4), st.lists(networks, max_size=4)
)
def test_forwarded_for_never_raises_and_names_the_peer_or_a_listed_hop(
    peer: Any, values: list[str], trusted: list[Any]
) -> None:
    result = parse_forwarded_for(peer, values, trusted)
    assert isinstance(result, ipaddress.IPv4Address | ipaddress.IPv6Address)
    assert not (isinstance(result, ipaddress.IPv6Address) and result.ipv4_mapped)
    hops = {_parsed(e) for e in ",".join(values).split(",")} - {None}
    assert result == peer or result in hops


@fuzz
@given(peers, st.lists(hop_text, max_size=8), peers, st.lists(addresses, max_size=3))
def test_forwarded_for_cannot_be_forged_left_of_the_first_untrusted_hop(
    peer: Any, forged: list[str], client: Any, proxies: list[Any]
) -> None:
    """Whatever a client writes, our proxies append what they saw: the client's real address wins."""
    trusted = [parse_network(str(p), setting="test") for p in proxies]  # as TRUSTED_PROXIES is read
    if any(client in net for net in trusted):
        return
    values = [",".join([*forged, str(client), *(str(p) for p in proxies)])]
    assert parse_forwarded_for(peer, values, trusted) == client


@fuzz
@given(peers, st.lists(hop_text, min_size=1, max_size=10))
def test_forwarded_for_without_trusted_hops_is_the_right_most_entry(peer: Any, hops: list[str]) -> None:
    expected = _parsed(hops[-1])
    assert parse_forwarded_for(peer, [",".join(hops)], []) == (peer if expected is None else expected)


def test_forwarded_for_of_a_hundred_thousand_hops_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    trusted = [ipaddress.ip_network("10.0.0.0/8")]
    values = [",".join(["10.1.2.3"] * 100_000)]
    # Bounded means at most MAX_HOPS entries are parsed, whatever the header holds: counted, not timed.
    parsed: list[str] = []
    parse_hop = client_ip._parse_hop
    monkeypatch.setattr(client_ip, "_parse_hop", lambda entry: parsed.append(entry) or parse_hop(entry))
    assert parse_forwarded_for(ipaddress.ip_address("10.0.0.1"), values, trusted) == ipaddress.ip_address(
        "10.1.2.3"
    )
    assert 0 < len(parsed) <= MAX_HOPS
    assert MAX_HOPS < 100


# -- Origin and Host ----------------------------------------------------------------------------

ORIGIN_SHAPE = re.compile(r"[a-z][a-z0-9+.-]*://(\[[0-9a-f:.]+\]|[a-z0-9._~!$&'()*+,;=%-]+)(:\d{1,5})?")
origin_like = st.one_of(
    st.text(max_size=60),
    st.from_regex(
        r"\A[A-Za-z][A-Za-z0-9+.-]{0,6}://[A-Za-z0-9.\-\[\]:@%_]{0,30}(:[0-9]{0,6})?/?[?#]?.{0,5}\Z"
    ),
    st.builds(
        lambda scheme, host, port: f"{scheme}://{host}" + ("" if port is None else f":{port}"),
        st.sampled_from(["http", "https", "HTTP", "Https", "chrome-extension", "x"]),
        st.one_of(
            st.from_regex(r"\A[a-zA-Z0-9-]{1,10}(\.[a-zA-Z0-9-]{1,10}){0,2}\Z"),
            addresses.map(lambda a: f"[{a}]" if a.version == 6 else str(a)),
        ),
        st.none() | st.integers(0, 70000),
    ),
)


@fuzz
@given(origin_like, st.booleans())
def test_normalise_origin_is_canonical_and_idempotent(text: str, header: bool) -> None:
    try:
        result = normalise_origin(text, header=header)
    except ValueError:
        return
    assert ORIGIN_SHAPE.fullmatch(result), result
    assert result == result.lower()
    assert normalise_origin(result) == result
    assert normalise_origin(result, header=True) == result
    assert not result.startswith(("http://", "https://")) or not result.endswith((":80", ":443"))
    if header:  # what a header may say, a configured entry may say too
        assert normalise_origin(text) == result


host_like = st.one_of(
    st.text(max_size=40),
    st.from_regex(r"\A(\[[0-9a-fA-F:.]{0,40}\]|[A-Za-z0-9.\-]{0,20})(:[0-9*]{0,6})?\Z"),
)


@fuzz
@given(host_like)
def test_normalise_host_is_canonical_and_round_trips(text: str) -> None:
    try:
        host, port = normalise_host(text)
    except ValueError:
        return
    assert host == host.lower() and host.isascii() and host
    assert port is None or 0 < port < 65536
    assert normalise_host(host if port is None else f"{host}:{port}") == (host, port)


# -- Accept ---------------------------------------------------------------------------------------

media = st.sampled_from(
    ["application/json", "text/event-stream", "*/*", "text/*", "application/*", "text/html", "", "x"]
)
params_text = st.sampled_from(["", ";q=0.5", "; charset=utf-8", ";q=0", ";;", ";level=1;q=1"])
accept_headers = st.one_of(
    st.text(max_size=60),
    st.lists(st.tuples(media, params_text).map("".join), max_size=5).map(", ".join),
)


def accepts(value: str | None, *types: str) -> bool:
    headers = {} if value is None else {"Accept": value}
    return _accepts(make_mocked_request("POST", "/mcp", headers=headers), *types)


@fuzz
@given(accept_headers)
def test_accept_parsing_never_raises_and_ignores_case_order_and_parameters(value: str) -> None:
    both = ("application/json", "text/event-stream")
    result = accepts(value, *both)
    assert isinstance(result, bool)
    if "\n" in value or "\r" in value:
        return  # not a header value that can arrive
    assert accepts(value.upper(), *both) == result
    parts = value.split(",")
    assert accepts(",".join(reversed(parts)), *both) == result
    if "*/*" in {p.split(";")[0].strip() for p in parts}:
        assert result
    # Adding what is required always makes it acceptable.
    assert accepts(f"{value}, application/json, text/event-stream", *both)


# -- Mcp-Param-* headers (2026-07-28) ------------------------------------------------------------

header_names = st.sampled_from(["Region", "Count", "Dry", "Id", "bad name", "", "région"])
property_schemas = st.fixed_dictionaries(
    {"type": st.sampled_from(["string", "integer", "boolean", "number", "object", None])},
    optional={"x-mcp-header": header_names | st.integers() | st.none()},
)
tool_schemas = st.recursive(
    st.fixed_dictionaries(
        {"properties": st.dictionaries(st.sampled_from("abc"), property_schemas, max_size=3)}
    ),
    lambda inner: st.fixed_dictionaries(
        {"properties": st.dictionaries(st.sampled_from("abc"), inner, max_size=3)}
    ),
    max_leaves=6,
)
param_headers = st.dictionaries(
    st.sampled_from(["Mcp-Param-Region", "mcp-param-count", "Mcp-Param-Dry", "Mcp-Param-Id", "Other"]),
    st.text(max_size=30) | st.just("=?base64?@@?=") | st.just("=?base64?dHJ1ZQ==?="),
    max_size=4,
)


@fuzz
@given(tool_schemas, json_values, param_headers)
def test_param_header_check_never_raises_and_names_a_header(
    schema: Any, arguments: Any, headers: Any
) -> None:
    from multidict import CIMultiDict, CIMultiDictProxy

    from mcp_sse.protocol.param_headers import param_header_problem

    problem = param_header_problem(schema, arguments, CIMultiDictProxy(CIMultiDict(headers)))
    assert problem is None or problem.startswith("Mcp-Param-")


@fuzz
@given(st.text(max_size=40), st.integers(-(10**30), 10**30), st.booleans())
def test_param_headers_written_as_a_client_writes_them_always_agree(
    text: str, number: int, flag: bool
) -> None:
    import base64

    from multidict import CIMultiDict, CIMultiDictProxy

    from mcp_sse.protocol.param_headers import param_header_problem

    schema = {
        "properties": {
            "s": {"type": "string", "x-mcp-header": "S"},
            "n": {"type": "integer", "x-mcp-header": "N"},
            "b": {"type": "boolean", "x-mcp-header": "B"},
        }
    }
    headers = CIMultiDict(
        {
            "Mcp-Param-S": "=?base64?"
            + base64.b64encode(text.encode("utf-8", "surrogatepass")).decode()
            + "?="
            if not text.isascii() or not text.isprintable() or text != text.strip()
            else text,
            "Mcp-Param-N": str(number),
            "Mcp-Param-B": "true" if flag else "false",
        }
    )
    arguments = {"s": text, "n": number, "b": flag}
    if any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        return  # not JSON a client can send
    assert param_header_problem(schema, arguments, CIMultiDictProxy(headers)) is None
    headers["Mcp-Param-N"] = str(number + 1)
    assert param_header_problem(schema, arguments, CIMultiDictProxy(headers)) == (
        "Mcp-Param-N header does not match argument 'n'"
    )
