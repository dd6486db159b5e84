"""Rate limits: 429, Retry-After and RateLimit headers; sliding window; bounded memory; lockout; streams."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.typedefs import Handler

from mcp_sse.security.audit import AuditLog
from mcp_sse.security.client_ip import client_ip_middleware
from mcp_sse.security.cors import setup_cors
from mcp_sse.security.ratelimit import (
    LOCKED_OUT,
    FailureLockout,
    LogThrottle,
    RateLimiter,
    StreamCounter,
    address_key,
    install_rate_limit_headers,
    ip_rate_limit_middleware,
    lockout_refusal,
    rate_limit_middleware,
)
from mcp_sse.settings import KEY_RATE_LIMIT_DEFAULT, Settings

from .helpers import audit_lines, make_app, read_event

RATELIMIT = re.compile(r'"default";r=(\d+);t=(\d+)')


@pytest.fixture
def audit(tmp_path: Path) -> AuditLog:
    return AuditLog(tmp_path / "audit.log", stream=None)


def limited_app(audit: AuditLog, **kwargs: Any) -> web.Application:
    def setup(app: web.Application) -> None:
        install_rate_limit_headers(app)
        setup_cors(app, allowed_origins=["https://app.example"])

    return make_app(
        [client_ip_middleware(trusted_proxies=[]), rate_limit_middleware(audit=audit, **kwargs)], setup=setup
    )


async def test_429_after_max_requests_with_retry_after_and_ratelimit_headers(
    aiohttp_client: Any, audit: AuditLog
) -> None:
    client = await aiohttp_client(limited_app(audit, window_ms=60_000, max_requests=3))
    remaining = []
    for path in ("/json", "/sse", "/nowhere"):  # the streamed response and a 404 count and carry them too
        async with client.get(path) as response:
            assert response.status in (200, 404)
            assert response.headers["RateLimit-Policy"] == '"default";q=3;w=60'
            match = RATELIMIT.fullmatch(response.headers["RateLimit"])
            assert match is not None and 0 < int(match.group(2)) <= 60
            remaining.append(int(match.group(1)))
            assert response.headers["X-RateLimit-Limit"] == "3"
            assert response.headers["X-RateLimit-Remaining"] == match.group(1)
            if path == "/sse":
                assert await read_event(response) == '{"hello": "world"}'
    assert remaining == [2, 1, 0]
    for _ in range(3):
        async with client.post("/json") as response:
            assert response.status == 429
            assert await response.json() == {"error": "Too many requests, retry later"}
            retry = int(response.headers["Retry-After"])
            assert 0 < retry <= 120
            assert RATELIMIT.fullmatch(response.headers["RateLimit"]).group(1) == "0"  # type: ignore[union-attr]
            assert response.headers["RateLimit-Policy"] == '"default";q=3;w=60'
    lines = [line for line in audit_lines(audit.path or Path()) if line["event"] == "rate_limited"]
    assert len(lines) == 1  # refusals are logged once, not once each
    assert lines[0]["ip"] == "127.0.0.1" and lines[0]["msg"].startswith("Too many requests")


async def test_preflights_are_not_counted(aiohttp_client: Any, audit: AuditLog) -> None:
    client = await aiohttp_client(limited_app(audit, window_ms=60_000, max_requests=1))
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    for _ in range(3):
        async with client.options("/json", headers=preflight) as response:
            assert response.status == 200
    async with client.post("/json") as response:
        assert response.status == 200
    async with client.post("/json") as response:
        assert response.status == 429


async def test_key_func_counts_per_key(aiohttp_client: Any, audit: AuditLog) -> None:
    client = await aiohttp_client(
        limited_app(audit, window_ms=60_000, max_requests=1, key_func=lambda r: r.headers.get("X-Key", ""))
    )
    for key, status in (("a", 200), ("b", 200), ("a", 429), ("b", 429), ("c", 200)):
        async with client.get("/json", headers={"X-Key": key}) as response:
            assert response.status == status, key


def test_sliding_window_counts_the_previous_window_by_its_overlap() -> None:
    limiter = RateLimiter(window_ms=100_000, max_requests=10)
    for i in range(10):
        decision = limiter.hit("k", now=0.0)
        assert decision.allowed and decision.remaining == 9 - i and decision.reset_seconds == 100
    refused = limiter.hit("k", now=0.0)
    assert not refused.allowed and refused.remaining == 0
    assert refused.retry_after == 110  # next window starts at 100, the old 10 must fade to 9
    # No burst at the window edge (a fixed window would allow 10 more at t=100).
    assert not limiter.hit("k", now=100.0).allowed
    assert not limiter.hit("k", now=109.9).allowed
    assert limiter.hit("k", now=110.0).allowed
    # Halfway through the next window half of the old count still weighs.
    decision = limiter.hit("k", now=150.0)
    assert decision.allowed and decision.remaining == 3  # 10 * 0.5 + 2 used of 10
    # Two quiet windows later everything is forgotten.
    assert limiter.hit("k", now=400.0).remaining == 9


def test_retry_after_is_true() -> None:
    limiter = RateLimiter(window_ms=60_000, max_requests=5)
    for t in (0.0, 10.0, 20.0, 30.0, 40.0):
        assert limiter.hit("k", now=t).allowed
    for t in (50.0, 70.0):
        refused = limiter.hit("k", now=t)
        assert not refused.allowed
        wait = refused.retry_after
        assert not limiter.hit("k", now=t + wait - 1.0).allowed
        assert limiter.hit("k", now=t + wait).allowed
        limiter.hit("k", now=t + wait)  # and over the limit again


def test_per_call_limit_overrides_the_default() -> None:
    limiter = RateLimiter(window_ms=60_000, max_requests=100)
    assert limiter.hit("key:a", limit=1, now=0.0).allowed
    decision = limiter.hit("key:a", limit=1, now=1.0)
    assert not decision.allowed and decision.limit == 1
    assert limiter.hit("key:b", now=1.0).limit == 100


def test_memory_is_bounded() -> None:
    limiter = RateLimiter(window_ms=1000, max_requests=5, max_keys=100)
    for i in range(1000):
        limiter.hit(f"ip:{i}", now=0.0)
    assert len(limiter) == 100
    limiter.hit("late", now=5.0)  # two windows later the old buckets are pruned
    assert len(limiter) == 1


def test_ipv6_clients_are_counted_per_64() -> None:
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:bbbb::2") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert address_key("192.0.2.1") != address_key("192.0.2.2")


@pytest.mark.parametrize(
    "kwargs",
    [{"window_ms": 0}, {"window_ms": 999}, {"max_requests": 0}, {"max_requests": -5}, {"window_ms": 1.5}],
)
def test_bad_settings_are_refused_at_build(audit: AuditLog, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="RATE_LIMIT"):
        rate_limit_middleware(audit=audit, **kwargs)


def test_keys_get_their_own_generous_default_and_addresses_keep_the_guides_limit() -> None:
    seed = Settings()  # RATE_LIMIT_WINDOW_MS=900000, RATE_LIMIT_MAX_REQUESTS=100, as the guide had them
    assert (seed.rate_limit_window_ms, seed.rate_limit_max_requests) == (900_000, 100)
    assert seed.key_rate_limit == KEY_RATE_LIMIT_DEFAULT == 9000  # 10 a second for 15 minutes
    # A key is never held tighter than an address: raising the address limit raises it too...
    assert Settings(rate_limit_max_requests=100_000).key_rate_limit == 100_000
    # ...unless KEY_RATE_LIMIT_MAX_REQUESTS says otherwise (a key's own rate_limit still wins over both).
    loaded = Settings.load(environ={"KEY_RATE_LIMIT_MAX_REQUESTS": "40", "RATE_LIMIT_MAX_REQUESTS": "100"})
    assert loaded.key_rate_limit == 40 and loaded.rate_limit_max_requests == 100
    assert Settings.load(environ={"KEY_RATE_LIMIT_MAX_REQUESTS": ""}).key_rate_limit == 9000
    with pytest.raises(ValueError, match="KEY_RATE_LIMIT_MAX_REQUESTS"):
        Settings.load(environ={"KEY_RATE_LIMIT_MAX_REQUESTS": "0"})


def test_lockout_after_n_failures_within_the_window() -> None:
    lockout = FailureLockout(max_failures=10, window_seconds=900, lockout_seconds=900)
    for i in range(9):
        lockout.failed("203.0.113.7", now=float(i))
    assert lockout.locked("203.0.113.7", now=9.0) == 0.0
    lockout.failed("203.0.113.7", now=10.0)
    assert lockout.locked("203.0.113.7", now=10.0) == 900.0
    assert lockout.locked("203.0.113.7", now=500.0) == 410.0
    assert lockout.locked("203.0.113.8", now=500.0) == 0.0  # another client is unaffected
    assert lockout.locked("203.0.113.7", now=910.0) == 0.0  # served
    # Failures spread beyond the window never add up to a lockout.
    slow = FailureLockout(max_failures=3, window_seconds=60, lockout_seconds=60)
    for t in (0.0, 50.0, 100.0, 150.0, 200.0):
        slow.failed("198.51.100.1", now=t)
    assert slow.locked("198.51.100.1", now=200.0) == 0.0
    # reset forgives.
    slow.failed("198.51.100.1", now=201.0)
    slow.failed("198.51.100.1", now=202.0)
    slow.reset("198.51.100.1")
    slow.failed("198.51.100.1", now=203.0)
    assert slow.locked("198.51.100.1", now=203.0) == 0.0


def test_lockout_counts_distinct_credentials_so_a_stale_client_never_locks_out() -> None:
    lockout = FailureLockout(max_failures=3, window_seconds=900, lockout_seconds=900)
    # A stale client (an mcp-remote launched with the token of an earlier run) retries that token
    # forever: it teaches nobody anything and must not lock out the address's other clients.
    for t in range(50):
        assert not lockout.failed("127.0.0.1", "Bearer old-run-token", now=float(t))
    assert lockout.locked("127.0.0.1", now=50.0) == 0.0
    # A guesser needs new guesses, and each new one counts: the third distinct failure locks.
    assert not lockout.failed("127.0.0.1", "Bearer guess-1", now=51.0)
    assert lockout.failed("127.0.0.1", "Bearer guess-2", now=52.0)
    assert lockout.locked("127.0.0.1", now=52.0) == 900.0
    # A failure whose credential this layer cannot see (a token in a login's body) always counts.
    blind = FailureLockout(max_failures=3, window_seconds=900, lockout_seconds=900)
    for t in (0.0, 1.0, 2.0):
        blind.failed("198.51.100.1", now=t)
    assert blind.locked("198.51.100.1", now=2.0) == 900.0
    # Remembering a few credentials per address keeps memory bounded all the same.
    bounded = FailureLockout(max_failures=10, max_keys=5)
    for i in range(100):
        for j in range(9):
            bounded.failed(f"203.0.113.{i}", f"guess-{j}", now=0.0)
    assert len(bounded._failures) == 5 and all(len(f.seen) == 9 for f in bounded._failures.values())


@web.middleware
async def fake_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authentication as the real one treats a locked-out address: only a credential no guess can
    produce passes (here an "owner proof" header stands for a live session or a generated token)."""
    if (left := request.get(LOCKED_OUT)) is not None and "X-Owner-Proof" not in request.headers:
        raise lockout_refusal(left)
    if request.headers.get("Authorization") != "Bearer good":
        raise web.HTTPUnauthorized(text="Invalid token")
    return await handler(request)


async def test_lockout_through_a_server(aiohttp_client: Any, audit: AuditLog) -> None:
    lockout = FailureLockout(max_failures=4, lockout_seconds=60)
    limiter = RateLimiter(window_ms=60_000, max_requests=100)
    app = make_app(
        [
            client_ip_middleware(trusted_proxies=[]),
            ip_rate_limit_middleware(limiter=limiter, lockout=lockout, audit=audit, login_paths=("/sse",)),
            fake_auth,
        ]
    )
    client = await aiohttp_client(app)
    # Requests without any credential are not guesses, nor is one stale token retried.
    for headers in [{}] * 5 + [{"Authorization": "Bearer stale"}] * 5:
        async with client.get("/json", headers=headers) as response:
            assert response.status == 401
    assert lockout.locked("127.0.0.1") == 0.0
    for guess in ("one", "two", "three"):  # with the stale one, four distinct failures: locked
        async with client.get("/json", headers={"Authorization": f"Bearer {guess}"}) as response:
            assert response.status == 401
    assert lockout.locked("127.0.0.1") > 0

    async def refused(headers: dict[str, str], path: str = "/json") -> dict[str, Any]:
        async with client.get(path, headers=headers) as response:
            assert response.status == 429
            assert 0 < int(response.headers["Retry-After"]) <= 60
            assert "RateLimit" not in response.headers  # no quota of anything is told
            return dict(await response.json())

    # Locked: no credential, a login, a wrong token (a 401 below) and the right one without the
    # owner's proof get one and the same answer, so a guess right or wrong is worth nothing.
    answers = [
        await refused({}),
        await refused({"Authorization": "Bearer good"}, "/sse"),
        await refused({"Authorization": "Bearer four"}),
        await refused({"Authorization": "Bearer four", "X-Owner-Proof": "1"}),
        await refused({"Authorization": "Bearer good"}),
    ]
    assert all(answer == answers[0] for answer in answers) and "failed authentication" in answers[0]["error"]
    owner = {"Authorization": "Bearer good", "X-Owner-Proof": "1"}
    async with client.get("/json", headers=owner) as response:
        assert response.status == 200  # the owner is not locked out with the guesser
    events = [line["event"] for line in audit_lines(audit.path or Path())]
    assert events.count("auth.locked") == 2  # the moment it locked, then the first refusal (throttled)
    assert lockout.locked("127.0.0.1") > 0  # refusals are not failures: the lockout neither grows nor ends
    lockout.reset("127.0.0.1")
    async with client.get("/json", headers={"Authorization": "Bearer good"}) as response:
        assert response.status == 200


def test_log_throttle_allows_one_line_per_key_per_period_in_bounded_memory() -> None:
    throttle = LogThrottle(seconds=60, max_keys=3)
    assert throttle.allow("a", now=0.0)
    assert not throttle.allow("a", now=59.9)  # the flood is quiet...
    assert throttle.allow("b", now=59.9)  # ...without silencing anyone else
    assert throttle.allow("a", now=60.0)  # one line again once the period is over
    for i in range(100):
        throttle.allow(f"scanner-{i}", now=61.0)
    assert len(throttle._quiet_until) == 3  # a flood of new keys costs a fixed amount


def test_stream_counter() -> None:
    streams = StreamCounter(2)
    assert streams.acquire("a") and streams.acquire("a")
    assert not streams.acquire("a")
    assert streams.acquire("b")
    streams.release("a")
    assert streams.acquire("a")
    for _ in range(5):
        streams.release("a")  # extra releases never go negative
    assert streams.open("a") == 0 and streams.acquire("a")
    streams.release("a")
    streams.release("b")
    assert streams._open == {}  # only keys with open streams take memory


def test_reset_is_the_window_on_a_large_clock() -> None:
    # (t + 900.0) - t is not exactly 900.0 for large t; the header must still say 900, not 901.
    limiter = RateLimiter(window_ms=900_000, max_requests=1)
    assert limiter.hit("k", now=987654.321).reset_seconds == 900
    # With a limit of 1 the one request must fade completely: the rest of this window and the next.
    assert limiter.hit("k", now=987654.321).retry_after == 1800
