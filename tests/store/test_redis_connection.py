"""The one Redis pool per process (store/redis.py): bounded however many requests are in flight,
named in CLIENT LIST, closed at shutdown; without REDIS_URL nothing is opened at all."""

from __future__ import annotations

import asyncio

import aiohttp
import redis.asyncio

from mcp_sse.settings import Secret
from mcp_sse.store.redis import CLIENT_NAME, MAX_CONNECTIONS, REDIS

from ..conftest import StartGateway


async def ours(admin: redis.asyncio.Redis) -> int:
    return sum(1 for client in await admin.client_list() if client.get("name") == CLIENT_NAME)


async def test_a_burst_of_requests_stays_within_the_pool(start_gateway: StartGateway, redis_url: str) -> None:
    # ContextForge #4570: a gateway that opens a connection per request in flight runs Redis out.
    gw = await start_gateway(redis_url=Secret(redis_url))
    admin = redis.asyncio.Redis.from_url(redis_url)
    most = 0
    burst_done = asyncio.Event()

    async def watch() -> None:
        nonlocal most
        while not burst_done.is_set():
            most = max(most, await ours(admin))
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    connector = aiohttp.TCPConnector(limit=0)  # every request at once, each on its own connection
    async with aiohttp.ClientSession(connector=connector) as http:

        async def one() -> int:
            async with http.get(gw.url + "/mcp/servers", headers=gw.headers) as response:
                return response.status

        statuses = await asyncio.gather(*(one() for _ in range(4 * MAX_CONNECTIONS)))
    burst_done.set()
    await watcher
    assert set(statuses) == {200}
    assert 1 <= most <= MAX_CONNECTIONS, most  # it did use Redis, and never past the bound
    await gw.server.close()
    async with asyncio.timeout(30):  # an event: shutdown closes the pool
        while await ours(admin):
            await asyncio.sleep(0.05)
    await admin.aclose()


async def test_without_redis_url_nothing_is_opened(start_gateway: StartGateway) -> None:
    gw = await start_gateway()
    assert gw.app[REDIS] is None
