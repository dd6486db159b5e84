"""Security headers on every response (JSON, SSE, errors); HSTS when asked or over TLS; no version leak."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web

from mcp_sse.security.client_ip import client_ip_middleware
from mcp_sse.security.headers import install_security_headers

from .helpers import make_app, read_event

EXPECTED = {
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
    "X-XSS-Protection": "0",
}


def app(*, hsts: bool, trusted: list[str] | None = None) -> web.Application:
    return make_app(
        [client_ip_middleware(trusted_proxies=trusted or [])],
        setup=lambda a: install_security_headers(a, hsts=hsts),
    )


async def test_every_kind_of_response_gets_them(aiohttp_client: Any) -> None:
    client = await aiohttp_client(app(hsts=False))
    for path, status in (("/json", 200), ("/sse", 200), ("/refuse", 409), ("/nowhere", 404)):
        async with client.get(path) as response:
            assert response.status == status
            if path == "/sse":
                assert await read_event(response) == '{"hello": "world"}'
            for name, value in EXPECTED.items():
                assert response.headers.get(name) == value, (path, name)
            assert "camera=()" in response.headers["Permissions-Policy"]
            assert response.headers["Server"] == "mcp-sse"
            assert (
                "aiohttp" not in str(response.headers).lower()
                and "python" not in str(response.headers).lower()
            )
            assert "Strict-Transport-Security" not in response.headers


async def test_a_handlers_own_cache_control_is_kept(aiohttp_client: Any) -> None:
    client = await aiohttp_client(app(hsts=False))
    async with client.get("/json") as response:
        assert response.headers["Cache-Control"] == "no-store"
    async with client.get("/sse") as response:
        assert response.headers["Cache-Control"] == "no-cache"  # the event stream's own
        await response.read()


async def test_hsts_when_configured(aiohttp_client: Any) -> None:
    client = await aiohttp_client(app(hsts=True))
    for path in ("/json", "/sse"):
        async with client.get(path) as response:
            assert response.headers["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains"
            await response.read()


@pytest.mark.parametrize(("trusted", "expected"), [(["127.0.0.1/32"], True), (["10.0.0.0/8"], False)])
async def test_hsts_when_a_trusted_proxy_says_https(
    aiohttp_client: Any, trusted: list[str], expected: bool
) -> None:
    client = await aiohttp_client(app(hsts=False, trusted=trusted))
    async with client.get("/sse", headers={"X-Forwarded-Proto": "https"}) as response:
        assert ("Strict-Transport-Security" in response.headers) is expected
        await response.read()
