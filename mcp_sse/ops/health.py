"""Health and the backend list.

/health tells the truth about the backends, in its status code as well as its body, because a
load balancer or an orchestrator reads only the code:

- 200 `ok`: every backend is up, or on its way (starting, restarting after a crash: the
  supervisor is on it, and a caller waits for it).
- 200 `degraded`: some backends are `failed` (named in `failed`) or have their circuit open (named
  in `circuit_open`: every call fails fast until it half-opens); the others still serve, so the
  instance stays in rotation.
- 503 `down`: every backend (or the only one) is `failed` or open: nothing can be served until a
  reload (SIGHUP), a restart or the circuit's timeout gives them a fresh start, so traffic should go
  elsewhere.

systemd itself does not read /health (its watchdog is fed from the event loop, see sd_notify.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, NamedTuple

from aiohttp import web

from .. import __version__
from ..state import BACKENDS
from ..store.redis import redis_status
from ..upstream.breaker import OPEN, CircuitBreaker

if TYPE_CHECKING:
    from ..upstream.backend import Backend

__all__ = ["DEGRADED", "DOWN", "OK", "Assessment", "assess", "health", "public_health", "servers"]

OK: Final = "ok"
DEGRADED: Final = "degraded"
DOWN: Final = "down"


class Assessment(NamedTuple):
    code: int
    """The HTTP status."""
    status: str
    failed: list[str]
    """Backends whose supervisor gave up."""
    circuit_open: list[str]
    """Backends whose circuit is open (a failed one is named in `failed` only)."""


def _open(backend: Backend) -> bool:
    # Half-open is not down: trial calls are going through.
    return isinstance(backend, CircuitBreaker) and backend.current() == OPEN


def assess(backends: dict[str, Backend]) -> Assessment:
    """What /health says about these backends; an open circuit counts as down, as failed does."""
    failed = sorted(name for name, backend in backends.items() if backend.state == "failed")
    circuit_open = sorted(n for n, b in backends.items() if n not in failed and _open(b))
    down = len(failed) + len(circuit_open)
    if not down:
        return Assessment(200, OK, [], [])
    if down == len(backends):
        return Assessment(503, DOWN, failed, circuit_open)
    return Assessment(200, DEGRADED, failed, circuit_open)


def _with_redis(app: web.Application, found: Assessment) -> tuple[Assessment, str | None]:
    """With REDIS_URL, Redis down makes an instance `degraded` (it still serves, counting alone)."""
    redis = redis_status(app)
    if redis == DOWN and found.status == OK:
        found = found._replace(status=DEGRADED)
    return found, redis


async def health(request: web.Request) -> web.Response:
    found, redis = _with_redis(request.app, assess(request.app[BACKENDS]))
    body: dict[str, object] = {"status": found.status, "version": __version__}
    if redis is not None:
        body["redis"] = redis
    if found.failed:
        body["failed"] = found.failed
    if found.circuit_open:
        body["circuit_open"] = found.circuit_open
    return web.json_response(body, status=found.code)


def public_health(app: web.Application) -> web.Response:
    """The bare answer for a caller without a key (HEALTH_PUBLIC=true): the same status and code as
    /health, but no version and no backend names, which are for authenticated callers only."""
    found, _ = _with_redis(app, assess(app[BACKENDS]))
    return web.json_response({"status": found.status}, status=found.code)


async def servers(request: web.Request) -> web.Response:
    return web.json_response({"servers": [b.status() for b in request.app[BACKENDS].values()]})
