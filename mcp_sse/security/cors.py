"""CORS for browser clients, on aiohttp-cors: exact origins, with credentials, any request header.

SECURITY: aiohttp-cors given the origin "*" echoes the caller's Origin back; with
`allow_credentials` that lets any web page read the answers, so "*" is refused at startup.
aiohttp-cors never sends `Vary: Origin`, so a shared cache could hand one origin's answer
(with its Access-Control-Allow-Origin) to another; the hook here adds it to every response.

Call `setup_cors()` after every route is added: it enables CORS on the routes that exist.
Preflights are answered by aiohttp-cors' OPTIONS handlers, which are routes like any other:
authentication and rate limiting must let them through (`is_preflight`), since a browser
never sends credentials on a preflight.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import aiohttp_cors
from aiohttp import web

from .origin import normalise_origin

__all__ = ["EXPOSE_HEADERS", "METHODS", "is_preflight", "setup_cors"]

# Without Mcp-Session-Id here a browser client cannot read its session id and breaks.
EXPOSE_HEADERS: Final = (
    "Mcp-Session-Id",
    "MCP-Protocol-Version",
    "RateLimit",
    "RateLimit-Policy",
    "Retry-After",
    "X-Request-Id",
)
METHODS: Final = ("GET", "POST", "DELETE", "OPTIONS")
MAX_AGE: Final = 600  # seconds a browser may reuse a preflight answer (Chromium caps it at 7200)

ResponseHook = Callable[[web.Request, web.StreamResponse], Awaitable[object]]


def is_preflight(request: web.Request) -> bool:
    """A CORS preflight: OPTIONS with Origin and Access-Control-Request-Method. It carries no credentials."""
    return (
        request.method == "OPTIONS"
        and "Access-Control-Request-Method" in request.headers
        and "Origin" in request.headers
    )


async def _vary_origin(request: web.Request, response: web.StreamResponse) -> None:
    vary = response.headers.get("Vary")
    if vary is None:
        response.headers["Vary"] = "Origin"
        return
    listed = {v.strip().lower() for v in vary.split(",")}
    if "origin" not in listed and "*" not in listed:
        response.headers["Vary"] = f"{vary}, Origin"


def setup_cors(app: web.Application, *, allowed_origins: Sequence[str]) -> None:
    """Enable CORS for `allowed_origins` (exact, normalised) on every resource in `app.router`.

    With no origins no cross-origin caller is granted anything; preflights are then refused.
    Raises ValueError on "*" or a malformed origin, and if called twice on one app.
    """
    if isinstance(allowed_origins, str):
        raise ValueError("allowed_origins must be a list of origins, not one string")
    if aiohttp_cors.APP_CONFIG_KEY in app:
        raise ValueError("setup_cors was already called on this application")
    # aiohttp-cors compares the Origin header as a string, so the keys are what browsers send.
    origins = {normalise_origin(o) for o in allowed_origins if o.strip()}
    # ResourceOptions is untyped in aiohttp-cors 0.8; a mapping cannot carry allow_methods.
    options = aiohttp_cors.ResourceOptions(  # type: ignore[no-untyped-call]
        allow_credentials=True,
        expose_headers=EXPOSE_HEADERS,
        # Any request header: MCP 2026-07-28 names one Mcp-Param-<Name> header per tool argument,
        # so no fixed list can hold them. The grant is still only ever for an exact allowed origin.
        allow_headers="*",
        allow_methods=METHODS,
        max_age=MAX_AGE,
    )
    theirs = len(app.on_response_prepare)
    cors = aiohttp_cors.setup(app, defaults={origin: options for origin in sorted(origins)})
    for resource in list(app.router.resources()):
        # Sub-application resources are not routes of this router; their own setup would cover them.
        if isinstance(resource, web.Resource | web.StaticResource):
            cors.add(resource)
    hooks = app.on_response_prepare
    for index in range(theirs, len(hooks)):  # the hooks aiohttp_cors.setup added
        hooks[index] = _with_origin_only(hooks[index])
    hooks.append(_vary_origin)


def _with_origin_only(hook: ResponseHook) -> ResponseHook:
    """aiohttp-cors' response hook, called only for requests that carry an Origin.

    It looks up the route's CORS options on every response before it reads Origin, then does
    nothing without one (CORS 6.1.1). Most callers are not browsers: they are spared the lookup.
    """

    async def hook_with_origin(request: web.Request, response: web.StreamResponse) -> None:
        if "Origin" in request.headers:
            await hook(request, response)

    return hook_with_origin
