"""A request id per request: in `request[REQUEST_ID]`, in every audit line, and in `X-Request-Id`.

Two parts, both needed:
- `request_id_middleware()` goes in the middleware list (early, right after the error layer)
  and sets `request[REQUEST_ID]`;
- `install_request_id(app)` registers the `on_response_prepare` hook that writes the
  `X-Request-Id` response header. A middleware cannot add headers to an SSE response (it is
  already prepared when the handler returns), nor to an HTTPException raised past it; the
  prepare signal sees every response, streamed or not.
"""

from __future__ import annotations

import re
import secrets
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ..state import REQUEST_ID

__all__ = ["HEADER", "install_request_id", "new_request_id", "request_id_middleware"]

HEADER: Final = "X-Request-Id"
# An inbound id (from a proxy or the client) is kept only when it cannot carry anything but an id:
# no spaces, quotes or control characters to smuggle into logs or header values.
_VALID: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")


def new_request_id() -> str:
    return secrets.token_hex(8)


def request_id_middleware() -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        inbound = request.headers.get(HEADER)
        request[REQUEST_ID] = inbound if inbound and _VALID.fullmatch(inbound) else new_request_id()
        return await handler(request)

    return middleware


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    request_id = request.get(REQUEST_ID)
    if request_id is not None:
        response.headers[HEADER] = request_id


def install_request_id(app: web.Application) -> None:
    """Register the prepare hook that echoes the id in `X-Request-Id` (the middleware is separate)."""
    app.on_response_prepare.append(_on_prepare)
