"""Fixtures: a movable clock, verifiers that clean up after themselves, and an issuer of our own on
loopback (an aiohttp app serving metadata and a JWKS we control, counting every JWKS fetch)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from mcp_sse.oauth.resource import FetchPolicy, JwtVerifier

from .helpers import Clock, Key, make_key

# 30 s: a loaded CI machine can keep a loopback answer waiting longer than the 5 s default.
LOOPBACK = FetchPolicy(allow_http_loopback=True, timeout=30)


@pytest.fixture
def clock() -> Clock:
    return Clock()


MakeVerifier = Callable[..., JwtVerifier]


@pytest.fixture
async def make_verifier(clock: Clock) -> AsyncIterator[MakeVerifier]:
    """`make_verifier(issuer, ...)`: a JwtVerifier on the test's clock, loopback http allowed, then closed."""
    made: list[JwtVerifier] = []

    def make(*issuers: str, **kwargs: Any) -> JwtVerifier:
        kwargs.setdefault("fetch", LOOPBACK)
        verifier = JwtVerifier(issuers=list(issuers), clock=clock.time, timer=clock.monotonic, **kwargs)
        made.append(verifier)
        return verifier

    yield make
    for verifier in made:
        await verifier.close()


@dataclass
class FakeIssuer:
    """An issuer we control: what its metadata and JWKS say, and how often the JWKS was fetched."""

    url: str
    clock: Clock
    key: Key
    keys: list[dict[str, Any]]
    metadata: dict[str, Any] = field(default_factory=dict)
    jwks_status: int = 200
    metadata_fetches: int = 0
    jwks_fetches: int = 0

    @property
    def resource(self) -> str:
        return self.url + "/mcp"

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(self.clock.now)
        claims = {
            "iss": self.url,
            "sub": "user-1",
            "aud": self.resource,
            "exp": now + 300,
            "iat": now,
            "scope": "mcp:viewer",
            "client_id": "client-1",
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}


@pytest.fixture
async def fake_issuer(aiohttp_server: Callable[..., Any], clock: Clock) -> FakeIssuer:
    key = make_key("RS256", "good-1")
    issuer = FakeIssuer(url="", clock=clock, key=key, keys=[key.jwk])

    async def metadata(request: web.Request) -> web.Response:
        issuer.metadata_fetches += 1
        return web.json_response({"issuer": issuer.url, "jwks_uri": issuer.url + "/jwks", **issuer.metadata})

    async def jwks(request: web.Request) -> web.Response:
        issuer.jwks_fetches += 1
        if issuer.jwks_status != 200:
            return web.json_response({"error": "down"}, status=issuer.jwks_status)
        return web.json_response({"keys": issuer.keys})

    app = web.Application()
    app.router.add_get("/.well-known/oauth-authorization-server", metadata)
    app.router.add_get("/jwks", jwks)
    server: TestServer = await aiohttp_server(app, host="127.0.0.1")
    issuer.url = f"http://127.0.0.1:{server.port}"
    return issuer
