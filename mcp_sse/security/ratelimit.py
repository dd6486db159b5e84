"""Rate limits: requests per client and per key, failed logins per client, open streams per key.

Two budgets on one window: an address pays for what arrives without credentials and for every
failed credential (RATE_LIMIT_MAX_REQUESTS, the security guide's 100 per 15 minutes); an
authenticated request is counted against its key instead (KEY_RATE_LIMIT_MAX_REQUESTS, or the
key's own `rate_limit`), so a flood from an address never throttles the keys used there.

The classes here are the memory engine: per process, and bounded: at most `max_keys` keys are
tracked and the least recently seen is forgotten first, so a flood of new addresses costs a fixed
amount of memory (it can at worst reset the count of an idle client, never grow without end).
IPv6 clients are counted per /64: one subscriber usually holds a whole /64, and counting
single addresses would give them 2**64 budgets.

With REDIS_URL every instance counts in one place: `Counters` is the protocol both engines keep
(`MemoryCounters` here, the reference in tests; `store/redis_counters.py`), and the middlewares
take one as `shared`. Without it they call the memory classes directly, synchronously, as before:
no await and no Redis code on the hot path of a single process.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import json
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Final, NamedTuple, Protocol

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ..state import CLIENT_IP, IPAddress
from .audit import AuditLog
from .cors import is_preflight

__all__ = [
    "LOCKED_OUT",
    "LOCKOUT_DEFERRED",
    "MAX_KEYS",
    "Counters",
    "Decision",
    "FailureLockout",
    "LockedOut",
    "LogThrottle",
    "MemoryCounters",
    "RateLimiter",
    "StreamCounter",
    "address_key",
    "fingerprint",
    "install_rate_limit_headers",
    "ip_rate_limit_middleware",
    "lockout_refusal",
    "rate_limit_headers",
    "rate_limit_middleware",
]

MAX_KEYS: Final = 100_000
TOO_MANY: Final = "Too many requests, retry later"
LOCKED: Final = "Too many failed authentication attempts from your address, retry later"
_FINGERPRINT_KEY: Final = secrets.token_bytes(16)


@functools.lru_cache(maxsize=4096)
def address_key(ip: IPAddress | str) -> str:
    """The unit a client is counted in: an IPv4 address, or an IPv6 /64."""
    try:
        address = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    except ValueError:
        return str(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is None:
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else address)


def _ceil(seconds: float) -> int:
    # Rounded first: (t + 900.0) - t on a large monotonic clock is 900.0000000001, not 901 seconds.
    return math.ceil(round(seconds, 6))


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value!r}")


class Decision(NamedTuple):  # a tuple: made on every request, and cheaper than a frozen dataclass
    allowed: bool
    limit: int
    remaining: int
    reset_seconds: int
    """Seconds until the current window ends and its count starts to fade."""
    retry_after: int
    """Seconds to wait before a request would be allowed; 0 when this one was."""


@dataclass(slots=True)
class _Bucket:
    start: float
    previous: int = 0
    current: int = 0


class RateLimiter:
    """Sliding-window counter (as Cloudflare's): the previous window's count, weighted by how much
    of it still overlaps the last `window` seconds, plus the current window's count.

    Smooth like a sliding log, two integers per key like a fixed window, and no burst of 2x the
    limit across a window edge. Refused hits are not counted, so Retry-After stays true.
    """

    def __init__(
        self, *, window_ms: int = 900_000, max_requests: int = 100, max_keys: int = MAX_KEYS
    ) -> None:
        if isinstance(window_ms, bool) or not isinstance(window_ms, int) or window_ms < 1000:
            raise ValueError(f"RATE_LIMIT_WINDOW_MS must be a whole number >= 1000, got {window_ms!r}")
        if isinstance(max_requests, bool) or not isinstance(max_requests, int) or max_requests < 1:
            raise ValueError(f"RATE_LIMIT_MAX_REQUESTS must be a whole number >= 1, got {max_requests!r}")
        _positive("max_keys", max_keys)
        self.window = window_ms / 1000
        self.limit = max_requests
        self.max_keys = max_keys
        # The IETF draft's policy: quota q per window w (whole seconds). Per-key limits share the window.
        self.policy = f'"default";q={max_requests};w={math.ceil(self.window)}'
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def _prune(self, now: float) -> None:
        # Least recently hit first; a bucket untouched for two windows counts nothing.
        while self._buckets:
            bucket = next(iter(self._buckets.values()))
            if now - bucket.start < 2 * self.window:
                break
            self._buckets.popitem(last=False)

    def _bucket(self, key: str, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            while len(self._buckets) >= self.max_keys:
                self._buckets.popitem(last=False)
            bucket = self._buckets[key] = _Bucket(start=now)
            return bucket
        self._buckets.move_to_end(key)
        elapsed = now - bucket.start
        if elapsed >= 2 * self.window:
            bucket.start, bucket.previous, bucket.current = now, 0, 0
        elif elapsed >= self.window:
            bucket.start, bucket.previous, bucket.current = bucket.start + self.window, bucket.current, 0
        return bucket

    def _wait(self, bucket: _Bucket, now: float, limit: int) -> float:
        """Seconds until one more request fits under `limit`, if nobody else hits meanwhile."""
        w, elapsed = self.window, now - bucket.start
        room = limit - 1 - bucket.current
        if room >= 0 and bucket.previous > 0:
            # Still in this window: wait until the previous window's weight has faded enough.
            wait = w * (1 - room / bucket.previous) - elapsed
            if wait < w - elapsed:
                return max(0.0, wait)
        # In the next window the current count becomes the fading one.
        fade = w * (1 - (limit - 1) / bucket.current) if bucket.current > 0 else 0.0
        return (w - elapsed) + max(0.0, fade)

    def hit(self, key: str, *, limit: int | None = None, now: float | None = None) -> Decision:
        """Count one request for `key` if it fits under `limit` (default: the limiter's own)."""
        now = time.monotonic() if now is None else now
        limit = self.limit if limit is None else limit
        self._prune(now)
        bucket = self._bucket(key, now)
        weight = 1 - (now - bucket.start) / self.window
        used = bucket.previous * weight + bucket.current
        reset = max(1, _ceil(bucket.start + self.window - now))
        if used + 1 > limit:
            retry = max(1, _ceil(self._wait(bucket, now, limit)))
            return Decision(False, limit, 0, reset, retry)
        bucket.current += 1
        remaining = max(0, math.floor(limit - used - 1))
        return Decision(True, limit, remaining, reset, 0)


class LogThrottle:
    """At most one audit line per key every `seconds` for a repeated event: a flood of refused
    requests must not become a flood of log lines that fills the disk (CWE-779)."""

    def __init__(self, *, seconds: float = 60, max_keys: int = MAX_KEYS) -> None:
        _positive("seconds", seconds)
        _positive("max_keys", max_keys)
        self.seconds, self.max_keys = seconds, max_keys
        self._quiet_until: OrderedDict[str, float] = OrderedDict()  # oldest first

    def allow(self, key: str, *, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        table = self._quiet_until
        while table and next(iter(table.values())) <= now:
            table.popitem(last=False)  # quiet periods end in the order they began
        if key in table:
            return False
        table[key] = now + self.seconds
        if len(table) > self.max_keys:
            table.popitem(last=False)
        return True


def fingerprint(credential: str) -> int:
    """64 bits of a keyed hash of a presented credential: enough to tell a repeat from a new guess.

    Keyed with a secret of this process, so nobody can pick two different guesses that count as one.
    """
    raw = credential.encode("utf-8", "surrogateescape")
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8, key=_FINGERPRINT_KEY).digest(), "big")


class _Failures(NamedTuple):
    start: float
    seen: tuple[int, ...]
    """Fingerprints of the distinct credentials that failed (fewer than max_failures)."""
    unseen: int
    """Failures whose credential this layer cannot see (a token in a login's body): each counts."""


class FailureLockout:
    """After `max_failures` distinct failed credentials from one client within `window` seconds,
    refuse that client for `lockout_seconds` (OWASP Authentication Cheat Sheet: throttle guessing).

    Distinct, because the same wrong credential sent again teaches a guesser nothing new, while
    it is exactly what a stale client does: an mcp-remote launched with the token of an earlier
    run retries it, and counting each retry locked every other client of the address out (the
    default loopback run makes a new token at each start, and all local clients share 127.0.0.1).
    """

    def __init__(
        self,
        *,
        max_failures: int = 10,
        window_seconds: float = 900.0,
        lockout_seconds: float = 900.0,
        max_keys: int = MAX_KEYS,
    ) -> None:
        _positive("AUTH_LOCKOUT_FAILURES", max_failures)
        _positive("window_seconds", window_seconds)
        _positive("AUTH_LOCKOUT_SECONDS", lockout_seconds)
        _positive("max_keys", max_keys)
        self.max_failures, self.max_keys = max_failures, max_keys
        self.window, self.lockout = window_seconds, lockout_seconds
        self._failures: OrderedDict[str, _Failures] = OrderedDict()  # least recently failed first
        self._locked: OrderedDict[str, float] = OrderedDict()  # key -> locked until

    @staticmethod
    def _bound(table: OrderedDict[str, float] | OrderedDict[str, _Failures], limit: int) -> None:
        while len(table) > limit:
            table.popitem(last=False)

    def failed(self, ip: IPAddress | str, credential: str | None = None, *, now: float | None = None) -> bool:
        """Count a failed authentication from `ip`; True when this one locks it out.

        `credential` is what the request presented (its Authorization header, its URL token): one
        already counted in this window is not counted again. None (unseen) always counts.
        """
        now = time.monotonic() if now is None else now
        key = address_key(ip)
        entry = self._failures.pop(key, None)
        if entry is None or now - entry.start >= self.window:
            entry = _Failures(now, (), 0)
        if credential is None:
            entry = entry._replace(unseen=entry.unseen + 1)
        elif (mark := fingerprint(credential)) not in entry.seen:
            entry = entry._replace(seen=(*entry.seen, mark))
        if len(entry.seen) + entry.unseen >= self.max_failures:
            self._locked.pop(key, None)
            self._locked[key] = now + self.lockout
            self._bound(self._locked, self.max_keys)
            return True
        self._failures[key] = entry
        self._bound(self._failures, self.max_keys)
        return False

    def locked(self, ip: IPAddress | str, *, now: float | None = None) -> float:
        """Seconds of lockout left for `ip`, 0.0 when it may try again."""
        now = time.monotonic() if now is None else now
        key = address_key(ip)
        until = self._locked.get(key)
        if until is None:
            return 0.0
        if until <= now:
            del self._locked[key]
            return 0.0
        return until - now

    def hold(self, ip: IPAddress | str, seconds: float, *, now: float | None = None) -> None:
        """Lock `ip` out for `seconds` (no fewer than it already has): a lockout learnt elsewhere,
        from the shared store, kept here so that a Redis outage does not lift it."""
        now = time.monotonic() if now is None else now
        key = address_key(ip)
        until = max(now + seconds, self._locked.pop(key, 0.0))
        self._locked[key] = until
        self._bound(self._locked, self.max_keys)

    def reset(self, ip: IPAddress | str) -> None:
        """Forget `ip`'s failures and lockout (after a successful login, or by an operator)."""
        key = address_key(ip)
        self._failures.pop(key, None)
        self._locked.pop(key, None)


class StreamCounter:
    """At most `limit` concurrent streams per key. Only keys with open streams are stored."""

    def __init__(self, limit: int) -> None:
        _positive("limit", limit)
        self.limit = limit
        self._open: dict[str, int] = {}

    def acquire(self, key: str) -> bool:
        count = self._open.get(key, 0)
        if count >= self.limit:
            return False
        self._open[key] = count + 1
        return True

    def release(self, key: str) -> None:
        count = self._open.get(key, 0) - 1
        if count > 0:
            self._open[key] = count
        else:
            self._open.pop(key, None)

    def open(self, key: str) -> int:
        return self._open.get(key, 0)


class Counters(Protocol):
    """The counters several instances must agree on, one engine per store: `MemoryCounters` (this
    process only) or `RedisCounters` (store/redis_counters.py, every instance sharing one Redis).
    Both decide the same way; `now` (seconds) is for tests, each engine has its own clock."""

    async def hit(self, key: str, *, limit: int, now: float | None = None) -> Decision:
        """Count one request for `key` if it fits under `limit` (RateLimiter.hit)."""
        ...

    async def failed(
        self, ip: IPAddress | str, credential: str | None = None, *, now: float | None = None
    ) -> bool:
        """Count a failed credential from `ip`; True when this one locks it out (FailureLockout.failed)."""
        ...

    async def locked(self, ip: IPAddress | str, *, now: float | None = None, strict: bool = False) -> float:
        """Seconds of lockout left for `ip`. `strict`: refuse with a 503 (store/redis_faults.py's
        Unavailable) rather than answer from this process's own knowledge while the shared store is
        unreachable (for a login, which is a guess by its nature)."""
        ...

    async def charge(
        self, ip: IPAddress | str, key: str, *, limit: int, now: float | None = None
    ) -> tuple[float, Decision | None]:
        """`locked(ip)` and, only when that is 0, `hit(key)`, in one decision (one Redis round trip
        for an authenticated call): (seconds of lockout left, None) or (0, the key's decision)."""
        ...

    async def reset(self, ip: IPAddress | str) -> None: ...

    async def acquire(self, key: str) -> bool:
        """Open one more stream for `key` if it has fewer than the limit (StreamCounter.acquire)."""
        ...

    async def release(self, key: str) -> None: ...

    async def open(self, key: str) -> int: ...


class MemoryCounters:
    """The memory engine behind the `Counters` protocol: today's classes, unchanged. The middlewares
    call those directly when nothing is shared; this is the reference the Redis engine is tested against."""

    def __init__(self, limiter: RateLimiter, lockout: FailureLockout, streams: StreamCounter) -> None:
        self.limiter, self.lockout, self.streams = limiter, lockout, streams

    async def hit(self, key: str, *, limit: int, now: float | None = None) -> Decision:
        return self.limiter.hit(key, limit=limit, now=now)

    async def failed(
        self, ip: IPAddress | str, credential: str | None = None, *, now: float | None = None
    ) -> bool:
        return self.lockout.failed(ip, credential, now=now)

    async def locked(self, ip: IPAddress | str, *, now: float | None = None, strict: bool = False) -> float:
        return self.lockout.locked(ip, now=now)  # memory is always available: strict changes nothing

    async def charge(
        self, ip: IPAddress | str, key: str, *, limit: int, now: float | None = None
    ) -> tuple[float, Decision | None]:
        if (left := self.lockout.locked(ip, now=now)) > 0:
            return left, None
        return 0.0, self.limiter.hit(key, limit=limit, now=now)

    async def reset(self, ip: IPAddress | str) -> None:
        self.lockout.reset(ip)

    async def acquire(self, key: str) -> bool:
        return self.streams.acquire(key)

    async def release(self, key: str) -> None:
        self.streams.release(key)

    async def open(self, key: str) -> int:
        return self.streams.open(key)


class _Quota(NamedTuple):
    decision: Decision
    policy: str


_QUOTA: Final[web.RequestKey[_Quota]] = web.RequestKey("rate_limit_quota")

LOCKED_OUT: Final[web.RequestKey[float]] = web.RequestKey("locked_out")
"""Set on a request that presented a credential from a locked-out address: the seconds left.
Authentication must then admit it only on a credential no guess can produce, and refuse anything
else with `lockout_refusal` (see `security/auth.py`)."""


LOCKOUT_DEFERRED: Final[web.RequestKey[bool]] = web.RequestKey("lockout_deferred")
"""Set, with a shared engine, on a request presenting a key credential (not a login): the rate-limit
layer leaves its address's lockout to authentication, which asks it with the key's charge in one
call (`Counters.charge`). So an authenticated call costs one Redis round trip, not two. Whatever
ends in a 401 still has the lockout asked first, so a locked address learns nothing either way."""


class LockedOut(web.HTTPTooManyRequests):
    """The answer to a locked-out address: the same whatever was presented, right or wrong."""


def lockout_refusal(seconds: float) -> LockedOut:
    return LockedOut(
        text=json.dumps({"error": LOCKED}),
        content_type="application/json",
        headers={"Retry-After": str(max(1, _ceil(seconds)))},
    )


def rate_limit_headers(decision: Decision, policy: str) -> dict[str, str]:
    """IETF draft-ietf-httpapi-ratelimit-headers (structured fields) plus the legacy X- trio."""
    name = policy.partition(";")[0]  # the limit names the policy it counts against ("key" or "default")
    return {
        "RateLimit-Policy": policy,
        "RateLimit": f"{name};r={decision.remaining};t={decision.reset_seconds}",
        "X-RateLimit-Limit": str(decision.limit),
        "X-RateLimit-Remaining": str(decision.remaining),
        # Epoch seconds, as GitHub and express-rate-limit's legacy headers send it.
        "X-RateLimit-Reset": str(math.ceil(time.time()) + decision.reset_seconds),
    }


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    quota = request.get(_QUOTA)
    if quota is not None and "RateLimit" not in response.headers:  # a 429 carries its own already
        response.headers.extend(rate_limit_headers(quota.decision, quota.policy))


def install_rate_limit_headers(app: web.Application) -> None:
    """Register the prepare hook that puts the rate-limit headers on every response: ordinary,
    streamed (SSE) and errors alike. The middlewares count; this hook is what tells the client."""
    app.on_response_prepare.append(_on_prepare)


def _client_ip(request: web.Request) -> IPAddress:
    ip: IPAddress | None = request.get(CLIENT_IP)
    if ip is None:
        raise RuntimeError("the rate limit middleware needs client_ip_middleware before it in the pipeline")
    return ip


def _client_key(request: web.Request) -> str:
    return f"ip:{address_key(_client_ip(request))}"


def _presented(request: web.Request) -> str | None:
    """The key credential this request presented, as sent: its Authorization header or URL token.

    Only a request that tried one (or a login) counts towards a lockout. A client configured
    without a token (or probing OAuth discovery) gets 401s too, and locking it out would only
    lock out the user who then adds the right token. A cookie is not counted either: it is
    Fernet-encrypted, there is nothing in it to guess.
    """
    header = request.headers.get("Authorization")
    if header is not None:
        return header
    query = request.query
    return query.get("access_token", query.get("token"))


def _has_cookie(request: web.Request) -> bool:
    return any(name in request.cookies for name in ("__Host-mcp-sse", "mcp-sse"))


def charge_key(
    request: web.Request, limiter: RateLimiter, key: str, limit: int, decision: Decision | None = None
) -> None:
    """Count an authenticated request against its key; 429 with the key's quota when over it.
    `decision`: already made by a shared engine (`Counters.hit(key_budget(key), ...)`)."""
    if decision is None:
        decision = limiter.hit(f"key:{key}", limit=limit)
    policy = _key_policy(limit, limiter.window)
    request[_QUOTA] = _Quota(decision, policy)
    if not decision.allowed:
        headers = rate_limit_headers(decision, policy)
        raise _too_many(TOO_MANY, {**headers, "Retry-After": str(decision.retry_after)})


def key_budget(key: str) -> str:
    """The limiter key an authenticated caller is counted under."""
    return f"key:{key}"


@functools.lru_cache(maxsize=256)
def _key_policy(limit: int, window: float) -> str:
    return f'"key";q={limit};w={math.ceil(window)}'


def _too_many(error: str, headers: dict[str, str]) -> web.HTTPTooManyRequests:
    return web.HTTPTooManyRequests(
        text=json.dumps({"error": error}), content_type="application/json", headers=headers
    )


def ip_rate_limit_middleware(
    *,
    limiter: RateLimiter,
    audit: AuditLog,
    lockout: FailureLockout | None = None,
    key_func: Callable[[web.Request], str] | None = None,
    login_paths: Collection[str] = ("/auth/login",),
    probe_paths: Collection[str] = (),
    shared: Counters | None = None,
) -> Middleware:
    """Per-client request limit on a shared `limiter` (keys "ip:<address>"), and the failed-login lockout.

    With a `lockout`, a 401 to a request that presented a credential (Authorization header,
    URL token, or any request to one of `login_paths`) counts as a failure of its client address,
    once per distinct credential. A locked-out address is answered 429 with Retry-After until
    the lockout ends: at once for a request without a credential and for a login; a request
    with a credential goes on marked `LOCKED_OUT` for authentication to admit or refuse (the
    owner's credentials that no guess can produce pass, see `security/auth.py`), and a 401
    below becomes the same 429. So a locked address learns nothing from any guess.

    Preflights are not counted: a browser sends one before most requests, which would halve
    its budget; they are cheap, answered without reaching a backend, and cached (Max-Age).
    Nor are keyless GETs of `probe_paths` (a public /health): a load balancer probing every few
    seconds would spend the address's 100 per 15 minutes and take the instance out of rotation,
    and the answer is a constant, reaching no backend; the connection cap still bounds them.

    `shared`: the engine every instance counts in (REDIS_URL), in place of `limiter` and `lockout`
    (which it falls back to while Redis is unreachable); None keeps the synchronous memory path.
    """
    key_of = key_func or _client_key
    logins = frozenset(login_paths)
    probes = frozenset(probe_paths)
    throttle = LogThrottle()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if is_preflight(request):
            return await handler(request)
        presented = _presented(request)
        login = request.path in logins
        if lockout is None:
            left = 0.0
        elif shared is None:
            left = lockout.locked(_client_ip(request))
        elif presented is not None and not login:
            left, request[LOCKOUT_DEFERRED] = 0.0, True  # asked by authentication (LOCKOUT_DEFERRED)
        else:
            left = await shared.locked(_client_ip(request), strict=login)
        if left > 0:
            admissible = not login and (presented is not None or _has_cookie(request))
            return await _locked(request, handler, left, admissible)
        # Authenticated requests are counted against their key (in authentication); the
        # address pays for what arrives without credentials and for every failed credential.
        # The RateLimit headers are added by install_rate_limit_headers' hook, on every response.
        credential = presented is not None or login or _has_cookie(request)
        if not credential and not (request.method == "GET" and request.path in probes):
            key = key_of(request)
            decision = limiter.hit(key) if shared is None else await shared.hit(key, limit=limiter.limit)
            _charge(request, key, decision)
        try:
            return await handler(request)
        except LockedOut as exc:  # authentication found the address locked (LOCKOUT_DEFERRED)
            _audit_locked(request, float(exc.headers["Retry-After"]))
            raise
        except web.HTTPException as exc:
            if exc.status == 401:
                if (
                    shared is not None
                    and request.get(LOCKOUT_DEFERRED)
                    and (left := await shared.locked(_client_ip(request))) > 0
                ):
                    # As _locked answers it: not a failure, the lockout already holds.
                    _audit_locked(request, left)
                    raise lockout_refusal(left) from None
                if lockout is not None and (presented is not None or login):
                    ip = _client_ip(request)
                    tripped = (
                        lockout.failed(ip, presented)
                        if shared is None
                        else await shared.failed(ip, presented)
                    )
                    if tripped:
                        audit.event(
                            "auth.locked", request, failures=lockout.max_failures, seconds=lockout.lockout
                        )
                if credential:
                    key = key_of(request)
                    decision = (
                        limiter.hit(key) if shared is None else await shared.hit(key, limit=limiter.limit)
                    )
                    _charge(request, key, decision)
            raise

    async def _locked(
        request: web.Request, handler: Handler, left: float, admissible: bool
    ) -> web.StreamResponse:
        try:
            # Nothing without a credential can be the owner's, and a login is a guess by its nature.
            if not admissible:
                raise lockout_refusal(left)
            request[LOCKED_OUT] = left
            try:
                return await handler(request)
            except web.HTTPException as exc:
                if exc.status == 401:  # a wrong token, a dead cookie: refused as any other guess
                    raise lockout_refusal(left) from None
                raise
        except LockedOut:
            # Neither counted as failures nor against the address: the lockout already holds.
            _audit_locked(request, left)
            raise

    def _audit_locked(request: web.Request, left: float) -> None:
        if throttle.allow(f"locked:{_client_key(request)}"):
            audit.event("auth.locked", request, retry_after=max(1, _ceil(left)))

    def _charge(request: web.Request, key: str, decision: Decision) -> None:
        request[_QUOTA] = _Quota(decision, limiter.policy)
        if not decision.allowed:
            if throttle.allow(f"limited:{key}"):
                audit.event("rate_limited", request, scope="ip", retry_after=decision.retry_after)
            headers = rate_limit_headers(decision, limiter.policy)
            raise _too_many(TOO_MANY, {**headers, "Retry-After": str(decision.retry_after)})

    return middleware


def rate_limit_middleware(
    *,
    window_ms: int = 900_000,
    max_requests: int = 100,
    audit: AuditLog,
    key_func: Callable[[web.Request], str] | None = None,
) -> Middleware:
    """At most `max_requests` per `window_ms` per client address (or per `key_func(request)`), on a limiter
    of its own. `ip_rate_limit_middleware` is the same with a shared limiter and the failure lockout."""
    limiter = RateLimiter(window_ms=window_ms, max_requests=max_requests)
    return ip_rate_limit_middleware(limiter=limiter, audit=audit, key_func=key_func)
