"""Remote MCP servers as backends, against real servers on loopback: the official SDK's server over
Streamable HTTP (it speaks 2026-07-28 too) and SSE, a second mcp-sse that wants a bearer token, and
a 2025-era Streamable HTTP server of our own that misbehaves on demand."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.fernet import Fernet
from mcp.shared.exceptions import MCPError
from mcp.types import CreateMessageResult, TextContent

from mcp_sse.app import create_app
from mcp_sse.settings import Secret, Settings
from tests.conftest import (
    SERVERS,
    TIME_SERVER,
    Launched,
    Running,
    StartGateway,
    launch,
    mcp_client,
    text_of,
    wait_for_text,
)
from tests.tls import certificate_authority

pytestmark = pytest.mark.timeout(120)

ENV = {"PATH": "/usr/bin:/bin"}


@pytest.fixture
async def sdk_remote(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Launched]]]:
    """The SDK test server (tests/servers/sdk_server.py) as a remote HTTP server process."""
    started: list[Launched] = []

    async def start(*flags: str) -> Launched:
        server = await launch(
            [sys.executable, str(SERVERS / "sdk_server.py"), "--http", *flags], env=ENV, cwd=tmp_path
        )
        started.append(server)
        return server

    yield start
    for server in started:
        if server.process.returncode is None:
            server.process.kill()
            await server.process.wait()


async def servers_status(gw: Running) -> dict[str, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{gw.url}/mcp/servers", headers=gw.headers) as response,
    ):
        assert response.status == 200
        return {s["name"]: s for s in (await response.json())["servers"]}


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout: float = 60) -> None:
    """Poll until `predicate` holds; `timeout` only bounds a failing test."""
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.05)


async def state_is(gw: Running, name: str, *states: str) -> bool:
    return (await servers_status(gw))[name]["state"] in states


# -- the SDK's server, each transport and era ------------------------------------------------------


@pytest.mark.parametrize("client_transport", ["streamable", "sse"])
@pytest.mark.parametrize("flags", [(), ("--stateless",)], ids=["stateful", "stateless"])
async def test_sdk_streamable_remote_is_spoken_to_at_2026_07_28(
    start_gateway: StartGateway, sdk_remote: Any, client_transport: str, flags: tuple[str, ...]
) -> None:
    remote = await sdk_remote(*flags)
    gw = await start_gateway({"remote": {"type": "http", "url": remote.url}})
    async with mcp_client(gw.url, gw.token, transport=client_transport) as client:
        assert text_of(await client.call_tool("echo", {"text": "through the remote"})) == "through the remote"
        assert text_of(await client.call_tool("add", {"a": 2, "b": 40})) == "42"
        tools = {t.name for t in (await client.list_tools()).tools}
        assert {"echo", "add", "slow"} <= tools
        # The remote's schemas were learned at connect: bad arguments never leave the gateway.
        with pytest.raises(MCPError, match="Invalid params"):
            await client.call_tool("add", {"a": "two", "b": 1})
    status = (await servers_status(gw))["remote"]
    assert status["state"] == "running" and status["era"] == "2026-07-28" and status["transport"] == "http"


async def test_sdk_sse_remote_keeps_a_session_and_relays_progress_and_sampling(
    start_gateway: StartGateway, sdk_remote: Any
) -> None:
    remote = await sdk_remote("--sse")
    gw = await start_gateway({"remote": {"type": "sse", "url": remote.url}})
    progress: list[float] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(value)

    async def sampling(context: Any, params: Any) -> CreateMessageResult:
        question = params.messages[0].content.text
        return CreateMessageResult(
            role="assistant", content=TextContent(type="text", text=f"answer to {question}"), model="test"
        )

    async with mcp_client(gw.url, gw.token, sampling_callback=sampling) as client:
        result = await client.call_tool("slow", {"steps": 3, "delay": 0.01}, progress_callback=on_progress)
        assert text_of(result) == "done 3"
        assert progress == [1, 2, 3]
        assert text_of(await client.call_tool("ask_llm", {"question": "why"})) == "answer to why"
    status = (await servers_status(gw))["remote"]
    assert status["era"] == "session" and status["transport"] == "sse"


async def test_a_url_without_type_falls_back_to_sse_as_the_sdks_do(
    start_gateway: StartGateway, sdk_remote: Any
) -> None:
    remote = await sdk_remote("--sse")
    gw = await start_gateway({"remote": {"url": remote.url}})
    async with mcp_client(gw.url, gw.token) as client:
        assert text_of(await client.call_tool("echo", {"text": "fell back"})) == "fell back"
    assert (await servers_status(gw))["remote"]["transport"] == "sse"


async def test_remotes_aggregate_at_the_root_beside_a_stdio_child(
    start_gateway: StartGateway, sdk_remote: Any
) -> None:
    http_remote, sse_remote = await sdk_remote(), await sdk_remote("--sse")
    gw = await start_gateway(
        {
            "modern": {"url": http_remote.url},
            "legacy": {"type": "sse", "url": sse_remote.url},
            "time": TIME_SERVER,
        }
    )
    async with mcp_client(gw.url, gw.token) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert {"modern__echo", "legacy__echo", "time__get_current_time"} <= names
        assert text_of(await client.call_tool("modern__echo", {"text": "a"})) == "a"
        assert text_of(await client.call_tool("legacy__echo", {"text": "b"})) == "b"
        now = await client.call_tool("time__get_current_time", {"timezone": "UTC"})
        assert not now.is_error
    async with mcp_client(f"{gw.url}/servers/legacy", gw.token, transport="sse") as client:
        assert text_of(await client.call_tool("echo", {"text": "c"})) == "c"


# -- another mcp-sse, which wants a bearer token ----------------------------------------------------


@pytest.fixture
async def upstream_gateway(
    aiohttp_server: Callable[..., Awaitable[TestServer]], tmp_path: Path
) -> Callable[..., Awaitable[tuple[str, str]]]:
    """A second mcp-sse (embedded tools: echo, server_time) on loopback: (its /mcp URL, its token)."""

    async def start(**tls: Any) -> tuple[str, str]:
        token = "upstream-" + Fernet.generate_key().decode()[:32]
        settings = Settings(
            auth_token=Secret(token),
            session_secret=Secret(Fernet.generate_key().decode()),
            audit_log=tmp_path / "upstream-audit.log",
            rate_limit_max_requests=100_000,
        )
        server = await aiohttp_server(create_app(settings), host="127.0.0.1", **tls)
        return str(server.make_url("/mcp")), token

    return start


@pytest.mark.parametrize("kind", ["http", "sse"])
async def test_a_second_mcp_sse_with_its_token_in_headers(
    start_gateway: StartGateway,
    upstream_gateway: Any,
    kind: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    url, token = await upstream_gateway()
    url = url if kind == "http" else url.removesuffix("/mcp") + "/sse"
    monkeypatch.setenv("UPSTREAM_TOKEN", token)
    caplog.set_level(logging.DEBUG)
    entry = {"type": kind, "url": url, "headers": {"Authorization": "Bearer ${UPSTREAM_TOKEN}"}}
    gw = await start_gateway({"up": entry})
    async with mcp_client(gw.url, gw.token) as client:
        assert text_of(await client.call_tool("echo", {"text": "hop"})) == "hop"
    status = await servers_status(gw)
    assert status["up"]["era"] == ("2026-07-28" if kind == "http" else "session")
    # SECURITY: the operator's upstream secret is shown nowhere.
    assert token not in json.dumps(status)
    assert token not in caplog.text
    assert token not in (tmp_path / "audit.log").read_text()


async def test_a_remote_that_refuses_the_gateway_says_why(
    start_gateway: StartGateway, upstream_gateway: Any
) -> None:
    url, _ = await upstream_gateway()
    gw = await start_gateway(
        {"up": {"type": "http", "url": url}},
    )
    await wait_for(lambda: state_is(gw, "up", "disconnected", "failed"))
    status = (await servers_status(gw))["up"]
    assert "HTTP 401" in status["last_error"] and '"headers" or "auth"' in status["last_error"]
    async with aiohttp.ClientSession() as http:
        reply = await http.post(
            f"{gw.url}/mcp",
            json={
                "jsonrpc": "2.0",
                "id": 1,
                "method": "tools/list",
                "params": {
                    "_meta": {
                        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
                        "io.modelcontextprotocol/clientCapabilities": {},
                    }
                },
            },
            headers={**gw.headers, "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/list"},
        )
        body = await reply.json()
    assert "HTTP 401" in body["error"]["message"]


async def test_tls_with_an_unknown_ca_is_refused_and_with_its_ca_file_trusted(
    start_gateway: StartGateway, upstream_gateway: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca, cert, key = certificate_authority(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    url, token = await upstream_gateway(ssl=context)
    url = url.replace("http://", "https://")
    monkeypatch.setenv("UPSTREAM_TOKEN", token)
    headers = {"Authorization": "Bearer ${UPSTREAM_TOKEN}"}
    gw = await start_gateway(
        {
            "untrusted": {"url": url, "headers": headers},
            "trusted": {"url": url, "headers": headers, "tls": {"ca_file": str(ca)}},
        }
    )
    await wait_for(lambda: state_is(gw, "untrusted", "disconnected", "failed"))
    await wait_for(lambda: state_is(gw, "trusted", "running"))
    assert "certificate" in (await servers_status(gw))["untrusted"]["last_error"]
    async with mcp_client(f"{gw.url}/servers/trusted", gw.token) as client:
        assert text_of(await client.call_tool("echo", {"text": "over tls"})) == "over tls"
    with pytest.raises(BaseException) as refused:  # the session is refused, saying why
        async with mcp_client(f"{gw.url}/servers/untrusted", gw.token):
            pass
    assert "TLS certificate not trusted" in repr(
        refused.value.exceptions if hasattr(refused.value, "exceptions") else refused.value
    )


async def test_a_2026_call_that_times_out_is_cancelled_by_closing_its_stream(
    start_gateway: StartGateway, sdk_remote: Any, tmp_path: Path
) -> None:
    remote = await sdk_remote()
    gw = await start_gateway({"remote": {"type": "http", "url": remote.url, "timeout": 1}})
    marker = tmp_path / "cancel.txt"
    async with mcp_client(gw.url, gw.token) as client:
        with pytest.raises(MCPError, match="did not answer within 1 s"):
            await client.call_tool("record_cancel", {"seconds": 300, "path": str(marker)})
        await wait_for_text(marker, "cancelled")  # the server saw its request end
        assert text_of(await client.call_tool("echo", {"text": "on"})) == "on"
    assert (await servers_status(gw))["remote"]["era"] == "2026-07-28"


# -- faults: killed and restarted ---------------------------------------------------------------


@pytest.mark.parametrize("flags", [(), ("--sse",)], ids=["http", "sse"])
async def test_a_killed_remote_fails_calls_in_flight_at_once_and_is_reconnected(
    start_gateway: StartGateway, sdk_remote: Any, flags: tuple[str, ...]
) -> None:
    remote = await sdk_remote(*flags)
    port = remote.url.split(":")[2].split("/")[0]
    kind = "sse" if flags else "http"
    gw = await start_gateway({"remote": {"type": kind, "url": remote.url}})
    async with mcp_client(gw.url, gw.token) as client:
        assert text_of(await client.call_tool("echo", {"text": "before"})) == "before"
        in_flight = asyncio.create_task(client.call_tool("sleep", {"seconds": 300}))
        await asyncio.sleep(0)  # the call is sent; killing the server now ends it mid-call
        await wait_for(lambda: _sessions_busy(gw))
        remote.process.send_signal(signal.SIGKILL)
        await remote.process.wait()
        with pytest.raises(MCPError, match=r"connection|closed|ended"):
            await in_flight  # never a hang: the lost connection fails it
        restarted = await sdk_remote(*flags, "--port", port)
        assert restarted.url == remote.url
        await wait_for(lambda: state_is(gw, "remote", "running"))  # reconnected by itself
        assert text_of(await client.call_tool("echo", {"text": "after"})) == "after"
    assert (await servers_status(gw))["remote"]["state"] == "running"


async def _sessions_busy(gw: Running) -> bool:
    """The gateway has the call in flight upstream (so a kill now really is mid-call)."""
    from mcp_sse.state import BACKENDS

    backend: Any = gw.app[BACKENDS]["remote"]
    backend = getattr(backend, "inner", backend)
    return any(p.session is not None for p in backend.mux._pending.values())


# -- a 2025-era Streamable HTTP server that misbehaves on demand ---------------------------------


@dataclass
class Misbehaving:
    """A session-keeping Streamable HTTP server whose tools misbehave; what it received is kept."""

    sessions: set[str] = field(default_factory=set)
    initialized: int = 0
    received: list[dict[str, Any]] = field(default_factory=list)
    counter: int = 0
    resumed: list[str] = field(default_factory=list)
    held: dict[str, Any] = field(default_factory=dict)  # event id -> the request it belongs to

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/mcp", self.post)
        app.router.add_get("/mcp", self.get)
        app.router.add_delete("/mcp", self.status(200))
        return app

    @staticmethod
    def status(code: int) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            return web.Response(status=code)

        return handler

    async def get(self, request: web.Request) -> web.StreamResponse:
        """405 (no stream of its own), except a resumption of a stream it ended early."""
        last = request.headers.get("Last-Event-ID")
        if last not in self.held:
            return web.Response(status=405)
        self.resumed.append(last)
        message = self.held.pop(last)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        answer = {
            "jsonrpc": "2.0",
            "id": message["id"],
            "result": {"content": [{"type": "text", "text": "resumed"}]},
        }
        await response.write(f"id: r2\ndata: {json.dumps(answer)}\n\n".encode())
        return response

    async def post(self, request: web.Request) -> web.StreamResponse:
        message = await request.json()
        self.received.append(message)
        method = message.get("method")
        if method == "server/discover":
            return web.json_response(
                {
                    "jsonrpc": "2.0",
                    "id": message["id"],
                    "error": {"code": -32600, "message": "Bad Request: Missing session ID"},
                },
                status=400,
            )
        if method == "initialize":
            self.counter += 1
            self.initialized += 1
            session = f"s{self.counter}"
            self.sessions.add(session)
            result = {
                "protocolVersion": "2025-06-18",
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "misbehaving", "version": "1"},
            }
            return web.json_response(
                {"jsonrpc": "2.0", "id": message["id"], "result": result}, headers={"Mcp-Session-Id": session}
            )
        if request.headers.get("Mcp-Session-Id") not in self.sessions:
            return web.json_response(
                {"jsonrpc": "2.0", "id": None, "error": {"code": -32001, "message": "Session not found"}},
                status=404,
            )
        if "id" not in message:
            return web.Response(status=202)
        if method == "tools/list":
            tools = [
                {"name": n, "inputSchema": {"type": "object"}}
                for n in ("echo", "stall", "garbage", "huge", "endless")
            ]
            return web.json_response({"jsonrpc": "2.0", "id": message["id"], "result": {"tools": tools}})
        name = message["params"]["name"]
        if name == "echo":
            text = message["params"]["arguments"].get("text", "")
            return web.json_response(
                {
                    "jsonrpc": "2.0",
                    "id": message["id"],
                    "result": {"content": [{"type": "text", "text": text}]},
                }
            )
        if name == "garbage":
            return web.Response(text="this is { not json", content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if name == "resumable":  # one event with an id, then the stream ends before the answer
            self.held["r1"] = message
            note = {
                "jsonrpc": "2.0",
                "method": "notifications/message",
                "params": {"level": "info", "data": "x"},
            }
            await response.write(f"id: r1\ndata: {json.dumps(note)}\n\n".encode())
            return response
        if name == "huge":
            await response.write(b"data: " + b"x" * 300_000 + b"\n\n")
            return response
        while True:  # stall sends nothing; endless sends an event a moment, never the answer
            if name == "endless":
                note = {
                    "jsonrpc": "2.0",
                    "method": "notifications/message",
                    "params": {"level": "info", "data": "x"},
                }
                await response.write(f"data: {json.dumps(note)}\n\n".encode())
            await asyncio.sleep(0.01)


@pytest.fixture
async def misbehaving(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> tuple[Misbehaving, str]:
    server = Misbehaving()
    running = await aiohttp_server(server.app(), host="127.0.0.1")
    return server, str(running.make_url("/mcp"))


async def test_a_forgotten_session_is_initialized_again_and_the_call_sent_again(
    start_gateway: StartGateway, misbehaving: tuple[Misbehaving, str]
) -> None:
    server, url = misbehaving
    gw = await start_gateway({"remote": {"type": "http", "url": url}})
    async with mcp_client(gw.url, gw.token) as client:
        assert text_of(await client.call_tool("echo", {"text": "one"})) == "one"
        assert server.initialized == 1
        server.sessions.clear()  # the server expired our session
        assert text_of(await client.call_tool("echo", {"text": "two"})) == "two"
        assert server.initialized == 2
    assert (await servers_status(gw))["remote"]["era"] == "session"


async def test_an_answer_stream_that_ends_early_is_resumed_with_last_event_id(
    start_gateway: StartGateway, misbehaving: tuple[Misbehaving, str]
) -> None:
    server, url = misbehaving
    gw = await start_gateway({"remote": {"type": "http", "url": url}})
    async with mcp_client(gw.url, gw.token) as client:
        assert text_of(await client.call_tool("resumable", {})) == "resumed"
    assert server.resumed == ["r1"]


async def test_a_stalled_call_times_out_and_is_cancelled_upstream(
    start_gateway: StartGateway, misbehaving: tuple[Misbehaving, str]
) -> None:
    server, url = misbehaving
    gw = await start_gateway({"remote": {"type": "http", "url": url, "timeout": 1}})
    async with mcp_client(gw.url, gw.token) as client:
        with pytest.raises(MCPError, match="did not answer within 1 s"):
            await client.call_tool("stall", {})
        stalled = next(m for m in server.received if m.get("params", {}).get("name") == "stall")

        async def cancelled() -> bool:
            return any(
                m.get("method") == "notifications/cancelled" and m["params"]["requestId"] == stalled["id"]
                for m in server.received
            )

        await wait_for(cancelled)
        # The backend serves on.
        assert text_of(await client.call_tool("echo", {"text": "still"})) == "still"


@pytest.mark.parametrize(
    ("tool", "expected"),
    [("garbage", "not a JSON-RPC"), ("huge", "MAX_MESSAGE_BYTES"), ("endless", "did not answer")],
)
async def test_garbage_oversized_and_endless_answers_are_bounded(
    start_gateway: StartGateway, misbehaving: tuple[Misbehaving, str], tool: str, expected: str
) -> None:
    _, url = misbehaving
    gw = await start_gateway({"remote": {"type": "http", "url": url, "timeout": 2}}, max_line=100_000)
    async with mcp_client(gw.url, gw.token) as client:
        with pytest.raises(MCPError, match=expected):
            await client.call_tool(tool, {})
        assert text_of(await client.call_tool("echo", {"text": "after"})) == "after"


# -- both client eras, per-session upstreams, outbound safety ----------------------------------


@pytest.mark.parametrize("flags", [(), ("--sse",)], ids=["remote-2026", "remote-session"])
async def test_a_2026_client_through_the_gateway_to_either_era_of_remote(
    start_gateway: StartGateway, sdk_remote: Any, flags: tuple[str, ...]
) -> None:
    remote = await sdk_remote(*flags)
    gw = await start_gateway({"remote": {"type": "sse" if flags else "http", "url": remote.url}})
    async with mcp_client(gw.url, gw.token, mode="auto") as client:
        assert text_of(await client.call_tool("echo", {"text": "modern client"})) == "modern client"
        assert text_of(await client.call_tool("add", {"a": 1, "b": 2})) == "3"


async def test_per_session_remotes_get_the_callers_mapped_header_and_never_its_credentials(
    start_gateway: StartGateway, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    """Each client session gets an upstream session of its own, initialized with the header the
    operator mapped; the caller's Authorization never goes upstream."""
    seen: list[dict[str, str]] = []
    server = Misbehaving()
    app = server.app()

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        seen.append({k.lower(): v for k, v in request.headers.items()})
        return await handler(request)

    app.middlewares.append(record)
    running = await aiohttp_server(app, host="127.0.0.1")
    entry = {
        "type": "http",
        "url": str(running.make_url("/mcp")),
        "isolation": "per-session",
        "headers": {"X-Api-Key": "operator-key"},
        "headers_from_request": {"X-Tenant": "X-Upstream-Tenant"},
    }
    gw = await start_gateway({"remote": entry})
    async with (
        mcp_client(gw.url, gw.token, headers={"X-Tenant": "blue"}) as blue,
        mcp_client(gw.url, gw.token, headers={"X-Tenant": "green"}) as green,
    ):
        assert text_of(await blue.call_tool("echo", {"text": "b"})) == "b"
        assert text_of(await green.call_tool("echo", {"text": "g"})) == "g"
    by_session: dict[str, set[str | None]] = {}
    for h in seen:
        if "mcp-session-id" in h:
            by_session.setdefault(h["mcp-session-id"], set()).add(h.get("x-upstream-tenant"))
    # One upstream session per client session, each with its own caller's value and no other's
    # (the one without a tenant is the gateway's own, which learned the tools at start).
    assert sorted(by_session.values(), key=str) == [{"blue"}, {"green"}, {None}]
    assert all(h.get("x-api-key") == "operator-key" for h in seen)
    # SECURITY: no token passthrough (MCP forbids it).
    assert not any(gw.token in json.dumps(h) for h in seen)


async def test_a_redirect_is_not_followed_to_another_server(
    start_gateway: StartGateway, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    hits: list[str] = []

    async def elsewhere(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(status=500)

    target = web.Application()
    target.router.add_route("*", "/{tail:.*}", elsewhere)
    other = await aiohttp_server(target, host="127.0.0.2")

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(str(other.make_url("/mcp")))

    source = web.Application()
    source.router.add_route("*", "/mcp", redirect)
    first = await aiohttp_server(source, host="127.0.0.1")
    gw = await start_gateway({"remote": {"type": "http", "url": str(first.make_url("/mcp"))}})
    await wait_for(lambda: state_is(gw, "remote", "disconnected", "failed"))
    assert "redirect (HTTP 307), which is not followed" in (await servers_status(gw))["remote"]["last_error"]
    assert hits == []


async def test_a_server_that_accepts_and_says_nothing_is_given_up_on_and_retried(
    start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("mcp_sse.upstream.remote.INIT_TIMEOUT", 1.0)
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # reads nothing, answers nothing, keeps the connection

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        gw = await start_gateway({"mute": {"type": "http", "url": f"http://127.0.0.1:{port}/mcp"}})
        await wait_for(lambda: state_is(gw, "mute", "disconnected", "failed"))
        assert (await servers_status(gw))["mute"]["last_error"].endswith("timed out")
        await wait_for(lambda: _held_more_than(held, 1))  # it tries again by itself
    finally:
        server.close()
        for writer in held:
            writer.close()


async def _held_more_than(held: list[asyncio.StreamWriter], count: int) -> bool:
    return len(held) > count
