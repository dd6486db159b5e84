"""The shared-state connection (REDIS_URL): one redis-py asyncio pool per process, opened at
startup and closed at shutdown. Without REDIS_URL the key holds None and everything stays in
this process's memory, as on one host with one worker.

What is shared through it lives with what uses it (rate limits, logins, revocations, session
ownership); this module only owns the connection, its health and its key prefix.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Final

from aiohttp import web

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["PREFIX", "REDIS", "REDIS_HEALTH", "RedisHealth", "connect", "install", "redis_status"]

PREFIX: Final = "mcp-sse:"
"""Every key the gateway writes starts with it, so one Redis can serve other programs too."""

REDIS: Final[web.AppKey[Redis | None]] = web.AppKey("redis")


class RedisHealth:
    """Whether the last exchange with Redis worked: set by whoever talks to it (the shared counters
    do on every request and on their heartbeat), read by /health."""

    __slots__ = ("error", "up")

    def __init__(self) -> None:
        self.up = True
        self.error: str | None = None
        """The kind of the last failure: an exception's class name, never its text (it may hold the URL)."""


REDIS_HEALTH: Final[web.AppKey[RedisHealth]] = web.AppKey("redis_health", RedisHealth)


def redis_status(app: web.Application) -> str | None:
    """What /health says of Redis: None without REDIS_URL, else "ok" or "down"."""
    if app.get(REDIS) is None:
        return None
    health = app.get(REDIS_HEALTH)
    return "down" if health is not None and not health.up else "ok"


# Short timeouts: a decision that needs Redis fails closed (503) quickly rather than hanging a request.
SOCKET_TIMEOUT: Final = 2.0
CONNECT_TIMEOUT: Final = 2.0
HEALTH_CHECK_SECONDS: Final = 15
MAX_CONNECTIONS: Final = 32
CLIENT_NAME: Final = "mcp-sse"
"""Per process; pub/sub subscribers hold one each on top of the requests' share."""


def connect(url: str) -> Redis:
    """A client for `url` (redis://, rediss:// for TLS, unix://); the password stays in the URL.

    redis-py connects lazily and reconnects by itself after Redis restarts: nothing here retries.
    """
    try:
        from redis.asyncio import BlockingConnectionPool, Redis
    except ImportError:  # pragma: no cover - the extra is part of the test install
        raise RuntimeError("REDIS_URL needs redis-py: pip install 'mcp-sse[redis]'") from None
    # Bounded: a burst waits (up to the socket timeout) for a connection instead of opening one
    # per request in flight, which is how a gateway runs a Redis out of connections.
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=SOCKET_TIMEOUT,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=CONNECT_TIMEOUT,
        health_check_interval=HEALTH_CHECK_SECONDS,
        client_name=CLIENT_NAME,  # CLIENT LIST shows which connections are the gateway's
        decode_responses=False,
    )
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes it


def install(app: web.Application, url: str | None) -> None:
    """Set app[REDIS] (None without REDIS_URL) and close the pool at shutdown. Nothing connects here:
    redis-py opens connections on first use, so a Redis that is down does not stop the gateway."""
    client = connect(url) if url is not None else None
    app[REDIS] = client

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        yield
        if client is not None:
            await client.aclose()

    app.cleanup_ctx.append(lifecycle)
