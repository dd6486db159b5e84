"""Fixtures: a real gateway on a loopback port, real stdio children, the official MCP SDK client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.fernet import Fernet
from mcp import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

from mcp_sse.app import create_app
from mcp_sse.settings import Secret, Settings
from mcp_sse.state import SESSIONS

SERVERS = Path(__file__).parent / "servers"
SDK_SERVER = {"command": sys.executable, "args": [str(SERVERS / "sdk_server.py")]}
TIME_SERVER = {"command": sys.executable, "args": ["-m", "mcp_server_time", "--local-timezone", "UTC"]}


@dataclass
class Running:
    url: str
    token: str
    app: web.Application
    server: TestServer

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@pytest.fixture
def token() -> str:
    return secrets.token_urlsafe(32)


StartGateway = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start_gateway(
    aiohttp_server: Callable[..., Awaitable[TestServer]], token: str, tmp_path: Path
) -> StartGateway:
    """Start create_app() on 127.0.0.1:<free port>; `servers` maps names to Claude-format entries."""

    async def start(
        servers: dict[str, dict[str, Any]] | None = None, *, tracing: Any = None, **overrides: Any
    ) -> Running:
        settings: dict[str, Any] = {
            "auth_token": Secret(token),
            "session_secret": Secret(Fernet.generate_key().decode()),
            "audit_log": tmp_path / "audit.log",
            # Tests make many requests from 127.0.0.1; the limits have tests of their own.
            "rate_limit_max_requests": 100_000,
            **overrides,
        }
        if servers is not None:
            path = tmp_path / "servers.json"
            path.write_text(json.dumps({"mcpServers": servers}))
            settings["servers_file"] = path
        app = create_app(Settings(**settings), tracing=tracing)  # tracing: ops/tracing.py's, in its tests
        server = await aiohttp_server(
            app, host="127.0.0.1"
        )  # TestServer cancels handlers on disconnect, as serve() does
        return Running(str(server.make_url("")).rstrip("/"), token, app, server)

    return start


@asynccontextmanager
async def mcp_client(
    url: str,
    token: str,
    *,
    transport: str = "streamable",
    mode: str = "legacy",
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> AsyncIterator[Client]:
    """The official SDK client, over Streamable HTTP (`url` + /mcp) or legacy SSE (`url` + /sse),
    sending `headers` besides its bearer token."""
    headers = {"Authorization": f"Bearer {token}", **(headers or {})}
    if transport == "sse":
        async with Client(sse_client(f"{url}/sse", headers=headers), mode=mode, **kwargs) as client:
            yield client
        return
    timeout = httpx2.Timeout(30, read=300)
    async with (
        httpx2.AsyncClient(headers=headers, timeout=timeout) as http,
        Client(streamable_http_client(f"{url}/mcp", http_client=http), mode=mode, **kwargs) as client,
    ):
        yield client


def init_message(
    version: str = "2025-11-25", request_id: str | int = 1, capabilities: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A raw initialize request, for tests that speak the wire by hand."""
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "initialize",
        "params": {
            "protocolVersion": version,
            "capabilities": capabilities or {},
            "clientInfo": {"name": "raw", "version": "0"},
        },
    }


def text_of(result: Any) -> str:
    """The text of a CallToolResult's first content block."""
    return str(result.content[0].text)


# -- waiting for an event, not for a time ---------------------------------------------------------


async def wait_for_text(path: Path, text: str, timeout: float = 60) -> None:
    """Wait until a marker file holds exactly `text` (sdk_server.py's record_cancel writes "started"
    once the call has reached the child). `timeout` only bounds a failing test."""
    async with asyncio.timeout(timeout):
        while not (path.exists() and path.read_text() == text):
            await asyncio.sleep(0.02)


async def wait_for_dropped_stream(
    app: web.Application, session_id: str, event_id: str, timeout: float = 60
) -> None:
    """After a client hung up on a request stream it had read up to `event_id`: wait until the
    gateway has let go of the stream (no reader left) and has buffered an event after it since,
    which a Last-Event-ID resume must replay. `timeout` only bounds a failing test."""
    session = app[SESSIONS].get(session_id)
    assert session is not None
    found = session.resolve_event_id(event_id)
    assert found is not None, event_id
    stream, seq = found
    async with asyncio.timeout(timeout):
        while stream.reader is not None or stream._seq <= seq:
            await asyncio.sleep(0.02)


# -- server processes --------------------------------------------------------------------------

LISTENING = re.compile(r"listening on (https?://\S+)")


@dataclass
class Launched:
    """A server process started by `launch()`: where it listens, and its stderr lines so far."""

    process: asyncio.subprocess.Process
    url: str
    lines: list[str]
    drain: asyncio.Task[None]

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    async def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (unless it already exited); its exit code, once the rest of its stderr is read."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.process.wait(), timeout)
        await asyncio.wait_for(self.drain, 5)
        return code


async def launch(
    argv: Sequence[str],
    *,
    env: dict[str, str],
    cwd: Path,
    until: str | None = None,
    stdout: int = asyncio.subprocess.DEVNULL,
    preexec_fn: Callable[[], None] | None = None,
) -> Launched:
    """Start a server and wait (20 s at most) for its `listening on` line, and for `until` if given;
    its stderr is read on in the background. The caller stops it (`stop()`, or kills it)."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=stdout,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=preexec_fn,
    )
    stderr = process.stderr
    assert stderr is not None
    lines: list[str] = []
    url = None
    try:
        async with asyncio.timeout(20):
            while url is None or (until is not None and not any(until in line for line in lines)):
                raw = await stderr.readline()
                if not raw:
                    raise AssertionError(
                        f"exited with {await process.wait()} before listening:\n" + "\n".join(lines)
                    )
                lines.append(raw.decode(errors="replace").rstrip("\n"))
                if url is None and (match := LISTENING.search(lines[-1])):
                    url = match.group(1)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise

    async def drain() -> None:
        while raw := await stderr.readline():
            lines.append(raw.decode(errors="replace").rstrip("\n"))

    return Launched(process, url, lines, asyncio.create_task(drain()))


@dataclass
class Event:
    event: str = "message"
    data: str = ""
    id: str | None = None
    comment: str | None = None


async def next_event(response: Any, timeout: float = 10.0) -> Event:
    """Read one SSE event (or one comment line) from an aiohttp response."""
    import asyncio

    event = Event()
    data: list[str] = []
    async with asyncio.timeout(timeout):
        while True:
            raw = await response.content.readline()
            if not raw:
                raise EOFError("stream ended")
            line = raw.decode().rstrip("\n").rstrip("\r")  # SSE lines may end in CRLF
            if line == "":
                if data or event.id is not None or event.event != "message":
                    event.data = "\n".join(data)
                    return event
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "":
                return Event(comment=value)
            if field == "data":
                data.append(value)
            elif field == "event":
                event.event = value
            elif field == "id":
                event.id = value


async def until_eof(response: Any, timeout: float = 60.0) -> None:
    """Read an SSE stream until it ends (keep-alives and events included); fail if it has not in `timeout`."""
    import asyncio

    async with asyncio.timeout(timeout):
        with pytest.raises(EOFError):
            while True:
                await next_event(response, timeout)


async def next_message_with_id(response: Any, timeout: float = 10.0) -> tuple[str | None, Any]:
    """The next JSON-RPC message on an SSE stream and its event id, skipping keep-alives and
    priming events."""
    while True:
        event = await next_event(response, timeout)
        if event.comment is None and event.data:
            return event.id, json.loads(event.data)


async def next_message(response: Any, timeout: float = 10.0) -> dict[str, Any]:
    """The next JSON-RPC message on an SSE stream, skipping keep-alives and priming events."""
    return dict((await next_message_with_id(response, timeout))[1])


_redis_db = 0


@pytest.fixture(scope="session")
def _redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One redis-server for the whole session, started on first use."""
    from .redis_server import REDIS_SERVER, redis_server

    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield f"redis://127.0.0.1:{server.port}"


@pytest.fixture
async def redis_url(_redis_server: str) -> str:
    """redis://127.0.0.1:<port>/<db>: a database of the session's redis-server, emptied for this test."""
    import redis.asyncio

    global _redis_db
    _redis_db = _redis_db % 63 + 1
    url = f"{_redis_server}/{_redis_db}"
    client = redis.asyncio.Redis.from_url(url)
    await client.flushdb()
    await client.aclose()
    return url
