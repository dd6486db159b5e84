"""Tracing (ops/tracing.py) through a real gateway and the real SDK client, spans caught by the
OpenTelemetry SDK's in-memory exporter: their tree and attributes, the caller's traceparent (good,
malformed, in `_meta`), the context a remote backend receives, what spans never hold; then the real
configuration path (`python server_secure.py` exporting OTLP/HTTP to a receiver of ours), the error
without the otel extra, and no OpenTelemetry import at all when off."""

from __future__ import annotations

import asyncio
import functools
import gzip
import json
import logging
import os
import secrets
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from mcp.shared.exceptions import MCPError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from mcp_sse.ops.tracing import INSTALL_HINT, Tracing, configured
from mcp_sse.settings import SettingsError
from mcp_sse.state import SESSIONS
from tests.conftest import Running, StartGateway, init_message, launch, mcp_client, text_of
from tests.upstream.test_remote import Misbehaving

REPO = Path(__file__).resolve().parents[2]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@pytest.fixture
def exporter() -> Iterator[tuple[InMemorySpanExporter, Tracing]]:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))  # exported as each span ends
    yield memory, Tracing(provider)
    provider.shutdown()


StartTraced = Callable[..., Awaitable[Running]]


@pytest.fixture
def traced(start_gateway: StartGateway, exporter: tuple[InMemorySpanExporter, Tracing]) -> StartTraced:
    """conftest's start_gateway, with the in-memory exporter's tracing passed to create_app."""
    return functools.partial(start_gateway, tracing=exporter[1])


def spans(memory: InMemorySpanExporter) -> list[ReadableSpan]:
    return list(memory.get_finished_spans())


def named(found: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in found if s.name == name]


def parent_of(span: ReadableSpan, found: list[ReadableSpan]) -> ReadableSpan:
    assert span.parent is not None, span.name
    (parent,) = [s for s in found if s.context.span_id == span.parent.span_id]
    return parent


def trace_hex(span: ReadableSpan) -> str:
    return format(span.context.trace_id, "032x")


async def wait_for_span(memory: InMemorySpanExporter, name: str, timeout: float = 30) -> ReadableSpan:
    """A span ends after its answer is written: the client may see the answer first."""
    async with asyncio.timeout(timeout):
        while not (found := named(spans(memory), name)):
            await asyncio.sleep(0.01)
    return found[-1]


# -- the span tree, through the SDK client ---------------------------------------------------------


async def test_streamable_http_spans_and_the_callers_traceparent(
    traced: StartTraced, exporter: tuple[InMemorySpanExporter, Tracing]
) -> None:
    memory = exporter[0]
    gw = await traced()
    async with mcp_client(gw.url, gw.token, headers={"traceparent": TRACEPARENT}) as client:
        assert text_of(await client.call_tool("echo", {"text": "traced"})) == "traced"
        (session,) = gw.app[SESSIONS].all()
    call = await wait_for_span(memory, "tools/call echo")
    found = spans(memory)

    # The HTTP request: a server span per POST, the caller's span its parent, in the caller's trace.
    post = parent_of(call, found)
    assert post.name == "POST /mcp" and post.kind is SpanKind.SERVER
    assert trace_hex(post) == TRACE_ID and post.parent is not None
    assert format(post.parent.span_id, "016x") == PARENT_ID and post.parent.is_remote
    attributes = dict(post.attributes or {})
    assert attributes["http.request.method"] == "POST" and attributes["http.route"] == "/mcp"
    assert attributes["http.response.status_code"] == 200 and attributes["url.scheme"] == "http"
    assert attributes["server.address"] == "127.0.0.1" and attributes["server.port"] == gw.server.port
    assert attributes["network.peer.address"] == "127.0.0.1" == attributes["client.address"]
    assert len(str(attributes["mcp_sse.request_id"])) > 0

    # The MCP request, per the MCP semantic conventions; the session by a digest only.
    assert call.kind is SpanKind.SERVER
    mcp = dict(call.attributes or {})
    assert mcp["mcp.method.name"] == "tools/call" and mcp["gen_ai.tool.name"] == "echo"
    assert mcp["gen_ai.operation.name"] == "execute_tool" and mcp["mcp.protocol.version"] == "2025-11-25"
    assert "jsonrpc.request.id" in mcp and "error.type" not in mcp
    assert mcp["mcp.session.id"] != session.id and len(str(mcp["mcp.session.id"])) == 16
    assert call.status.status_code is StatusCode.UNSET

    # The call forwarded to the backend: a client span under it.
    (forwarded,) = [s for s in found if s.kind is SpanKind.CLIENT and s.name == "tools/call echo"]
    assert parent_of(forwarded, found) is call
    assert dict(forwarded.attributes or {})["mcp_sse.backend"] == "mcp-sse"
    assert dict(forwarded.attributes or {})["mcp_sse.outcome"] == "ok"

    # Every request of the session is in the caller's trace: initialize, the list, the DELETE.
    (initialize,) = [s for s in named(found, "initialize") if s.kind is SpanKind.SERVER]
    assert parent_of(initialize, found).name == "POST /mcp"
    assert {trace_hex(s) for s in found} == {TRACE_ID}
    assert named(found, "DELETE /mcp")


async def test_legacy_sse_stream_span_ends_when_the_stream_opens(
    traced: StartTraced, exporter: tuple[InMemorySpanExporter, Tracing]
) -> None:
    memory = exporter[0]
    gw = await traced()
    async with mcp_client(gw.url, gw.token, transport="sse") as client:
        assert text_of(await client.call_tool("echo", {"text": "over sse"})) == "over sse"
        # The stream is still open, and its span is over: it ended when the stream's headers went out.
        (stream,) = named(spans(memory), "GET /sse")
        assert dict(stream.attributes or {})["http.response.status_code"] == 200
        assert stream.end_time is not None
    call = await wait_for_span(memory, "tools/call echo")
    found = spans(memory)
    post = parent_of(call, found)  # answered on the stream, but begun by its POST
    assert post.name == "POST /messages" and dict(post.attributes or {})["http.response.status_code"] == 202
    assert len(named(found, "GET /sse")) == 1  # not ended a second time when the stream closed


async def test_a_tool_error_and_a_refused_request_are_error_spans(
    traced: StartTraced, exporter: tuple[InMemorySpanExporter, Tracing]
) -> None:
    memory = exporter[0]
    gw = await traced()
    async with mcp_client(gw.url, gw.token) as client:
        await client.list_tools()  # the gateway checks arguments against the schemas listed
        with pytest.raises(MCPError, match="Invalid params"):
            await client.call_tool("echo", {"text": 42})
        with pytest.raises(MCPError, match="Unknown tool"):
            await client.call_tool("not-a-tool", {})
    found = spans(memory)
    invalid = next(s for s in named(found, "tools/call echo") if s.kind is SpanKind.SERVER)
    assert invalid.status.status_code is StatusCode.ERROR
    assert dict(invalid.attributes or {})["error.type"] == "-32602"
    assert not invalid.status.description  # an error's text stays out of spans
    # An unlisted tool is named in its attribute, never in the span name (any name could be sent).
    (unknown,) = [s for s in named(found, "tools/call") if s.kind is SpanKind.SERVER]
    assert dict(unknown.attributes or {})["gen_ai.tool.name"] == "not-a-tool"
    async with aiohttp.ClientSession() as http, http.post(gw.url + "/mcp", json={}) as response:
        assert response.status == 401
    (refused,) = [
        s for s in named(spans(memory), "POST /mcp") if s.attributes["http.response.status_code"] == 401
    ]
    assert refused.status.status_code is StatusCode.UNSET  # a 4xx is the caller's error, not the server's


# -- the caller's trace context ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "traceparent",
    [
        "00-zzzz2f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # not hex
        f"00-{'0' * 32}-{PARENT_ID}-01",  # an all-zero trace id
        f"00-{TRACE_ID}-{'0' * 16}-01",  # an all-zero parent id
        f"ff-{TRACE_ID}-{PARENT_ID}-01",  # version ff is forbidden
        f"00-{TRACE_ID}-{PARENT_ID}",  # no flags
        "x" * 4000,
    ],
    ids=["not-hex", "zero-trace", "zero-parent", "version-ff", "short", "long"],
)
async def test_a_malformed_traceparent_is_ignored_and_the_request_served(
    traced: StartTraced,
    exporter: tuple[InMemorySpanExporter, Tracing],
    traceparent: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    memory = exporter[0]
    gw = await traced()
    headers = {**gw.headers, **ACCEPT, "traceparent": traceparent, "tracestate": "vendor=x"}
    caplog.set_level(logging.DEBUG)
    async with (
        aiohttp.ClientSession() as http,
        http.post(gw.url + "/mcp", json=init_message(), headers=headers) as response,
    ):
        assert response.status == 200
        assert (await response.json())["result"]["protocolVersion"] == "2025-11-25"
    (post,) = named(spans(memory), "POST /mcp")
    assert post.parent is None  # a new trace, of the gateway's own
    assert trace_hex(post) not in traceparent and post.context.trace_id != 0
    assert traceparent not in json.dumps({k: str(v) for k, v in (post.attributes or {}).items()})
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry")]  # no line per request


@pytest.mark.parametrize(
    "tracestate",
    [
        "vendor=ok,Caller-Text-In-Logs!!",  # not a member
        "a=1,a=2",  # a key twice
        ",".join(f"k{i}=v" for i in range(33)),  # over 32 members
        "k=" + "v" * 600,  # over 512 characters
    ],
    ids=["bad-member", "duplicate", "too-many", "too-long"],
)
async def test_a_malformed_tracestate_is_dropped_unlogged_and_the_traceparent_kept(
    traced: StartTraced,
    exporter: tuple[InMemorySpanExporter, Tracing],
    tracestate: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    memory = exporter[0]
    gw = await traced()
    caplog.set_level(logging.DEBUG)
    headers = {**gw.headers, **ACCEPT, "traceparent": TRACEPARENT, "tracestate": tracestate}
    async with (
        aiohttp.ClientSession() as http,
        http.post(gw.url + "/mcp", json=init_message(), headers=headers) as response,
    ):
        assert response.status == 200
    (post,) = named(spans(memory), "POST /mcp")
    assert trace_hex(post) == TRACE_ID and not post.context.trace_state  # the parent kept, its state not
    # The SDK would log a bad member verbatim at WARNING: caller text, a line per request.
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry")]


async def test_meta_traceparent_parents_the_mcp_span_and_a_malformed_one_is_ignored(
    traced: StartTraced, exporter: tuple[InMemorySpanExporter, Tracing]
) -> None:
    """SEP-414: a request's `params._meta.traceparent` is its own context; the HTTP span is linked."""
    memory = exporter[0]
    gw = await traced()
    meta_trace, meta_parent = secrets.token_hex(16), secrets.token_hex(8)
    headers = {**gw.headers, **ACCEPT, "traceparent": TRACEPARENT}
    async with aiohttp.ClientSession() as http:
        async with http.post(gw.url + "/mcp", json=init_message(), headers=headers) as response:
            session_headers = {**headers, "Mcp-Session-Id": response.headers["Mcp-Session-Id"]}
        for request_id, meta in enumerate(
            [
                {"traceparent": f"00-{meta_trace}-{meta_parent}-01"},
                {"traceparent": 12},
                {"traceparent": "bad"},
            ],
            start=2,
        ):
            call = {
                "jsonrpc": "2.0",
                "id": request_id,
                "method": "tools/call",
                "params": {"name": "echo", "arguments": {"text": "x"}, "_meta": meta},
            }
            async with http.post(gw.url + "/mcp", json=call, headers=session_headers) as response:
                assert (await response.json())["result"]["content"][0]["text"] == "x"
    found = spans(memory)
    carried, numeric, bad = [s for s in named(found, "tools/call echo") if s.kind is SpanKind.SERVER]
    assert trace_hex(carried) == meta_trace and carried.parent is not None
    assert format(carried.parent.span_id, "016x") == meta_parent
    (link,) = carried.links
    assert format(link.context.trace_id, "032x") == TRACE_ID  # the POST that carried it
    for ignored in (numeric, bad):
        assert trace_hex(ignored) == TRACE_ID and parent_of(ignored, found).name == "POST /mcp"
        assert not ignored.links


# -- the context a remote backend receives --------------------------------------------------------


class Recording(Misbehaving):
    """test_remote's Streamable HTTP server, keeping each POST's message with its trace headers."""

    def __init__(self) -> None:
        super().__init__()
        self.posts: list[tuple[dict[str, Any], dict[str, str | None]]] = []

    async def post(self, request: web.Request) -> web.StreamResponse:
        message = await request.json()  # aiohttp keeps the body: the server reads it again
        headers = {k: request.headers.get(k) for k in ("traceparent", "tracestate", "baggage")}
        self.posts.append((message, headers))
        return await super().post(request)

    def sent(self, method: str) -> tuple[dict[str, Any], dict[str, str | None]]:
        (found,) = [(m, h) for m, h in self.posts if m.get("method") == method]
        return found


async def test_a_remote_backend_receives_the_call_span_as_its_parent(
    traced: StartTraced,
    exporter: tuple[InMemorySpanExporter, Tracing],
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> None:
    memory = exporter[0]
    remote = Recording()
    upstream = await aiohttp_server(remote.app(), host="127.0.0.1")
    gw = await traced({"remote": {"type": "http", "url": str(upstream.make_url("/mcp"))}})
    headers = {"traceparent": TRACEPARENT, "tracestate": "vendor=opaque", "baggage": "user=alice"}
    async with mcp_client(gw.url, gw.token, headers=headers) as client:
        assert text_of(await client.call_tool("echo", {"text": "upstream"})) == "upstream"
    forwarded = [s for s in spans(memory) if s.kind is SpanKind.CLIENT and s.name == "tools/call echo"]
    (client_span,) = forwarded
    expected = f"00-{TRACE_ID}-{format(client_span.context.span_id, '016x')}-01"
    call, headers = remote.sent("tools/call")
    assert headers["traceparent"] == expected
    assert headers["tracestate"] == "vendor=opaque"  # the caller's vendors' state, kept
    assert headers["baggage"] is None  # the caller's baggage is its own text: not passed on
    meta = call["params"]["_meta"]
    assert meta["traceparent"] == expected and meta["tracestate"] == "vendor=opaque"  # SEP-414
    # The gateway's own requests (its handshake at start) belong to no caller's trace.
    handshake, headers = remote.sent("initialize")
    assert headers["traceparent"] is None
    assert "_meta" not in (handshake.get("params") or {})


# -- what spans never hold -----------------------------------------------------------------------------


def _everything(found: list[ReadableSpan]) -> str:
    """Every name, attribute, event and link of these spans, as one text to search."""
    parts: list[str] = []
    for span in found:
        parts.append(span.name)
        parts.extend(f"{k}={v}" for k, v in (span.attributes or {}).items())
        for event in span.events:
            parts.append(event.name)
            parts.extend(f"{k}={v}" for k, v in (event.attributes or {}).items())
        for link in span.links:
            parts.extend(f"{k}={v}" for k, v in (link.attributes or {}).items())
        parts.append(span.status.description or "")
    return "\n".join(parts)


async def test_no_token_cookie_query_or_session_id_in_any_span(
    traced: StartTraced, exporter: tuple[InMemorySpanExporter, Tracing]
) -> None:
    memory = exporter[0]
    gw = await traced(url_auth=False)
    cookie = "mcp_sse_session=" + "c00k1e" * 8
    ids: set[str] = set()
    for transport in ("sse", "streamable"):  # legacy SSE names its session in the query string
        headers = {"Cookie": cookie, "traceparent": TRACEPARENT}
        async with mcp_client(gw.url, gw.token, transport=transport, headers=headers) as client:
            await client.call_tool("echo", {"text": "secret-argument-value"})
            ids.update(s.id for s in gw.app[SESSIONS].all())
    async with aiohttp.ClientSession() as http:
        query_token = "q" * 40
        async with http.get(f"{gw.url}/health?token={query_token}&x=query-text") as response:
            assert response.status in (400, 401)
        async with http.get(f"{gw.url}/metrics", headers=gw.headers) as response:
            exposition = await response.text()
    text = _everything(spans(memory))
    assert len(ids) == 2
    for secret in (gw.token, "c00k1e", query_token, "query-text", "secret-argument-value", *ids):
        assert secret not in text, secret
    assert "?" not in text and "Bearer" not in text
    assert TRACE_ID not in exposition  # trace ids are no metric label either


# -- configuration ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "gw", "OTEL_TRACES_SAMPLER": "always_on"}, False),  # naming is not asking
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, True),
    ],
)
def test_what_turns_tracing_on(environ: dict[str, str], on: bool) -> None:
    assert configured(environ) is on


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "otlp, console or none"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "http/protobuf"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"}, "grpc"),
    ],
)
def test_what_cannot_be_honoured_is_refused(environ: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        configured(environ)


def _clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {"PATH": os.environ["PATH"], "HOME": str(home), "LANG": "C.UTF-8", **extra}


async def _python(code: str, env: dict[str, str], cwd: Path) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode()


async def test_configured_without_the_extra_is_a_clear_startup_error(tmp_path: Path) -> None:
    # The otel extra missing, as far as this interpreter can tell.
    script = str(REPO / "server_secure.py")
    code = (
        "import sys; sys.modules['opentelemetry'] = None; sys.argv = ['server_secure.py', '--port', '0', "
        f"'--env-file', '/dev/null']; import runpy; runpy.run_path({script!r}, run_name='__main__')"
    )
    env = _clean_env(
        tmp_path,
        AUTH_TOKEN=secrets.token_urlsafe(32),
        AUDIT_LOG=str(tmp_path / "audit.log"),
        OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9",
    )
    code_, out = await _python(code, env, tmp_path)
    assert code_ == 2, out
    assert INSTALL_HINT in out and "OTEL_EXPORTER_OTLP_ENDPOINT" in out
    assert "Traceback" not in out and "listening on" not in out


async def test_off_imports_no_opentelemetry(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from mcp_sse.app import create_app\n"
        "from mcp_sse.settings import Secret, Settings\n"
        "settings = Settings(auth_token=Secret('t' * 40), session_secret=Secret('s' * 44), audit_log=None)\n"
        "app = create_app(settings)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'opentelemetry'))\n"
    )
    status, out = await _python(code, _clean_env(tmp_path), tmp_path)
    assert (status, out.strip()) == (0, "[]")


# -- the real configuration path: OTLP/HTTP to a receiver on loopback ----------------------------


@pytest.fixture
async def receiver(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> AsyncIterator[tuple[str, list[ExportTraceServiceRequest]]]:
    """An OTLP/HTTP trace receiver: every ExportTraceServiceRequest it is sent, decoded."""
    received: list[ExportTraceServiceRequest] = []

    async def traces(request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        assert request.content_type == "application/x-protobuf"
        export = ExportTraceServiceRequest()
        export.ParseFromString(body)
        received.append(export)
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    server = await aiohttp_server(app, host="127.0.0.1")
    yield str(server.make_url("")).rstrip("/"), received


async def test_server_secure_exports_spans_over_otlp_http(
    tmp_path: Path, receiver: tuple[str, list[ExportTraceServiceRequest]]
) -> None:
    endpoint, received = receiver
    token = secrets.token_urlsafe(32)
    env = _clean_env(
        tmp_path,
        AUTH_TOKEN=token,
        AUDIT_LOG=str(tmp_path / "audit.log"),
        OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
        OTEL_SERVICE_NAME="gateway-under-test",
        OTEL_RESOURCE_ATTRIBUTES="deployment.environment=test",
    )
    argv = [sys.executable, str(REPO / "server_secure.py"), "--port", "0", "--env-file", os.devnull]
    server = await launch(argv, env=env, cwd=tmp_path)
    try:
        async with mcp_client(server.url, token, headers={"traceparent": TRACEPARENT}) as client:
            assert text_of(await client.call_tool("echo", {"text": "exported"})) == "exported"
    finally:
        code = await server.stop()  # SIGTERM: the batch is flushed at shutdown, not after its delay
    assert code == 0, server.stderr
    assert "tracing on" in server.stderr
    exported = [
        (dict((a.key, a.value.string_value) for a in rs.resource.attributes), span)
        for export in received
        for rs in export.resource_spans
        for ss in rs.scope_spans
        for span in ss.spans
    ]
    by_name = {span.name: (resource, span) for resource, span in exported}
    assert {"POST /mcp", "initialize", "tools/call echo"} <= set(by_name)
    resource, call = by_name["tools/call echo"]
    assert resource["service.name"] == "gateway-under-test"
    assert resource["deployment.environment"] == "test"
    assert call.trace_id.hex() == TRACE_ID
    assert {span.trace_id.hex() for _, span in exported} == {TRACE_ID}
