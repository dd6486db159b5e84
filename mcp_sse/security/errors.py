"""The outermost layer: no exception ever reaches a client as a stack trace."""

from __future__ import annotations

import json
import logging
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

__all__ = ["REALM", "error_middleware", "forbidden", "unauthorized"]

log = logging.getLogger("mcp_sse")
REALM: Final = 'Bearer realm="mcp-sse"'


def unauthorized(reason: str) -> web.HTTPUnauthorized:
    return web.HTTPUnauthorized(
        text=json.dumps({"error": reason}),
        content_type="application/json",
        headers={"WWW-Authenticate": REALM},
    )


def forbidden(reason: str) -> web.HTTPForbidden:
    return web.HTTPForbidden(text=json.dumps({"error": reason}), content_type="application/json")


def error_middleware() -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except Exception:
            # The trace goes to the server log; the client learns only that it was not its fault.
            log.exception("unhandled error on %s %s", request.method, request.path)
            return web.json_response({"error": "internal server error"}, status=500)

    return middleware
