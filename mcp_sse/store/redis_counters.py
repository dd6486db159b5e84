"""The Redis engine of the shared counters (security/ratelimit.py's `Counters`): rate limits,
failed-login lockouts and open streams that every instance on one Redis agrees on.

Each decision is one Lua script, so it is atomic on the server: two instances hitting the same
key at once never both take its last request. The scripts do what the memory classes do (the
same sliding window, the same distinct-credential lockout) on the server's clock (TIME), or on
the `now` a test passes. Every key lives under PREFIX and has a TTL: nothing grows without end.

Nothing secret is in Redis: keys name addresses and key ids; a failed credential is kept as a
64-bit keyed digest (keyed from SESSION_SECRET, which every instance shares), never as sent.

SECURITY: when Redis is unreachable or slow (2 s), nothing is let through unlimited. Each decision
falls back to this process's own memory counters (the limits still hold, per instance), a lockout
this process has seen stays in force, and what cannot be decided locally (a login: a guess whose
lockout may be held elsewhere) is refused 503. The outage is audited once (`store.unavailable`),
the recovery too (`store.recovered`); redis-py reconnects by itself and the next decision after
RETRY_SECONDS tries Redis again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from ..security.audit import AuditLog
from ..security.ratelimit import (
    Decision,
    FailureLockout,
    LogThrottle,
    RateLimiter,
    StreamCounter,
    _Bucket,
    _ceil,
    address_key,
)
from ..state import IPAddress
from .redis import PREFIX, REDIS, REDIS_HEALTH, RedisHealth
from .redis_faults import Unavailable

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

__all__ = ["RETRY_SECONDS", "STREAM_TTL", "RedisCounters"]

log = logging.getLogger("mcp_sse")

RETRY_SECONDS: Final = 1.0
"""After a failure, decisions use the fallback for this long before trying Redis again: a Redis
that hangs costs one request its 2 s timeout per second, not every request."""
STREAM_TTL: Final = 30.0
"""An open stream is counted for this long unless its instance refreshes it (every third of it):
the streams of an instance that died stop counting within STREAM_TTL."""

# The server's clock in milliseconds, unless the caller passed one (tests).
_NOW: Final = """
local now = tonumber(ARGV[1])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# RateLimiter.hit on the bucket KEYS[#KEYS] {s: start, p: previous, c: current}; ARGV now, limit,
# window (ms). Returns {allowed, elapsed ms, previous, current before this hit}; Python computes the
# headers.
_HIT_BUCKET: Final = """
local bucket, limit, w = KEYS[#KEYS], tonumber(ARGV[2]), tonumber(ARGV[3])
local b = redis.call('HMGET', bucket, 's', 'p', 'c')
local start, prev, cur = now, 0, 0
if b[1] then
  start, prev, cur = tonumber(b[1]), tonumber(b[2]), tonumber(b[3])
  local elapsed = now - start
  if elapsed >= 2 * w then
    start, prev, cur = now, 0, 0
  elseif elapsed >= w then
    start, prev, cur = start + w, cur, 0
  end
end
local used = prev * (1 - (now - start) / w) + cur
local allowed = 0
if used + 1 <= limit then allowed = 1 end
redis.call('HSET', bucket, 's', start, 'p', prev, 'c', cur + allowed)
redis.call('PEXPIRE', bucket, math.max(1, start + 2 * w - now))
return {allowed, now - start, prev, cur}
"""
_HIT: Final = _NOW + _HIT_BUCKET

# FailureLockout.failed: KEYS failures {s: start, n: unseen}, marks (set of digests), until (ms).
# ARGV now, window, lockout (ms), max failures, the credential's mark ('' when unseen).
_FAILED: Final = (
    _NOW
    + """
local w, lockout, max = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local start = tonumber(redis.call('HGET', KEYS[1], 's'))
if start == nil or now - start >= w then
  redis.call('DEL', KEYS[1], KEYS[2])
  start = now
  redis.call('HSET', KEYS[1], 's', now, 'n', 0)
end
if ARGV[5] == '' then
  redis.call('HINCRBY', KEYS[1], 'n', 1)
else
  redis.call('SADD', KEYS[2], ARGV[5])
end
if redis.call('SCARD', KEYS[2]) + tonumber(redis.call('HGET', KEYS[1], 'n')) >= max then
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('SET', KEYS[3], now + lockout, 'PX', lockout)
  return 1
end
local ttl = math.max(1, start + w - now)
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return 0
"""
)

# FailureLockout.locked on KEYS[1], the address's lockout until (ms): `left`, the milliseconds it
# still holds (0 when not locked; an ended one is deleted).
_LEFT: Final = """
local left = 0
local ends = tonumber(redis.call('GET', KEYS[1]))
if ends ~= nil then
  if ends > now then left = ends - now else redis.call('DEL', KEYS[1]) end
end
"""
_LOCKED: Final = _NOW + _LEFT + "return left\n"

# Counters.charge: KEYS[1] the address's lockout until (ms), KEYS[2] the key's bucket; ARGV as _HIT's.
# {-1, ms left} while locked (nothing charged), else _HIT's answer. (Two keys in two hash slots: one
# Redis, not a Redis Cluster, as REDIS_URL is.)
_CHARGE: Final = _NOW + _LEFT + "if left > 0 then return {-1, left} end\n" + _HIT_BUCKET

# Streams: KEYS[1] a sorted set of stream ids scored by when they stop counting unless refreshed.
# ARGV now, limit, ttl (ms), id. Returns 1 when opened.
_ACQUIRE: Final = (
    _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
)

# ARGV now, ttl (ms), ids...: push the expiry of this instance's open streams forward.
_REFRESH: Final = (
    _NOW
    + """
local ttl = tonumber(ARGV[2])
for i = 3, #ARGV do redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], ttl)
return 0
"""
)

_OPEN: Final = (
    _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"""
)

WHAT: Final = "counters"  # the `store` of its audit lines, as store/redis_faults.py names the others
_LOCAL: Final = ""  # the id of a stream counted by the fallback while Redis was down


def _ms(now: float | None) -> str:
    return "" if now is None else str(round(now * 1000))


class RedisCounters:
    """`Counters` on Redis, with this process's memory counters as the fallback during an outage.

    `limiter` and `lockout` are the memory engine's (their settings are the shared ones, and they
    count alone while Redis is away); `secret` keys the digests of failed credentials.
    """

    def __init__(
        self,
        *,
        limiter: RateLimiter,
        lockout: FailureLockout,
        max_streams: int,
        secret: bytes,
        audit: AuditLog,
        stream_ttl: float = STREAM_TTL,
    ) -> None:
        self.limiter, self.lockout = limiter, lockout
        self.streams = StreamCounter(max_streams)
        self.audit = audit
        self.stream_ttl = stream_ttl
        self.health = RedisHealth()
        self._mark_key = hashlib.blake2b(secret, digest_size=32, person=b"mcp-sse lockout").digest()
        self._client: Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._retry_at = 0.0
        self._open: dict[str, list[str]] = {}  # budget -> ids of this process's open streams
        self._throttle = LogThrottle(seconds=60)

    # -- wiring --------------------------------------------------------------------------------

    def attach(self, client: Redis) -> None:
        self._client = client
        self._scripts = {
            name: client.register_script(source)
            for name, source in (
                ("hit", _HIT),
                ("failed", _FAILED),
                ("locked", _LOCKED),
                ("charge", _CHARGE),
                ("acquire", _ACQUIRE),
                ("refresh", _REFRESH),
                ("open", _OPEN),
            )
        }

    def install(self, app: web.Application) -> None:
        """Use app[REDIS] (store/redis.py's pool), report to /health, refresh open streams."""
        client = app[REDIS]
        if client is None:
            raise ValueError("RedisCounters needs REDIS_URL (app[REDIS] is None)")
        self.attach(client)
        app[REDIS_HEALTH] = self.health
        app.cleanup_ctx.append(self._lifecycle)

    async def _lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        await self.check()
        task = asyncio.create_task(self._heartbeat())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def check(self) -> bool:
        """PING, saying in the log why not (never the URL: it may hold the password)."""
        assert self._client is not None
        where = self._client.connection_pool.connection_kwargs
        place = where.get("path") or f"{where.get('host')}:{where.get('port')}"
        try:
            await self._client.ping()
        except Exception as exc:
            from redis.exceptions import AuthenticationError, ResponseError

            self._down(exc)
            if isinstance(exc, AuthenticationError) or (
                isinstance(exc, ResponseError) and "NOAUTH" in str(exc)
            ):
                log.error(
                    "REDIS_URL: Redis at %s refused the credentials; check the password in REDIS_URL", place
                )
            else:
                log.error("REDIS_URL: Redis at %s is unreachable (%s)", place, type(exc).__name__)
            return False
        self._up()
        return True

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.stream_ttl / 3)
            await self.refresh()

    async def refresh(self) -> bool:
        """Keep this process's open streams counted (every third of STREAM_TTL), and /health current
        when no request asks Redis anything. False when Redis did not answer."""
        assert self._client is not None
        ttl = round(self.stream_ttl * 1000)
        try:
            shared = {budget: [i for i in ids if i != _LOCAL] for budget, ids in self._open.items()}
            if not any(shared.values()):
                await self._client.ping()
            for budget, ids in shared.items():
                if ids:
                    await self._scripts["refresh"](keys=[self._stream_key(budget)], args=["", ttl, *ids])
        except Exception as exc:
            self._down(exc)
            return False
        self._up()
        return True

    # -- the outage --------------------------------------------------------------------------

    def _down(self, exc: BaseException) -> None:
        self._retry_at = time.monotonic() + RETRY_SECONDS
        if self.health.up:
            self.health.up, self.health.error = False, type(exc).__name__
            log.warning("Redis unavailable (%s): each instance counts on its own", type(exc).__name__)
            if self._throttle.allow("unavailable"):
                self.audit.event(
                    "store.unavailable", None, store=WHAT, error=type(exc).__name__, fallback="this process's"
                )

    def _up(self) -> None:
        if not self.health.up:
            self.health.up, self.health.error = True, None
            log.warning("Redis available again: counters are shared again")
            self.audit.event("store.recovered", None, store=WHAT)

    async def _run(self, name: str, keys: list[str], args: list[Any], *, retry: bool = False) -> Any:
        """The script's answer, or None while Redis is unavailable. `retry`: ask Redis even within
        RETRY_SECONDS of a failure (a decision that would otherwise be refused)."""
        if self._client is None or (not retry and time.monotonic() < self._retry_at):
            return None
        try:
            result = await self._scripts[name](keys=keys, args=args)
        except Exception as exc:  # ConnectionError, TimeoutError, a Redis refusing AUTH or loading
            from redis.exceptions import RedisError

            if not isinstance(exc, (RedisError, OSError, asyncio.TimeoutError)):
                raise
            self._down(exc)
            return None
        self._up()
        return result

    # -- rate limits ---------------------------------------------------------------------------

    async def hit(self, key: str, *, limit: int, now: float | None = None) -> Decision:
        window_ms = round(self.limiter.window * 1000)
        found = await self._run("hit", [f"{PREFIX}rate:{key}"], [_ms(now), limit, window_ms])
        if found is None:
            return self.limiter.hit(key, limit=limit, now=now)
        return self._decision(found, limit)

    async def charge(
        self, ip: IPAddress | str, key: str, *, limit: int, now: float | None = None
    ) -> tuple[float, Decision | None]:
        if (held := self.lockout.locked(ip, now=now)) > 0:  # one tripped here during an outage holds
            return held, None
        window_ms = round(self.limiter.window * 1000)
        keys = [self._lockout_keys(ip)[2], f"{PREFIX}rate:{key}"]
        found = await self._run("charge", keys, [_ms(now), limit, window_ms])
        if found is None:
            return 0.0, self.limiter.hit(key, limit=limit, now=now)
        if int(found[0]) < 0:
            left = int(found[1]) / 1000
            self.lockout.hold(ip, left, now=now)
            return left, None
        return 0.0, self._decision(found, limit)

    def _decision(self, found: list[Any], limit: int) -> Decision:
        """A Decision from _HIT's answer: the memory limiter's own arithmetic on the shared bucket."""
        allowed, elapsed_ms, previous, current = (int(v) for v in found)
        w, elapsed = self.limiter.window, elapsed_ms / 1000
        used = previous * (1 - elapsed / w) + current
        reset = max(1, _ceil(w - elapsed))
        if not allowed:
            wait = self.limiter._wait(_Bucket(0.0, previous, current), elapsed, limit)
            return Decision(False, limit, 0, reset, max(1, _ceil(wait)))
        return Decision(True, limit, max(0, math.floor(limit - used - 1)), reset, 0)

    # -- the lockout -------------------------------------------------------------------------

    def _lockout_keys(self, ip: IPAddress | str) -> list[str]:
        base = f"{PREFIX}lockout:{{{address_key(ip)}}}"  # one hash slot for the three
        return [f"{base}:failures", f"{base}:marks", f"{base}:until"]

    def _mark(self, credential: str) -> str:
        raw = credential.encode("utf-8", "surrogateescape")
        return hashlib.blake2b(raw, digest_size=8, key=self._mark_key).hexdigest()

    async def failed(
        self, ip: IPAddress | str, credential: str | None = None, *, now: float | None = None
    ) -> bool:
        lockout = self.lockout
        args = [
            _ms(now),
            round(lockout.window * 1000),
            round(lockout.lockout * 1000),
            lockout.max_failures,
            "" if credential is None else self._mark(credential),
        ]
        found = await self._run("failed", self._lockout_keys(ip), args)
        if found is None:
            return lockout.failed(ip, credential, now=now)
        if found:
            lockout.hold(ip, lockout.lockout, now=now)  # known here too, should Redis go away
        return bool(found)

    async def locked(self, ip: IPAddress | str, *, now: float | None = None, strict: bool = False) -> float:
        found = await self._run("locked", self._lockout_keys(ip)[2:], [_ms(now)], retry=strict)
        if found is None:
            if strict:
                if self._throttle.allow("refused"):
                    self.audit.event(
                        "store.unavailable", None, store=WHAT, refused="sign-in", error=self.health.error
                    )
                raise Unavailable("sign-in")
            return self.lockout.locked(ip, now=now)
        left = int(found) / 1000
        if left > 0:
            self.lockout.hold(ip, left, now=now)
            return left
        return self.lockout.locked(ip, now=now)  # one tripped here during an outage still holds

    async def reset(self, ip: IPAddress | str) -> None:
        self.lockout.reset(ip)
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.delete(*self._lockout_keys(ip))

    # -- streams -------------------------------------------------------------------------------

    def _stream_key(self, budget: str) -> str:
        return f"{PREFIX}streams:{budget}"

    async def acquire(self, key: str) -> bool:
        stream = secrets.token_hex(8)
        args = ["", self.streams.limit, round(self.stream_ttl * 1000), stream]
        found = await self._run("acquire", [self._stream_key(key)], args)
        if found is None:
            if not self.streams.acquire(key):
                return False
            stream = _LOCAL
        elif not found:
            return False
        self._open.setdefault(key, []).append(stream)
        return True

    async def release(self, key: str) -> None:
        ids = self._open.get(key)
        if not ids:
            return
        stream = ids.pop()
        if not ids:
            del self._open[key]
        if stream == _LOCAL:
            self.streams.release(key)
        elif self._client is not None and time.monotonic() >= self._retry_at:
            # Not refreshed any more, it stops counting within stream_ttl even if this fails.
            with contextlib.suppress(Exception):
                await self._client.zrem(self._stream_key(key), stream)

    async def open(self, key: str) -> int:
        found = await self._run("open", [self._stream_key(key)], [""])
        return self.streams.open(key) if found is None else int(found)
