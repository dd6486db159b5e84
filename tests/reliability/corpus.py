"""A generated corpus of hostile inputs, and the runner that fires it at a live session.

Every case is something a correct client never sends: invalid JSON or UTF-8, wrong JSON-RPC
shapes, huge or odd ids, deep nesting, oversized or compressed bodies, bad, repeated and
injected headers, unknown sessions and sessions of other transports and other keys. The
verdict for each is the same: a 4xx, or a JSON-RPC error for the request it carried, and
never a 5xx, a stack trace or the token in a body. Notifications and responses (which JSON-RPC
never answers) may be accepted silently with a 202; nothing else may.

Used by tests/reliability/test_hostile_input.py (the whole corpus, both transports) and by
the soak (a rotating sample).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
from multidict import CIMultiDict

from .harness import ACCEPT_BOTH, Legacy, Streamable, parse_sse

NO_ANSWER: Final = object()
"""`Case.answer_id` for a case whose request can never be answered on the legacy stream."""

BASE_MESSAGES: Final[tuple[dict[str, Any], ...]] = (
    {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": "hi"}},
    },
    {"jsonrpc": "2.0", "id": "abc", "method": "tools/list", "params": {}},
    {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1, "reason": "x"}},
    {"jsonrpc": "2.0", "id": 7, "result": {"content": []}},
    {"jsonrpc": "2.0", "id": 8, "error": {"code": -32000, "message": "nope"}},
    {"jsonrpc": "2.0", "id": 2, "method": "resources/read", "params": {"uri": "test://greeting"}},
    {
        "jsonrpc": "2.0",
        "id": 3,
        "method": "prompts/get",
        "params": {"name": "summarize", "arguments": {"topic": "é"}},
    },
    {"jsonrpc": "2.0", "id": 4, "method": "ping"},
)
"""Valid messages, broken in many ways below."""

BAD_UTF8: Final = (
    b"\xff",
    b"\xfe\xff",
    b"\x80",
    b"\xc0\xaf",  # overlong '/'
    b"\xe0\x80\xaf",  # overlong, three bytes
    b"\xed\xa0\x80",  # a UTF-16 surrogate encoded as UTF-8
    b"\xf4\x90\x80\x80",  # past U+10FFFF
    b"\xe2\x82",  # truncated sequence
    b"\xe9",  # Latin-1 e-acute
    b"\xc3",  # lone lead byte
    b"\xf8\x88\x80\x80\x80",  # five-byte form
    b"\x00\xff\x00",
)

BAD_VALUES: Final[tuple[Any, ...]] = (None, True, False, 0, 1.5, -1, "", "x", [], [1], {}, {"a": 1})

VALID_ODD_IDS: Final[tuple[Any, ...]] = (
    0,
    -1,
    2**63 - 1,
    -(2**63),
    "",
    " ",
    "\n",
    "\t\r",
    "\u0000",
    "null",
    "0",
    "-0",
    "1e3",
    "é",
    "🙂",
    "x" * 256,
    "init",
    "tools",
    "mcp-sse-test-1",
    "../../etc/passwd",
    "<script>alert(1)</script>",
    "%s%n%x",
    '"',
    "\\",
    "\u202e",
    "Bearer x",
    "id with spaces",
    "'; DROP TABLE x; --",
)
"""Ids JSON-RPC allows (strings, integers in 64 bits): each is answered, with the id echoed exactly."""

INVALID_IDS: Final[tuple[Any, ...]] = (
    None,
    True,
    False,
    1.5,
    1.0,
    -0.0,
    1e3,
    2**63,
    -(2**63) - 1,
    10**30,
    [],
    [1],
    {},
    {"id": 1},
    "x" * 257,
    "y" * 10_000,
)


@dataclass(frozen=True)
class Case:
    name: str
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    """Extra headers, repeatable; a value of None-like "" still sends the header."""
    drop: tuple[str, ...] = ()
    """Default headers not to send (Content-Type, Accept, the session id, Authorization)."""
    session: str | None = "own"
    """"own": the session under test; None: no session id; anything else: that exact id."""
    answer_id: Any = NO_ANSWER
    """For a request-shaped body: the id whose JSON-RPC error must arrive (legacy: on the stream)."""
    silent: bool = False
    """A notification or a response: a 202 without any answer is correct."""
    transports: frozenset[str] = frozenset({"sse", "streamable"})
    chunked: bool = False
    raw: bytes | None = None
    """A whole HTTP request sent over a raw socket ({token}, {sid}, {path} filled in)."""


@dataclass
class Outcome:
    case: Case
    transport: str
    status: int
    body: str = ""
    problem: str | None = None


@dataclass
class Verdicts:
    outcomes: list[Outcome] = field(default_factory=list)
    legacy_expected: dict[Any, Case] = field(default_factory=dict)

    @property
    def problems(self) -> list[str]:
        return [f"[{o.transport}] {o.case.name}: {o.problem}" for o in self.outcomes if o.problem]

    def statuses(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for o in self.outcomes:
            counts[o.status] = counts.get(o.status, 0) + 1
        return dict(sorted(counts.items()))


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


def _unknown_method(request_id: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": "no/such/method", "params": {}}


def generate(*, max_body: int, seed: int = 20260728) -> list[Case]:
    """The whole corpus, deterministic for a seed. `max_body` is the gateway's MAX_BODY_BYTES."""
    rng = random.Random(seed)
    cases: list[Case] = []
    serial = iter(range(1_000_000))

    def rid(prefix: str) -> str:
        return f"{prefix}-{next(serial)}"

    # -- invalid JSON: every base message cut short, random bytes, and classic mistakes --------
    for index, message in enumerate(BASE_MESSAGES):
        text = _dumps(message)
        for cut in sorted({*range(1, len(text), max(1, len(text) // 30)), len(text) - 1}):
            cases.append(Case(f"truncated {index}@{cut}", text[:cut]))
    for index, message in enumerate(BASE_MESSAGES):
        text = _dumps(message)
        # One structural character removed, or one stray one added: checked invalid by the stdlib parser.
        structural = [i for i, c in enumerate(text) if chr(c) in '{}[]:,"']
        for i in rng.sample(structural, min(len(structural), 16)):
            for mutated in (text[:i] + text[i + 1 :], text[:i] + bytes([rng.choice(b'{}[]:,"')]) + text[i:]):
                try:
                    json.loads(mutated)
                except ValueError:
                    cases.append(Case(f"mutated {index}@{i}", mutated))
    for n in range(150):
        length = rng.choice([1, 2, 3, 8, 40, 300, 3000])
        alphabet = rng.choice([b'{}[]":,0123456789eE.-+ntrufals\\', bytes(range(256)), b"\x00\x01\x7f "])
        cases.append(Case(f"random bytes {n}", bytes(rng.choice(alphabet) for _ in range(length))))
    for n, body in enumerate(
        [
            b"",
            b" ",
            b"\r\n\t",
            b"{oops",
            b"{'jsonrpc': '2.0', 'id': 1, 'method': 'ping'}",
            b'{"jsonrpc":"2.0","id":1,"method":"ping",}',
            b'{"jsonrpc":"2.0" "id":1}',
            b'{"jsonrpc":"2.0","id":1,"method":"ping"} // comment',
            b'/* c */ {"jsonrpc":"2.0","id":1,"method":"ping"}',
            b'{"jsonrpc":"2.0","id":1,"method":"ping"}{"jsonrpc":"2.0","id":2,"method":"ping"}',
            b'{"jsonrpc":"2.0","id":1,"method":"ping"}\n{"jsonrpc":"2.0","id":2,"method":"ping"}',
            b'\xef\xbb\xbf{"jsonrpc":"2.0","id":1,"method":"ping"}',
            b'\x00{"jsonrpc":"2.0","id":1,"method":"ping"}',
            b'{"jsonrpc":"2.0","id":1,"method":"pi\x00ng"}',
            b'{"jsonrpc":"2.0","id":1,"method":"pi\nng"}',
            b'{"jsonrpc":"2.0","id":1,"method":"\\u12"}',
            b'{"jsonrpc":"2.0","id":1,"method":"\\x41"}',
            b'{"jsonrpc":"2.0","id":01,"method":"ping"}',
            b'{"jsonrpc":"2.0","id":1.,"method":"ping"}',
            b'{"jsonrpc":"2.0","id":.5,"method":"ping"}',
            b'{"jsonrpc":"2.0","id":+1,"method":"ping"}',
            b'{"jsonrpc":"2.0","id":0x10,"method":"ping"}',
            b'{"jsonrpc":"2.0","id":' + b"9" * 5000 + b',"method":"ping"}',  # past int digit limits
            b'{"jsonrpc":"2.0","id":undefined,"method":"ping"}',
            b'{jsonrpc:"2.0",id:1,method:"ping"}',
            b'{"jsonrpc":"2.0","id":1,"method":"ping"',
            b'"jsonrpc"',
            b"[",
            b"]",
            b"{}}",
            b"{{}}",
            b"\\",
            b"<?xml version='1.0'?><methodCall/>",
            b"GET / HTTP/1.1\r\n\r\n",
            b"jsonrpc=2.0&id=1&method=ping",
        ]
    ):
        cases.append(Case(f"malformed {n}", body))

    # -- invalid UTF-8 inside and around a valid message ---------------------------------------
    template = (
        b'{"jsonrpc":"2.0","id":"utf","method":"tools/call",'
        b'"params":{"name":"echo","arguments":{"text":"@@"}}}'
    )
    positions = (0, 1, template.index(b"@@"), template.index(b'"echo"') + 2, len(template) - 1, len(template))
    for bad in BAD_UTF8:
        for pos in positions:
            body = template.replace(b"@@", b"ok") if pos != template.index(b"@@") else template
            cut = min(pos, len(body))
            cases.append(
                Case(f"bad utf-8 {bad!r}@{pos}", (body[:cut] + bad + body[cut:]).replace(b"@@", b""))
            )

    # -- wrong JSON-RPC shapes ------------------------------------------------------------------
    for n, value in enumerate(
        [0, 1, -1, 1.5, "x", "", None, True, False, [], [[]], [1, 2], [None], {}, [{}]]
    ):
        cases.append(Case(f"top-level {value!r}"[:60] + f" #{n}", _dumps(value)))
    request = {"jsonrpc": "2.0", "method": "no/such/method", "params": {}}
    for value in ["1.0", "2", 2.0, 2, None, "", "2.0 ", " 2.0", ["2.0"], {"v": "2.0"}, "2.0\u0000"]:
        cases.append(Case(f"jsonrpc={value!r}", _dumps({**request, "id": rid("v"), "jsonrpc": value})))
    cases.append(Case("no jsonrpc", _dumps({"id": rid("v"), "method": "no/such/method"})))
    for value in [5, None, "", [], {}, True, 1.5, ["tools/call"]]:
        cases.append(Case(f"method={value!r}", _dumps({**request, "id": rid("m"), "method": value})))
    for value in [[], "x", 5, None, True, [{"name": "echo"}], 1.5]:
        cases.append(Case(f"params={value!r}", _dumps({**request, "id": rid("p"), "params": value})))
    for value in INVALID_IDS:
        cases.append(Case(f"invalid id {str(value)[:40]!r}", _dumps({**request, "id": value})))
    for extra in ({"result": {}}, {"error": {"code": 1, "message": "x"}}, {"result": {}, "error": {}}):
        cases.append(Case(f"request with {sorted(extra)}", _dumps({**request, "id": rid("x"), **extra})))
    # Responses the client never owed: malformed ones are refused, well-formed ones dropped quietly.
    for n, response in enumerate(
        [
            {"jsonrpc": "2.0", "id": 1},
            {"jsonrpc": "2.0", "id": 1, "result": {}, "error": {"code": 1, "message": "x"}},
            {"jsonrpc": "2.0", "id": 1, "result": 5},
            {"jsonrpc": "2.0", "id": 1, "result": []},
            {"jsonrpc": "2.0", "id": 1, "result": None},
            {"jsonrpc": "2.0", "id": 1, "error": "x"},
            {"jsonrpc": "2.0", "id": 1, "error": {}},
            {"jsonrpc": "2.0", "id": 1, "error": {"code": True, "message": "x"}},
            {"jsonrpc": "2.0", "id": 1, "error": {"code": "1", "message": "x"}},
            {"jsonrpc": "2.0", "id": 1, "error": {"code": 1.5, "message": "x"}},
            {"jsonrpc": "2.0", "result": {}},
            {"jsonrpc": "2.0", "id": None, "result": {}},
        ]
    ):
        cases.append(Case(f"bad response {n}", _dumps(response)))
    for n, response in enumerate(
        [
            {"jsonrpc": "2.0", "id": "never-asked", "result": {}},
            {"jsonrpc": "2.0", "id": 123456, "error": {"code": -1, "message": "x"}},
            {"jsonrpc": "2.0", "id": "mcp-sse-test-1", "result": {"role": "assistant"}},
            {"jsonrpc": "2.0", "id": 1, "result": {"x": "y" * 10_000}},
        ]
    ):
        cases.append(Case(f"unowed response {n}", _dumps(response), silent=True))
    for n, params in enumerate(
        [
            {},
            {"requestId": None},
            {"requestId": {"a": 1}},
            {"requestId": 2**63},
            {"requestId": "x" * 10_000},
            {"requestId": "not-mine", "reason": "\u0000" * 100},
            {"progressToken": [1], "progress": "x"},
            None,
        ]
    ):
        for method in ("notifications/cancelled", "notifications/progress"):
            note: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
            if params is not None:
                note["params"] = params
            cases.append(Case(f"{method} {n}", _dumps(note), silent=True))
    for method in ("notifications/initialized", "notifications/roots/list_changed", "notifications/x" * 50):
        cases.append(
            Case(f"notification {method[:40]}", _dumps({"jsonrpc": "2.0", "method": method}), silent=True)
        )
    # Envelopes that are valid but ask for nonsense: answered with a JSON-RPC error.
    for n, (method, params) in enumerate(
        [
            ("no/such/method", {}),
            ("rpc.discover", {}),
            ("sampling/createMessage", {}),
            ("notifications/cancelled", {"requestId": 1}),  # a notification method sent as a request
            ("logging/setLevel", {"level": "loud"}),
            ("logging/setLevel", {"level": ["debug"]}),
            ("logging/setLevel", {}),
            ("tools/call", {"name": "echo", "arguments": "x"}),
            ("tools/call", {"name": "echo", "arguments": []}),
            ("tools/call", {"name": "echo", "arguments": {"text": 5}}),
            ("tools/call", {"name": "echo", "arguments": {}}),
            ("tools/call", {"name": "echo"}),
            ("tools/call", {"name": "add", "arguments": {"a": "1", "b": 2}}),
            ("tools/call", {"name": "add", "arguments": {"a": 1.5, "b": 2}}),
            ("tools/call", {"name": "sleep", "arguments": {"seconds": "forever"}}),
            ("tools/call", {"name": 5}),
            ("tools/call", {"name": None}),
            ("tools/call", {}),
            ("resources/read", {"uri": 5}),
            ("resources/read", {"uri": "nope://x"}),
            ("resources/read", {}),
            ("prompts/get", {"name": "nope"}),
            ("prompts/get", {}),
            ("completion/complete", {"x": 1}),
            ("tools/list", {"cursor": 5}),
            ("resources/list", {"cursor": ["x"]}),
        ]
    ):
        cases.append(
            Case(
                f"nonsense {method} {n}",
                _dumps({"jsonrpc": "2.0", "id": (i := rid("n")), "method": method, "params": params}),
                answer_id=i,
            )
        )
    cases.append(
        Case(
            "initialize again",
            _dumps({"jsonrpc": "2.0", "id": (i := rid("init")), "method": "initialize", "params": {}}),
            answer_id=i,
            transports=frozenset({"sse"}),
        )
    )
    # Batches: refused outside 2025-03-26; inside it, each bad member gets its own error.
    for n, batch in enumerate(
        [
            [],
            [1],
            [None, None],
            [_unknown_method(rid("b")), _unknown_method(rid("b"))],
            [{"jsonrpc": "2.0", "id": rid("b"), "method": "initialize", "params": {}}],
            [[_unknown_method(rid("b"))]],
            [_unknown_method(rid("b"))] * 200,
        ]
    ):
        cases.append(Case(f"batch {n}", _dumps(batch)))
    for n in range(6):
        members = [_unknown_method(rid("bb")) for _ in range(n + 1)]
        cases.append(Case(f"batch of nonsense x{n + 1}", _dumps(members), transports=frozenset({"batch"})))
    cases.append(
        Case(
            "batch with a bad member",
            _dumps([_unknown_method(rid("bb")), {"jsonrpc": "1.0"}]),
            transports=frozenset({"batch"}),
        )
    )

    # -- ids: odd but valid ones are echoed exactly in the error -------------------------------
    for value in VALID_ODD_IDS:
        cases.append(Case(f"odd id {value!r}"[:60], _dumps(_unknown_method(value)), answer_id=value))

    # -- nesting -------------------------------------------------------------------------------
    for depth in (63, 65, 100, 1_000, 10_000):
        for opener, closer in ((b"[", b"]"), (b'{"a":', b"}")):
            nest = opener * depth + b"1" + closer * depth
            cases.append(Case(f"top nest {opener!r} {depth}", nest))
            wrapped = b'{"jsonrpc":"2.0","id":"deep","method":"no/such/method","params":{"x":' + nest + b"}}"
            if depth > 60:  # 63 levels of params still fit within the 64 allowed
                cases.append(Case(f"params nest {opener!r} {depth}", wrapped))
            cases.append(
                Case(f"id nest {opener!r} {depth}", b'{"jsonrpc":"2.0","id":' + nest + b',"method":"ping"}')
            )
            cases.append(Case(f"unbalanced nest {opener!r} {depth}", opener * depth))
    cases.append(
        Case(
            "nested within limits",
            _dumps({**_unknown_method(i := rid("nest")), "params": {"a": [[[[{"b": [1]}]]]]}}),
            answer_id=i,
        )
    )

    # -- size ----------------------------------------------------------------------------------
    def filler(size: int, name: str, **kwargs: Any) -> None:
        request_id = rid("big")
        body = _dumps({**_unknown_method(request_id), "params": {"pad": "x" * size}})
        if kwargs.pop("gzip", False):
            body = gzip.compress(body)
        cases.append(Case(name, body, answer_id=request_id, **kwargs))

    for size in (max_body + 1, 2 * max_body, 10 * max_body):
        filler(size, f"body of {size} bytes")
        filler(size, f"chunked body of {size} bytes", chunked=True)
    cases.append(Case("long id in a long body", _dumps(_unknown_method("z" * (max_body - 100)))))
    filler(50 * 1024 * 1024, "gzip bomb", gzip=True, headers=(("Content-Encoding", "gzip"),))
    filler(max_body // 2, "gzip within the limit", gzip=True, headers=(("Content-Encoding", "gzip"),))
    filler(10, "unknown encoding", headers=(("Content-Encoding", "x-nope"),))
    filler(10, "identity encoding", headers=(("Content-Encoding", "identity"),))
    wide = {f"k{n}": n for n in range(5_000)}
    cases.append(
        Case("5000 keys", _dumps({**_unknown_method(i := rid("wide")), "params": wide}), answer_id=i)
    )

    # -- headers (the body always carries a request that can only end in an error) --------------
    def header_case(name: str, headers: tuple[tuple[str, str], ...] = (), **kwargs: Any) -> None:
        request_id = rid("h")
        cases.append(Case(name, _dumps(_unknown_method(request_id)), headers, answer_id=request_id, **kwargs))

    for value in [
        "text/plain",
        "application/json-patch+json",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/json; charset=latin-1",
        "application/JSON",
        "",
        ";;;",
        "application/json, text/plain",
        "x" * 5000,
    ]:
        header_case(f"Content-Type {value[:30]!r}", (("Content-Type", value),), drop=("Content-Type",))
    header_case("no Content-Type", drop=("Content-Type",))
    header_case(
        "two Content-Types",
        (("Content-Type", "application/json"), ("Content-Type", "text/plain")),
        drop=("Content-Type",),
    )
    for value in [
        "application/json",
        "text/event-stream",
        "*/*",
        "text/html",
        "application/*",
        ";;;,,,",
        "",
        "x" * 6000,
        "application/json;q=0, text/event-stream;q=0",
    ]:
        header_case(f"Accept {value[:30]!r}", (("Accept", value),), drop=("Accept",))
    header_case("no Accept", drop=("Accept",))
    header_case("two Accepts", (("Accept", "text/html"), ("Accept", ACCEPT_BOTH)), drop=("Accept",))
    for value in [
        "1999-01-01",
        "2025-06-18",
        "2024-11-05",
        "",
        " ",
        "x" * 300,
        "2025-11-25 ",
        "2026-07-28",
        "9999-99-99",
        "2025-11-25, 2025-06-18",
    ]:
        header_case(
            f"MCP-Protocol-Version {value[:30]!r}",
            (("MCP-Protocol-Version", value),),
            drop=("MCP-Protocol-Version",),
        )
    header_case(
        "two versions",
        (("MCP-Protocol-Version", "2025-11-25"), ("MCP-Protocol-Version", "1999-01-01")),
        drop=("MCP-Protocol-Version",),
    )
    for value in ["", "short", "x" * 129, "bad id!", "../../etc", "A" * 43, "B" * 128, "=" * 43, "a\tb" * 10]:
        header_case(f"session id {value[:30]!r}", session=value)
    header_case("no session id", session=None)
    for who in ("other-key", "other-transport", "ended", "other-route"):
        header_case(f"session of {who}", session=f"<{who}>")
    header_case(
        "repeated session header", (("Mcp-Session-Id", "A" * 43),), transports=frozenset({"streamable"})
    )
    for value in [
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Bearer {token}x",
        "Bearer x{token}",
        "Token {token}",
        "Bearer {token} extra",
        "{token}",
        "Bearer " + "x" * 8000,
    ]:
        header_case(f"Authorization {value[:20]!r}", (("Authorization", value),), drop=("Authorization",))
    header_case("no Authorization", drop=("Authorization",))
    header_case(
        "Authorization twice, bad first",
        (("Authorization", "Bearer wrong"), ("Authorization", "Bearer {token}")),
        drop=("Authorization",),
    )
    for value in [
        "null",
        "http://evil.example",
        "http://127.0.0.1",
        "file://",
        "http://[::1",
        "*",
        "x" * 3000,
    ]:
        header_case(f"Origin {value[:30]!r}", (("Origin", value),))
    header_case("two Origins", (("Origin", "http://a.example"), ("Origin", "http://b.example")))
    for value in ["garbage", "1.2.3.4", "::1, 999.1.1.1", "unknown, " * 100, "1.1.1.1:99999"]:
        header_case(f"X-Forwarded-For {value[:30]!r}", (("X-Forwarded-For", value),))
    for value in ["<script>", "a" * 200, "id;rm -rf", "ok-id", "%0d%0aSet-Cookie:x"]:
        header_case(f"X-Request-Id {value[:30]!r}", (("X-Request-Id", value),))
    for value in [
        "AIOHTTP_SESSION=garbage",
        "AIOHTTP_SESSION=" + "A" * 4000,
        "__Host-mcp=x; a=b; a=c",
        "=;=;=",
    ]:
        header_case(f"Cookie {value[:30]!r}", (("Cookie", value),))
    for value in ["0-0", "99-99", "x", "-1--1", "1-" + "9" * 30, ""]:
        header_case(f"Last-Event-ID on POST {value!r}", (("Last-Event-ID", value),))
    header_case("Expect 100-continue", (("Expect", "100-continue"),))
    header_case("Expect garbage", (("Expect", "garbage"),))
    header_case("Transfer-Encoding gzip", (("Transfer-Encoding", "gzip"),))

    # -- raw requests: injection and smuggling attempts aiohttp's client would never send -------
    def raw_case(name: str, head: str, body: bytes = b"") -> None:
        # Each raw request carries its own id, so a legacy 202 can be matched to its error.
        request_id = rid("raw")
        body = body.replace(b'"raw-id"', json.dumps(request_id).encode())
        cases.append(Case(f"raw {name}", answer_id=request_id, raw=head.encode("latin-1") + body))

    body = _dumps(_unknown_method("raw-id"))
    common = (
        "Host: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        "Accept: application/json, text/event-stream\r\nConnection: close\r\n{session_header}"
    )
    cl = f"Content-Length: {len(body)}\r\n"
    raw_case(
        "CR in a header value",
        f"POST {{path}} HTTP/1.1\r\n{common}X-Request-Id: a\rInjected: b\r\n{cl}\r\n",
        body,
    )
    raw_case(
        "LF in a header value",
        f"POST {{path}} HTTP/1.1\r\n{common}X-Request-Id: a\nSet-Cookie: evil=1\r\n{cl}\r\n",
        body,
    )
    raw_case("NUL in a header value", f"POST {{path}} HTTP/1.1\r\n{common}X-Test: a\x00b\r\n{cl}\r\n", body)
    raw_case("space in a header name", f"POST {{path}} HTTP/1.1\r\n{common}Bad Header: x\r\n{cl}\r\n", body)
    raw_case("obs-fold", f"POST {{path}} HTTP/1.1\r\n{common}X-Test: a\r\n  folded\r\n{cl}\r\n", body)
    raw_case("two Content-Lengths", f"POST {{path}} HTTP/1.1\r\n{common}{cl}Content-Length: 5\r\n\r\n", body)
    raw_case(
        "Content-Length and chunked",
        f"POST {{path}} HTTP/1.1\r\n{common}{cl}Transfer-Encoding: chunked\r\n\r\n",
        body,
    )
    raw_case(
        "chunked, identity",
        f"POST {{path}} HTTP/1.1\r\n{common}Transfer-Encoding: chunked, identity\r\n\r\n",
        body,
    )
    raw_case(
        "bad chunk size",
        f"POST {{path}} HTTP/1.1\r\n{common}Transfer-Encoding: chunked\r\n\r\n",
        b"zz\r\n" + body + b"\r\n0\r\n\r\n",
    )
    raw_case(
        "huge chunk size",
        f"POST {{path}} HTTP/1.1\r\n{common}Transfer-Encoding: chunked\r\n\r\n",
        b"fffffffffffffffff\r\nx\r\n0\r\n\r\n",
    )
    raw_case("negative Content-Length", f"POST {{path}} HTTP/1.1\r\n{common}Content-Length: -1\r\n\r\n", body)
    raw_case("Content-Length 1e3", f"POST {{path}} HTTP/1.1\r\n{common}Content-Length: 1e3\r\n\r\n", body)
    raw_case("Content-Length +5", f"POST {{path}} HTTP/1.1\r\n{common}Content-Length: +5\r\n\r\n", body)
    raw_case(
        "enormous Content-Length",
        f"POST {{path}} HTTP/1.1\r\n{common}Content-Length: 99999999999999\r\n\r\n",
        body,
    )
    raw_case("short Content-Length", f"POST {{path}} HTTP/1.1\r\n{common}Content-Length: 10\r\n\r\n", body)
    raw_case("HTTP/9.9", f"POST {{path}} HTTP/9.9\r\n{common}{cl}\r\n", body)
    raw_case(
        "HTTP/1.0 without Host",
        "POST {path} HTTP/1.0\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        f"{cl}\r\n",
        body,
    )
    raw_case("absolute form", f"POST http://evil.example{{path}} HTTP/1.1\r\n{common}{cl}\r\n", body)
    raw_case("extra token in request line", f"POST {{path}} HTTP/1.1 extra\r\n{common}{cl}\r\n", body)
    raw_case("lowercase method", f"post {{path}} HTTP/1.1\r\n{common}{cl}\r\n", body)
    raw_case("unknown method", f"FROB {{path}} HTTP/1.1\r\n{common}{cl}\r\n", body)
    raw_case("PATCH", f"PATCH {{path}} HTTP/1.1\r\n{common}{cl}\r\n", body)
    raw_case("percent-encoded NUL in path", f"POST {{path}}%00 HTTP/1.1\r\n{common}{cl}\r\n", body)
    raw_case("dot segments", f"POST /x/../{{path}} HTTP/1.1\r\n{common}{cl}\r\n", body)
    raw_case("URL of 20000 bytes", f"POST {{path}}{'&x=' + 'a' * 20_000} HTTP/1.1\r\n{common}{cl}\r\n", body)
    raw_case(
        "header of 20000 bytes", f"POST {{path}} HTTP/1.1\r\n{common}X-Big: {'b' * 20_000}\r\n{cl}\r\n", body
    )
    many = "".join(f"X-H{n}: v\r\n" for n in range(300))
    raw_case("300 headers", f"POST {{path}} HTTP/1.1\r\n{common}{many}{cl}\r\n", body)
    raw_case("two Hosts", f"POST {{path}} HTTP/1.1\r\nHost: evil.example\r\n{common}{cl}\r\n", body)
    raw_case("HTTP/2 preface", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    raw_case("TLS ClientHello", "\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + "\x00" * 40)
    raw_case(
        "Upgrade to websocket",
        f"GET {{path}} HTTP/1.1\r\n{common}Connection: Upgrade\r\nUpgrade: websocket\r\n"
        "Sec-WebSocket-Key: x\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    raw_case(
        "Upgrade to h2c",
        f"POST {{path}} HTTP/1.1\r\n{common}Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        f"HTTP2-Settings: x\r\n{cl}\r\n",
        body,
    )
    raw_case(
        "non-Latin-1 bytes in a header",
        f"POST {{path}} HTTP/1.1\r\n{common}X-Test: \xff\xfe\r\n{cl}\r\n",
        body,
    )
    return cases


def surrogate_cases() -> list[Case]:
    """Lone UTF-16 surrogates in JSON strings, fired by their own test in test_hostile_input.py."""
    return [
        Case(
            "lone surrogate in the id",
            b'{"jsonrpc":"2.0","id":"\\ud800","method":"no/such/method"}',
            answer_id="\ud800",
        ),
        Case(
            "lone surrogate in the method", b'{"jsonrpc":"2.0","id":"s1","method":"\\udfff"}', answer_id="s1"
        ),
        Case(
            "lone surrogate in tool arguments",
            b'{"jsonrpc":"2.0","id":"s2","method":"tools/call","params":{"name":"echo","arguments":{"text":"\\ud83d"}}}',
            answer_id="s2",
        ),
    ]


# -- the runner ------------------------------------------------------------------------------------


@dataclass
class Targets:
    """Where cases are aimed: the session under test per transport, and ids of sessions it must not reach."""

    legacy: Legacy
    streamable: Streamable
    batch: Streamable
    foreign: dict[str, dict[str, str]]
    """"<other-key>" etc. -> session id per transport."""


def _expand(value: str, token: str) -> str:
    return value.replace("{token}", token)


def _session_value(case: Case, transport: str, own: str, targets: Targets) -> str | None:
    if case.session == "own":
        return own
    if case.session is None:
        return None
    if case.session.startswith("<"):
        return targets.foreign[case.session][transport]
    return case.session


def _judge(outcome: Outcome, token: str) -> str | None:
    case, status, body = outcome.case, outcome.status, outcome.body
    if status >= 500:
        return f"status {status}: {body[:200]!r}"
    if token in body:
        return "the token is in the body"
    if "Traceback" in body or 'File "' in body:
        return f"a stack trace in the body: {body[:200]!r}"
    if status == 0 or 400 <= status < 500:
        return None  # refused (0: the connection was closed without a response)
    if status == 202:
        if case.silent or (outcome.transport == "sse" and case.answer_id is not NO_ANSWER):
            return None  # legacy answers arrive on the stream, checked afterwards
        return "accepted (202) but never answered"
    if status == 200 and outcome.transport != "sse":
        try:
            messages = (
                parse_sse(body) if body.startswith(("id:", "data:", "event:", ":")) else json.loads(body)
            )
        except ValueError:
            return f"200 with a body that is not JSON-RPC: {body[:200]!r}"
        messages = messages if isinstance(messages, list) else [messages]
        answers = [m for m in messages if isinstance(m, dict) and "method" not in m]
        if not answers:
            return f"200 without an answer: {body[:200]!r}"
        if any("error" not in m for m in answers):
            return f"answered with a result: {body[:300]!r}"
        if case.answer_id is not NO_ANSWER and [m.get("id") for m in answers] != [case.answer_id]:
            return f"the error carries id {[m.get('id') for m in answers]!r}, not {case.answer_id!r}"
        return None
    return f"unexpected status {status}: {body[:200]!r}"


async def _send_http(
    http: aiohttp.ClientSession, case: Case, transport: str, targets: Targets, token: str
) -> Outcome:
    client = {"sse": targets.legacy, "streamable": targets.streamable, "batch": targets.batch}[transport]
    own = client.session_id
    sid = _session_value(case, transport, own, targets)
    if transport == "sse":
        url = targets.legacy.base + targets.legacy.endpoint.split("?", 1)[0]
        params = {} if sid is None else {"session_id": sid}
        headers: list[tuple[str, str]] = [
            ("Authorization", f"Bearer {token}"),
            ("Content-Type", "application/json"),
        ]
    else:
        assert isinstance(client, Streamable)
        url, params = client.url, {}
        headers = [
            ("Authorization", f"Bearer {token}"),
            ("Content-Type", "application/json"),
            ("Accept", ACCEPT_BOTH),
            ("MCP-Protocol-Version", client.version),
        ]
        if sid is not None:
            headers.append(("Mcp-Session-Id", sid))
    headers = [(k, v) for k, v in headers if k not in case.drop]
    headers += [(k, _expand(v, token)) for k, v in case.headers]
    data: Any = case.body
    if case.chunked:

        async def chunks() -> Any:
            for start in range(0, len(case.body), 8192):
                yield case.body[start : start + 8192]

        data = chunks()
    try:
        async with http.post(
            url, params=params, data=data, headers=CIMultiDict(headers), skip_auto_headers=("Content-Type",)
        ) as response:
            body = await response.text(errors="replace")
            return Outcome(case, transport, response.status, body)
    except (TimeoutError, aiohttp.ClientError) as exc:
        return Outcome(case, transport, 0, repr(exc))


async def _send_raw(case: Case, transport: str, port: int, targets: Targets, token: str) -> Outcome:
    assert case.raw is not None
    if transport == "sse":
        path = targets.legacy.endpoint
        session_header = ""
    else:
        path = urlsplit(targets.streamable.url).path
        streamable = targets.streamable
        session_header = (
            f"Mcp-Session-Id: {streamable.session_id}\r\nMCP-Protocol-Version: {streamable.version}\r\n"
        )
    raw = (
        case.raw.replace(b"{path}", path.encode())
        .replace(b"{token}", token.encode())
        .replace(b"{session_header}", session_header.encode())
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            if status == 100:  # Continue: the real answer follows
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
            lines = [line.lower() for line in head.split(b"\r\n")]
            length = next(
                (int(line.split(b":", 1)[1]) for line in lines if line.startswith(b"content-length:")), None
            )
            if length is not None:
                body = await reader.readexactly(length)
            else:
                body = await reader.read()  # Connection: close, so the answer ends with the connection
                if b"transfer-encoding: chunked" in lines:
                    body = _dechunk(body)
        return Outcome(case, transport, status, body.decode("utf-8", "replace"))
    except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, ValueError, IndexError):
        return Outcome(case, transport, 0, "connection closed without a response")
    finally:
        writer.close()


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out, data = out + rest[:size], rest[size + 2 :]
    return out


async def fire(
    http: aiohttp.ClientSession,
    cases: list[Case],
    targets: Targets,
    *,
    token: str,
    port: int,
    concurrency: int = 8,
    answer_timeout: float = 15.0,
) -> Verdicts:
    """Send every case to each of its transports; judge each answer, then the legacy stream's errors."""
    verdicts = Verdicts()
    jobs: list[tuple[Case, str]] = [(c, t) for c in cases for t in sorted(c.transports)]
    queue: Iterator[tuple[Case, str]] = iter(jobs)

    async def worker() -> None:
        for case, transport in queue:
            if case.raw is not None:
                outcome = await _send_raw(case, transport, port, targets, token)
            else:
                outcome = await _send_http(http, case, transport, targets, token)
            outcome.problem = _judge(outcome, token)
            verdicts.outcomes.append(outcome)
            if transport == "sse" and outcome.status == 202 and case.answer_id is not NO_ANSWER:
                verdicts.legacy_expected[_answer_key(case.answer_id)] = case

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    # The legacy errors arrive on the stream: each must be there, and an error.
    legacy = targets.legacy
    deadline = asyncio.get_running_loop().time() + answer_timeout
    for key, case in verdicts.legacy_expected.items():
        remaining = max(0.1, deadline - asyncio.get_running_loop().time())
        outcome = next(o for o in verdicts.outcomes if o.case is case and o.transport == "sse")
        try:
            answer = await legacy.answer(key[1], timeout=remaining)
        except (TimeoutError, EOFError) as exc:
            outcome.problem = f"no answer on the legacy stream ({type(exc).__name__})"
            continue
        if "error" not in answer:
            outcome.problem = f"answered with a result on the stream: {json.dumps(answer)[:300]}"
    return verdicts


def _answer_key(request_id: Any) -> tuple[str, Any]:
    return (type(request_id).__name__, request_id)


async def open_targets(
    http: aiohttp.ClientSession, url: str, token: str, other_token: str, *, other_route: str
) -> Targets:
    """The sessions under test, plus ids that must not reach them: another key's, the other transport's,
    an ended one, and one opened on another route."""
    legacy = await Legacy(http, url, token).open("2024-11-05")
    streamable = await Streamable(http, url, token).initialize("2025-11-25")
    batch = await Streamable(http, url, token).initialize("2025-03-26")
    other_legacy = await Legacy(http, url, other_token).open("2024-11-05")
    other_streamable = await Streamable(http, url, other_token).initialize("2025-11-25")
    ended_legacy = await Legacy(http, url, token).open("2024-11-05")
    ended_streamable = await Streamable(http, url, token).initialize("2025-11-25")
    await ended_legacy.close()
    assert await ended_streamable.delete() == 204
    route_legacy = await Legacy(http, url, token, other_route).open("2024-11-05")
    route_streamable = await Streamable(http, url, token, other_route + "/mcp").initialize("2025-11-25")
    foreign = {
        "<other-key>": {"sse": other_legacy.session_id, "streamable": other_streamable.session_id or ""},
        "<other-transport>": {"sse": streamable.session_id or "", "streamable": legacy.session_id},
        "<ended>": {"sse": ended_legacy.session_id, "streamable": ended_streamable.session_id or ""},
        "<other-route>": {"sse": route_legacy.session_id, "streamable": route_streamable.session_id or ""},
    }
    # Like any client, list the tools first: the gateway checks tool arguments against their schemas.
    for client in (legacy, streamable, batch):
        assert "result" in await client.request({"jsonrpc": "2.0", "id": "list", "method": "tools/list"})
    targets = Targets(legacy, streamable, batch, foreign)
    targets._keep = [other_legacy, other_streamable, route_legacy, route_streamable]  # type: ignore[attr-defined]
    return targets
