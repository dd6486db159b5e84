"""The gateway against a real identity provider, end to end: oidc-provider (tests/oauth/idp) on
loopback issues client_credentials tokens bound to a resource (RFC 8707); a real server_secure.py
process configured by environment only (OAUTH_ISSUERS, PUBLIC_URL) takes them from the official MCP
SDK client over Streamable HTTP, by resource and scope. Key rotation is shown in process, where the
verifier's refetch interval can be reached: a real process refetches at most once a minute."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import unused_port
from cryptography.fernet import Fernet
from mcp.shared.exceptions import MCPError

import mcp_sse.app
from mcp_sse.oauth.metadata import SCOPES
from mcp_sse.oauth.resource import JwtVerifier
from mcp_sse.security.policy import FORBIDDEN
from tests.conftest import Launched, launch, mcp_client, text_of

from .helpers import running_idp, segments
from .test_wiring import StartOAuth, challenge_params, post_initialize, start_oauth

__all__ = ["start_oauth"]  # a fixture of test_wiring.py, used here by name

REPO = Path(__file__).resolve().parents[2]
WELL_KNOWN = "/.well-known/oauth-protected-resource"
PASSED_ENV = ("PATH", "HOME", "LANG", "PYTHONPATH", "VIRTUAL_ENV")


def audit_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def stop(gateway: Launched) -> int | None:
    """Stop the process; kill it if SIGTERM is not enough. Its exit code (None when killed)."""
    try:
        return await gateway.stop()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            gateway.process.kill()
        await gateway.process.wait()
        return None


async def test_a_real_gateway_process_takes_the_real_providers_tokens_by_resource_and_scope(
    tmp_path: Path,
) -> None:
    port = unused_port()
    public = f"http://127.0.0.1:{port}"
    resource = public + "/mcp"
    admin = "mcp_" + secrets.token_urlsafe(32)
    audit_log = tmp_path / "audit.log"
    async with running_idp() as idp:
        env = {
            **{k: v for k, v in os.environ.items() if k in PASSED_ENV},
            "AUTH_TOKEN": admin,
            "SESSION_SECRET": Fernet.generate_key().decode(),
            "AUDIT_LOG": str(audit_log),
            "OAUTH_ISSUERS": idp.issuer,
            "PUBLIC_URL": public,
            "STATE_DIR": str(tmp_path / "state"),
        }
        argv = [sys.executable, str(REPO / "server_secure.py"), "--port", str(port), "--env-file", os.devnull]
        gateway = await launch(argv, env=env, cwd=tmp_path)
        code: int | None = None
        tokens: list[str] = []
        try:
            assert gateway.url.rstrip("/") == public

            operator = await idp.token(resource=resource, scope="mcp:operator")
            tokens.append(operator)
            assert segments(operator)[1]["aud"] == resource  # the provider bound it as asked
            async with mcp_client(public, operator) as client:
                assert "echo" in {tool.name for tool in (await client.list_tools()).tools}
                assert text_of(await client.call_tool("echo", {"text": "from the idp"})) == "from the idp"

            viewer = await idp.token(resource=resource, scope="mcp:viewer")
            tokens.append(viewer)
            async with mcp_client(public, viewer) as client:
                assert "echo" in {tool.name for tool in (await client.list_tools()).tools}
                with pytest.raises(MCPError) as refused:
                    await client.call_tool("echo", {"text": "no"})
                assert refused.value.code == FORBIDDEN
                assert refused.value.message == "Forbidden: role 'viewer' may not call tools/call"

            other_port = unused_port()
            for other in (public + "/servers/x/mcp", f"http://127.0.0.1:{other_port}/mcp"):
                foreign = await idp.token(resource=other, scope="mcp:admin")
                tokens.append(foreign)
                response = await post_initialize(public, foreign)
                assert response.status == 401, other
                header = response.headers["WWW-Authenticate"]
                assert 'error="invalid_token"' in header, header
                assert challenge_params(header)["resource_metadata"] == public + WELL_KNOWN + "/mcp"

            unscoped = await idp.token(resource=resource, scope="files:read")
            tokens.append(unscoped)
            response = await post_initialize(public, unscoped)
            assert response.status == 403
            params = challenge_params(response.headers["WWW-Authenticate"])
            assert params["error"] == "insufficient_scope"
            assert params["scope"] == " ".join(SCOPES)
            assert params["resource_metadata"] == public + WELL_KNOWN + "/mcp"
        finally:
            code = await stop(gateway)
        assert code == 0, gateway.stderr

    lines = audit_lines(audit_log)
    successes = [e for e in lines if e["event"] == "auth.success" and e.get("via") == "oauth"]
    # client_credentials: the provider's subject is the client itself
    assert {(e["issuer"], e["subject"], e["role"]) for e in successes} == {
        (idp.issuer, "mcp-test", "operator"),
        (idp.issuer, "mcp-test", "viewer"),
    }
    [operator_id] = {e["identity"] for e in successes if e["role"] == "operator"}
    assert [(e["identity"], e["tool"]) for e in lines if e["event"] == "tool.invoked"] == [
        (operator_id, "echo")
    ]
    assert [e["reason"] for e in lines if e["event"] == "auth.failed"] == [
        "the token was not issued for this resource",
        "the token was not issued for this resource",
        "the token grants no mcp:* scope (mcp:viewer at least)",
    ]
    text = audit_log.read_text()
    for token in tokens:
        for part in token.split("."):  # not the token, nor its signature or claims segment
            assert part not in text
    assert admin not in text
    for token in tokens:
        assert token not in gateway.stderr


@pytest.fixture
def gateway_verifiers(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[JwtVerifier]]:
    """The JwtVerifier each create_app() makes, recorded: nothing is changed in what it does."""
    made: list[JwtVerifier] = []

    class Recorded(JwtVerifier):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            made.append(self)

    monkeypatch.setattr(mcp_sse.app, "JwtVerifier", Recorded)
    yield made


async def test_after_the_provider_rotates_its_key_a_token_signed_by_the_new_key_is_accepted(
    start_oauth: StartOAuth, gateway_verifiers: list[JwtVerifier]
) -> None:
    """In process: the refetch a new `kid` triggers is rate-limited (60 s by default, not a setting);
    the test holds it shut, then opens it, by the verifier's `refetch_interval`."""
    async with running_idp() as idp:
        gw = await start_oauth(oauth_issuers=(idp.issuer,))
        resource = gw.url + "/mcp"
        [verifier] = gateway_verifiers
        keys = verifier.issuers[idp.issuer]

        old = await idp.token(resource=resource)
        async with mcp_client(gw.url, old) as client:
            assert text_of(await client.call_tool("echo", {"text": "old key"})) == "old key"
        old_kid = segments(old)[0]["kid"]
        assert old_kid in keys.kids

        kids = await idp.rotate(keep=False)
        assert old_kid not in kids
        new = await idp.token(resource=resource)
        new_kid = segments(new)[0]["kid"]
        assert new_kid in kids and new_kid not in keys.kids
        hits = await idp.jwks_hits()

        keys.refetch_interval = 1e9  # just fetched, as far as the limit is concerned: no refetch
        response = await post_initialize(gw.url, new)
        assert response.status == 401
        assert challenge_params(response.headers["WWW-Authenticate"])["error"] == "invalid_token"
        assert await idp.jwks_hits() == hits

        keys.refetch_interval = 1e-9  # the interval has passed
        async with mcp_client(gw.url, new) as client:
            assert text_of(await client.call_tool("echo", {"text": "new key"})) == "new key"
        assert await idp.jwks_hits() == hits + 1
        assert new_kid in keys.kids and old_kid not in keys.kids

        # The old key is gone from the provider's JWKS, so its token is refused now.
        response = await post_initialize(gw.url, old)
        assert response.status == 401
        assert challenge_params(response.headers["WWW-Authenticate"])["error"] == "invalid_token"
