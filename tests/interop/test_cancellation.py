"""A 2026-07-28 client that closes its request's stream cancels the call downstream.

Proven on the path users run: a real `server_secure.py` process on each event loop, a real
child, a raw HTTP client that hangs up once the child has started the call (an event, not a
time: on a busy machine the child may take seconds to start).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import SDK_SERVER, launch
from tests.interop.test_modern import modern_headers, modern_request

REPO = Path(__file__).resolve().parents[2]


async def wait_for_text(path: Path, text: str, timeout: float = 60) -> None:
    async with asyncio.timeout(timeout):
        while not (path.exists() and path.read_text() == text):
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_closing_the_stream_cancels_the_request_downstream(tmp_path: Path, loop: str) -> None:
    token = secrets.token_urlsafe(32)
    servers = tmp_path / "servers.json"
    servers.write_text(json.dumps({"mcpServers": {"test": SDK_SERVER}}))
    env = {
        **os.environ,
        "AUTH_TOKEN": token,
        "AUDIT_LOG": str(tmp_path / "audit.log"),
        "MCP_SERVERS_FILE": str(servers),
        "EVENT_LOOP": loop,
    }
    server = await launch(
        [sys.executable, str(REPO / "server_secure.py"), "--port", "0"], env=env, cwd=tmp_path
    )
    marker = tmp_path / "marker"
    message = modern_request(
        "tools/call", {"name": "record_cancel", "arguments": {"seconds": 600, "path": str(marker)}}
    )
    try:
        async with aiohttp.ClientSession() as http:
            call = asyncio.create_task(
                http.post(
                    server.url + "/mcp",
                    json=message,
                    headers=modern_headers(token, "tools/call", "record_cancel"),
                )
            )
            await wait_for_text(marker, "started")
            assert not call.done()  # the call is in flight at the child
            call.cancel()  # the client gives up: its connection closes
            with pytest.raises(asyncio.CancelledError):
                await call
        await wait_for_text(marker, "cancelled")
    finally:
        assert await server.stop() == 0, server.stderr
    assert "Traceback" not in server.stderr
