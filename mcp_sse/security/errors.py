"""The outermost layer: no exception ever reaches a client as a stack trace."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

__all__ = ["error_middleware"]

log = logging.getLogger("mcp_sse")


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
