"""The built-in authorization server through real HTTP: metadata, registration, the browser's
sign-in and consent, the token endpoint, refresh rotation, revocation, and what an attacker tries.

Everything runs on loopback: a real aiohttp server with the OAuthServer's routes, a real KeyStore
and cookie logins, the SQLite store in a temporary state directory. Time is the server's injected
clock, moved by the tests; nothing waits.
"""

from __future__ import annotations

import importlib.resources
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from mcp.shared.auth import OAuthMetadata

from mcp_sse.oauth import pages
from mcp_sse.oauth.metadata import ROLE_SCOPES as PRM_ROLE_SCOPES
from mcp_sse.oauth.metadata import SCOPES as PRM_SCOPES
from mcp_sse.oauth.server import OAuthServer
from mcp_sse.oauth.tokens import ROLE_SCOPES, OwnToken, SigningKey, TokenRefused
from mcp_sse.security.audit import AuditLog
from mcp_sse.security.cookies import Logins
from mcp_sse.security.keys import KeyStore, digest
from mcp_sse.settings import Secret
from mcp_sse.store.sqlite import SQLiteStore

from .as_helpers import (
    AS,
    LOOPBACK_CALLBACK,
    Browser,
    authorization_params,
    basic,
    form_of,
    pkce,
    query_of,
    register,
    start_as,
    token,
)


@pytest.fixture
async def as_(tmp_path: Path) -> AsyncIterator[AS]:
    running = await start_as(tmp_path)
    yield running
    await running.http.close()


@pytest.fixture
async def browser(as_: AS) -> AsyncIterator[Browser]:
    b = Browser(as_.url)
    yield b
    await b.close()


async def public_client(as_: AS, **metadata: Any) -> str:
    status, body = await register(as_.url, **metadata)
    assert status == 201, body
    return str(body["client_id"])


async def get_code(
    as_: AS, browser: Browser, client_id: str, key: str | None = None, **overrides: str
) -> tuple[str, str, dict[str, str]]:
    """Sign in, approve; (code, verifier, the authorization request's parameters)."""
    verifier, challenge = pkce()
    params = authorization_params(as_, client_id, challenge, **overrides)
    answer = await browser.approve(params, key or as_.keys.admin)
    assert "code" in answer, answer
    return answer["code"], verifier, params


async def exchange(
    as_: AS, client_id: str, code: str, verifier: str, **extra: str
) -> tuple[int, dict[str, Any]]:
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "code_verifier": verifier,
        "client_id": client_id,
        "redirect_uri": LOOPBACK_CALLBACK,
        "resource": as_.resource,
        **extra,
    }
    status, body, _ = await token(as_.url, {k: v for k, v in form.items() if v != ""})
    return status, body


async def refresh(as_: AS, client_id: str, refresh_token: str, **extra: str) -> tuple[int, dict[str, Any]]:
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": client_id, **extra}
    status, body, _ = await token(as_.url, form)
    return status, body


async def tokens(
    as_: AS, browser: Browser, client_id: str, key: str | None = None, **overrides: str
) -> dict[str, Any]:
    code, verifier, _ = await get_code(as_, browser, client_id, key, **overrides)
    status, body = await exchange(as_, client_id, code, verifier)
    assert status == 200, body
    return body


async def verified(as_: AS, access_token: str, resource: str | None = None) -> OwnToken:
    result = await as_.server.verify_own_token(access_token, resource or as_.resource)
    assert isinstance(result, OwnToken), result
    return result


async def refused(as_: AS, access_token: str, resource: str | None = None) -> str:
    result = await as_.server.verify_own_token(access_token, resource or as_.resource)
    assert isinstance(result, TokenRefused), result
    return result.reason


# -- metadata -------------------------------------------------------------------------------------


async def test_metadata_at_both_discovery_paths(as_: AS) -> None:
    async with aiohttp.ClientSession() as session:
        documents = []
        for path in ("/.well-known/oauth-authorization-server", "/.well-known/openid-configuration"):
            async with session.get(as_.url + path) as response:
                assert response.status == 200
                documents.append(await response.json())
    assert documents[0] == documents[1]
    meta = documents[0]
    assert meta["issuer"] == as_.url
    assert meta["authorization_endpoint"] == as_.url + "/oauth/authorize"
    assert meta["token_endpoint"] == as_.url + "/oauth/token"
    assert meta["registration_endpoint"] == as_.url + "/oauth/register"
    assert meta["revocation_endpoint"] == as_.url + "/oauth/revoke"
    assert meta["response_types_supported"] == ["code"]
    assert meta["grant_types_supported"] == ["authorization_code", "refresh_token"]
    assert meta["code_challenge_methods_supported"] == ["S256"]
    assert meta["token_endpoint_auth_methods_supported"] == [
        "none",
        "client_secret_basic",
        "client_secret_post",
    ]
    assert meta["scopes_supported"] == ["mcp:admin", "mcp:operator", "mcp:viewer"]
    assert meta["client_id_metadata_document_supported"] is True
    assert meta["authorization_response_iss_parameter_supported"] is True
    # The SDK client reads it; its issuer stays the exact string (RFC 8414 section 3.3).
    assert str(OAuthMetadata.model_validate(meta).issuer) == as_.url


def test_scopes_agree_with_the_resource_metadata() -> None:
    assert dict(ROLE_SCOPES) == dict(PRM_ROLE_SCOPES)
    assert sorted(ROLE_SCOPES.values()) == sorted(PRM_SCOPES)


# -- the whole flow ---------------------------------------------------------------------------------


async def test_whole_flow_register_authorize_token_refresh_revoke(as_: AS, browser: Browser) -> None:
    client_id = await public_client(as_)
    verifier, challenge = pkce()
    params = authorization_params(as_, client_id, challenge)

    login = await browser.authorize(params)
    assert login.status == 200
    page = await login.text()
    assert 'name="key"' in page and "Test Client" in page
    consent = await browser.sign_in(params, as_.keys.admin)
    assert consent.status == 200
    page = await consent.text()
    assert "Test Client" in page and "127.0.0.1:8976" in page and "mcp:admin" in page
    assert "All backends: time, files" in page
    action, fields = form_of(page)
    answer = await browser.post(action, {**fields, "decision": "approve"})
    assert answer.status == 303
    location = answer.headers["Location"]
    assert location.startswith(LOOPBACK_CALLBACK + "?")
    query = query_of(location)
    assert query["state"] == params["state"]  # state echoed
    assert query["iss"] == as_.url  # RFC 9207
    assert set(query) == {"code", "state", "iss"}

    status, body = await exchange(as_, client_id, query["code"], verifier)
    assert status == 200, body
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3600 and body["scope"] == "mcp:admin"
    own = await verified(as_, body["access_token"])
    assert (own.subject, own.client_id, own.role, own.key.id) == (
        "auth-token",
        client_id,
        "admin",
        "auth-token",
    )
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["aud"] == as_.resource and claims["iss"] == as_.url and claims["sub"] == "auth-token"
    assert {"jti", "exp", "iat", "client_id", "scope"} <= set(claims)

    status, rotated = await refresh(as_, client_id, body["refresh_token"])
    assert status == 200, rotated
    assert rotated["refresh_token"] != body["refresh_token"]
    assert rotated["access_token"] != body["access_token"]
    await verified(as_, rotated["access_token"])

    async with aiohttp.ClientSession() as session:
        form = {"token": rotated["refresh_token"], "client_id": client_id}
        async with session.post(as_.url + "/oauth/revoke", data=form) as response:
            assert response.status == 200
    assert await refused(as_, rotated["access_token"]) == "the grant was revoked"
    assert await refused(as_, body["access_token"]) == "the grant was revoked"
    status, error = await refresh(as_, client_id, rotated["refresh_token"])
    assert (status, error["error"]) == (400, "invalid_grant")
    assert [e["outcome"] for e in as_.events("oauth.authorize")] == ["approved"]
    assert [e["outcome"] for e in as_.events("oauth.revoke")] == ["revoked"]


async def test_confidential_client_authenticates_with_basic_or_post(as_: AS, browser: Browser) -> None:
    status, registered = await register(as_.url, token_endpoint_auth_method="client_secret_basic")
    assert status == 201 and registered["client_secret"] and registered["client_secret_expires_at"] == 0
    client_id, secret = registered["client_id"], registered["client_secret"]

    code, verifier, _ = await get_code(as_, browser, client_id)
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "code_verifier": verifier,
        "resource": as_.resource,
    }
    status, body, response = await token(as_.url, form, headers=basic(client_id, "wrong"))
    assert (status, body["error"]) == (401, "invalid_client")
    assert response.headers["WWW-Authenticate"].startswith("Basic")
    assert response.headers["Cache-Control"] == "no-store"
    status, body, _ = await token(as_.url, {**form, "client_id": client_id})  # no secret at all
    assert (status, body["error"]) == (401, "invalid_client")
    # The failed attempts did not spend the code: client authentication comes first.
    status, body, _ = await token(as_.url, form, headers=basic(client_id, secret))
    assert status == 200, body

    # A public client may send Basic with an empty password: that is no secret, and no refusal.
    public = await public_client(as_)
    code, verifier, _ = await get_code(as_, browser, public)
    status, public_tokens, _ = await token(
        as_.url, {**form, "code": code, "code_verifier": verifier}, headers=basic(public, "")
    )
    assert status == 200, public_tokens

    status, body, _ = await token(
        as_.url,
        {
            "grant_type": "refresh_token",
            "refresh_token": body["refresh_token"],
            "client_id": client_id,
            "client_secret": secret,
        },
    )
    assert status == 200, body  # client_secret_post works for the same client
    status, body, _ = await token(
        as_.url,
        {"grant_type": "refresh_token", "refresh_token": body["refresh_token"], "client_secret": secret},
        headers=basic(client_id, secret),
    )
    assert (status, body["error"]) == (400, "invalid_request")  # two methods at once


# -- redirect URIs and the authorization request ----------------------------------------------------


async def test_unregistered_redirect_uri_gets_an_error_page_not_a_redirect(as_: AS, browser: Browser) -> None:
    client_id = await public_client(as_)
    _, challenge = pkce()
    for redirect_uri in (
        "https://evil.example/callback",
        "http://127.0.0.1:8977/callback",
        LOOPBACK_CALLBACK + "/x",
    ):
        response = await browser.authorize(
            authorization_params(as_, client_id, challenge, redirect_uri=redirect_uri)
        )
        assert response.status == 400
        assert "Location" not in response.headers
        assert response.content_type == "text/html"
        assert "evil.example" not in response.headers.get("Content-Security-Policy", "")
    response = await browser.authorize(authorization_params(as_, "mcp-nobody", challenge))
    assert response.status == 400 and "Location" not in response.headers
    assert "not registered" in await response.text()


async def test_registration_only_for_allowed_redirect_uris(as_: AS) -> None:
    for uris in (
        ["https://evil.example/callback"],
        ["http://example.com/callback"],  # http beyond loopback
        ["https://claude.ai/api/mcp/auth_callback#frag"],
        ["https://claude.ai/api/mcp/auth_callback", "https://evil.example/cb"],  # one bad one spoils all
        ["javascript:alert(1)"],
        ["http://127.0.0.1:8976/cb with space"],
    ):
        status, body = await register(as_.url, redirect_uris=uris)
        assert status == 400, (uris, body)
        assert body["error"] == "invalid_redirect_uri"
    for uris in (
        ["https://claude.ai/api/mcp/auth_callback"],
        ["https://chatgpt.com/connector_platform_oauth_redirect"],
        ["http://localhost:33418/oauth/callback", "http://[::1]:5000/cb"],
    ):
        status, body = await register(as_.url, redirect_uris=uris)
        assert status == 201, (uris, body)
        assert body["redirect_uris"] == uris


async def test_registration_refuses_bad_metadata(as_: AS) -> None:
    cases: list[tuple[Any, str]] = [
        (
            {"redirect_uris": [LOOPBACK_CALLBACK], "token_endpoint_auth_method": "private_key_jwt"},
            "invalid_client_metadata",
        ),
        ({"redirect_uris": [LOOPBACK_CALLBACK], "grant_types": ["implicit"]}, "invalid_client_metadata"),
        (
            {"redirect_uris": [LOOPBACK_CALLBACK], "grant_types": ["password", "authorization_code"]},
            "invalid_client_metadata",
        ),
        ({"redirect_uris": [LOOPBACK_CALLBACK], "response_types": ["token"]}, "invalid_client_metadata"),
        ({"redirect_uris": [LOOPBACK_CALLBACK], "client_name": 7}, "invalid_client_metadata"),
        ([LOOPBACK_CALLBACK], "invalid_client_metadata"),
        ({"client_name": "no redirect"}, "invalid_redirect_uri"),
        ({"redirect_uris": []}, "invalid_redirect_uri"),
    ]
    async with aiohttp.ClientSession() as session:
        for body, error in cases:
            async with session.post(as_.url + "/oauth/register", json=body) as response:
                assert response.status == 400, body
                assert (await response.json())["error"] == error
        async with session.post(
            as_.url + "/oauth/register", data="[" * 5000, headers={"Content-Type": "application/json"}
        ) as response:
            assert response.status == 400 and (await response.json())["error"] == "invalid_client_metadata"
        async with session.post(
            as_.url + "/oauth/register", data="{not json", headers={"Content-Type": "application/json"}
        ) as response:
            assert response.status == 400 and (await response.json())["error"] == "invalid_client_metadata"
        async with session.post(
            as_.url + "/oauth/register",
            data=json.dumps({"client_name": "x" * 20000}),
            headers={"Content-Type": "application/json"},
        ) as response:
            assert response.status == 400
    # RFC 7591: an omitted method is client_secret_basic, so a secret comes back.
    async with (
        aiohttp.ClientSession() as session,
        session.post(as_.url + "/oauth/register", json={"redirect_uris": [LOOPBACK_CALLBACK]}) as response,
    ):
        body = await response.json()
    assert (
        response.status == 201
        and body["token_endpoint_auth_method"] == "client_secret_basic"
        and body["client_secret"]
    )


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"code_challenge": ""}, "invalid_request"),  # no PKCE
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"code_challenge_method": ""}, "invalid_request"),  # absent means plain (RFC 7636 section 4.3)
        ({"code_challenge": "short"}, "invalid_request"),
        ({"response_type": "token"}, "unsupported_response_type"),  # no implicit grant
        ({"resource": ""}, "invalid_target"),
        ({"resource": "https://other.example/mcp"}, "invalid_target"),
        ({"resource": "http://127.0.0.1:1/mcp"}, "invalid_target"),
    ],
)
async def test_bad_authorization_requests_go_back_with_an_error(
    as_: AS, browser: Browser, overrides: dict[str, str], error: str
) -> None:
    client_id = await public_client(as_)
    _, challenge = pkce()
    params = authorization_params(as_, client_id, challenge, **overrides)
    response = await browser.authorize(params)
    assert response.status == 302
    location = response.headers["Location"]
    assert location.startswith(LOOPBACK_CALLBACK + "?")
    query = query_of(location)
    assert query["error"] == error
    assert query["state"] == params["state"] and query["iss"] == as_.url
    assert "code" not in query


async def test_denied_consent_goes_back_with_access_denied(as_: AS, browser: Browser) -> None:
    client_id = await public_client(as_)
    _, challenge = pkce()
    params = authorization_params(as_, client_id, challenge)
    answer = await browser.approve(params, as_.keys.admin, decision="deny")
    assert answer == {
        "error": "access_denied",
        "error_description": "the user denied the request",
        "state": params["state"],
        "iss": as_.url,
    }
    assert [e["outcome"] for e in as_.events("oauth.authorize")] == ["denied"]


# -- codes and PKCE ---------------------------------------------------------------------------------


async def test_wrong_verifier_is_refused(as_: AS, browser: Browser) -> None:
    client_id = await public_client(as_)
    code, verifier, _ = await get_code(as_, browser, client_id)
    other, _ = pkce()
    status, body = await exchange(as_, client_id, code, other)
    assert (status, body["error"]) == (400, "invalid_grant")
    status, body = await exchange(as_, client_id, code, "")
    assert (status, body["error"]) == (400, "invalid_request")
    # The code was spent by the failed try: the right verifier cannot redeem it now.
    status, body = await exchange(as_, client_id, code, verifier)
    assert (status, body["error"]) == (400, "invalid_grant")


async def test_code_reuse_is_refused_and_revokes_what_it_issued(as_: AS, browser: Browser) -> None:
    client_id = await public_client(as_)
    code, verifier, _ = await get_code(as_, browser, client_id)
    status, first = await exchange(as_, client_id, code, verifier)
    assert status == 200
    await verified(as_, first["access_token"])
    status, body = await exchange(as_, client_id, code, verifier)
    assert (status, body["error"], body["error_description"]) == (
        400,
        "invalid_grant",
        "authorization code already used",
    )
    assert await refused(as_, first["access_token"]) == "the grant was revoked"
    status, body = await refresh(as_, client_id, first["refresh_token"])
    assert (status, body["error"]) == (400, "invalid_grant")
    [reuse] = as_.events("oauth.code_reuse")
    assert reuse["revoked"] is True and reuse["client_id"] == client_id


async def test_code_expires_after_60_seconds(as_: AS, browser: Browser) -> None:
    client_id = await public_client(as_)
    code, verifier, _ = await get_code(as_, browser, client_id)
    as_.clock.advance(60)
    status, body = await exchange(as_, client_id, code, verifier)
    assert (status, body["error_description"]) == (400, "authorization code expired")


async def test_code_is_bound_to_client_redirect_uri_and_resource(as_: AS, browser: Browser) -> None:
    client_id = await public_client(as_)
    other_client = await public_client(as_)
    code, verifier, _ = await get_code(as_, browser, client_id)
    status, body = await exchange(as_, other_client, code, verifier)
    assert (status, body["error"]) == (400, "invalid_grant")

    code, verifier, _ = await get_code(as_, browser, client_id)
    status, body = await exchange(as_, client_id, code, verifier, redirect_uri="http://127.0.0.1:8976/other")
    assert (status, body["error"]) == (400, "invalid_grant")

    code, verifier, _ = await get_code(as_, browser, client_id)
    status, body = await exchange(as_, client_id, code, verifier, resource=as_.url + "/servers/time/mcp")
    assert (status, body["error"]) == (400, "invalid_target")
    code, verifier, _ = await get_code(as_, browser, client_id)
    status, body = await exchange(as_, client_id, code, verifier, resource="https://other.example/mcp")
    assert (status, body["error"]) == (400, "invalid_target")


# -- scopes and keys --------------------------------------------------------------------------------


async def test_scope_never_exceeds_the_keys_role(as_: AS, browser: Browser) -> None:
    client_id = await public_client(as_)
    viewer = Browser(as_.url)
    operator = Browser(as_.url)
    admin = Browser(as_.url)
    try:
        _, challenge = pkce()
        consent = await viewer.sign_in(authorization_params(as_, client_id, challenge), as_.keys.viewer)
        page = await consent.text()
        assert '<span class="pill">mcp:viewer</span>' in page and "no tool calls" in page
        assert '<span class="pill">mcp:admin' not in page  # asked for, not offered
        body = await tokens(as_, viewer, client_id, as_.keys.viewer)  # asks for all three
        assert body["scope"] == "mcp:viewer"
        own = await verified(as_, body["access_token"])
        assert (own.role, own.subject, own.scopes) == ("viewer", "k-viewer", frozenset({"mcp:viewer"}))

        body = await tokens(as_, operator, client_id, as_.keys.operator, scope="mcp:admin")
        assert body["scope"] == "mcp:operator"
        own = await verified(as_, body["access_token"])
        assert own.key.backends == ("time",) and own.key.tools_deny == ("*delete*",)

        body = await tokens(as_, admin, client_id, as_.keys.admin, scope="mcp:viewer")
        assert body["scope"] == "mcp:viewer"  # least privilege: what was asked for
        body = await tokens(as_, admin, client_id, as_.keys.admin, scope="openid offline_access")
        assert body["scope"] == "mcp:admin"  # nothing of ours asked for: the key's role
    finally:
        for b in (viewer, operator, admin):
            await b.close()


async def test_consent_page_shows_the_keys_reach(as_: AS, browser: Browser) -> None:
    client_id = await public_client(as_, client_name="Claude")
    _, challenge = pkce()
    params = authorization_params(as_, client_id, challenge)
    page = await (await browser.sign_in(params, as_.keys.operator)).text()
    assert "mcp:operator" in page and "otto" in page
    assert ">time<" in page and "Only get_*; never *delete*" in page
    assert "own computer" in page  # a loopback redirect gets the warning the MCP pages ask for


async def test_refresh_cannot_widen_scope_and_may_narrow_it(as_: AS, browser: Browser) -> None:
    client_id = await public_client(as_)
    body = await tokens(as_, browser, client_id, scope="mcp:operator")
    status, error = await refresh(as_, client_id, body["refresh_token"], scope="mcp:admin")
    assert (status, error["error"]) == (400, "invalid_scope")
    # The refused refresh did not spend the token (no false reuse alarm).
    status, narrowed = await refresh(as_, client_id, body["refresh_token"], scope="mcp:viewer")
    assert status == 200 and narrowed["scope"] == "mcp:viewer"
    status, again = await refresh(as_, client_id, narrowed["refresh_token"])
    assert status == 200 and again["scope"] == "mcp:operator"


async def test_token_of_a_revoked_key_fails_verification_and_refresh(as_: AS, browser: Browser) -> None:
    client_id = await public_client(as_)
    body = await tokens(as_, browser, client_id, as_.keys.operator)
    await verified(as_, body["access_token"])
    as_.write_keys(as_.keys.entries(operator=False))
    assert as_.keystore.reload() == {"k-operator"}
    assert (
        await refused(as_, body["access_token"])
        == "the key that approved the token was revoked or has expired"
    )
    status, error = await refresh(as_, client_id, body["refresh_token"])
    assert (status, error["error"]) == (400, "invalid_grant")


async def test_token_of_an_expired_key_fails_verification_and_refresh(as_: AS, browser: Browser) -> None:
    client_id = await public_client(as_)
    entries = as_.keys.entries()
    entries[1]["expires"] = "2999-01-01T00:00:00Z"
    as_.write_keys(entries)
    as_.keystore.reload()
    body = await tokens(as_, browser, client_id, as_.keys.operator)
    await verified(as_, body["access_token"])
    entries[1]["expires"] = "2000-01-01T00:00:00Z"  # the key runs out (KeyStore keeps the real clock)
    as_.write_keys(entries)
    assert as_.keystore.reload() == set()  # still listed, no longer current
    assert "revoked or has expired" in await refused(as_, body["access_token"])
    status, error = await refresh(as_, client_id, body["refresh_token"])
    assert (status, error["error"]) == (400, "invalid_grant")


async def test_a_key_reissued_under_the_same_id_does_not_inherit_tokens(as_: AS, browser: Browser) -> None:
    client_id = await public_client(as_)
    body = await tokens(as_, browser, client_id, as_.keys.operator)
    entries = as_.keys.entries()
    entries[1]["sha256"] = digest("mcp_a-new-secret").hex()
    as_.write_keys(entries)
    as_.keystore.reload()
    assert as_.keystore.current("k-operator") is not None
    assert "revoked" in await refused(as_, body["access_token"])


async def test_access_token_expires_on_the_servers_clock(as_: AS, browser: Browser) -> None:
    client_id = await public_client(as_)
    body = await tokens(as_, browser, client_id)
    as_.clock.advance(3599)
    await verified(as_, body["access_token"])
    as_.clock.advance(1)
    assert await refused(as_, body["access_token"]) == "the token has expired"
    status, fresh = await refresh(as_, client_id, body["refresh_token"])  # the refresh token lives on
    assert status == 200
    await verified(as_, fresh["access_token"])


async def test_refresh_token_expires(as_: AS, browser: Browser) -> None:
    client_id = await public_client(as_)
    body = await tokens(as_, browser, client_id)
    as_.clock.advance(30 * 86400)
    status, error = await refresh(as_, client_id, body["refresh_token"])
    assert (status, error["error"]) == (400, "invalid_grant")


# -- refresh tokens ----------------------------------------------------------------------------------


async def test_refresh_token_reuse_revokes_the_family(as_: AS, browser: Browser) -> None:
    client_id = await public_client(as_)
    first = await tokens(as_, browser, client_id)
    status, second = await refresh(as_, client_id, first["refresh_token"])
    assert status == 200
    status, third = await refresh(as_, client_id, second["refresh_token"])
    assert status == 200
    status, error = await refresh(as_, client_id, first["refresh_token"])  # the thief's copy
    assert (status, error["error"]) == (400, "invalid_grant")
    assert "revoked" in error["error_description"]
    status, error = await refresh(as_, client_id, third["refresh_token"])  # the family is gone
    assert (status, error["error"]) == (400, "invalid_grant")
    assert await refused(as_, third["access_token"]) == "the grant was revoked"
    [reuse] = as_.events("oauth.refresh_reuse")
    assert reuse["client_id"] == client_id and reuse["identity"] == "auth-token"


async def test_refresh_token_is_bound_to_its_client_and_resource(as_: AS, browser: Browser) -> None:
    client_id = await public_client(as_)
    other = await public_client(as_)
    body = await tokens(as_, browser, client_id)
    status, error = await refresh(as_, other, body["refresh_token"])
    assert (status, error["error"]) == (400, "invalid_grant")
    status, error = await refresh(
        as_, client_id, body["refresh_token"], resource=as_.url + "/servers/time/mcp"
    )
    assert (status, error["error"]) == (400, "invalid_target")
    status, ok = await refresh(as_, client_id, body["refresh_token"], resource=as_.resource)
    assert status == 200, ok  # neither refusal spent it


# -- the token endpoint's errors ----------------------------------------------------------------------


async def test_token_endpoint_errors_are_oauth_json_and_never_cached(as_: AS) -> None:
    client_id = await public_client(as_)
    cases: list[tuple[dict[str, str], int, str]] = [
        (
            {"grant_type": "password", "username": "a", "password": "b", "client_id": client_id},
            400,
            "unsupported_grant_type",
        ),
        ({"grant_type": "client_credentials", "client_id": client_id}, 400, "unsupported_grant_type"),
        ({"client_id": client_id}, 400, "invalid_request"),
        ({"grant_type": "authorization_code", "client_id": client_id}, 400, "invalid_request"),
        (
            {
                "grant_type": "authorization_code",
                "code": "x",
                "code_verifier": "y" * 43,
                "client_id": client_id,
            },
            400,
            "invalid_grant",
        ),
        ({"grant_type": "refresh_token", "client_id": client_id}, 400, "invalid_request"),
        (
            {"grant_type": "refresh_token", "refresh_token": "nope", "client_id": client_id},
            400,
            "invalid_grant",
        ),
        ({"grant_type": "authorization_code", "code": "x", "code_verifier": "y" * 43}, 401, "invalid_client"),
        (
            {
                "grant_type": "authorization_code",
                "code": "x",
                "code_verifier": "y" * 43,
                "client_id": "mcp-gone",
            },
            401,
            "invalid_client",
        ),
        (
            {
                "grant_type": "authorization_code",
                "code": "x",
                "code_verifier": "y" * 43,
                "client_id": client_id,
                "client_secret": "s",
            },
            401,
            "invalid_client",
        ),
    ]
    for form, status, error in cases:
        got, body, response = await token(as_.url, form)
        assert (got, body.get("error")) == (status, error), form
        assert response.headers["Cache-Control"] == "no-store"
        assert set(body) == {"error", "error_description"}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            as_.url + "/oauth/token", json={"grant_type": "authorization_code"}
        ) as response:
            assert response.status == 400 and (await response.json())["error"] == "invalid_request"
        async with session.post(
            as_.url + "/oauth/token",
            data=b"grant_type=authorization_code&code=\xff\xfe",  # not UTF-8
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ) as response:
            assert response.status == 400 and (await response.json())["error"] == "invalid_request"
        async with session.post(
            as_.url + "/oauth/token",
            data="grant_type=refresh_token&grant_type=authorization_code",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ) as response:
            assert response.status == 400 and (await response.json())["error"] == "invalid_request"
        async with session.post(
            as_.url + "/oauth/token",
            data={"grant_type": "refresh_token", "client_id": client_id},
            headers={"Authorization": "Basic !!!"},
        ) as response:
            assert response.status == 401 and (await response.json())["error"] == "invalid_client"


# -- browser-side attacks ------------------------------------------------------------------------------


async def test_consent_post_without_csrf_token_or_from_a_foreign_origin_is_refused(
    as_: AS, browser: Browser
) -> None:
    client_id = await public_client(as_)
    _, challenge = pkce()
    params = authorization_params(as_, client_id, challenge)
    consent = await browser.sign_in(params, as_.keys.admin)
    action, fields = form_of(await consent.text())
    fields["decision"] = "approve"

    no_token = {k: v for k, v in fields.items() if k != "csrf"}
    assert (await browser.post(action, no_token)).status == 403
    assert (await browser.post(action, {**fields, "csrf": "A" * 43})).status == 403
    assert (await browser.post(action, fields, origin="https://evil.example")).status == 403
    assert (await browser.post(action, fields, origin="null")).status == 403
    assert (await browser.post(action, fields, origin=None)).status == 403
    # The token is bound to the request: it cannot approve another client's or another redirect's.
    other = await public_client(as_, redirect_uris=["http://127.0.0.1:9000/cb"])
    swapped = {**fields, "client_id": other, "redirect_uri": "http://127.0.0.1:9000/cb"}
    assert (await browser.post(action, swapped)).status == 403
    # ...nor from another browser (another login).
    intruder = Browser(as_.url)
    try:
        await intruder.sign_in(params, as_.keys.admin)
        assert (await intruder.post(action, fields)).status == 403
    finally:
        await intruder.close()
    assert as_.events("oauth.authorize") and all(
        e["outcome"] == "refused" for e in as_.events("oauth.authorize")
    )
    answer = await browser.post(action, fields)  # the real one still works
    assert answer.status == 303 and "code=" in answer.headers["Location"]


async def test_sign_in_needs_our_origin_its_form_token_and_a_valid_key(as_: AS, browser: Browser) -> None:
    client_id = await public_client(as_)
    _, challenge = pkce()
    params = authorization_params(as_, client_id, challenge)
    page = await browser.authorize(params)
    action, fields = form_of(await page.text())
    assert (
        await browser.post(action, {**fields, "key": as_.keys.admin}, origin="https://evil.example")
    ).status == 403
    stranger = Browser(as_.url)  # no pre-login cookie: a cross-site form cannot have it (login CSRF)
    try:
        assert (await stranger.post(action, {**fields, "key": as_.keys.admin})).status == 403
    finally:
        await stranger.close()
    wrong = await browser.post(action, {**fields, "key": "mcp_wrong"})
    assert wrong.status == 401 and "That key is not valid." in await wrong.text()
    assert as_.events("auth.failed")
    ok = await browser.post(action, {**fields, "key": as_.keys.admin})
    assert ok.status == 303 and ok.headers["Location"].startswith("/oauth/authorize?")
    assert [e["identity"] for e in as_.events("session.login")] == ["auth-token"]


async def test_pages_escape_client_names_and_carry_a_strict_csp(as_: AS, browser: Browser) -> None:
    hostile = '<script>alert(1)</script>"><img src=x onerror=alert(2)>\u202eevil'
    client_id = await public_client(as_, client_name=hostile)
    _, challenge = pkce()
    params = authorization_params(as_, client_id, challenge, state='"><script>alert(3)</script>')
    login = await browser.authorize(params)
    consent = await browser.sign_in(params, as_.keys.admin)
    for response in (login, consent):
        page = await response.text()
        assert "<script" not in page and "<img" not in page and "\u202e" not in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
        csp = response.headers["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp and "style-src 'self'" in csp
        assert "unsafe-inline" not in csp and "script-src" not in csp
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["Cache-Control"] == "no-store"
        assert response.headers["Referrer-Policy"] == "same-origin"
        assert re.search(r"<link rel=\"stylesheet\" href=\"/oauth/static/oauth.css\?v=[0-9a-f]{12}\">", page)
    assert "form-action 'self' http://127.0.0.1:8976" in consent.headers["Content-Security-Policy"]
    css = await browser.get("/oauth/static/oauth.css")
    assert css.status == 200 and css.content_type == "text/css"


# -- revocation -----------------------------------------------------------------------------------------


async def test_revoking_an_access_token_ends_its_grant_and_foreign_tokens_are_left_alone(
    as_: AS, browser: Browser
) -> None:
    client_id = await public_client(as_)
    other = await public_client(as_)
    body = await tokens(as_, browser, client_id)
    async with aiohttp.ClientSession() as session:
        for form in (
            {"token": body["access_token"], "client_id": other},  # someone else's: 200, nothing happens
            {"token": body["refresh_token"], "client_id": other},
            {"token": "not-a-token", "client_id": client_id},
        ):
            async with session.post(as_.url + "/oauth/revoke", data=form) as response:
                assert response.status == 200
        await verified(as_, body["access_token"])
        async with session.post(
            as_.url + "/oauth/revoke",
            data={"token": body["access_token"], "token_type_hint": "access_token", "client_id": client_id},
        ) as response:
            assert response.status == 200
        async with session.post(as_.url + "/oauth/revoke", data={"token": "x"}) as response:
            assert response.status == 401 and (await response.json())["error"] == "invalid_client"
    assert await refused(as_, body["access_token"]) == "the grant was revoked"
    status, _ = await refresh(as_, client_id, body["refresh_token"])
    assert status == 400
    assert [e["outcome"] for e in as_.events("oauth.revoke")] == ["nothing to revoke"] * 3 + [
        "revoked",
        "refused",
    ]


# -- verification ---------------------------------------------------------------------------------------


async def test_verify_own_token_refuses_other_resources_forgeries_and_garbage(
    as_: AS, browser: Browser
) -> None:
    client_id = await public_client(as_)
    body = await tokens(as_, browser, client_id)
    access = body["access_token"]
    await verified(as_, access)  # remembered as verified for /mcp: that must not carry over
    assert await refused(as_, access, as_.url + "/servers/time/mcp") == "the token is for another resource"
    assert await refused(as_, access, "https://other.example/mcp") == "the token is for another resource"
    assert await refused(as_, access, "not a url") == "not a resource URL"
    claims = jwt.decode(access, options={"verify_signature": False})
    header = jwt.get_unverified_header(access)
    forged = jwt.encode(claims, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256", headers=header)
    assert await refused(as_, forged) == "invalid token"
    unsigned = jwt.encode(claims, "", algorithm="none", headers={"kid": header["kid"], "typ": "at+jwt"})
    assert await refused(as_, unsigned) == "invalid token"
    assert await refused(as_, "garbage") == "invalid token"
    assert as_.server.looks_like_own_token(access) and not as_.server.looks_like_own_token("garbage")

    # The published JWKS verifies the token on its own (any resource server could).
    async with aiohttp.ClientSession() as session, session.get(as_.url + "/oauth/jwks.json") as response:
        jwks = await response.json()
    key = jwt.PyJWK(jwks["keys"][0])
    assert (
        jwt.decode(
            access,
            key,
            algorithms=["ES256"],
            audience=as_.resource,
            issuer=as_.url,
            options={"verify_exp": False},
        )["sub"]
        == "auth-token"
    )
    # ...but a signature is not enough here: a token whose grant is unknown does not count.
    replayed = dict(claims, gid="unknown-grant")
    resigned = as_.server.signing_key.sign(replayed)
    assert await refused(as_, resigned) == "the grant was revoked"


# -- secrets never leak -----------------------------------------------------------------------------------


async def test_audit_lines_hold_no_secret(as_: AS, browser: Browser) -> None:
    status, registered = await register(as_.url, token_endpoint_auth_method="client_secret_post")
    client_id, secret = registered["client_id"], registered["client_secret"]
    code, verifier, _ = await get_code(as_, browser, client_id)
    status, body = await exchange(as_, client_id, code, verifier, client_secret=secret)
    assert status == 200, body
    status, again = await refresh(as_, client_id, body["refresh_token"], client_secret=secret)
    await refresh(as_, client_id, body["refresh_token"], client_secret=secret)  # reuse
    await exchange(as_, client_id, code, verifier, client_secret=secret)  # code reuse
    text = as_.audit_stream.getvalue() + (as_.state_dir.parent / "audit.log").read_text()
    for value in (
        secret,
        code,
        verifier,
        body["access_token"],
        body["refresh_token"],
        again["refresh_token"],
        as_.keys.admin,
    ):
        assert value not in text
    events = {line["event"] for line in as_.audit_lines}
    assert {
        "oauth.register",
        "oauth.authorize",
        "oauth.token",
        "oauth.refresh_reuse",
        "oauth.code_reuse",
        "session.login",
    } <= events


def test_missing_page_templates_stop_the_server_at_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    class Missing:
        def joinpath(self, *parts: str) -> Missing:
            return self

        def read_text(self, **kwargs: Any) -> str:
            raise FileNotFoundError(2, "No such file or directory", "page.html")

        def read_bytes(self) -> bytes:
            raise FileNotFoundError(2, "No such file or directory", "oauth.css")

    pages.assets.cache_clear()
    monkeypatch.setattr(importlib.resources, "files", lambda package: Missing())
    try:
        with pytest.raises(RuntimeError, match="package-data"):
            OAuthServer(
                issuer="https://gw.example",
                resource_urls=["https://gw.example/mcp"],
                keys=KeyStore(Secret("k" * 40), None),
                logins=Logins(lifetime=60, idle=60),
                store=SQLiteStore(tmp_path / "never-opened.sqlite3"),
                audit=AuditLog(None, stream=None),
                signing_key=SigningKey.generate(),
            )
    finally:
        monkeypatch.undo()
        pages.assets.cache_clear()
    assert pages.assets().css  # and with them in place, all is well again
