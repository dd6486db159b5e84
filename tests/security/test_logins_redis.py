"""Cookie logins shared through a real redis-server by two gateways (two apps on two loopback
ports, one Redis, one SESSION_SECRET): a login on one works on the other, a logout on either
ends it on both; forged, unknown and replayed cookies are refused everywhere; with Redis down a
cookie is refused with a 503 (never let through) while bearer keys keep working, and logins
work again once Redis is back, without a gateway restart. Redis never holds a secret in clear."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio
from cryptography.fernet import Fernet

from mcp_sse.security.cookies import PLAIN_NAME, Logins, LoginStore
from mcp_sse.settings import Secret
from mcp_sse.state import LOGINS
from mcp_sse.store.redis_logins import RedisLogins
from tests.conftest import Running, StartGateway
from tests.redis_server import RedisServer, needs_redis

from .helpers import audit_lines

pytestmark = needs_redis
ORIGIN = "http://app.example"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # No cookie jar: each request says which cookie it carries, so a replay is explicit.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


async def two_gateways(start_gateway: StartGateway, tmp_path: Path, url: str) -> tuple[Running, Running, str]:
    """Two instances sharing one Redis and one SESSION_SECRET (as a load balancer's pool does)."""
    secret = Fernet.generate_key().decode()
    common: dict[str, Any] = {
        "redis_url": Secret(url),
        "session_secret": Secret(secret),
        "allowed_origins": (ORIGIN,),
        "lockout_failures": 1000,  # this file refuses on purpose, many times, from 127.0.0.1
    }
    a = await start_gateway(audit_log=tmp_path / "a.log", **common)
    b = await start_gateway(audit_log=tmp_path / "b.log", **common)
    return a, b, secret


async def login(http: aiohttp.ClientSession, gw: Running) -> str:
    async with http.post(f"{gw.url}/auth/login", headers=gw.headers) as response:
        assert response.status == 200, await response.text()
        return response.cookies[PLAIN_NAME].value


async def whoami(http: aiohttp.ClientSession, gw: Running, cookie: str) -> tuple[int, Any]:
    async with http.get(f"{gw.url}/auth/session", headers={"Cookie": f"{PLAIN_NAME}={cookie}"}) as response:
        return response.status, await response.json()


async def logout(http: aiohttp.ClientSession, gw: Running, cookie: str) -> tuple[int, Any]:
    headers = {"Cookie": f"{PLAIN_NAME}={cookie}", "Origin": ORIGIN}
    async with http.post(f"{gw.url}/auth/logout", headers=headers) as response:
        return response.status, await response.json()


def sealed(secret: str, session: dict[str, Any]) -> str:
    """A cookie as aiohttp-session seals one: what an attacker holding SESSION_SECRET could make."""
    return Fernet(secret.encode()).encrypt(json.dumps({"created": 0, "session": session}).encode()).decode()


async def everything_in(url: str) -> bytes:
    """Every key and value in the database, as one blob to search for secrets."""
    client = redis.asyncio.Redis.from_url(url)
    blob = []
    try:
        async for key in client.scan_iter():
            blob.append(key)
            kind = (await client.type(key)).decode()
            if kind == "hash":
                blob.extend(b for pair in (await client.hgetall(key)).items() for b in pair)
            elif kind == "set":
                blob.extend(await client.smembers(key))
            elif kind == "zset":
                blob.extend(await client.zrange(key, 0, -1))
            elif kind == "string":
                blob.append(await client.get(key))
    finally:
        await client.aclose()
    return b"\n".join(blob)


@pytest.fixture(params=["memory", "redis"])
async def engine(request: pytest.FixtureRequest) -> AsyncIterator[LoginStore]:
    """Both engines of LoginStore against the same tests; memory is the reference."""
    if request.param == "memory":
        yield Logins(lifetime=1000, idle=100)
        return
    # Database 0 of the session's server: the redis_url fixture hands out 1..63.
    client = redis.asyncio.Redis.from_url(request.getfixturevalue("_redis_server") + "/0")
    await client.flushdb()
    logins = RedisLogins(lifetime=1000, idle=100)
    logins.bind(client)
    yield logins
    await client.aclose()


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_both_engines_keep_the_lifetime_the_idle_timeout_and_revocation(
    engine: LoginStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    monkeypatch.setattr(time, "time", clock)
    idle = await engine.start("k1")
    clock.now += 50
    assert await engine.check(idle.sid) is not None  # touched: idle again from here
    clock.now += 90
    assert await engine.check(idle.sid) is not None
    clock.now += 101
    assert await engine.check(idle.sid) is None  # idle too long
    assert await engine.check(idle.sid) is None

    busy = await engine.start("k1")
    started = clock.now
    while clock.now + 90 < started + 1000:  # used often, yet never past its absolute lifetime
        clock.now += 90
        assert await engine.check(busy.sid) is not None
    clock.now = started + 1000
    assert await engine.check(busy.sid) is None

    first, second, other = await engine.start("k1"), await engine.start("k1"), await engine.start("k2")
    engine.end_key("k1")
    if isinstance(engine, RedisLogins):
        await engine.drain()
    assert [await engine.check(x.sid) is None for x in (first, second, other)] == [True, True, False]
    assert await engine.end(other.sid) is True
    assert await engine.end(other.sid) is False
    for junk in (None, "", 7, ["a"], "x" * 43):
        assert await engine.check(junk) is None
        assert await engine.end(junk) is False


async def test_a_login_on_one_instance_works_on_the_other_and_a_logout_ends_it_everywhere(
    start_gateway: StartGateway, tmp_path: Path, http: aiohttp.ClientSession, redis_url: str
) -> None:
    a, b, secret = await two_gateways(start_gateway, tmp_path, redis_url)
    cookie = await login(http, a)
    status, body = await whoami(http, b, cookie)
    assert (status, body["via"], body["identity"]) == (200, "cookie", "auth-token")
    second = await login(http, b)  # another browser, the other way round

    status, body = await logout(http, b, cookie)
    assert (status, body) == (200, {"logged_out": True})
    # The logged-out cookie, replayed on either instance, is refused; the other login lives on.
    for gw in (a, b):
        status, body = await whoami(http, gw, cookie)
        assert status == 401, body
        assert (await whoami(http, gw, second))[0] == 200

    # Attacker side: an unknown id sealed with the real SESSION_SECRET, junk, another secret's seal.
    forged = [
        sealed(secret, {"sid": secrets.token_urlsafe(32)}),
        sealed(secret, {"sid": ["not", "a", "string"]}),
        "not-a-cookie",
        sealed(Fernet.generate_key().decode(), {"sid": "x"}),
    ]
    for value in forged:
        for gw in (a, b):
            assert (await whoami(http, gw, value))[0] == 401

    # Redis holds digests only: neither the bearer token, nor the cookie, nor the login id in it.
    login_id = json.loads(Fernet(secret.encode()).decrypt(second.encode()))["session"]["sid"]
    client = redis.asyncio.Redis.from_url(redis_url)
    try:  # nothing outlives the login: each key has a TTL, a login's at most its idle timeout
        async for key in client.scan_iter(match="mcp-sse:login*"):
            ttl = await client.ttl(key)
            assert 0 < ttl <= (b.app[LOGINS].idle if key.startswith(b"mcp-sse:login:") else 86401), key
    finally:
        await client.aclose()
    blob = await everything_in(redis_url)
    assert b"login:" in blob  # the scan did see the logins
    for raw in (a.token, second, cookie, login_id):
        assert raw.encode() not in blob


async def test_redis_down_refuses_cookies_with_503_bearer_keys_work_and_it_recovers(
    start_gateway: StartGateway, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        a, b, _ = await two_gateways(start_gateway, tmp_path, server.url())
        cookie = await login(http, a)
        assert (await whoami(http, b, cookie))[0] == 200

        server.stop()
        for gw in (a, b):
            status, body = await whoami(http, gw, cookie)
            # Fail closed: the login may have been ended elsewhere; not a 401 (the cookie is not wrong).
            assert status == 503, body
            assert "REDIS_URL" in body["error"] and "bearer keys keep working" in body["error"]
            async with http.get(f"{gw.url}/auth/session", headers=gw.headers) as response:
                assert response.status == 200  # the keys file is local
            async with http.post(f"{gw.url}/auth/login", headers=gw.headers) as response:
                assert response.status == 503  # no login that the others could not see
        assert any(line.get("store") == "cookie logins" for line in audit_lines(tmp_path / "b.log"))

        server.start()  # the same port, no persistence: the logins are gone, the gateways reconnect
        async with asyncio.timeout(30):  # redis-py reconnects by itself; bounds a failing test only
            while (status := (await whoami(http, b, cookie))[0]) == 503:
                await asyncio.sleep(0.05)
        assert status == 401
        fresh = await login(http, b)
        status, body = await whoami(http, a, fresh)
        assert (status, body["via"]) == (200, "cookie")
    finally:
        server.stop()
