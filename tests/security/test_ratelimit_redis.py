"""Shared counters (security/ratelimit.py's `Counters`): the memory engine and the Redis engine
(store/redis_counters.py) pass one behavioural suite against a real redis-server; two gateways on
one Redis share one limit, one lockout and one stream cap; a killed instance's streams stop
counting; Redis stopped mid-run: limits still hold (each instance alone), a lockout is not lifted,
a sign-in is refused 503 and audited, /health says so; started again, all is shared again without
restarting the gateways; a password-protected Redis works, a wrong password fails clearly."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio
from cryptography.fernet import Fernet

from mcp_sse.security.audit import AuditLog
from mcp_sse.security.keys import generate_key
from mcp_sse.security.ratelimit import Counters, FailureLockout, MemoryCounters, RateLimiter, StreamCounter
from mcp_sse.settings import Secret
from mcp_sse.store.redis import PREFIX
from mcp_sse.store.redis_counters import RedisCounters

from ..conftest import Running, StartGateway
from ..redis_server import RedisServer, needs_redis
from .helpers import audit_lines

WINDOW = 100.0


def counters_for(
    client: redis.asyncio.Redis | None, audit: AuditLog, *, stream_ttl: float = 30.0
) -> Counters:
    limiter = RateLimiter(window_ms=round(WINDOW * 1000), max_requests=10)
    lockout = FailureLockout(max_failures=3, window_seconds=900, lockout_seconds=900)
    if client is None:
        return MemoryCounters(limiter, lockout, StreamCounter(2))
    engine = RedisCounters(
        limiter=limiter, lockout=lockout, max_streams=2, secret=b"s" * 32, audit=audit, stream_ttl=stream_ttl
    )
    engine.attach(client)
    return engine


async def flushed_client(request: pytest.FixtureRequest) -> redis.asyncio.Redis:
    # Database 0 of the session's server (a sync fixture): the redis_url fixture hands out the others.
    client = redis.asyncio.Redis.from_url(request.getfixturevalue("_redis_server") + "/0")
    await client.flushdb()
    return client


@pytest.fixture
async def redis_client(request: pytest.FixtureRequest) -> AsyncIterator[redis.asyncio.Redis]:
    client = await flushed_client(request)
    yield client
    await client.aclose()


@pytest.fixture(params=["memory", pytest.param("redis", marks=needs_redis)])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Counters]:
    audit = AuditLog(tmp_path / "audit.log", stream=None)
    if request.param == "memory":
        yield counters_for(None, audit)
        return
    client = await flushed_client(request)
    engine = counters_for(client, audit)
    yield engine
    # Decided in Redis, not by the fallback (which would pass the same suite).
    assert isinstance(engine, RedisCounters) and engine.health.up and await client.dbsize() > 0
    await client.aclose()


# -- one suite, both engines ---------------------------------------------------------------------


async def test_sliding_window_counts_the_previous_window_by_its_overlap(engine: Counters) -> None:
    for i in range(10):
        decision = await engine.hit("k", limit=10, now=0.0)
        assert decision.allowed and decision.remaining == 9 - i and decision.reset_seconds == 100
    refused = await engine.hit("k", limit=10, now=0.0)
    assert not refused.allowed and refused.remaining == 0
    assert refused.retry_after == 110  # the next window starts at 100, the old 10 must fade to 9
    assert not (await engine.hit("k", limit=10, now=100.0)).allowed  # no burst at the window edge
    assert not (await engine.hit("k", limit=10, now=109.9)).allowed
    assert (await engine.hit("k", limit=10, now=110.0)).allowed
    decision = await engine.hit("k", limit=10, now=150.0)
    assert decision.allowed and decision.remaining == 3  # 10 * 0.5 + 2 used of 10
    assert (await engine.hit("k", limit=10, now=400.0)).remaining == 9  # two quiet windows: forgotten
    assert (await engine.hit("other", limit=1, now=400.0)).allowed  # per key, per-call limit
    assert not (await engine.hit("other", limit=1, now=400.0)).allowed


async def test_retry_after_is_true(engine: Counters) -> None:
    for t in (0.0, 20.0, 40.0, 60.0, 80.0):
        assert (await engine.hit("k", limit=5, now=t)).allowed
    for t in (90.0, 130.0):
        refused = await engine.hit("k", limit=5, now=t)
        assert not refused.allowed
        wait = refused.retry_after
        assert not (await engine.hit("k", limit=5, now=t + wait - 1.0)).allowed
        assert (await engine.hit("k", limit=5, now=t + wait)).allowed


async def test_the_same_decisions_as_the_memory_limiter(engine: Counters) -> None:
    """Every field of every Decision (what the RateLimit headers say) as the reference gives it."""
    reference = RateLimiter(window_ms=round(WINDOW * 1000), max_requests=10)
    rng = random.Random(18)
    now = 0.0
    for _ in range(400):
        now += rng.choice((0.0, 0.0, 1.0, 3.0, 7.0, 40.0))
        key, limit = rng.choice(("a", "b")), rng.choice((3, 10))
        assert await engine.hit(key, limit=limit, now=now) == reference.hit(key, limit=limit, now=now)


async def test_lockout_counts_distinct_credentials_within_the_window(engine: Counters) -> None:
    ip = "203.0.113.7"
    for t in range(20):  # a stale client retrying one token never locks its address out
        assert not await engine.failed(ip, "Bearer stale", now=float(t))
    assert await engine.locked(ip, now=20.0) == 0.0
    assert not await engine.failed(ip, "Bearer guess-1", now=21.0)
    assert await engine.failed(ip, "Bearer guess-2", now=22.0)  # the third distinct one locks
    assert await engine.locked(ip, now=22.0) == 900.0
    assert await engine.locked(ip, now=500.0) == 422.0
    assert await engine.locked("203.0.113.8", now=500.0) == 0.0  # another client is unaffected
    assert await engine.locked(ip, now=922.0) == 0.0  # served
    # Unseen credentials (a login's body) each count; failures spread beyond the window never add up.
    blind = "198.51.100.1"
    assert not await engine.failed(blind, now=1000.0) and not await engine.failed(blind, now=1001.0)
    assert not await engine.failed(blind, now=2000.0)  # a new window: one, not three
    assert not await engine.failed(blind, now=2001.0)
    await engine.reset(blind)  # forgiven: counting starts again
    assert not await engine.failed(blind, now=2002.0) and not await engine.failed(blind, now=2003.0)
    assert await engine.failed(blind, now=2004.0)
    assert await engine.locked(blind, now=2004.0) == 900.0
    # IPv6 clients are one address per /64.
    assert await engine.locked("2001:db8::1", now=0.0) == 0.0
    for guess in ("x", "y", "z"):
        await engine.failed("2001:db8::1", guess, now=0.0)
    assert await engine.locked("2001:db8::ffff", now=1.0) == 899.0


async def test_charge_is_the_lockout_then_the_key_in_one_decision(engine: Counters) -> None:
    ip, reference = "203.0.113.9", RateLimiter(window_ms=round(WINDOW * 1000), max_requests=10)
    for t in (0.0, 1.0, 2.0):  # not locked: the key is charged, exactly as hit() charges it
        assert await engine.charge(ip, "key:k", limit=3, now=t) == (0.0, reference.hit("k", limit=3, now=t))
    left, refused = await engine.charge(ip, "key:k", limit=3, now=3.0)
    assert left == 0.0 and refused is not None and not refused.allowed
    for guess in ("x", "y", "z"):
        await engine.failed(ip, guess, now=4.0)
    # Locked: the seconds left, and nothing charged (a refused right secret learns no quota).
    assert await engine.charge(ip, "key:other", limit=3, now=10.0) == (894.0, None)
    assert (await engine.hit("key:other", limit=3, now=10.0)).remaining == 2
    left, decision = await engine.charge("203.0.113.10", "key:other", limit=3, now=10.0)  # not locked
    assert left == 0.0 and decision is not None and decision.allowed and decision.remaining == 1
    assert (await engine.charge(ip, "key:other", limit=3, now=904.0))[0] == 0.0  # served: charged again


async def test_streams_up_to_the_limit_per_key(engine: Counters) -> None:
    assert await engine.acquire("a") and await engine.acquire("a")
    assert not await engine.acquire("a")
    assert await engine.acquire("b")
    assert await engine.open("a") == 2
    await engine.release("a")
    assert await engine.open("a") == 1 and await engine.acquire("a")
    for _ in range(5):
        await engine.release("a")  # extra releases never go negative
    assert await engine.open("a") == 0 and await engine.acquire("a")


@needs_redis
async def test_every_key_is_prefixed_expiring_and_holds_no_credential(
    redis_client: redis.asyncio.Redis, tmp_path: Path
) -> None:
    engine = counters_for(redis_client, AuditLog(tmp_path / "audit.log", stream=None))
    secret = "mcp_" + "S3cret" * 6
    await engine.hit("key:alice", limit=10)
    await engine.failed("203.0.113.9", f"Bearer {secret}")
    for guess in ("a", "b", "c"):
        await engine.failed("203.0.113.10", guess)
    assert await engine.locked("203.0.113.10") > 0
    assert await engine.acquire("key:alice")
    keys = [k async for k in redis_client.scan_iter("*")]
    assert len(keys) >= 4
    for key in keys:
        assert key.startswith(PREFIX.encode()) and await redis_client.pttl(key) > 0, key
        dumped = await redis_client.dump(key)
        assert dumped is not None and secret.encode() not in dumped and secret.encode() not in key


# -- two gateways, one Redis ---------------------------------------------------------------------


async def start_pair(
    start_gateway: StartGateway, tmp_path: Path, url: str, **overrides: Any
) -> tuple[Running, Running, dict[str, str]]:
    """Two create_app()s on two loopback ports sharing `url`; returns them and key name -> secret."""
    secrets_, entries = {}, []
    for name in ("alice", "bob"):
        secret, entry = generate_key(name, "operator")
        secrets_[name] = secret
        entries.append(entry)
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": entries}))
    keys.chmod(0o600)
    common: dict[str, Any] = {
        "keys_file": keys,
        "redis_url": Secret(url),
        "session_secret": Secret(Fernet.generate_key().decode()),  # one per deployment, as in production
        "key_rate_limit_max_requests": 10,
        "lockout_failures": 3,
        "allowed_ips": ("127.0.0.0/8",),  # guessers and floods come from other loopback addresses
        **overrides,
    }
    a = await start_gateway(audit_log=tmp_path / "a.log", **common)
    b = await start_gateway(audit_log=tmp_path / "b.log", **common)
    return a, b, secrets_


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def session_from(address: str) -> aiohttp.ClientSession:
    """A client whose requests come from another loopback address: another client to the limits."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0)))


async def status(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> int:
    async with http.get(url, headers=headers) as response:
        return response.status


@needs_redis
async def test_one_key_limit_across_two_instances(
    start_gateway: StartGateway, tmp_path: Path, redis_url: str, http: aiohttp.ClientSession
) -> None:
    a, b, keys = await start_pair(start_gateway, tmp_path, redis_url)
    alice = bearer(keys["alice"])
    for i, running in enumerate([a] * 6 + [b] * 4):
        async with http.get(f"{running.url}/mcp/servers", headers=alice) as response:
            assert response.status == 200, i
            assert response.headers["RateLimit"].startswith(f'"key";r={9 - i};')
    for running in (b, a):  # the 11th, wherever it lands
        async with http.get(f"{running.url}/mcp/servers", headers=alice) as response:
            assert response.status == 429
            assert response.headers["RateLimit-Policy"] == '"key";q=10;w=900'
            assert response.headers["RateLimit"].startswith('"key";r=0;')
            assert response.headers["X-RateLimit-Remaining"] == "0"
            assert int(response.headers["Retry-After"]) > 0
    assert await status(http, f"{b.url}/mcp/servers", bearer(keys["bob"])) == 200  # bob has his own


@needs_redis
async def test_a_lockout_on_one_instance_holds_on_the_other(
    start_gateway: StartGateway, tmp_path: Path, redis_url: str
) -> None:
    a, b, keys = await start_pair(start_gateway, tmp_path, redis_url)
    async with session_from("127.0.0.2") as guesser:
        for guess in ("one", "two", "three"):
            assert await status(guesser, f"{a.url}/mcp/servers", bearer(guess)) == 401
        # On B, which saw none of it: the right key from that address gets the lockout's 429.
        async with guesser.get(f"{b.url}/mcp/servers", headers=bearer(keys["alice"])) as response:
            assert response.status == 429
            assert "failed authentication" in (await response.json())["error"]
        for wrong in (keys["alice"] + "x", "four"):  # a wrong one too: the same 429, never a 401
            async with guesser.get(f"{b.url}/mcp/servers", headers=bearer(wrong)) as response:
                assert response.status == 429
                assert "failed authentication" in (await response.json())["error"]
    async with session_from("127.0.0.3") as other:  # another address is not locked
        assert await status(other, f"{b.url}/mcp/servers", bearer(keys["alice"])) == 200


async def _scripts_run(client: redis.asyncio.Redis) -> int:
    stats = await client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("eval", "evalsha"))


@needs_redis
async def test_an_authenticated_call_costs_one_redis_round_trip(
    start_gateway: StartGateway, tmp_path: Path, redis_url: str, http: aiohttp.ClientSession
) -> None:
    # The lockout check and the key's charge are one script (Counters.charge), not two in a row.
    running = await start_gateway(
        audit_log=tmp_path / "a.log",
        redis_url=Secret(redis_url),
        session_secret=Secret(Fernet.generate_key().decode()),
        allowed_ips=("127.0.0.0/8",),
    )
    alice = {"Authorization": f"Bearer {running.token}"}
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        assert await status(http, f"{running.url}/mcp/servers", alice) == 200  # scripts loaded
        before = await _scripts_run(client)
        for _ in range(20):
            assert await status(http, f"{running.url}/mcp/servers", alice) == 200
        assert await _scripts_run(client) - before == 20
    finally:
        await client.aclose()


@needs_redis
async def test_max_streams_per_key_across_two_instances(
    start_gateway: StartGateway, tmp_path: Path, redis_url: str, http: aiohttp.ClientSession
) -> None:
    a, b, keys = await start_pair(start_gateway, tmp_path, redis_url, max_streams_per_key=1)
    alice = bearer(keys["alice"])
    first = await http.get(f"{a.url}/sse", headers=alice)
    assert first.status == 200
    async with http.get(f"{b.url}/sse", headers=alice) as refused:
        assert refused.status == 429 and "open streams" in (await refused.json())["error"]
    first.close()  # the client goes: A's handler ends and releases the stream
    deadline = time.monotonic() + 30
    while True:
        async with http.get(f"{b.url}/sse", headers=alice) as second:
            if second.status == 200:
                break
            assert second.status == 429 and time.monotonic() < deadline, "A's stream was never released"
        await asyncio.sleep(0.05)


CHILD = """
import asyncio, sys
import redis.asyncio
from mcp_sse.security.audit import AuditLog
from mcp_sse.security.ratelimit import FailureLockout, RateLimiter
from mcp_sse.store.redis_counters import RedisCounters

async def main():
    engine = RedisCounters(limiter=RateLimiter(), lockout=FailureLockout(), max_streams=2, secret=b"s" * 32,
                           audit=AuditLog(None, stream=None), stream_ttl=float(sys.argv[2]))
    engine.attach(redis.asyncio.Redis.from_url(sys.argv[1]))
    assert await engine.acquire("key:k") and await engine.acquire("key:k")
    print("open", flush=True)
    while True:
        await asyncio.sleep(engine.stream_ttl / 3)
        assert await engine.refresh()
        print("refreshed", flush=True)

asyncio.run(main())
"""


@needs_redis
async def test_a_killed_instances_streams_stop_counting(
    redis_client: redis.asyncio.Redis, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    ttl = 1.5
    url = request.getfixturevalue("_redis_server") + "/0"
    engine = counters_for(redis_client, AuditLog(tmp_path / "audit.log", stream=None), stream_ttl=ttl)
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, url, str(ttl), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        assert await asyncio.wait_for(child.stdout.readline(), 30) == b"open\n"
        assert not await engine.acquire("key:k")  # the other instance holds the key's two streams
        # Four refreshes, a third of the TTL apart: longer than the TTL, and they still count.
        for _ in range(4):
            assert await asyncio.wait_for(child.stdout.readline(), 30) == b"refreshed\n"
        assert await engine.open("key:k") == 2 and not await engine.acquire("key:k")
    finally:
        if child.returncode is None:
            child.kill()  # SIGKILL: no release, no goodbye
        await child.wait()
    deadline = time.monotonic() + 30
    while await engine.open("key:k"):
        assert time.monotonic() < deadline, "a dead instance's streams still count"
        await asyncio.sleep(0.1)
    assert await engine.acquire("key:k") and await engine.acquire("key:k")


# -- Redis down, and back ------------------------------------------------------------------------


async def health(http: aiohttp.ClientSession, running: Running, headers: dict[str, str]) -> dict[str, Any]:
    async with http.get(f"{running.url}/health", headers=headers) as response:
        assert response.status == 200
        body: dict[str, Any] = await response.json()
        return body


@needs_redis
async def test_redis_stopped_and_started_again_mid_run(
    start_gateway: StartGateway, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    server = RedisServer(tmp_path)
    server.start()
    try:
        await outage_and_recovery(start_gateway, tmp_path, server, http)
    finally:
        server.stop()


async def outage_and_recovery(
    start_gateway: StartGateway, tmp_path: Path, server: RedisServer, http: aiohttp.ClientSession
) -> None:
    a, b, keys = await start_pair(start_gateway, tmp_path, server.url(), rate_limit_max_requests=5)
    alice, bob = bearer(keys["alice"]), bearer(keys["bob"])
    body = await health(http, a, bob)
    assert body["status"] == "ok" and body["redis"] == "ok" and "version" in body
    async with session_from("127.0.0.2") as guesser:  # locked out through Redis, and seen so by B
        for guess in ("one", "two", "three"):
            assert await status(guesser, f"{a.url}/mcp/servers", bearer(guess)) == 401
        assert await status(guesser, f"{b.url}/mcp/servers", alice) == 429

        server.stop()
        # Bearer keys keep working from the keys file, each instance counting alone: never unlimited.
        for _ in range(10):
            assert await status(http, f"{a.url}/mcp/servers", alice) == 200
        assert await status(http, f"{a.url}/mcp/servers", alice) == 429
        assert (await health(http, b, bob))["redis"] == "down"
        assert (await health(http, b, bob))["status"] == "degraded"
        # The lockout is not lifted by the outage, on the instance that locked it nor on the one that saw it.
        for running in (a, b):
            assert await status(guesser, f"{running.url}/mcp/servers", alice) == 429
        # A flood without credentials is still limited by the address's budget.
        async with session_from("127.0.0.4") as flood:
            codes = [await status(flood, f"{a.url}/mcp/servers", {}) for _ in range(8)]
            assert codes == [401] * 5 + [429] * 3
        # A sign-in is a guess whose lockout may be held on another instance: refused, not decided here.
        async with (
            session_from("127.0.0.3") as signin,
            signin.post(f"{a.url}/auth/login", json={"token": keys["alice"]}) as response,
        ):
            assert response.status == 503 and int(response.headers["Retry-After"]) > 0
            assert "unavailable" in (await response.json())["error"]

    lines = audit_lines(tmp_path / "a.log")
    outage = [
        line for line in lines if line["event"] == "store.unavailable" and line.get("store") == "counters"
    ]
    # The outage once, the refused sign-in once: not a line per request.
    assert [line.get("refused") for line in outage] == [None, "sign-in"], outage

    server.start()  # the same port, an empty Redis; the gateways are not restarted
    deadline = time.monotonic() + 30
    while (await health(http, a, bob)).get("redis") != "ok" or (await health(http, b, bob)).get(
        "redis"
    ) != "ok":
        assert time.monotonic() < deadline, "the gateways never reconnected"
        await asyncio.sleep(0.1)
    # Shared again: bob has spent some on health checks; his budget is one across both instances.
    results = []
    for i in range(20):
        results.append(await status(http, f"{(a, b)[i % 2].url}/mcp/servers", bob))
    assert results.count(200) <= 10 and results[-1] == 429
    client = redis.asyncio.Redis.from_url(server.url())
    try:
        assert int(await client.hget(f"{PREFIX}rate:key:{keys_id(tmp_path, 'bob')}", "c") or 0) == 10
    finally:
        await client.aclose()
    assert any(line["event"] == "store.recovered" for line in audit_lines(tmp_path / "a.log"))


@needs_redis
async def test_a_redis_that_hangs_is_down_after_its_timeout_and_never_lets_a_flood_through(
    start_gateway: StartGateway, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    server = RedisServer(tmp_path)
    server.start()
    assert server.process is not None
    try:
        a, _, keys = await start_pair(start_gateway, tmp_path, server.url())
        alice = bearer(keys["alice"])
        assert await status(http, f"{a.url}/mcp/servers", alice) == 200
        os.kill(server.process.pid, signal.SIGSTOP)  # accepts connections, answers nothing
        try:
            # The first decision waits out the 2 s socket timeout; then this process's counters decide.
            codes = [await status(http, f"{a.url}/mcp/servers", alice) for _ in range(11)]
            assert codes == [200] * 10 + [429]
            assert (await health(http, a, bearer(keys["bob"])))["redis"] == "down"
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        deadline = time.monotonic() + 30
        # Each poll is a request of bob's, counted alone until Redis is asked again (RETRY_SECONDS).
        while (await health(http, a, bearer(keys["bob"])))["redis"] != "ok":
            assert time.monotonic() < deadline, "never recovered from the hang"
            await asyncio.sleep(0.4)
    finally:
        server.stop()


def keys_id(tmp_path: Path, name: str) -> str:
    entries = json.loads((tmp_path / "keys.json").read_text())["keys"]
    return str(next(e["id"] for e in entries if e["name"] == name))


@needs_redis
async def test_a_password_protected_redis(
    start_gateway: StartGateway, tmp_path: Path, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    password = "pw-" + "x9" * 12
    server = RedisServer(tmp_path, password=password)
    server.start()
    (tmp_path / "right").mkdir()
    (tmp_path / "wrong").mkdir()
    try:
        right, _, keys = await start_pair(start_gateway, tmp_path / "right", server.url())
        assert await status(http, f"{right.url}/mcp/servers", bearer(keys["alice"])) == 200
        assert (await health(http, right, bearer(keys["alice"])))["redis"] == "ok"
        client = redis.asyncio.Redis.from_url(server.url())
        try:
            assert [k async for k in client.scan_iter(f"{PREFIX}rate:*")]  # counted in Redis
        finally:
            await client.aclose()

        caplog.set_level(logging.WARNING, logger="mcp_sse")
        wrong_url = server.url().replace(password, "wrong-" + password[::-1])
        wrong, _, keys = await start_pair(start_gateway, tmp_path / "wrong", wrong_url, health_public=True)
        assert "refused the credentials" in caplog.text
        assert password not in caplog.text and password[::-1] not in caplog.text
        audit = (tmp_path / "wrong" / "a.log").read_text()
        assert "store.unavailable" in audit and password[::-1] not in audit
        assert (await health(http, wrong, bearer(keys["alice"])))["redis"] == "down"
        assert await health(http, wrong, {}) == {"status": "degraded"}  # the bare answer says so too
        assert await status(http, f"{wrong.url}/mcp/servers", bearer(keys["alice"])) == 200  # keys still work
    finally:
        server.stop()
