"""What a decision that needs Redis does when Redis cannot answer: it fails closed.

A cookie login, an OAuth token or refresh decision that cannot reach the shared state is
refused with a 503 that says why (never let through: the login may have been ended, the grant
revoked, on another instance), and the audit log gets one line a minute per store, not one per
refused request. Bearer keys do not come here: the keys file is local.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Final, TypeVar

from aiohttp import web

from ..security.ratelimit import LogThrottle

if TYPE_CHECKING:
    from ..security.audit import AuditLog

__all__ = ["RETRY_AFTER", "SharedState", "Unavailable"]

log = logging.getLogger("mcp_sse")
T = TypeVar("T")
RETRY_AFTER: Final = "5"


class Unavailable(web.HTTPServiceUnavailable):
    """503: the shared state (Redis) did not answer. An HTTPException, so it passes every layer
    to the client as it is, whichever handler or middleware made the call."""

    def __init__(self, what: str) -> None:
        super().__init__(
            text=json.dumps(
                {
                    "error": f"{what} unavailable: the shared state (REDIS_URL) cannot be reached; "
                    "retry shortly (bearer keys keep working)"
                }
            ),
            content_type="application/json",
            headers={"Retry-After": RETRY_AFTER},
        )


class SharedState:
    """Runs one Redis call for a store named `what`; a connection or timeout failure becomes
    Unavailable (and a throttled audit line). redis-py reconnects by itself on the next call."""

    def __init__(self, what: str, audit: AuditLog | None = None) -> None:
        self.what = what
        self.audit = audit
        self._throttle = LogThrottle(seconds=60)

    async def __call__(self, call: Awaitable[T]) -> T:
        from redis.exceptions import ConnectionError, RedisError, TimeoutError

        try:
            return await call
        except (RedisError, OSError) as exc:
            if self._throttle.allow(self.what):
                # Unreachable or slow, or refusing (NOAUTH, OOM, read-only replica): refused the same.
                # The exception's text names the host and port at most, never the URL's password.
                detail = (
                    "" if isinstance(exc, ConnectionError | TimeoutError | OSError) else f": {str(exc)[:200]}"
                )
                log.warning(
                    "%s: Redis unavailable, refusing (fail closed): %s%s",
                    self.what,
                    type(exc).__name__,
                    detail,
                )
                if self.audit is not None:
                    self.audit.event("store.unavailable", None, store=self.what, error=type(exc).__name__)
            raise Unavailable(self.what) from None
