"""Cookie logins shared through Redis (REDIS_URL): a login made on one instance works on every
other, and a logout or a key's revocation on one ends it everywhere.

Layout (PREFIX is "mcp-sse:"):
  PREFIX login:<sha256(login id) hex>   hash {key_id, started, last_seen}; expires with the login
  PREFIX logins-of:<key id>             set of those digests, for end_key; expires with the newest

The cookie carries the random login id; Redis holds only its SHA-256, so whoever reads Redis
cannot make a cookie from it (nor could they anyway: the cookie is sealed with SESSION_SECRET).
Every key has a TTL: nothing outlives the login's absolute lifetime or its idle timeout.

Idle refresh without a write per request: last_seen (and the TTL) is written again only when
it is older than TOUCH seconds, so the idle timeout holds to within that much.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any, Final, cast

from ..security.cookies import Login, LoginStore
from .redis import PREFIX
from .redis_faults import SharedState

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

    from ..security.audit import AuditLog

__all__ = ["RedisLogins"]

log = logging.getLogger("mcp_sse")
MAX_TOUCH: Final = 60.0
_TOUCH: Final = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'last_seen', ARGV[1])
  redis.call('PEXPIREAT', KEYS[1], ARGV[2])
end
return 0
"""


def _digest(sid: str) -> str:
    return hashlib.sha256(sid.encode()).hexdigest()


def _login_key(digest: str) -> str:
    return f"{PREFIX}login:{digest}"


def _index_key(key_id: str) -> str:
    return f"{PREFIX}logins-of:{key_id}"


class RedisLogins(LoginStore):
    """`LoginStore` on Redis; `bind()` gives it the process's pool (app[REDIS]) once it exists."""

    def __init__(self, *, lifetime: float, idle: float, audit: AuditLog | None = None) -> None:
        self.lifetime = lifetime
        self.idle = idle
        self.touch = min(MAX_TOUCH, idle / 10)
        self._redis: Redis | None = None
        self._call = SharedState("cookie logins", audit)
        self._tasks: set[asyncio.Task[None]] = set()
        self._touch: AsyncScript | None = None

    def bind(self, redis: Redis) -> None:
        self._redis = redis

    @property
    def redis(self) -> Redis:
        if self._redis is None:
            raise RuntimeError("RedisLogins used before bind(app[REDIS])")
        return self._redis

    async def start(self, key_id: str) -> Login:
        now = time.time()
        login = Login(secrets.token_urlsafe(32), key_id, now, now)
        digest = _digest(login.sid)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(
            _login_key(digest), mapping={"key_id": key_id, "started": repr(now), "last_seen": repr(now)}
        )
        pipe.pexpireat(_login_key(digest), int(self.expires_at(login) * 1000))
        pipe.sadd(_index_key(key_id), digest)
        pipe.expire(_index_key(key_id), int(self.lifetime) + 1)
        await self._call(pipe.execute())
        return login

    async def check(self, sid: Any) -> Login | None:
        if not isinstance(sid, str) or not sid:
            return None  # no cookie, no round trip
        key = _login_key(_digest(sid))
        fields = cast("dict[bytes, bytes]", await self._call(self.redis.hgetall(key)))
        try:
            login = Login(
                sid, fields[b"key_id"].decode(), float(fields[b"started"]), float(fields[b"last_seen"])
            )
        except (KeyError, ValueError, UnicodeDecodeError):
            return None  # ended, expired (its TTL), or never there
        now = time.time()
        if now >= self.expires_at(login):
            await self._call(self.redis.delete(key))
            return None
        if now - login.last_seen >= self.touch:
            login.last_seen = now
            if self._touch is None:
                self._touch = self.redis.register_script(_TOUCH)
            # Only if it still exists: a logout on another instance meanwhile is not undone.
            await self._call(self._touch(keys=[key], args=[repr(now), int(self.expires_at(login) * 1000)]))
        return login

    async def end(self, sid: Any) -> bool:
        if not isinstance(sid, str) or not sid:
            return False
        return bool(await self._call(self.redis.delete(_login_key(_digest(sid)))))

    async def _end_key(self, key_id: str) -> None:
        index = _index_key(key_id)
        digests = cast("set[bytes]", await self.redis.smembers(index))
        await self.redis.delete(index, *(_login_key(d.decode()) for d in digests))

    def end_key(self, key_id: str) -> int:
        """Ends the key's logins everywhere, in the background; returns 0 (the count is not known
        here). Should Redis be down, the logins stay refused: their key is no longer current."""
        task = asyncio.get_running_loop().create_task(self._end_key(key_id))
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return 0

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("ending cookie logins in Redis failed: %s", type(exc).__name__)

    async def drain(self) -> None:
        """Wait for background end_key work (tests, shutdown)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def prune(self) -> None:
        """Nothing to do: every login key carries its own TTL."""
