"""Security response headers on every response, streamed (SSE) ones included.

Helmet 8's defaults, tuned for an API that serves JSON and event streams and never HTML:
the CSP denies everything (nothing here should ever render or run), and framing is refused
twice (CSP frame-ancestors and X-Frame-Options, for old browsers). They are set from
`on_response_prepare`, the only place that sees an SSE response before its headers go out.

Cross-Origin-Resource-Policy: same-origin does not break the CORS-allowed browser clients:
the Fetch standard applies CORP only to no-cors requests (<img>, <script>, ...); fetch() and
EventSource from an ALLOWED_ORIGINS page are CORS requests, governed by the CORS headers.
"""

from __future__ import annotations

from typing import Final

from aiohttp import web

from ..state import SECURE

__all__ = ["HSTS", "SECURITY_HEADERS", "SERVER", "install_security_headers"]

SERVER: Final = "mcp-sse"  # no framework, no version: nothing to match against a CVE list
HSTS: Final = "max-age=31536000; includeSubDomains"
SECURITY_HEADERS: Final[dict[str, str]] = {
    "Content-Security-Policy": (
        "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Origin-Agent-Cluster": "?1",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-DNS-Prefetch-Control": "off",
    "X-Download-Options": "noopen",
    "X-Frame-Options": "DENY",
    "X-Permitted-Cross-Domain-Policies": "none",
    # 0 turns off the legacy XSS auditor, which itself enabled cross-site leaks (Helmet, OWASP).
    "X-XSS-Protection": "0",
    "Permissions-Policy": (
        "accelerometer=(), camera=(), geolocation=(), gyroscope=(), magnetometer=(), microphone=(), "
        "payment=(), usb=()"
    ),
    # Tool results and key listings must not sit in a shared or browser cache (OWASP REST Security).
    # Event streams set their own `no-cache`, which is left alone.
    "Cache-Control": "no-store",
}


def install_security_headers(app: web.Application, *, hsts: bool) -> None:
    """Add the headers to every response of `app`. `hsts`: send HSTS even when the request was not TLS."""

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        headers = response.headers
        headers.merge(SECURITY_HEADERS)  # only those not set: a handler that set its own meant it
        # hsts=True is for TLS ended by a proxy we do not hear X-Forwarded-Proto from. Should it
        # reach a browser over plain HTTP anyway, the browser ignores it (RFC 6797 section 8.1).
        if hsts or request.get(SECURE, False):
            headers.setdefault("Strict-Transport-Security", HSTS)
        headers["Server"] = SERVER  # replaced: aiohttp has already written its own by now

    app.on_response_prepare.append(on_prepare)
