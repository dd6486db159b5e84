"""Legacy HTTP+SSE (2024-11-05) on the wire: statuses, the endpoint event, sessions surviving bad POSTs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest

from tests.conftest import Running, StartGateway, next_event, next_message

INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2024-11-05",
        "capabilities": {},
        "clientInfo": {"name": "raw", "version": "0"},
    },
}


@asynccontextmanager
async def open_stream(
    http: aiohttp.ClientSession, gw: Running, prefix: str = ""
) -> AsyncIterator[tuple[Any, str]]:
    async with http.get(f"{gw.url}{prefix}/sse", headers=gw.headers) as response:
        assert response.status == 200
        endpoint = await next_event(response)
        assert endpoint.event == "endpoint"
        yield response, endpoint.data


async def test_endpoint_event_and_a_full_exchange(start_gateway: StartGateway) -> None:
    gw = await start_gateway()
    async with aiohttp.ClientSession() as http, open_stream(http, gw) as (stream, endpoint):
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        assert stream.headers["Cache-Control"].startswith("no-cache")
        assert stream.headers["X-Accel-Buffering"] == "no"
        assert endpoint.startswith("/messages?session_id=")
        assert len(endpoint.split("=", 1)[1]) >= 43  # 256 random bits, base64url
        post = await http.post(gw.url + endpoint, json=INIT, headers=gw.headers)
        assert post.status == 202
        reply = await next_message(stream)
        assert reply["id"] == 1
        assert reply["result"]["protocolVersion"] == "2024-11-05"


async def test_backend_route_advertises_its_own_messages_path(start_gateway: StartGateway) -> None:
    gw = await start_gateway()
    async with aiohttp.ClientSession() as http, open_stream(http, gw, "/servers/mcp-sse") as (_, endpoint):
        assert endpoint.startswith("/servers/mcp-sse/messages?session_id=")


async def test_session_id_alias_is_accepted(start_gateway: StartGateway) -> None:
    gw = await start_gateway()
    async with aiohttp.ClientSession() as http, open_stream(http, gw) as (stream, endpoint):
        alias = endpoint.replace("session_id=", "sessionId=")
        assert (await http.post(gw.url + alias, json=INIT, headers=gw.headers)).status == 202
        assert (await next_message(stream))["id"] == 1


@pytest.mark.parametrize(
    ("query", "status"),
    [("", 400), ("?session_id=", 400), ("?session_id=bad%20id!", 400), ("?session_id=" + "A" * 43, 404)],
)
async def test_session_id_errors(start_gateway: StartGateway, query: str, status: int) -> None:
    gw = await start_gateway()
    async with aiohttp.ClientSession() as http:
        post = await http.post(f"{gw.url}/messages{query}", json=INIT, headers=gw.headers)
        assert post.status == status
        assert "session" in (await post.json())["error"]


async def test_ended_session_is_404(start_gateway: StartGateway) -> None:
    gw = await start_gateway()
    async with aiohttp.ClientSession() as http:
        async with open_stream(http, gw) as (_, endpoint):
            assert (await http.post(gw.url + endpoint, json=INIT, headers=gw.headers)).status == 202
        async with asyncio.timeout(30):  # the disconnect reaches the server a moment later
            while (post := await http.post(gw.url + endpoint, json=INIT, headers=gw.headers)).status != 404:
                await asyncio.sleep(0.05)
        assert post.status == 404


async def test_bad_posts_get_4xx_and_never_kill_the_session(start_gateway: StartGateway) -> None:
    gw = await start_gateway(max_body=10_000)
    async with aiohttp.ClientSession() as http, open_stream(http, gw) as (stream, endpoint):
        url = gw.url + endpoint
        bad_bodies: list[tuple[bytes, int]] = [
            (b"{not json", 400),
            (b"\xff\xfe\x00garbage", 400),
            (b"", 400),
            (b"[" * 10_00 + b"]" * 10_00, 400),
            (json.dumps({"jsonrpc": "1.0", "id": 1, "method": "ping"}).encode(), 400),
            (json.dumps({"jsonrpc": "2.0", "id": None, "method": "ping"}).encode(), 400),
            (json.dumps([{"jsonrpc": "2.0", "id": 1, "method": "ping"}]).encode(), 400),
            (b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":"' + b"a" * 20_000 + b'"}}', 413),
        ]
        for body, status in bad_bodies:
            post = await http.post(url, data=body, headers={**gw.headers, "Content-Type": "application/json"})
            assert post.status == status, body[:40]
            if status == 400:
                error = (await post.json())["error"]
                assert error["code"] in (-32700, -32600)
                assert "Traceback" not in error["message"]
        assert (await http.post(url, json=INIT, headers=gw.headers)).status == 202
        assert (await next_message(stream))["id"] == 1
        ping = {"jsonrpc": "2.0", "id": "after", "method": "ping"}
        assert (await http.post(url, json=ping, headers=gw.headers)).status == 202
        assert await next_message(stream) == {"jsonrpc": "2.0", "id": "after", "result": {}}


async def test_requests_before_initialize_are_refused_on_the_stream(start_gateway: StartGateway) -> None:
    gw = await start_gateway()
    async with aiohttp.ClientSession() as http, open_stream(http, gw) as (stream, endpoint):
        call = {"jsonrpc": "2.0", "id": 7, "method": "tools/list"}
        assert (await http.post(gw.url + endpoint, json=call, headers=gw.headers)).status == 202
        reply = await next_message(stream)
        assert reply["id"] == 7 and reply["error"]["code"] == -32600


async def test_keepalive_comments(start_gateway: StartGateway) -> None:
    gw = await start_gateway(keepalive=0.2)
    async with aiohttp.ClientSession() as http, open_stream(http, gw) as (stream, _):
        event = await next_event(stream, timeout=2)
        assert event.comment is not None


@pytest.mark.parametrize("auth", [None, "Bearer wrong", "Basic abc", "Bearer "])
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/sse"),
        ("POST", "/messages?session_id=x"),
        ("POST", "/mcp"),
        ("GET", "/mcp"),
        ("DELETE", "/mcp"),
        ("GET", "/servers/mcp-sse/sse"),
        ("GET", "/mcp/servers"),
    ],
)
async def test_every_route_needs_the_token(
    start_gateway: StartGateway, auth: str | None, method: str, path: str
) -> None:
    gw = await start_gateway()
    headers = {"Authorization": auth} if auth is not None else {}
    async with aiohttp.ClientSession() as http:
        response = await http.request(method, gw.url + path, headers=headers)
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
