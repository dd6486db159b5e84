"""Bearer-token authentication: who is calling, decided before any route runs."""

from __future__ import annotations

import hashlib
import hmac
import json

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ..settings import Secret
from ..state import IDENTITY

__all__ = ["bearer_auth"]

REALM = 'Bearer realm="mcp-sse"'


def _unauthorized(reason: str) -> web.HTTPUnauthorized:
    return web.HTTPUnauthorized(
        text=json.dumps({"error": reason}),
        content_type="application/json",
        headers={"WWW-Authenticate": REALM},
    )


def bearer_auth(*, token: Secret) -> Middleware:
    expected = hashlib.sha256(token.reveal().encode()).digest()
    # The identity is a digest prefix of the token: stable, loggable, and not the secret.
    identity = "token:" + hashlib.sha256(b"mcp-sse-id:" + token.reveal().encode()).hexdigest()[:12]

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise _unauthorized("missing bearer token")
        digest = hashlib.sha256(presented.strip().encode()).digest()
        # Comparing digests of equal length keeps the check constant-time whatever was sent.
        if not hmac.compare_digest(digest, expected):
            raise _unauthorized("invalid token")
        request[IDENTITY] = identity
        return await handler(request)

    return middleware
