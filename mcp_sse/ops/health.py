"""Liveness and the backend list."""

from __future__ import annotations

from aiohttp import web

from .. import __version__
from ..state import BACKENDS

__all__ = ["health", "servers"]


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


async def servers(request: web.Request) -> web.Response:
    return web.json_response({"servers": [b.status() for b in request.app[BACKENDS].values()]})
