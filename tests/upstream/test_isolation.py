"""Per-session children: one per client session, capped, reaped; the only place for per-caller values."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import traceback
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mcp_sse.state import TASKS
from mcp_sse.upstream.config import ConfigError, load_servers
from mcp_sse.upstream.isolation import BACKEND_BUSY
from tests.conftest import SDK_SERVER, SERVERS, StartGateway, init_message, mcp_client, text_of
from tests.interop.test_modern import MODERN, modern_headers, modern_request

PER_SESSION = {**SDK_SERVER, "isolation": "per-session"}
COUNTED = (
    "import runpy, sys; open(sys.argv[1], 'a').write('x'); runpy.run_path(sys.argv[2], run_name='__main__')"
)
"""The SDK test server, started through a line that counts its starts in a file."""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"  # a zombie has already exited
    except FileNotFoundError:
        return False


async def children(gw: Any) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        status = await (await http.get(gw.url + "/mcp/servers", headers=gw.headers)).json()
    return next(s for s in status["servers"] if s["name"] == "iso")


async def test_each_session_gets_its_own_child_and_it_is_reaped(start_gateway: StartGateway) -> None:
    gw = await start_gateway({"iso": PER_SESSION})
    async with (
        mcp_client(gw.url, gw.token) as one,
        mcp_client(gw.url, gw.token, transport="sse") as two,
        mcp_client(gw.url, gw.token) as three,
    ):
        pids = [int(text_of(await c.call_tool("pid", {}))) for c in (one, two, three)]
        assert len(set(pids)) == 3 and all(alive(p) for p in pids)
        assert (await children(gw))["children"] == 3
    async with asyncio.timeout(60):  # an event: the children are reaped, however slowly
        while any(alive(p) for p in pids):
            await asyncio.sleep(0.05)
    assert (await children(gw))["children"] == 0


async def test_the_cap_refuses_the_next_session_clearly(start_gateway: StartGateway) -> None:
    gw = await start_gateway({"iso": {**PER_SESSION, "max_sessions": 2}})
    async with mcp_client(gw.url, gw.token) as one, mcp_client(gw.url, gw.token) as two:
        with pytest.raises(BaseException) as refused:  # the SDK wraps it in its task group's ExceptionGroup
            async with mcp_client(gw.url, gw.token):
                pass
        assert "all 2 per-session children are in use" in "".join(traceback.format_exception(refused.value))
        assert text_of(await one.call_tool("echo", {"text": "1"})) == "1"
        assert text_of(await two.call_tool("echo", {"text": "2"})) == "2"
    async with mcp_client(gw.url, gw.token) as later:  # a slot is free again
        assert text_of(await later.call_tool("echo", {"text": "3"})) == "3"


async def test_a_per_session_backend_beside_a_shared_one_serves_at_the_aggregate_root(
    start_gateway: StartGateway,
) -> None:
    # Before, the aggregate never asked its backends to prepare a session: every call to a
    # per-session backend there failed with "no child for this session", and its tools were never listed.
    gw = await start_gateway({"iso": {**PER_SESSION, "max_sessions": 1}, "shared": SDK_SERVER})
    async with asyncio.timeout(60):
        # At start the root lists every backend's resources to report URIs offered twice; iso's
        # through a child of its own, which holds its only place until the check is done.
        while gw.app[TASKS]:
            await asyncio.sleep(0.02)
    async with mcp_client(gw.url, gw.token) as one, mcp_client(gw.url, gw.token, transport="sse") as two:
        names = {tool.name for tool in (await one.list_tools()).tools}
        assert {"iso__pid", "shared__pid"} <= names
        assert text_of(await one.call_tool("iso__echo", {"text": "mine"})) == "mine"
        shared_pid = int(text_of(await one.call_tool("shared__pid", {})))
        assert alive(int(text_of(await one.call_tool("iso__pid", {}))))
        assert (await children(gw))["children"] == 1
        # The only child is taken: the second session is served by the shared backend alone.
        assert int(text_of(await two.call_tool("shared__pid", {}))) == shared_pid
        listed = await two.list_tools()
        assert "iso__pid" not in {tool.name for tool in listed.tools}
        assert "iso" in json.dumps((listed.meta or {}).get("io.github.mcp-sse/unavailable"))
        with pytest.raises(Exception, match="no child for this session"):
            await two.call_tool("iso__pid", {})
    async with asyncio.timeout(60):
        while (await children(gw))["children"] != 0:
            await asyncio.sleep(0.05)


async def test_discover_answers_what_a_child_offers_without_a_child_per_call(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    # Before, a 2026-07-28 client asking a per-session backend what it offers heard nothing:
    # no session had started a child yet.
    starts = tmp_path / "starts"
    counted = [sys.executable, "-c", COUNTED, str(starts), str(SERVERS / "sdk_server.py")]
    gw = await start_gateway(
        {"iso": {"command": counted[0], "args": counted[1:], "isolation": "per-session"}}
    )
    discover = modern_request("server/discover")
    headers = modern_headers(gw.token, "server/discover")
    async with aiohttp.ClientSession() as http:
        answers = [
            await (await http.post(gw.url + "/mcp", json=discover, headers=headers)).json() for _ in range(3)
        ]
    async with mcp_client(gw.url, gw.token, mode="auto") as modern:
        assert modern.protocol_version == MODERN
        offered = modern.server_capabilities
    async with mcp_client(gw.url, gw.token) as legacy:  # what its own child tells a 2025 session
        expected = legacy.server_capabilities
        info = legacy.server_info
    assert offered is not None and expected is not None and offered.tools is not None
    assert offered.model_dump(exclude={"logging"}) == expected.model_dump(exclude={"logging"})
    for answer in answers:
        result = answer["result"]
        wire = expected.model_dump(exclude={"logging"}, exclude_none=True, by_alias=True)
        assert result["capabilities"] == wire
        assert result["_meta"]["io.modelcontextprotocol/serverInfo"]["name"] == info.name == "sdk-test-server"
        assert result["instructions"] == "A test server for mcp-sse."
    # One child told what they all offer, the session's own is the second: no discover started one.
    assert starts.read_text() == "xx"


async def test_a_2026_client_at_the_aggregate_root_sees_a_per_session_backend(
    start_gateway: StartGateway,
) -> None:
    # Before, the root skipped a per-session backend in every 2026-07-28 list: it seemed to offer
    # nothing, since no session had started a child for it.
    gw = await start_gateway({"iso": PER_SESSION, "shared": SDK_SERVER})
    async with mcp_client(gw.url, gw.token, mode="auto") as root:
        assert root.protocol_version == MODERN
        assert root.server_capabilities is not None and root.server_capabilities.prompts is not None
        names = {tool.name for tool in (await root.list_tools()).tools}
        assert {"iso__pid", "shared__pid"} <= names
        assert text_of(await root.call_tool("iso__echo", {"text": "mine"})) == "mine"


async def test_headers_reach_only_their_own_child(start_gateway: StartGateway) -> None:
    gw = await start_gateway({"iso": {**PER_SESSION, "env_from_headers": {"X-User-Token": "USER_TOKEN"}}})
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    async def token_seen(user: str) -> str:
        headers = {"Authorization": f"Bearer {gw.token}", "X-User-Token": user}
        async with (
            httpx2.AsyncClient(headers=headers, timeout=30) as http,
            Client(streamable_http_client(gw.url + "/mcp", http_client=http), mode="legacy") as client,
        ):
            seen = text_of(await client.call_tool("env", {"name": "USER_TOKEN"}))
            auth = text_of(await client.call_tool("env", {"name": "AUTH_TOKEN"}))
            assert auth == ""  # the gateway's own secret never reaches a child
            return seen

    assert await asyncio.gather(token_seen("alice"), token_seen("bob")) == ["alice", "bob"]


async def test_idle_sessions_are_reaped(start_gateway: StartGateway) -> None:
    gw = await start_gateway({"iso": {**PER_SESSION, "idle_timeout": 0.5}})
    async with aiohttp.ClientSession() as http:
        init = init_message()
        headers = {**gw.headers, "Accept": "application/json, text/event-stream"}
        response = await http.post(gw.url + "/mcp", json=init, headers=headers)
        assert response.status == 200
        assert (await children(gw))["children"] == 1
        async with asyncio.timeout(60):  # reaped once idle for 0.5 s, whenever the reaper runs
            while (await children(gw))["children"] != 0:
                await asyncio.sleep(0.05)
        again = await http.post(
            gw.url + "/mcp",
            json={"jsonrpc": "2.0", "id": 2, "method": "ping"},
            headers={**headers, "Mcp-Session-Id": response.headers["Mcp-Session-Id"]},
        )
        assert again.status == 404  # the session ended with its child: the client re-initializes


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"env_from_headers": {"X-A": "A"}}, 'needs "isolation": "per-session"'),
        ({"isolation": "per-session", "env_from_headers": {"Authorization": "A"}}, "may be passed on"),
        ({"isolation": "per-session", "env_from_headers": {"Cookie": "A"}}, "may be passed on"),
        (
            {"isolation": "per-session", "env_from_headers": {"X-A": "AUTH_TOKEN"}},
            "not an environment variable",
        ),
        ({"isolation": "per-session", "max_sessions": 0}, "max_sessions must be a positive integer"),
        ({"isolation": "sometimes"}, 'isolation must be "shared" or "per-session"'),
    ],
)
def test_per_caller_values_need_per_session_isolation(
    tmp_path: Path, entry: dict[str, Any], problem: str
) -> None:
    path = tmp_path / "servers.json"
    path.write_text(json.dumps({"mcpServers": {"s": {"command": "x", **entry}}}))
    with pytest.raises(ConfigError, match=problem):
        load_servers(path, {})


async def test_a_2026_call_to_a_per_session_backend_has_its_arguments_checked(
    start_gateway: StartGateway,
) -> None:
    # The attacker's side: before any child of its own exists, a 2026-07-28 call must meet the
    # tool's inputSchema exactly as a 2025 session's call does, not reach the backend unchecked.
    tools = [{"name": "add", "inputSchema": {"type": "object", "properties": {"n": {"type": "integer"}}}}]
    entry = {
        "command": sys.executable,
        "args": [str(SERVERS / "schema_server.py"), json.dumps(tools)],
        "isolation": "per-session",
    }
    gw = await start_gateway({"iso": entry})
    headers = modern_headers(gw.token, "tools/call", "add")
    async with aiohttp.ClientSession() as http:
        for arguments, expected in (({"n": "one"}, "error"), ({"n": 1}, "result")):
            message = modern_request("tools/call", {"name": "add", "arguments": arguments})
            async with http.post(gw.url + "/mcp", json=message, headers=headers) as response:
                body = await response.json()
            assert expected in body, body
            if expected == "error":
                assert body["error"]["code"] == -32602 and "integer" in body["error"]["message"]
            else:
                assert "reached add" in json.dumps(body["result"])


async def test_a_full_house_answers_busy_and_does_not_open_the_circuit(start_gateway: StartGateway) -> None:
    # Before, a 2026-07-28 call finding every child taken was INTERNAL_ERROR, which the circuit
    # breaker counts as the backend failing: load alone opened the circuit for everyone. And a call
    # whose client left while its child was starting kept that child's place for good.
    breaker = {"failureThreshold": 2, "volumeThreshold": 2, "timeout": 60, "successThreshold": 1}
    gw = await start_gateway({"iso": {**PER_SESSION, "max_sessions": 1, "circuit_breaker": breaker}})
    call = modern_headers(gw.token, "tools/call", "sleep")
    echoing = modern_headers(gw.token, "tools/call", "echo")
    async with aiohttp.ClientSession() as http:
        holder = asyncio.create_task(
            http.post(
                gw.url + "/mcp",
                json=modern_request("tools/call", {"name": "sleep", "arguments": {"seconds": 60}}),
                headers=call,
            )
        )
        async with asyncio.timeout(60):  # an event: the only child is taken by the sleeping call
            while (await children(gw))["children"] != 1:
                await asyncio.sleep(0.05)
        echo = modern_request("tools/call", {"name": "echo", "arguments": {"text": "x"}})
        for _ in range(4):
            answer = await (await http.post(gw.url + "/mcp", json=echo, headers=echoing)).json()
            assert answer["error"]["code"] == BACKEND_BUSY
            assert "all 1 per-session children are in use" in answer["error"]["message"]
        assert (await children(gw))["circuit"]["state"] == "closed"
        holder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await holder
        async with asyncio.timeout(60):  # the cancelled call's child is let go
            while (await children(gw))["children"] != 0:
                await asyncio.sleep(0.05)
        answer = await (await http.post(gw.url + "/mcp", json=echo, headers=echoing)).json()
        assert answer["result"]["content"][0]["text"] == "x"
