"""Two and three real instances behind a real HAProxy doing plain round-robin, no stickiness: the
SDK client completes every call on both transports and both eras (its requests land anywhere; the
2025-era ones reach their session's owner through the signed hop), and an instance killed with
SIGKILL mid-session takes only its own sessions with it (404, then a new initialize works; its
legacy SSE streams end) while every other session carries on."""

from __future__ import annotations

import asyncio
import hashlib
import signal
from typing import Any

import aiohttp
import pytest
import redis.asyncio

from mcp_sse.store.redis import PREFIX

from ..conftest import init_message, mcp_client, next_event, next_message, text_of
from .conftest import Cluster, StartCluster, needs_haproxy

pytestmark = needs_haproxy

ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
CALLS = 12


async def calls(url: str, token: str, **kwargs: Any) -> tuple[str, list[str]]:
    """The era the SDK client settled on, and the answers to CALLS echo calls."""
    async with mcp_client(url, token, **kwargs) as client:
        answers = [text_of(await client.call_tool("echo", {"text": f"n{i}"})) for i in range(CALLS)]
        return str(client.protocol_version), answers


@pytest.mark.parametrize("count", [2, 3])
async def test_sdk_clients_complete_every_call_through_round_robin(
    start_cluster: StartCluster, count: int
) -> None:
    cluster = await start_cluster(count)
    expected = [f"n{i}" for i in range(CALLS)]
    results = await asyncio.gather(
        calls(cluster.proxy_url, cluster.token, transport="streamable", mode="legacy"),  # 2025-11-25
        calls(cluster.proxy_url, cluster.token, transport="sse", mode="legacy"),  # 2024-11-05, /sse
        calls(cluster.proxy_url, cluster.token, transport="streamable", mode="auto"),  # 2026-07-28
    )
    assert results == [("2025-11-25", expected), ("2025-11-25", expected), ("2026-07-28", expected)]
    # Round-robin really spread the requests: every instance answered some of them. Each session
    # lives on one instance, so the others' share reached it through the hop.
    by_server = await cluster.responses_by_server()
    assert len(by_server) == count and all(n > 0 for n in by_server.values()), by_server


async def owner_of(cluster: Cluster, session_id: str) -> int:
    """The index in cluster.instances of the instance that owns a session (per Redis)."""
    store = redis.asyncio.Redis.from_url(cluster.redis.url(0))
    try:
        owner = await store.get(f"{PREFIX}session:{hashlib.sha256(session_id.encode()).hexdigest()}")
    finally:
        await store.aclose()
    assert owner is not None
    prefix = owner.decode()[:8]
    return next(n for n, i in enumerate(cluster.instances) if prefix in i.instance_ids)


async def initialize(http: aiohttp.ClientSession, cluster: Cluster) -> str:
    headers = {**ACCEPT, **cluster.headers}
    async with http.post(f"{cluster.proxy_url}/mcp", json=init_message(), headers=headers) as response:
        assert response.status == 200, await response.text()
        return response.headers["Mcp-Session-Id"]


async def echo(http: aiohttp.ClientSession, cluster: Cluster, session_id: str, text: str) -> int:
    headers = {
        **ACCEPT,
        **cluster.headers,
        "Mcp-Session-Id": session_id,
        "MCP-Protocol-Version": "2025-11-25",
    }
    message = {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": text}},
    }
    async with http.post(f"{cluster.proxy_url}/mcp", json=message, headers=headers) as response:
        if response.status == 200:
            assert (await response.json())["result"]["content"][0]["text"] == text
        return response.status


async def test_an_instance_killed_mid_session_takes_only_its_own_sessions(
    start_cluster: StartCluster,
) -> None:
    cluster = await start_cluster(3)
    async with aiohttp.ClientSession() as http:
        # Round-robin places consecutive sessions on different instances.
        sessions = [await initialize(http, cluster) for _ in range(6)]
        owners = {s: await owner_of(cluster, s) for s in sessions}
        assert len(set(owners.values())) == 3
        victim = owners[sessions[0]]
        # Legacy SSE streams (they land round-robin too): one on the victim, one elsewhere.
        streams = []
        for _ in range(3):
            stream = await http.get(f"{cluster.proxy_url}/sse", headers=cluster.headers)
            endpoint = await next_event(stream)
            session_id = endpoint.data.partition("session_id=")[2]
            streams.append((stream, endpoint.data, await owner_of(cluster, session_id)))
        doomed = next(s for s, _, owner in streams if owner == victim)
        alive, alive_endpoint = next((s, e) for s, e, owner in streams if owner != victim)
        cluster.instances[victim].process.process.send_signal(signal.SIGKILL)
        await cluster.instances[victim].process.process.wait()
        # Its SSE stream ends (HAProxy closes it when the server side goes).
        with pytest.raises((EOFError, aiohttp.ClientPayloadError)):
            while True:
                await next_event(doomed, timeout=30)
        for session_id, owner in owners.items():
            status = await echo(http, cluster, session_id, "after")
            assert status == (404 if owner == victim else 200), (owner, victim)
        # A client whose session was lost initializes again, and is served.
        fresh = await initialize(http, cluster)
        assert await owner_of(cluster, fresh) != victim
        for _ in range(4):  # through every instance still up
            assert await echo(http, cluster, fresh, "again") == 200
        # The other legacy stream still flows: POSTs through any instance answer on it.
        message = {
            "jsonrpc": "2.0",
            "id": 9,
            "method": "tools/call",
            "params": {"name": "echo", "arguments": {"text": "sse"}},
        }
        for body in (init_message("2024-11-05"), message):
            async with http.post(
                f"{cluster.proxy_url}{alive_endpoint}", json=body, headers=cluster.headers
            ) as r:
                assert r.status == 202
            answer = await next_message(alive)
        assert answer["result"]["content"][0]["text"] == "sse"
        for stream, _, _ in streams:
            stream.close()
