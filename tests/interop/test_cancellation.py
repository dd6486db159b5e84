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
from typing import Any

import aiohttp
import pytest

from tests.conftest import SDK_SERVER, StartGateway, init_message, launch, wait_for_text
from tests.interop.test_modern import modern_headers, modern_request
from tests.security.helpers import audit_lines

REPO = Path(__file__).resolve().parents[2]


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


async def test_a_cancelled_call_is_audited_alike_in_both_eras(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    # Before, a 2026-07-28 call whose stream closed left no tool.invoked line at all.
    gw = await start_gateway({"test": SDK_SERVER})
    url = gw.url + "/mcp"
    accept = {**gw.headers, "Accept": "application/json, text/event-stream"}
    legacy, modern = tmp_path / "legacy", tmp_path / "modern"
    async with aiohttp.ClientSession() as http:
        # 2025-11-25: the client sends notifications/cancelled for its call.
        opened = await http.post(url, json=init_message(), headers=accept)
        session = {
            **accept,
            "Mcp-Session-Id": opened.headers["Mcp-Session-Id"],
            "MCP-Protocol-Version": "2025-11-25",
        }
        arguments = {"seconds": 600, "path": str(legacy)}
        call = {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": "record_cancel", "arguments": arguments},
        }
        call_2025 = asyncio.create_task(http.post(url, json=call, headers=session))
        await wait_for_text(legacy, "started")
        note = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 2}}
        assert (await http.post(url, json=note, headers=session)).status == 202
        assert "error" in await (await call_2025).json()
        # 2026-07-28: the client closes the call's stream.
        message = modern_request(
            "tools/call", {"name": "record_cancel", "arguments": {**arguments, "path": str(modern)}}
        )
        call_2026 = asyncio.create_task(
            http.post(url, json=message, headers=modern_headers(gw.token, "tools/call", "record_cancel"))
        )
        await wait_for_text(modern, "started")
        call_2026.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call_2026
        await wait_for_text(modern, "cancelled")

    def invoked() -> list[dict[str, Any]]:
        lines = audit_lines(tmp_path / "audit.log")
        return [line for line in lines if line["event"] == "tool.invoked" and line["tool"] == "record_cancel"]

    async with asyncio.timeout(60):
        while len(invoked()) < 2:
            await asyncio.sleep(0.02)
    old, new = invoked()
    assert old["outcome"] == new["outcome"] == "error"
    assert set(old) == set(new)  # the same fields
    assert new["identity"] == old["identity"] == "auth-token" and new["backend"] == "test"
