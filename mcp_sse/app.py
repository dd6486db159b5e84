"""create_app(settings): the ordered middleware pipeline, the routes, and the lifecycle. Nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Final

from aiohttp import web

from .gateway import Gateway
from .ops.health import health, servers
from .protocol.session import SessionStore
from .security.auth import bearer_auth
from .security.errors import error_middleware
from .settings import GATEWAY_SECRETS, Settings, read_env_file
from .state import BACKENDS, SESSIONS, TASKS, TRANSPORT, TransportSettings
from .transport.legacy_sse import LegacySSE
from .transport.streamable import StreamableHTTP
from .upstream.backend import Backend, StdioBackend
from .upstream.builtin import BuiltinBackend
from .upstream.config import load_servers
from .upstream.default import default_toolset

__all__ = ["build_backends", "create_app"]

log = logging.getLogger("mcp_sse")

REAP_INTERVAL: Final = 30.0


def build_backends(
    settings: Settings, environ: Mapping[str, str], env_file: Path | None = None
) -> dict[str, Backend]:
    backends: dict[str, Backend] = {}
    if settings.servers_file is None:
        toolset = default_toolset(lambda: {"backends": [b.status() for b in backends.values()]})
        backends[toolset.name] = BuiltinBackend(toolset)
        return backends
    # Backends see the environment and `.env` (their API keys), never the gateway's own secrets.
    merged = {**(read_env_file(env_file) if env_file else {}), **environ}
    base_env = {k: v for k, v in merged.items() if k not in GATEWAY_SECRETS}
    for spec in load_servers(settings.servers_file, merged):
        backends[spec.name] = StdioBackend(spec, max_line=settings.max_line, base_env=base_env)
    return backends


def _add_mcp_routes(app: web.Application, prefix: str, gateway: Gateway) -> None:
    legacy = LegacySSE(gateway, f"{prefix}/messages")
    streamable = StreamableHTTP(gateway)
    app.router.add_get(f"{prefix}/sse", legacy.stream)
    app.router.add_post(f"{prefix}/messages", legacy.post)
    # Both spellings are served: a redirect from /mcp to /mcp/ breaks POSTing clients.
    for path in (f"{prefix}/mcp", f"{prefix}/mcp/"):
        app.router.add_post(path, streamable.post)
        app.router.add_get(path, streamable.get, allow_head=False)
        app.router.add_delete(path, streamable.delete)


def create_app(
    settings: Settings,
    *,
    environ: Mapping[str, str] | None = None,
    env_file: Path | None = None,
    backends: dict[str, Backend] | None = None,
) -> web.Application:
    if settings.auth_token is None:
        raise ValueError("create_app needs settings.auth_token; the CLI generates one for loopback runs")
    if backends is None:
        backends = build_backends(settings, os.environ if environ is None else environ, env_file)
    # Outermost first: reading this list is reading the path of every request.
    middlewares = [
        error_middleware(),
        bearer_auth(token=settings.auth_token),
    ]
    app = web.Application(middlewares=middlewares, client_max_size=settings.max_body)
    app[SESSIONS] = SessionStore(
        max_sessions=settings.max_sessions,
        idle_timeout=settings.session_idle,
        buffer_size=settings.event_buffer,
    )
    app[TRANSPORT] = TransportSettings(keepalive=settings.keepalive, max_body=settings.max_body)
    app[TASKS] = set()
    app[BACKENDS] = backends

    app.router.add_get("/health", health)
    app.router.add_get("/mcp/servers", servers)
    if len(backends) == 1:
        _add_mcp_routes(app, "", Gateway(next(iter(backends.values())), name=next(iter(backends))))
    for name, backend in backends.items():
        _add_mcp_routes(app, f"/servers/{name}", Gateway(backend, name=name))

    app.cleanup_ctx.append(_backends_lifecycle)
    app.cleanup_ctx.append(_session_reaper)
    app.on_shutdown.append(_close_streams)
    return app


async def _backends_lifecycle(app: web.Application) -> AsyncIterator[None]:
    for backend in app[BACKENDS].values():
        await backend.start()
    yield
    await asyncio.gather(*(b.stop() for b in app[BACKENDS].values()), return_exceptions=True)


async def _session_reaper(app: web.Application) -> AsyncIterator[None]:
    async def reap() -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL)
            if expired := app[SESSIONS].expire_idle():
                log.info("closed %d idle sessions", expired)

    task = asyncio.create_task(reap())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _close_streams(app: web.Application) -> None:
    # Ending every session finishes its streams, so open SSE handlers return and shutdown can proceed.
    app[SESSIONS].close_all()
    pending = app[TASKS].copy()
    if pending:
        _, still = await asyncio.wait(pending, timeout=5.0)
        for task in still:
            task.cancel()
