"""OAuth wired into the gateway: create_app with OAUTH_SERVER / OAUTH_ISSUERS on a real loopback
server, the official SDK's OAuthClientProvider doing the whole flow (registration, the sign-in and
consent pages driven as a browser would, the code exchange), then MCP over Streamable HTTP and
legacy SSE; the policy of the approving key or the token's scope applied inside MCP; revocation
at once; an external issuer's tokens checked per resource and scope; the RFC 9728 documents at
every route; and with OAuth off, the 401 of before.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import httpx2
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer, unused_port
from cryptography.fernet import Fernet
from mcp import Client
from mcp.client.auth import OAuthClientProvider
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import (
    AuthorizationCodeResult,
    OAuthClientMetadata,
)
from mcp.shared.exceptions import MCPError
from pydantic import AnyUrl

from mcp_sse import app as app_module
from mcp_sse.app import create_app, reload_keys
from mcp_sse.oauth.metadata import SCOPES
from mcp_sse.security.errors import REALM
from mcp_sse.security.keys import digest
from mcp_sse.settings import Secret, Settings, SettingsError
from mcp_sse.state import SESSIONS
from tests.conftest import init_message, launch, text_of, until_eof

from .as_helpers import (
    LOOPBACK_CALLBACK,
    Browser,
    MemoryStorage,
    form_of,
    oauth_process,
    pkce,
    register,
    token,
)
from .conftest import FakeIssuer

REPO = Path(__file__).resolve().parents[2]
BACKEND = "mcp-sse"  # the embedded default toolset's name: /servers/mcp-sse/...
MCP_ROUTES = ("/mcp", "/sse", f"/servers/{BACKEND}/mcp", f"/servers/{BACKEND}/sse")
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@dataclass
class Gateway:
    url: str
    app: web.Application
    admin: str
    operator: str
    viewer: str
    keys_file: Path
    audit_file: Path

    def entries(self, *, operator: bool = True) -> list[dict[str, Any]]:
        entries = [{"id": "k-view", "name": "vera", "sha256": digest(self.viewer).hex(), "role": "viewer"}]
        if operator:
            entries.append(
                {"id": "k-op", "name": "otto", "sha256": digest(self.operator).hex(), "role": "operator"}
            )
        return entries

    def audit(self, event: str) -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in self.audit_file.read_text().splitlines() if line.strip()]
        return [line for line in lines if line["event"] == event]


StartOAuth = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def start_oauth(aiohttp_server: Callable[..., Awaitable[TestServer]], tmp_path: Path) -> StartOAuth:
    """create_app() on 127.0.0.1 at a port chosen first, so PUBLIC_URL can name it."""

    async def start(*, like: Gateway | None = None, **overrides: Any) -> Gateway:
        """`like`: a second instance of that one (its keys, state dir and PUBLIC_URL, its own audit)."""
        port = unused_port()
        url = f"http://127.0.0.1:{port}"
        keys_file = tmp_path / "keys.json"
        gateway = Gateway(
            url,
            web.Application(),
            admin=like.admin if like else "mcp_" + secrets.token_urlsafe(32),
            operator=like.operator if like else "mcp_" + secrets.token_urlsafe(32),
            viewer=like.viewer if like else "mcp_" + secrets.token_urlsafe(32),
            keys_file=keys_file,
            audit_file=tmp_path / (f"audit-{port}.log" if like else "audit.log"),
        )
        if like is None:
            keys_file.write_text(json.dumps({"keys": gateway.entries()}))
        settings: dict[str, Any] = {
            "auth_token": Secret(gateway.admin),
            "keys_file": keys_file,
            "session_secret": Secret(Fernet.generate_key().decode()),
            "audit_log": gateway.audit_file,
            "rate_limit_max_requests": 100_000,
            "public_url": like.url if like else url,
            "state_dir": tmp_path / "state",
            **overrides,
        }
        gateway.app = create_app(Settings(**settings))
        await aiohttp_server(gateway.app, host="127.0.0.1", port=port)
        return gateway

    return start


@asynccontextmanager
async def oauth_client(
    url: str,
    key: str,
    *,
    path: str = "/mcp",
    storage: MemoryStorage | None = None,
    providers: list[OAuthClientProvider] | None = None,
    mode: str = "auto",
) -> AsyncIterator[Client]:
    """The SDK client with OAuthClientProvider: its redirect handler is a browser that opens the
    authorization URL, signs in with `key`, approves on the consent page and reads the code off
    the redirect. `path` ending in /sse speaks legacy SSE, else Streamable HTTP."""
    browser = Browser(url)
    results: list[AuthorizationCodeResult] = []

    async def redirect_handler(authorization_url: str) -> None:
        assert authorization_url.startswith(url + "/oauth/authorize?")
        params = {k: v[0] for k, v in parse_qs(urlsplit(authorization_url).query).items()}
        answer = await browser.approve(params, key)
        results.append(
            AuthorizationCodeResult(code=answer["code"], state=answer.get("state"), iss=answer.get("iss"))
        )

    async def callback_handler() -> AuthorizationCodeResult:
        return results[-1]

    provider = OAuthClientProvider(
        server_url=url + path,
        client_metadata=OAuthClientMetadata(
            redirect_uris=[AnyUrl(LOOPBACK_CALLBACK)],
            client_name="SDK wiring test",
            grant_types=["authorization_code", "refresh_token"],
            response_types=["code"],
            token_endpoint_auth_method="none",
        ),
        storage=storage or MemoryStorage(),
        redirect_handler=redirect_handler,
        callback_handler=callback_handler,
    )
    if providers is not None:
        providers.append(provider)
    try:
        if path.endswith("/sse"):
            async with Client(sse_client(url + path, auth=provider, timeout=30), mode=mode) as client:
                yield client
        else:
            async with (
                httpx2.AsyncClient(auth=provider, timeout=30) as http,
                Client(streamable_http_client(url + path, http_client=http), mode=mode) as client,
            ):
                yield client
    finally:
        await browser.close()
    assert len(results) == 1  # one sign-in per flow


@asynccontextmanager
async def bearer_client(url: str, token: str, path: str = "/mcp") -> AsyncIterator[Client]:
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30) as http,
        Client(streamable_http_client(url + path, http_client=http)) as client,
    ):
        yield client


async def post_initialize(url: str, token: str | None, path: str = "/mcp") -> aiohttp.ClientResponse:
    headers = dict(ACCEPT)
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with (
        aiohttp.ClientSession() as http,
        http.post(url + path, json=init_message(), headers=headers) as r,
    ):
        await r.read()
        return r


def challenge_params(header: str) -> dict[str, str]:
    assert header.startswith("Bearer "), header
    params: dict[str, str] = {}
    for part in header.removeprefix("Bearer ").split(", "):
        name, _, value = part.partition("=")
        params[name] = value.strip('"')
    return params


def assert_no_secret_logged(gw: Gateway, caplog: pytest.LogCaptureFixture, *secrets_: str) -> None:
    audit = gw.audit_file.read_text()
    for secret in secrets_:
        assert secret not in audit
        assert secret not in caplog.text


# -- the built-in authorization server --------------------------------------------------------------


@pytest.mark.parametrize("mode", ["legacy", "auto"])  # 2025-11-25 with a session; 2026-07-28 without
async def test_sdk_oauth_flow_then_tools_over_streamable_http(
    start_oauth: StartOAuth, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    caplog.set_level(logging.DEBUG)
    gw = await start_oauth(oauth_server=True)
    storage = MemoryStorage()
    async with oauth_client(gw.url, gw.operator, storage=storage, mode=mode) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert {"echo", "server_time"} <= names
        assert text_of(await client.call_tool("echo", {"text": "through oauth"})) == "through oauth"
    # The SDK asked for the challenge's scopes; the operator key's role capped what was granted.
    assert storage.tokens is not None and storage.tokens.scope == "mcp:operator"
    assert storage.tokens.access_token != gw.operator
    successes = [e for e in gw.audit("auth.success") if e.get("via") == "oauth"]
    assert successes and successes[0]["issuer"] == gw.url and successes[0]["subject"] == "k-op"
    assert successes[0]["identity"].startswith("oauth-")
    invoked = gw.audit("tool.invoked")
    assert invoked and invoked[-1]["identity"] == successes[0]["identity"]
    # Both eras really ran: a 2025 session was opened only in legacy mode.
    assert bool(gw.audit("mcp.session.open")) == (mode == "legacy")
    assert_no_secret_logged(
        gw, caplog, storage.tokens.access_token, storage.tokens.refresh_token or "-", gw.operator
    )


async def test_sdk_oauth_flow_over_legacy_sse(start_oauth: StartOAuth) -> None:
    gw = await start_oauth(oauth_server=True)
    async with oauth_client(gw.url, gw.operator, path=f"/servers/{BACKEND}/sse") as client:
        assert text_of(await client.call_tool("echo", {"text": "sse"})) == "sse"


async def test_the_sdk_refreshes_through_the_gateway_and_its_session_goes_on(start_oauth: StartOAuth) -> None:
    gw = await start_oauth(oauth_server=True)
    storage = MemoryStorage()
    providers: list[OAuthClientProvider] = []
    async with oauth_client(
        gw.url, gw.operator, storage=storage, providers=providers, mode="legacy"
    ) as client:
        assert text_of(await client.call_tool("echo", {"text": "one"})) == "one"
        assert storage.tokens is not None
        first = storage.tokens.access_token
        providers[0].context.token_expiry_time = 1.0  # long past on the client's clock (0 reads as "none")
        assert text_of(await client.call_tool("echo", {"text": "two"})) == "two"
        assert storage.tokens.access_token != first
    issued = [e["grant_type"] for e in gw.audit("oauth.token") if e["outcome"] == "issued"]
    assert issued == ["authorization_code", "refresh_token"]
    # One MCP session throughout: the refreshed token is the same caller.
    assert len(gw.audit("mcp.session.open")) == 1


async def test_a_viewer_token_lists_tools_but_cannot_call_them(start_oauth: StartOAuth) -> None:
    gw = await start_oauth(oauth_server=True)
    storage = MemoryStorage()
    async with oauth_client(gw.url, gw.viewer, storage=storage) as client:
        assert (await client.list_tools()).tools
        with pytest.raises(MCPError, match="role 'viewer' may not call tools/call"):
            await client.call_tool("echo", {"text": "no"})
    assert storage.tokens is not None and storage.tokens.scope == "mcp:viewer"


async def test_an_admin_keys_viewer_scoped_token_stays_a_viewer(start_oauth: StartOAuth) -> None:
    """The token's scope caps the role, though the approving key could do more."""
    gw = await start_oauth(oauth_server=True)
    storage = MemoryStorage()
    async with oauth_client(gw.url, gw.admin, storage=storage) as client:
        assert text_of(await client.call_tool("echo", {"text": "admin"})) == "admin"
    # Ask again for mcp:viewer only, as a client that wants less would: the token is a viewer's.
    browser = Browser(gw.url)
    try:
        status, client_info = await register(gw.url)
        assert status == 201, client_info
        verifier, challenge = pkce()
        params = {
            "response_type": "code",
            "client_id": client_info["client_id"],
            "redirect_uri": LOOPBACK_CALLBACK,
            "scope": "mcp:viewer",
            "state": "s",
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "resource": gw.url + "/mcp",
        }
        answer = await browser.approve(params, gw.admin)
        status, body, _ = await token(
            gw.url,
            {
                "grant_type": "authorization_code",
                "code": answer["code"],
                "redirect_uri": LOOPBACK_CALLBACK,
                "client_id": client_info["client_id"],
                "code_verifier": verifier,
                "resource": gw.url + "/mcp",
            },
        )
        assert status == 200, body
    finally:
        await browser.close()
    async with bearer_client(gw.url, body["access_token"]) as client:
        assert (await client.list_tools()).tools
        with pytest.raises(MCPError, match="role 'viewer' may not call tools/call"):
            await client.call_tool("echo", {"text": "no"})


async def test_revoking_the_approving_key_ends_its_token_and_sessions_at_once(
    start_oauth: StartOAuth,
) -> None:
    gw = await start_oauth(oauth_server=True)
    storage = MemoryStorage()
    async with oauth_client(gw.url, gw.operator, storage=storage) as client:
        assert text_of(await client.call_tool("echo", {"text": "before"})) == "before"
    assert storage.tokens is not None
    access = storage.tokens.access_token
    # A session of the token's own, left open (no DELETE).
    opened = await post_initialize(gw.url, access)
    assert opened.status == 200
    session = gw.app[SESSIONS].get(opened.headers["Mcp-Session-Id"])
    assert session is not None and not session.closed and (session.identity or "").startswith("oauth-")

    gw.keys_file.write_text(json.dumps({"keys": gw.entries(operator=False)}))
    reload_keys(gw.app)

    assert session.closed
    refused = await post_initialize(gw.url, access)
    assert refused.status == 401
    params = challenge_params(refused.headers["WWW-Authenticate"])
    assert params["error"] == "invalid_token"
    assert params["resource_metadata"] == gw.url + "/.well-known/oauth-protected-resource/mcp"
    assert (
        gw.audit("auth.failed")[-1]["reason"] == "the key that approved the token was revoked or has expired"
    )


@dataclass
class Grant:
    """What a client holds after the SDK's whole flow against `gw`, signed in with its operator key."""

    access: str
    refresh: str
    client_id: str


async def grant_of(gw: Gateway) -> Grant:
    storage = MemoryStorage()
    async with oauth_client(gw.url, gw.operator, storage=storage) as client:
        await client.list_tools()
    assert storage.tokens is not None and storage.tokens.refresh_token and storage.client is not None
    return Grant(storage.tokens.access_token, storage.tokens.refresh_token, storage.client.client_id or "")


@asynccontextmanager
async def session_stream(url: str, token: str) -> AsyncIterator[tuple[str, aiohttp.ClientResponse]]:
    """A 2025 session opened with `token` at `url`, and its GET stream, open: (session id, stream)."""
    opened = await post_initialize(url, token)
    assert opened.status == 200
    session_id = opened.headers["Mcp-Session-Id"]
    headers = {
        "Accept": "text/event-stream",
        "Authorization": f"Bearer {token}",
        "Mcp-Session-Id": session_id,
    }
    async with aiohttp.ClientSession() as http, http.get(url + "/mcp", headers=headers) as stream:
        assert stream.status == 200
        yield session_id, stream


async def revoke(url: str, token: str, client_id: str) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(url + "/oauth/revoke", data={"token": token, "client_id": client_id}) as revoked,
    ):
        assert revoked.status == 200


async def test_revoking_the_grant_ends_the_streams_its_tokens_opened(
    start_oauth: StartOAuth, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RFC 7009 revocation refuses the grant's tokens at once (tested in test_server); the 2025
    session its token opened, and its GET stream, end at the reaper's next pass. A key's own
    session, open alongside, is left alone."""
    monkeypatch.setattr(app_module, "REAP_INTERVAL", 0.05)
    gw = await start_oauth(oauth_server=True)
    grant = await grant_of(gw)
    kept = await post_initialize(gw.url, gw.operator)
    async with session_stream(gw.url, grant.access) as (session_id, stream):
        await revoke(gw.url, grant.refresh, grant.client_id)
        await until_eof(stream)  # the reaper's next pass, however slow the machine
    [line] = gw.audit("session.revoked")
    assert line["sessions_closed"] == 1 and line["identities"].startswith("oauth-")
    assert gw.app[SESSIONS].get(session_id) is None
    session = gw.app[SESSIONS].get(kept.headers["Mcp-Session-Id"])
    assert session is not None and not session.closed
    assert (await post_initialize(gw.url, grant.access)).status == 401


async def test_own_token_is_bound_to_its_resource(start_oauth: StartOAuth) -> None:
    gw = await start_oauth(oauth_server=True)
    storage = MemoryStorage()
    async with oauth_client(gw.url, gw.operator, storage=storage) as client:
        await client.list_tools()
    assert storage.tokens is not None
    # Issued for /mcp: not for a backend's own route, nor for legacy SSE.
    for path in (f"/servers/{BACKEND}/mcp", "/sse"):
        async with aiohttp.ClientSession() as http:
            if path == "/sse":
                response = await http.get(
                    gw.url + path, headers={"Authorization": f"Bearer {storage.tokens.access_token}"}
                )
            else:
                response = await http.post(
                    gw.url + path,
                    json=init_message(),
                    headers={**ACCEPT, "Authorization": f"Bearer {storage.tokens.access_token}"},
                )
            async with response:
                assert response.status == 401, path
                params = challenge_params(response.headers["WWW-Authenticate"])
                assert params["error"] == "invalid_token"
                assert params["resource_metadata"] == gw.url + "/.well-known/oauth-protected-resource" + path


async def test_consent_pages_take_the_gateways_own_origin_and_nothing_else(start_oauth: StartOAuth) -> None:
    gw = await start_oauth(oauth_server=True)
    # The gateway's own origin is allowed on its sign-in page ...
    evil = Browser(gw.url, origin="http://evil.example")
    try:
        response = await evil.post("/oauth/authorize/login", {"key": gw.operator})
        assert response.status == 403  # the pipeline's Origin check (JSON), before the page's own (HTML)
        assert response.content_type == "application/json"
        assert [e["origin"] for e in gw.audit("origin.denied")] == ["http://evil.example"]
    finally:
        await evil.close()
    # ... but not on the MCP routes, where only ALLOWED_ORIGINS count (none here).
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            gw.url + "/mcp",
            json=init_message(),
            headers={**ACCEPT, "Authorization": f"Bearer {gw.operator}", "Origin": gw.url},
        ) as response,
    ):
        assert response.status == 403


async def test_keys_guessed_on_the_sign_in_page_count_toward_the_lockout(start_oauth: StartOAuth) -> None:
    gw = await start_oauth(oauth_server=True, lockout_failures=3)
    status, client_info = await register(gw.url)
    assert status == 201, client_info
    _, challenge = pkce()
    params = {
        "response_type": "code",
        "client_id": client_info["client_id"],
        "redirect_uri": LOOPBACK_CALLBACK,
        "scope": "mcp:operator",
        "state": "s",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "resource": gw.url + "/mcp",
    }
    browser = Browser(gw.url)
    try:
        page = await browser.authorize(params)
        assert page.status == 200
        action, fields = form_of(await page.text())
        for guess in range(3):
            refused = await browser.post(action, {**fields, "key": f"mcp_wrong_{guess}"})
            assert refused.status == 401
        # The address is locked now: the right key is refused like any guess.
        locked = await browser.post(action, {**fields, "key": gw.operator})
        assert locked.status == 429 and "Retry-After" in locked.headers
    finally:
        await browser.close()


async def test_prm_documents_at_every_route_and_the_401s_point_at_them(start_oauth: StartOAuth) -> None:
    gw = await start_oauth(oauth_server=True)
    async with aiohttp.ClientSession() as http:
        for path in ("", *MCP_ROUTES):
            async with http.get(gw.url + "/.well-known/oauth-protected-resource" + path) as response:
                assert response.status == 200, path
                document = await response.json()
            assert document["resource"] == gw.url + path
            assert document["authorization_servers"] == [gw.url]
            assert document["scopes_supported"] == list(SCOPES)
            assert document["bearer_methods_supported"] == ["header"]
        async with http.get(gw.url + "/.well-known/oauth-protected-resource/nothing") as response:
            assert response.status == 401  # not a resource of ours: no document, auth as any path
        async with http.get(gw.url + "/.well-known/oauth-authorization-server") as response:
            assert (await response.json())["issuer"] == gw.url
    for path in ("/mcp", f"/servers/{BACKEND}/mcp"):
        response = await post_initialize(gw.url, None, path)
        assert response.status == 401
        params = challenge_params(response.headers["WWW-Authenticate"])
        assert "error" not in params
        assert params["scope"] == " ".join(SCOPES)
        assert params["resource_metadata"] == gw.url + "/.well-known/oauth-protected-resource" + path


async def test_prm_documents_still_pass_the_ip_allowlist(start_oauth: StartOAuth) -> None:
    gw = await start_oauth(oauth_server=True, allowed_ips=("10.9.9.9",))
    async with (
        aiohttp.ClientSession() as http,
        http.get(gw.url + "/.well-known/oauth-protected-resource/mcp") as response,
    ):
        assert response.status == 403


async def test_a_real_process_with_oauth_keeps_its_grants_across_a_restart(tmp_path: Path) -> None:
    """server_secure.py configured by environment only: the flow, then a restart on the same
    STATE_DIR, where the token issued before still works (signing key and grant persisted, 0600)."""
    process = oauth_process(tmp_path)
    admin, env, argv = process.admin, process.env, process.argv
    storage = MemoryStorage()
    first = await launch(argv, env=env, cwd=tmp_path)
    try:
        async with oauth_client(first.url, admin, storage=storage) as client:
            assert text_of(await client.call_tool("echo", {"text": "first run"})) == "first run"
    finally:
        assert await first.stop() == 0
    assert storage.tokens is not None
    assert storage.tokens.scope == "mcp:admin"
    for name in ("oauth-signing-key.pem", "oauth.sqlite3"):
        assert stat.S_IMODE((tmp_path / "state" / name).stat().st_mode) == 0o600, name
    second = await launch(argv, env=env, cwd=tmp_path)
    try:
        async with bearer_client(second.url, storage.tokens.access_token) as client:
            assert text_of(await client.call_tool("echo", {"text": "second run"})) == "second run"
    finally:
        assert await second.stop() == 0
    audit = (tmp_path / "audit.log").read_text()
    assert storage.tokens.access_token not in audit and admin not in audit


async def test_a_signing_key_others_can_read_stops_the_start_with_a_clear_message(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "oauth-signing-key.pem").write_text("not a key")
    (state / "oauth-signing-key.pem").chmod(0o644)
    env = {
        "PATH": os.environ["PATH"],
        "AUDIT_LOG": str(tmp_path / "audit.log"),
        "OAUTH_SERVER": "true",
        "STATE_DIR": str(state),
    }
    argv = [sys.executable, str(REPO / "server_secure.py"), "--port", "3999", "--env-file", os.devnull]
    done = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "STATE_DIR=" in done.stderr and "readable by others" in done.stderr
    assert "Traceback" not in done.stderr


# -- an external issuer --------------------------------------------------------------------------------


async def test_external_issuer_tokens_by_resource_and_scope(
    start_oauth: StartOAuth, fake_issuer: FakeIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    gw = await start_oauth(oauth_issuers=(fake_issuer.url,))
    resource = gw.url + "/mcp"

    def mint(**claims: Any) -> str:
        return fake_issuer.key.sign(fake_issuer.claims(**{"aud": resource, **claims}))

    operator = mint(scope="openid mcp:operator", sub="alice")
    async with bearer_client(gw.url, operator) as client:
        assert text_of(await client.call_tool("echo", {"text": "idp"})) == "idp"
    viewer = mint(scope="mcp:viewer", sub="bob")
    async with bearer_client(gw.url, viewer) as client:
        assert (await client.list_tools()).tools
        with pytest.raises(MCPError, match="role 'viewer' may not call tools/call"):
            await client.call_tool("echo", {"text": "no"})

    for other in ("http://127.0.0.1:1/mcp", gw.url + "/mcp-other", gw.url + f"/servers/{BACKEND}/mcp"):
        response = await post_initialize(gw.url, mint(aud=other, scope="mcp:admin"))
        assert response.status == 401, other
        assert challenge_params(response.headers["WWW-Authenticate"])["error"] == "invalid_token"

    response = await post_initialize(gw.url, mint(scope="openid profile"))
    assert response.status == 403
    params = challenge_params(response.headers["WWW-Authenticate"])
    assert params["error"] == "insufficient_scope" and params["scope"] == " ".join(SCOPES)

    async with (
        aiohttp.ClientSession() as http,
        http.get(gw.url + "/.well-known/oauth-protected-resource/mcp") as r,
    ):
        assert (await r.json())["authorization_servers"] == [fake_issuer.url]

    successes = [e for e in gw.audit("auth.success") if e.get("via") == "oauth"]
    assert {(e["issuer"], e["subject"], e["role"]) for e in successes} == {
        (fake_issuer.url, "alice", "operator"),
        (fake_issuer.url, "bob", "viewer"),
    }
    assert_no_secret_logged(gw, caplog, operator, viewer)


async def test_the_built_in_server_and_an_external_issuer_together(
    start_oauth: StartOAuth, fake_issuer: FakeIssuer
) -> None:
    gw = await start_oauth(oauth_server=True, oauth_issuers=(fake_issuer.url,))
    async with (
        aiohttp.ClientSession() as http,
        http.get(gw.url + "/.well-known/oauth-protected-resource/mcp") as r,
    ):
        assert (await r.json())["authorization_servers"] == [gw.url, fake_issuer.url]
    async with oauth_client(gw.url, gw.operator) as client:
        assert text_of(await client.call_tool("echo", {"text": "own"})) == "own"
    external = fake_issuer.key.sign(fake_issuer.claims(aud=gw.url + "/mcp", scope="mcp:operator"))
    async with bearer_client(gw.url, external) as client:
        assert text_of(await client.call_tool("echo", {"text": "external"})) == "external"


# -- OAuth off -----------------------------------------------------------------------------------------


async def test_with_oauth_off_the_401_and_the_routes_are_as_before(start_oauth: StartOAuth) -> None:
    gw = await start_oauth(public_url=None, state_dir=Path("unused"))
    for presented in (None, "not-a-key"):
        response = await post_initialize(gw.url, presented)
        assert response.status == 401
        assert response.headers.getall("WWW-Authenticate") == [REALM]
    async with aiohttp.ClientSession() as http:
        for path in ("/.well-known/oauth-protected-resource/mcp", "/oauth/authorize", "/oauth/jwks.json"):
            async with http.get(gw.url + path) as response:
                assert response.status == 401, path
    assert not Path("unused").exists()


# -- settings ------------------------------------------------------------------------------------------


def test_oauth_settings_are_checked_and_named() -> None:
    assert not Settings().oauth
    assert Settings().public_origin == "http://127.0.0.1:3001"
    with pytest.raises(SettingsError, match="PUBLIC_URL is required"):
        Settings(host="0.0.0.0", oauth_server=True)
    with pytest.raises(SettingsError, match="PUBLIC_URL is required"):
        Settings(port=0, oauth_issuers=("https://idp.example",))
    for bad in (
        "https://gw.example/prefix",
        "ftp://gw.example",
        "https://gw.example?x=1",
        "https://u:p@gw.example",
    ):
        with pytest.raises(SettingsError, match="PUBLIC_URL"):
            Settings.load(environ={"PUBLIC_URL": bad})
    with pytest.raises(SettingsError, match="OAUTH_ISSUERS"):
        Settings.load(environ={"OAUTH_ISSUERS": "http://idp.example"})
    with pytest.raises(SettingsError, match=re.escape("OAUTH_REDIRECT_URIS: 'https://evil.example/*'")):
        Settings.load(environ={"OAUTH_REDIRECT_URIS": "https://app.example/cb,https://evil.example/*"})
    with pytest.raises(SettingsError, match="OAUTH_REFRESH_TTL_SECONDS"):
        Settings(oauth_token_ttl=100, oauth_refresh_ttl=10)
    loaded = Settings.load(
        environ={
            "PUBLIC_URL": "HTTPS://GW.Example:443/",
            "OAUTH_SERVER": "true",
            "STATE_DIRECTORY": "/var/lib/mcp-sse",
        }
    )
    assert loaded.public_origin == "https://gw.example" and loaded.oauth
    assert loaded.state_dir == Path("/var/lib/mcp-sse")
    assert Settings.load(environ={"STATE_DIR": "/srv/s", "STATE_DIRECTORY": "/var/lib/x"}).state_dir == Path(
        "/srv/s"
    )
