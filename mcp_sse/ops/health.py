"""Health and the backend list.

/health tells the truth about the backends, in its status code as well as its body, because a
load balancer or an orchestrator reads only the code:

- 200 `ok`: every backend is up, or on its way (starting, restarting after a crash: the
  supervisor is on it, and a caller waits for it).
- 200 `degraded`: some backends are `failed` (named in `failed`); the others still serve, so the
  instance stays in rotation.
- 503 `down`: every backend (or the only one) is `failed`: nothing can be served until a reload
  (SIGHUP) or a restart gives them a fresh start, so traffic should go elsewhere.

systemd itself does not read /health (its watchdog is fed from the event loop, see sd_notify.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from aiohttp import web

from .. import __version__
from ..state import BACKENDS

if TYPE_CHECKING:
    from ..upstream.backend import Backend

__all__ = ["DEGRADED", "DOWN", "OK", "assess", "health", "public_health", "servers"]

OK: Final = "ok"
DEGRADED: Final = "degraded"
DOWN: Final = "down"


def assess(backends: dict[str, Backend]) -> tuple[int, str, list[str]]:
    """(HTTP status, health status, names of the failed backends) for these backends."""
    failed = sorted(name for name, backend in backends.items() if backend.state == "failed")
    if not failed:
        return 200, OK, []
    if len(failed) == len(backends):
        return 503, DOWN, failed
    return 200, DEGRADED, failed


async def health(request: web.Request) -> web.Response:
    code, status, failed = assess(request.app[BACKENDS])
    body: dict[str, object] = {"status": status, "version": __version__}
    if failed:
        body["failed"] = failed
    return web.json_response(body, status=code)


def public_health(app: web.Application) -> web.Response:
    """The bare answer for a caller without a key (HEALTH_PUBLIC=true): the same status and code as
    /health, but no version and no backend names, which are for authenticated callers only."""
    code, status, _ = assess(app[BACKENDS])
    return web.json_response({"status": status}, status=code)


async def servers(request: web.Request) -> web.Response:
    return web.json_response({"servers": [b.status() for b in request.app[BACKENDS].values()]})
