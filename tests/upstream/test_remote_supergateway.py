"""supergateway 4.0.0 (npm, pinned in tests/remotes) serving mcp-server-time over Streamable HTTP
(stateless and stateful), SSE and WebSocket, behind the gateway: the SDK client calls the tool
through us on both of our transports."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import StartGateway, mcp_client
from tests.oauth.helpers import ensure_installed, node_or_skip

pytestmark = pytest.mark.timeout(120)

REMOTES = Path(__file__).parents[1] / "remotes"
SUPERGATEWAY = REMOTES / "node_modules" / "supergateway" / "dist" / "index.js"
TIME = f"{sys.executable} -m mcp_server_time --local-timezone UTC"
MODES = {
    "streamable-stateless": (["--outputTransport", "streamableHttp"], "http", "http://127.0.0.1:{port}/mcp"),
    "streamable-stateful": (
        ["--outputTransport", "streamableHttp", "--stateful"],
        "http",
        "http://127.0.0.1:{port}/mcp",
    ),
    "sse": (["--outputTransport", "sse"], "sse", "http://127.0.0.1:{port}/sse"),
    "ws": (["--outputTransport", "ws"], "ws", "ws://127.0.0.1:{port}/message"),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def supergateway(tmp_path: Path) -> AsyncIterator[Callable[[str], Awaitable[str]]]:
    node = node_or_skip("supergateway (tests/remotes)")
    ensure_installed(REMOTES, "supergateway", "4.0.0")
    processes: list[asyncio.subprocess.Process] = []

    async def start(mode: str) -> str:
        flags, _, url = MODES[mode]
        for _ in range(5):  # a port another process took between free_port() and listen(): try another
            port = free_port()
            process = await asyncio.create_subprocess_exec(
                node,
                str(SUPERGATEWAY),
                "--stdio",
                TIME,
                "--port",
                str(port),
                "--logLevel",
                "info",
                *flags,
                env={"PATH": "/usr/bin:/bin", "NODE_OPTIONS": f"--require {REMOTES / 'loopback.cjs'}"},
                cwd=tmp_path,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            processes.append(process)
            assert process.stdout is not None
            async with asyncio.timeout(30):
                while line := (await process.stdout.readline()).decode():
                    if f"Listening on port {port}" in line:
                        # Read on, so its output never fills the pipe and stalls it.
                        asyncio.get_running_loop().create_task(_drain(process))
                        return url.format(port=port)
            await process.wait()
        raise AssertionError("supergateway did not start")

    yield start
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), 10)
        with contextlib.suppress(ProcessLookupError):
            process.kill()


async def _drain(process: asyncio.subprocess.Process) -> None:
    assert process.stdout is not None
    while await process.stdout.readline():
        pass


@pytest.mark.parametrize("client_transport", ["streamable", "sse"])
@pytest.mark.parametrize("mode", list(MODES))
async def test_supergateway_behind_the_gateway(
    start_gateway: StartGateway,
    supergateway: Callable[[str], Awaitable[str]],
    mode: str,
    client_transport: str,
) -> None:
    url = await supergateway(mode)
    gw = await start_gateway({"time": {"type": MODES[mode][1], "url": url}})
    async with mcp_client(gw.url, gw.token, transport=client_transport) as client:
        tools = {t.name for t in (await client.list_tools()).tools}
        assert "get_current_time" in tools
        for _ in range(3):  # a session, or none, that holds across calls
            result = await client.call_tool("get_current_time", {"timezone": "UTC"})
            assert not result.is_error and '"timezone": "UTC"' in result.content[0].text


async def test_a_pinned_protocol_keeps_one_upstream_session(
    start_gateway: StartGateway, supergateway: Callable[[str], Awaitable[str]]
) -> None:
    """supergateway answers server/discover at 2026-07-28 by starting a child per request; pinned
    to a handshake revision, the gateway keeps one session (one child) instead."""
    url = await supergateway("streamable-stateful")
    gw = await start_gateway({"time": {"type": "http", "url": url, "protocol": "2025-11-25"}})
    async with mcp_client(gw.url, gw.token) as client:
        for _ in range(3):
            assert not (await client.call_tool("get_current_time", {"timezone": "UTC"})).is_error
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{gw.url}/mcp/servers", headers=gw.headers) as answer,
    ):
        (status,) = (await answer.json())["servers"]
    assert status["era"] == "session"
