"""X-Request-Id: minted or accepted when safe, in request state and on every response, streamed too."""

from __future__ import annotations

import re
from typing import Any

import pytest
from aiohttp import web

from mcp_sse.security.request_id import install_request_id, request_id_middleware

from .helpers import make_app, read_event

HEX16 = re.compile(r"[0-9a-f]{16}")


def app() -> web.Application:
    return make_app([request_id_middleware()], setup=install_request_id)


async def test_minted_id_is_in_state_and_header_and_unique(aiohttp_client: Any) -> None:
    client = await aiohttp_client(app())
    ids = []
    for _ in range(2):
        async with client.get("/json") as response:
            body = await response.json()
            assert HEX16.fullmatch(response.headers["X-Request-Id"])
            assert body["request_id"] == response.headers["X-Request-Id"]
            ids.append(body["request_id"])
    assert ids[0] != ids[1]


async def test_streamed_and_error_responses_carry_it(aiohttp_client: Any) -> None:
    client = await aiohttp_client(app())
    async with client.get("/sse") as response:
        assert await read_event(response) == '{"hello": "world"}'
        assert HEX16.fullmatch(response.headers["X-Request-Id"])
    for path, status in (("/refuse", 409), ("/nowhere", 404)):
        async with client.get(path, headers={"X-Request-Id": "trace-7"}) as response:
            assert response.status == status
            assert response.headers["X-Request-Id"] == "trace-7"


async def test_an_inbound_id_is_kept_only_when_it_is_plainly_an_id(aiohttp_client: Any) -> None:
    client = await aiohttp_client(app())
    async with client.get("/json", headers={"X-Request-Id": "abc.DEF_1-2"}) as response:
        assert (await response.json())["request_id"] == "abc.DEF_1-2"


@pytest.mark.parametrize("inbound", ["has space", 'quote"', "a" * 65, "", "semi;colon", "üml"])
async def test_anything_else_is_replaced(aiohttp_client: Any, inbound: str) -> None:
    client = await aiohttp_client(app())
    async with client.get("/json", headers={"X-Request-Id": inbound}) as response:
        assert HEX16.fullmatch(response.headers["X-Request-Id"])
        assert (await response.json())["request_id"] == response.headers["X-Request-Id"]
