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

__all__ = ["PREFIX", "REDIS", "connect", "install"]

PREFIX: Final = "mcp-sse:"
"""Every key the gateway writes starts with it, so one Redis can serve other programs too."""

REDIS: Final[web.AppKey[Redis | None]] = web.AppKey("redis")

# Short timeouts: a decision that needs Redis fails closed (503) quickly rather than hanging a request.
SOCKET_TIMEOUT: Final = 2.0
CONNECT_TIMEOUT: Final = 2.0
HEALTH_CHECK_SECONDS: Final = 15


def connect(url: str) -> Redis:
    """A client for `url` (redis://, rediss:// for TLS, unix://); the password stays in the URL.

    redis-py connects lazily and reconnects by itself after Redis restarts: nothing here retries.
    """
    try:
        from redis.asyncio import Redis
    except ImportError:  # pragma: no cover - the extra is part of the test install
        raise RuntimeError("REDIS_URL needs redis-py: pip install 'mcp-sse[redis]'") from None
    return Redis.from_url(
        url,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=CONNECT_TIMEOUT,
        health_check_interval=HEALTH_CHECK_SECONDS,
        decode_responses=False,
    )


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
