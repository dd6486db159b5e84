"""OAuth 2.0 client credentials for remote backends (upstream/credentials.py), against real servers on
loopback: a token endpoint of our own (aiohttp) that fails on demand and counts every request, and the
real oidc-provider (tests/oauth/idp) whose JWT the gateway's own verifier accepts."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import secrets
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote_plus

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer, unused_port
from cryptography.fernet import Fernet

from mcp_sse.oauth.resource import FetchPolicy, JwtVerifier, TokenError
from mcp_sse.upstream.config import OAuth2Spec
from mcp_sse.upstream.credentials import (
    MAX_BODY,
    ClientCredentials,
    UpstreamAuthError,
    backoff_delay,
    refresh_after,
)
from tests.conftest import Launched, launch, mcp_client, text_of
from tests.oauth.helpers import IdP, running_idp

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[2]

# Characters RFC 6749 2.3.1's form-urlencoding must escape, in both the id and the secret.
CLIENT_ID = "gateway:1 é"
SECRET = "s3cr3t:+ %&=/é-" + secrets.token_urlsafe(12)
AnyServer = Callable[..., Awaitable[TestServer]]
ISSUED: list[str] = []  # every token any endpoint of ours issued in this test, for the log check


class Clock:
    """A monotonic timer that moves only when told: backoff windows without waiting for them."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Endpoint:
    """A token endpoint of our own: what it answers (`mode`), and every request it was sent."""

    url: str = ""
    mode: str = "ok"
    expires_in: Any = 3600
    hits: int = 0
    issued: list[str] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    elsewhere_hits: int = 0

    @property
    def token_url(self) -> str:
        return self.url + "/token"

    def spec(self, **overrides: Any) -> OAuth2Spec:
        fields: dict[str, Any] = {
            "client_id": CLIENT_ID,
            "client_secret": SECRET,
            "token_url": self.token_url,
            "scopes": ("read", "write"),
        }
        return OAuth2Spec(**{**fields, **overrides})


def basic_credentials(header: str) -> tuple[str, str] | None:
    if not header.startswith("Basic "):
        return None
    client_id, _, secret = base64.b64decode(header[6:]).decode().partition(":")
    return unquote_plus(client_id), unquote_plus(secret)


def endpoint_app(endpoint: Endpoint) -> web.Application:
    async def token(request: web.Request) -> web.StreamResponse:
        endpoint.hits += 1
        form = await request.post()
        endpoint.requests.append(
            {"headers": dict(request.headers), "form": dict(form), "content_type": request.content_type}
        )
        if basic_credentials(request.headers.get("Authorization", "")) != (CLIENT_ID, SECRET):
            # A careless server that quotes what it was sent: the client must not repeat it.
            sent = basic_credentials(request.headers.get("Authorization", ""))
            description = f"client authentication failed for {sent}" + "x" * 1000
            return web.json_response(
                {"error": "invalid_client", "error_description": description}, status=401
            )
        if form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        mode = endpoint.mode
        if mode == "down":
            return web.json_response({"error": "temporarily_unavailable"}, status=503)
        if mode == "redirect":
            raise web.HTTPFound(endpoint.url + "/elsewhere")
        if mode == "garbage":
            return web.Response(text="<html>Service Unavailable</html>" + "x" * 100, status=200)
        if mode == "oversized":
            return web.json_response({"access_token": "a" * MAX_BODY, "token_type": "Bearer"})
        if mode == "oversized-chunked":
            response = web.StreamResponse()
            response.enable_chunked_encoding()
            await response.prepare(request)
            for _ in range(MAX_BODY // 1024 + 2):
                await response.write(b" " * 1024)
            return response
        if mode == "stall":
            await asyncio.Event().wait()
        # With a "!", outside RFC 6750's b64token, as some providers' opaque tokens are: still sent.
        issued = f"tok-{len(endpoint.issued) + 1}!{secrets.token_urlsafe(16)}"
        endpoint.issued.append(issued)
        ISSUED.append(issued)
        body: dict[str, Any] = {"access_token": issued, "token_type": "bearer"}
        if endpoint.expires_in is not None:
            body["expires_in"] = endpoint.expires_in
        if mode == "no-token":
            del body["access_token"]
        if mode == "mac":
            body["token_type"] = "mac"
        if mode == "header-injection":
            body["access_token"] = issued + "\r\nX-Evil: 1"
        return web.json_response(body)

    async def elsewhere(request: web.Request) -> web.Response:
        endpoint.elsewhere_hits += 1
        return web.json_response({"access_token": "redirected", "token_type": "Bearer"})

    app = web.Application()
    app.router.add_post("/token", token)
    app.router.add_route("*", "/elsewhere", elsewhere)
    return app


@pytest.fixture
async def endpoint(aiohttp_server: AnyServer) -> Endpoint:
    made = Endpoint()
    server = await aiohttp_server(endpoint_app(made), host="127.0.0.1")
    made.url = f"http://127.0.0.1:{server.port}"
    return made


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """The remote backend's session: it sends the operator's upstream headers and keeps cookies."""
    async with aiohttp.ClientSession(
        headers={"X-Api-Key": "upstream-only"}, cookies={"upstream": "cookie"}
    ) as session:
        yield session


@pytest.fixture(autouse=True)
def nothing_secret_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """After every test: no log line holds the secret or any token the endpoint issued."""
    caplog.set_level(logging.DEBUG)
    ISSUED.clear()
    yield
    for secret in (SECRET, quote(SECRET, safe=""), *ISSUED):
        assert secret not in caplog.text


async def failure(credentials: ClientCredentials, http: aiohttp.ClientSession) -> str:
    """The UpstreamAuthError's message; it never holds the secret nor the status a token."""
    with pytest.raises(UpstreamAuthError) as caught:
        await credentials.authorization(http)
    message = str(caught.value)
    assert SECRET not in message and "tok-" not in message
    assert "tok-" not in json.dumps(credentials.status()) and SECRET not in json.dumps(credentials.status())
    return message


# -- the grant -----------------------------------------------------------------------------------


async def test_basic_auth_scope_and_one_fetch_for_many_callers(
    endpoint: Endpoint, http: aiohttp.ClientSession
) -> None:
    credentials = ClientCredentials(endpoint.spec(), name="docs")
    assert credentials.status()["token"] == "none"
    headers = await asyncio.gather(*(credentials.authorization(http) for _ in range(20)))
    assert set(headers) == {f"Bearer {endpoint.issued[0]}"}
    for _ in range(10):
        assert await credentials.authorization(http) == headers[0]
    assert endpoint.hits == 1  # concurrent callers shared one fetch, later ones the cache

    sent = endpoint.requests[0]
    assert sent["content_type"] == "application/x-www-form-urlencoded"
    assert sent["form"] == {"grant_type": "client_credentials", "scope": "read write"}
    # The backend's own headers and cookies are for the upstream, not the token endpoint.
    assert "X-Api-Key" not in sent["headers"] and "Cookie" not in sent["headers"]

    status = credentials.status()
    assert status == {
        "type": "oauth2",
        "token_url": endpoint.token_url,
        "scopes": ["read", "write"],
        "token": "valid",
        "expires_in": status["expires_in"],
        "last_error": None,
        "retry_in": None,
    }
    assert 3500 < status["expires_in"] <= 3600  # type: ignore[operator]


async def test_no_scope_is_sent_when_none_is_configured(
    endpoint: Endpoint, http: aiohttp.ClientSession
) -> None:
    await ClientCredentials(endpoint.spec(scopes=()), name="docs").authorization(http)
    assert endpoint.requests[0]["form"] == {"grant_type": "client_credentials"}


async def test_a_configured_resource_is_sent_as_rfc_8707_asks(
    endpoint: Endpoint, http: aiohttp.ClientSession
) -> None:
    spec = endpoint.spec(scopes=(), resource="https://mcp.example.com/mcp")
    await ClientCredentials(spec, name="docs").authorization(http)
    assert endpoint.requests[0]["form"] == {
        "grant_type": "client_credentials",
        "resource": "https://mcp.example.com/mcp",
    }


async def test_the_token_is_refreshed_before_it_expires(
    endpoint: Endpoint, http: aiohttp.ClientSession
) -> None:
    endpoint.expires_in = 2  # refreshed after 1 s, half its life
    credentials = ClientCredentials(endpoint.spec(), name="docs")
    seen = [await credentials.authorization(http)]
    async with asyncio.timeout(30):  # bounds a failure; the event is the second fetch
        while endpoint.hits < 2:
            seen.append(await credentials.authorization(http))
            await asyncio.sleep(0.05)
    seen.append(await credentials.authorization(http))
    assert seen[0] == f"Bearer {endpoint.issued[0]}" and seen[-1] == f"Bearer {endpoint.issued[1]}"
    assert endpoint.hits == 2


@pytest.mark.parametrize(("sent", "lifetime"), [(None, 3600), ("120", 120), (-5, 3600), (True, 3600)])
async def test_expires_in_missing_or_odd(
    endpoint: Endpoint, http: aiohttp.ClientSession, sent: Any, lifetime: int
) -> None:
    endpoint.expires_in = sent
    clock = Clock()
    credentials = ClientCredentials(endpoint.spec(), name="docs", timer=clock)
    await credentials.authorization(http)
    assert credentials.status()["expires_in"] == lifetime


def test_refresh_times() -> None:
    assert refresh_after(3600) == 2880  # 80 %
    assert refresh_after(300) == 240  # both rules agree
    assert refresh_after(200) == 140  # 60 s before
    assert refresh_after(60) == 30  # never before half its life
    assert refresh_after(2) == 1


def test_backoff_doubles_to_a_minute_with_jitter() -> None:
    for failures, ceiling in [(1, 1), (2, 2), (3, 4), (6, 32), (7, 60), (100, 60)]:
        assert backoff_delay(failures, rand=lambda: 0.0) == ceiling / 2
        assert backoff_delay(failures, rand=lambda: 1.0) == ceiling


async def test_a_refresh_that_fails_keeps_the_valid_token(
    endpoint: Endpoint, http: aiohttp.ClientSession
) -> None:
    endpoint.expires_in = 100  # refreshed after 50 s
    clock = Clock()
    credentials = ClientCredentials(endpoint.spec(), name="docs", timer=clock)
    first = await credentials.authorization(http)
    endpoint.mode = "down"
    clock.advance(60)
    assert await credentials.authorization(http) == first
    assert endpoint.hits == 2
    status = credentials.status()
    assert status["token"] == "valid" and "temporarily_unavailable" in str(status["last_error"])
    clock.advance(41)  # expired, and past the backoff
    assert "temporarily_unavailable" in await failure(credentials, http)
    assert credentials.status()["token"] == "failing"


# -- a 401 from the upstream ---------------------------------------------------------------------


async def test_rejected_forgets_the_token_and_the_next_call_fetches(
    endpoint: Endpoint, http: aiohttp.ClientSession
) -> None:
    credentials = ClientCredentials(endpoint.spec(), name="docs", timer=Clock())
    first = await credentials.authorization(http)
    credentials.rejected(first)
    second = await credentials.authorization(http)
    assert second == f"Bearer {endpoint.issued[1]}" and endpoint.hits == 2
    credentials.rejected(first)  # a late 401 to the old token: the new one stays
    assert await credentials.authorization(http) == second and endpoint.hits == 2


async def test_fresh_tokens_refused_again_and_again_back_off(
    endpoint: Endpoint, http: aiohttp.ClientSession
) -> None:
    """An upstream that refuses every token (wrong audience) must not cost a fetch per request."""
    clock = Clock()
    credentials = ClientCredentials(endpoint.spec(), name="docs", timer=clock)
    credentials.rejected(await credentials.authorization(http))
    credentials.rejected(await credentials.authorization(http))
    assert endpoint.hits == 2
    for _ in range(5):
        assert "refused (HTTP 401) a token just issued" in await failure(credentials, http)
    assert endpoint.hits == 2
    clock.advance(1)
    credentials.rejected(await credentials.authorization(http))
    assert endpoint.hits == 3
    clock.advance(2)  # the second backoff is 1-2 s
    await credentials.authorization(http)
    assert endpoint.hits == 4


# -- faults --------------------------------------------------------------------------------------


async def test_endpoint_down_then_backoff_fails_fast_then_recovers(
    aiohttp_server: AnyServer, http: aiohttp.ClientSession
) -> None:
    port = unused_port()
    endpoint = Endpoint(url=f"http://127.0.0.1:{port}")
    clock = Clock()
    credentials = ClientCredentials(endpoint.spec(), name="docs", timer=clock)
    message = await failure(credentials, http)
    assert message.startswith(f"backend 'docs': token endpoint {endpoint.token_url}: cannot connect")
    assert message.endswith("(next attempt in 1 s)")
    assert credentials.status()["token"] == "failing"
    assert credentials.status()["last_error"] == message.removesuffix(" (next attempt in 1 s)")

    await aiohttp_server(endpoint_app(endpoint), host="127.0.0.1", port=port)  # the endpoint is back
    for _ in range(5):
        assert await failure(credentials, http) == message  # the last error, without asking again
    assert endpoint.hits == 0

    clock.advance(1)  # the first backoff is 0.5-1 s
    assert await credentials.authorization(http) == f"Bearer {endpoint.issued[0]}"
    assert endpoint.hits == 1
    assert credentials.status()["token"] == "valid"


async def test_failures_in_a_row_back_off_longer(endpoint: Endpoint, http: aiohttp.ClientSession) -> None:
    endpoint.mode = "down"
    clock = Clock()
    credentials = ClientCredentials(endpoint.spec(), name="docs", timer=clock)
    await failure(credentials, http)
    clock.advance(1)
    assert "next attempt in" in await failure(credentials, http)
    assert endpoint.hits == 2
    clock.advance(0.9)  # the second backoff is at least 1 s
    await failure(credentials, http)
    assert endpoint.hits == 2
    assert 0 < credentials.status()["retry_in"] <= 2  # type: ignore[operator]


async def test_invalid_client_is_named_and_what_the_server_quoted_is_not_repeated(
    endpoint: Endpoint, http: aiohttp.ClientSession
) -> None:
    wrong = "wrong-" + secrets.token_urlsafe(12)
    credentials = ClientCredentials(endpoint.spec(client_secret=wrong), name="docs")
    message = await failure(credentials, http)
    assert message.startswith(f"backend 'docs': token endpoint {endpoint.token_url}: refused with HTTP 401,")
    assert "invalid_client" in message
    assert wrong not in message and "***" in message
    assert len(message) < 400  # the description is cut
    assert "xxxxxxxxxx" in message  # but some of it is shown
    assert wrong not in json.dumps(credentials.status())


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("garbage", "answered HTTP 200 with a non-JSON body"),
        ("oversized", "answered HTTP 200 with a body over 64 KiB"),
        ("oversized-chunked", "answered HTTP 200 with a body over 64 KiB"),
        ("no-token", "answered HTTP 200 without an access_token"),
        ("mac", "token_type 'mac' is not Bearer"),
        ("header-injection", "its access_token cannot be sent as a bearer token"),
        ("down", "refused with HTTP 503, temporarily_unavailable"),
    ],
)
async def test_bad_answers_are_clear_errors(
    endpoint: Endpoint, http: aiohttp.ClientSession, mode: str, expected: str
) -> None:
    endpoint.mode = mode
    message = await failure(ClientCredentials(endpoint.spec(), name="docs"), http)
    assert message.startswith(f"backend 'docs': token endpoint {endpoint.token_url}: {expected}")
    assert "<html>" not in message  # the body is never echoed


async def test_a_redirect_is_not_followed(endpoint: Endpoint, http: aiohttp.ClientSession) -> None:
    endpoint.mode = "redirect"
    message = await failure(ClientCredentials(endpoint.spec(), name="docs"), http)
    assert "answered HTTP 302, a redirect, which is not followed" in message
    assert endpoint.elsewhere_hits == 0


async def test_a_stalled_endpoint_times_out(endpoint: Endpoint, http: aiohttp.ClientSession) -> None:
    endpoint.mode = "stall"
    message = await failure(ClientCredentials(endpoint.spec(), name="docs", timeout=0.3), http)
    assert "no answer within 0.3 s" in message


async def test_plain_http_off_loopback_is_refused_before_any_request(http: aiohttp.ClientSession) -> None:
    spec = OAuth2Spec(
        client_id=CLIENT_ID, client_secret=SECRET, token_url="http://auth.example.com/token?k=v"
    )
    message = await failure(ClientCredentials(spec, name="docs"), http)
    assert message.startswith("backend 'docs': token endpoint http://auth.example.com/token is plain http")
    assert "k=v" not in message


# -- the real identity provider -----------------------------------------------------------------

GATEWAY_CLIENT = "mcp-gateway"  # tests/oauth/idp/idp.mjs: client_secret_basic, a default resource
GATEWAY_SECRET_SUFFIX = ":+ %&=/"  # idp.mjs adds it to IDP_CLIENT_SECRET for that client
RESOURCE = "http://127.0.0.1:8931/mcp"  # what the upstream gateway would be; nothing listens there


async def admin(idp: IdP, method: str, path: str) -> Any:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, idp.origin + path, headers={"x-admin-token": idp.admin_token}) as response,
    ):
        assert response.status == 200, await response.text()
        return await response.json()


async def set_default_resource(idp: IdP, resource: str) -> None:
    await admin(idp, "POST", "/_admin/default-resource?resource=" + quote(resource, safe=""))


def idp_spec(
    idp: IdP, *, secret: str | None = None, scopes: tuple[str, ...] = ("mcp:operator",)
) -> OAuth2Spec:
    return OAuth2Spec(
        client_id=GATEWAY_CLIENT,
        client_secret=idp.client_secret + GATEWAY_SECRET_SUFFIX if secret is None else secret,
        token_url=idp.issuer + "/token",
        scopes=scopes,
    )


async def test_a_real_providers_token_verifies_for_its_resource(
    http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_idp() as idp:
        await set_default_resource(idp, RESOURCE)
        credentials = ClientCredentials(idp_spec(idp), name="upstream")
        header = await credentials.authorization(http)
        assert await credentials.authorization(http) == header
        assert (await admin(idp, "GET", "/_admin/stats"))["gateway_tokens"] == 1
        token = header.removeprefix("Bearer ")
        async with JwtVerifier(issuers=[idp.issuer], fetch=FetchPolicy(allow_http_loopback=True)) as verifier:
            verified = await verifier.verify(token, resource=RESOURCE)
            assert verified.client_id == GATEWAY_CLIENT
            assert verified.scopes == frozenset({"mcp:operator"})
            assert verified.audience == (RESOURCE,)
            assert verified.role == "operator"
            with pytest.raises(TokenError, match="not issued for this resource"):
                await verifier.verify(token, resource="http://127.0.0.1:8932/mcp")
        status = credentials.status()
        assert status["token"] == "valid" and 0 < status["expires_in"] <= 300  # type: ignore[operator]
        assert token not in json.dumps(status) and token not in caplog.text
        assert idp.client_secret not in caplog.text


async def test_a_real_provider_refuses_a_wrong_secret_as_invalid_client(http: aiohttp.ClientSession) -> None:
    async with running_idp() as idp:
        await set_default_resource(idp, RESOURCE)
        wrong = idp.client_secret + "-not"
        with pytest.raises(UpstreamAuthError) as caught:
            await ClientCredentials(idp_spec(idp, secret=wrong), name="upstream").authorization(http)
        assert "refused with HTTP 401, invalid_client" in str(caught.value)
        assert wrong not in str(caught.value)


# -- end to end: gateway A calls gateway B with the provider's token -----------------------------

PASSED_ENV = ("PATH", "HOME", "LANG", "PYTHONPATH", "VIRTUAL_ENV")


def gateway_env(tmp_path: Path, name: str, **extra: str) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if k in PASSED_ENV},
        "AUTH_TOKEN": f"mcp_{name}_" + secrets.token_urlsafe(24),
        "SESSION_SECRET": Fernet.generate_key().decode(),
        "AUDIT_LOG": str(tmp_path / f"{name}-audit.log"),
        **extra,
    }


async def test_gateway_a_calls_gateway_b_with_the_providers_token(tmp_path: Path) -> None:
    """The SDK client calls echo through A (server_secure.py, a remote entry with "auth"); A fetches a
    client_credentials token from oidc-provider, once, and B (server_secure.py trusting that provider
    for its PUBLIC_URL) accepts it. No secret or token shows in A's logs, audit or status."""
    port_b = unused_port()
    public_b = f"http://127.0.0.1:{port_b}"
    gateways: list[Launched] = []
    async with running_idp() as idp:
        await set_default_resource(idp, public_b + "/mcp")
        secret = idp.client_secret + GATEWAY_SECRET_SUFFIX
        env_b = gateway_env(tmp_path, "b", OAUTH_ISSUERS=idp.issuer, PUBLIC_URL=public_b)
        env_b["STATE_DIR"] = str(tmp_path / "b-state")
        servers = tmp_path / "servers.json"
        auth = {
            "type": "oauth2",
            "clientId": GATEWAY_CLIENT,
            "clientSecret": "${B_CLIENT_SECRET}",
            "tokenUrl": idp.issuer + "/token",
            "scopes": ["mcp:operator"],
        }
        servers.write_text(
            json.dumps({"mcpServers": {"b": {"type": "http", "url": public_b + "/mcp", "auth": auth}}})
        )
        env_a = gateway_env(tmp_path, "a", B_CLIENT_SECRET=secret)
        script = str(REPO / "server_secure.py")
        try:
            argv_b = [sys.executable, script, "--port", str(port_b), "--env-file", os.devnull]
            gateways.append(await launch(argv_b, env=env_b, cwd=tmp_path))
            argv_a = [sys.executable, script, "--port", str(unused_port()), "--config", str(servers)]
            gateways.append(a := await launch([*argv_a, "--env-file", os.devnull], env=env_a, cwd=tmp_path))
            async with mcp_client(a.url, env_a["AUTH_TOKEN"]) as client:
                for n in range(3):
                    assert text_of(await client.call_tool("echo", {"text": f"via A {n}"})) == f"via A {n}"
            assert (await admin(idp, "GET", "/_admin/stats"))["gateway_tokens"] == 1
            async with (
                aiohttp.ClientSession() as http,
                http.get(
                    f"{a.url}/mcp/servers", headers={"Authorization": f"Bearer {env_a['AUTH_TOKEN']}"}
                ) as r,
            ):
                status = {s["name"]: s for s in (await r.json())["servers"]}["b"]
            assert status["auth"]["token"] == "valid", status
            assert status["auth"]["token_url"] == idp.issuer + "/token"
        finally:
            for gateway in reversed(gateways):
                await gateway.stop()
    # B saw A's calls as the provider's client, by OAuth; A told no one its secret or the token.
    audit_b = [json.loads(line) for line in (tmp_path / "b-audit.log").read_text().splitlines() if line]
    assert any(e["event"] == "auth.success" and e.get("subject") == GATEWAY_CLIENT for e in audit_b)
    told = gateways[1].stderr + (tmp_path / "a-audit.log").read_text() + json.dumps(status)
    assert secret not in told and quote(secret, safe="") not in told
    assert "Bearer ey" not in told and "eyJ" not in told  # a JWT starts eyJ (base64 of '{"')
