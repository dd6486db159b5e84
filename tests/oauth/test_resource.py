"""JwtVerifier against a real identity provider: oidc-provider (Node) on loopback, issuing JWT access tokens
bound to the resource asked for (RFC 8707). Real tokens are accepted; the attacker's are refused."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from mcp_sse.oauth.resource import ALGORITHMS, FetchPolicy, IssuerUnavailable, JwtVerifier, TokenError

from .conftest import MakeVerifier
from .helpers import IdP, b64, hmac_signed, make_key, public_pem, running_idp, segments, unsigned

RESOURCE_PATH = "/mcp"
RESOURCE = "http://127.0.0.1:8931/mcp"  # what the gateway would be; no server needs to listen there
REFETCH = 60.0


@pytest.fixture
async def idp() -> Any:
    async with running_idp() as provider:
        yield provider


async def refused(verifier: JwtVerifier, token: str, message: str, *, resource: str = RESOURCE) -> TokenError:
    with pytest.raises(TokenError) as caught:
        await verifier.verify(token, resource=resource)
    error = caught.value
    assert message in str(error)
    assert (error.error, error.http_status) == ("invalid_token", 401)
    # What a client may be shown never quotes the token or any part of it.
    assert all(part not in str(error) for part in token.split(".") if len(part) > 8)
    return error


@pytest.mark.parametrize(
    ("scope", "role"),
    [
        ("mcp:operator files:read", "operator"),
        ("mcp:viewer mcp:admin", "admin"),
        ("mcp:viewer", "viewer"),
        ("files:read", None),
    ],
)
async def test_a_real_token_is_accepted_with_its_scopes_and_role(
    idp: IdP, make_verifier: MakeVerifier, scope: str, role: str | None
) -> None:
    token = await idp.token(resource=RESOURCE, scope=scope)
    verified = await make_verifier(idp.issuer).verify(token, resource=RESOURCE)
    assert verified.issuer == idp.issuer
    assert verified.scopes == frozenset(scope.split())
    assert verified.role == role
    assert (verified.subject, verified.client_id) == ("mcp-test", "mcp-test")
    assert verified.audience == (RESOURCE,)
    assert verified.algorithm == "RS256"
    assert verified.key_id in {k["kid"] for k in (await idp.jwks())["keys"]}
    assert verified.claims["aud"] == RESOURCE


async def test_the_resource_is_compared_in_canonical_form(idp: IdP, make_verifier: MakeVerifier) -> None:
    """The MCP pages: accept uppercase scheme and host. Nothing else is folded."""
    token = await idp.token(resource=RESOURCE)
    verifier = make_verifier(idp.issuer)
    assert (await verifier.verify(token, resource="HTTP://127.0.0.1:8931/mcp")).audience == (RESOURCE,)


@pytest.mark.parametrize(
    "audience",
    [
        "http://127.0.0.1:8931/other/mcp",  # another MCP server on the same host
        "http://127.0.0.1:8931/mcp-other",  # a prefix-extended path
        "http://127.0.0.1:8931/mcp/",  # a child path: RFC 8707 names one resource, not a tree
        "http://127.0.0.1:8931/mcp/servers/time",
        "http://127.0.0.1:8931",  # the origin: a token for the whole host is not one for /mcp
        "http://127.0.0.1:8932/mcp",  # another port
        "https://127.0.0.1:8931/mcp",  # another scheme
    ],
)
async def test_a_token_for_another_resource_is_refused(
    idp: IdP, make_verifier: MakeVerifier, audience: str
) -> None:
    token = await idp.token(resource=audience)
    assert segments(token)[1]["aud"] == audience  # the provider did bind it (to the wrong place)
    await refused(make_verifier(idp.issuer), token, "not issued for this resource")


async def test_a_token_bound_to_no_resource_is_refused(idp: IdP, make_verifier: MakeVerifier) -> None:
    """Without `resource=` oidc-provider issues an opaque token for its own userinfo: not a JWT for us."""
    status, body = await idp.token_response(resource=None, scope="mcp:operator")
    assert status == 200
    await refused(make_verifier(idp.issuer), body["access_token"], "not a signed JWT")


async def test_a_token_from_another_issuer_is_refused(idp: IdP, make_verifier: MakeVerifier) -> None:
    async with running_idp() as other:
        token = await other.token(resource=RESOURCE)
        verifier = make_verifier(idp.issuer)
        await refused(verifier, token, "issuer is not trusted")
        # The issuer is compared exactly: the same URL with a trailing slash is another issuer.
        await refused(make_verifier(other.issuer + "/"), token, "issuer is not trusted")
        # Refused before any key was fetched from anywhere.
        assert await other.jwks_hits() == 0 and await idp.jwks_hits() == 0


async def test_an_expired_token_is_refused_after_the_leeway(
    idp: IdP, make_verifier: MakeVerifier, clock: Any
) -> None:
    async with running_idp(ttl=60) as short:
        token = await short.token(resource=RESOURCE)
        claims = segments(token)[1]
        assert claims["exp"] - claims["iat"] == 60
        verifier = make_verifier(short.issuer, leeway=30)
        clock.now = claims["exp"] + 29  # inside the leeway
        await verifier.verify(token, resource=RESOURCE)
        clock.now = claims["exp"] + 30
        await refused(verifier, token, "expired")


async def test_alg_none_is_refused_before_any_key_is_fetched(idp: IdP, make_verifier: MakeVerifier) -> None:
    header, claims, _ = segments(await idp.token(resource=RESOURCE, scope="mcp:viewer"))
    verifier = make_verifier(idp.issuer)
    claims["scope"] = "mcp:admin"
    for alg in ("none", "None", "NONE", ""):
        await refused(verifier, unsigned({**header, "alg": alg}, claims), "algorithm is not accepted")
    await refused(verifier, unsigned({k: v for k, v in header.items() if k != "alg"}, claims), "algorithm")
    assert await idp.jwks_hits() == 0


async def test_hs256_signed_with_the_providers_public_key_is_refused(
    idp: IdP, make_verifier: MakeVerifier
) -> None:
    """The RS256 -> HS256 confusion: the attacker signs with the public key (as PEM, as the JWK's modulus
    bytes, as the JSON) used as an HMAC secret, and names the real key's kid."""
    header, claims, _ = segments(await idp.token(resource=RESOURCE, scope="mcp:viewer"))
    jwk = next(k for k in (await idp.jwks())["keys"] if k["kid"] == header["kid"])
    claims["scope"] = "mcp:admin"
    verifier = make_verifier(idp.issuer)
    await verifier.verify(await idp.token(resource=RESOURCE), resource=RESOURCE)  # its keys are cached now
    for secret in (public_pem(jwk), jwk["n"].encode(), json.dumps(jwk).encode()):
        for alg in ("HS256", "HS384", "HS512"):
            forged = hmac_signed({**header, "alg": alg}, claims, secret)
            await refused(verifier, forged, "algorithm is not accepted")
    with pytest.raises(ValueError, match="never none or HMAC"):
        JwtVerifier(issuers=[idp.issuer], algorithms=["RS256", "HS256"])


async def test_an_unknown_signer_is_refused_and_its_refetch_is_rate_limited(
    idp: IdP, make_verifier: MakeVerifier, clock: Any
) -> None:
    """A well-formed RS256 token, the real claims, a key of the attacker's (a kid the provider never had)."""
    real = await idp.token(resource=RESOURCE)
    verifier = make_verifier(idp.issuer, refetch_interval=REFETCH)
    await verifier.verify(real, resource=RESOURCE)
    assert await idp.jwks_hits() == 1
    attacker = make_key("RS256", "attacker-1")
    claims = {**segments(real)[1], "scope": "mcp:admin"}
    forged = attacker.sign(claims)
    # Within the interval: no refetch, refused at once.
    await refused(verifier, forged, "not among its issuer's keys")
    assert await idp.jwks_hits() == 1
    # After it: one refetch, and still refused (the provider has no such key).
    clock.advance(REFETCH)
    await refused(verifier, forged, "not among its issuer's keys")
    assert await idp.jwks_hits() == 2
    # A flood of made-up kids right after costs the provider nothing.
    flood = [make_key("RS256", f"made-up-{i}").sign(claims) for i in range(5)] * 10
    results = await asyncio.gather(
        *(verifier.verify(t, resource=RESOURCE) for t in flood), return_exceptions=True
    )
    assert all(isinstance(r, TokenError) for r in results)
    assert await idp.jwks_hits() == 2
    # The attacker's key under the real kid: the signature does not verify.
    await refused(
        verifier, make_key("RS256", segments(real)[0]["kid"]).sign(claims), "signature does not verify"
    )
    # And the real token still passes.
    await verifier.verify(real, resource=RESOURCE)


async def test_a_tampered_token_is_refused(idp: IdP, make_verifier: MakeVerifier) -> None:
    token = await idp.token(resource=RESOURCE, scope="mcp:viewer")
    header, claims, signature = segments(token)
    verifier = make_verifier(idp.issuer)
    await verifier.verify(token, resource=RESOURCE)
    for changed in ({"scope": "mcp:admin"}, {"sub": "admin"}, {"exp": claims["exp"] + 86400}):
        await refused(
            verifier, unsigned(header, {**claims, **changed}, signature), "signature does not verify"
        )
    # The same claims, re-encoded with another JSON spacing: other bytes, so another signing input.
    payload = token.split(".")[1]
    respaced = b64(json.dumps(claims, indent=1).encode())
    assert respaced != payload
    await refused(verifier, token.replace(payload, respaced), "signature does not verify")
    # A signature cut short, or taken from another token.
    await refused(verifier, token[:-10], "")
    other = await idp.token(resource=RESOURCE, scope="mcp:admin")
    await refused(verifier, other.rsplit(".", 1)[0] + "." + signature, "signature does not verify")


async def test_key_rotation_at_the_provider_is_followed(
    idp: IdP, make_verifier: MakeVerifier, clock: Any
) -> None:
    old = await idp.token(resource=RESOURCE)
    verifier = make_verifier(idp.issuer, refetch_interval=REFETCH)
    await verifier.verify(old, resource=RESOURCE)
    kids = await idp.rotate(keep=False)
    new = await idp.token(resource=RESOURCE)
    assert segments(new)[0]["kid"] in kids and segments(new)[0]["kid"] != segments(old)[0]["kid"]
    # Right after our last fetch the new kid is not fetched for yet (the refetch is rate-limited)...
    await refused(verifier, new, "not among its issuer's keys")
    assert await idp.jwks_hits() == 1
    # ...and once the interval has passed it is: one refetch, then accepted.
    clock.advance(REFETCH)
    assert (await verifier.verify(new, resource=RESOURCE)).key_id == segments(new)[0]["kid"]
    assert await idp.jwks_hits() == 2
    # The retired key is gone from the provider's JWKS, so from ours: its token is refused now.
    await refused(verifier, old, "not among its issuer's keys")


async def test_a_kept_old_key_still_verifies_after_rotation(
    idp: IdP, make_verifier: MakeVerifier, clock: Any
) -> None:
    old = await idp.token(resource=RESOURCE)
    verifier = make_verifier(idp.issuer, refetch_interval=REFETCH)
    await verifier.verify(old, resource=RESOURCE)
    await idp.rotate(keep=True)
    clock.advance(REFETCH)
    await verifier.verify(await idp.token(resource=RESOURCE), resource=RESOURCE)
    await verifier.verify(old, resource=RESOURCE)
    assert await idp.jwks_hits() == 2


async def test_an_issuer_with_a_path_is_discovered(make_verifier: MakeVerifier) -> None:
    """`http://host/tenant1`: oidc-provider serves neither path-inserted form, so the third URL of the
    MCP pages' order (openid-configuration appended) is the one that answers."""
    async with running_idp(path="/tenant1") as tenant:
        assert tenant.issuer.endswith("/tenant1")
        verifier = make_verifier(tenant.issuer)
        await verifier.verify(await tenant.token(resource=RESOURCE), resource=RESOURCE)
        assert verifier.issuers[tenant.issuer].jwks_uri == tenant.issuer + "/jwks"


@pytest.mark.parametrize("alg", ["PS256", "ES256", "EdDSA"])
async def test_each_asymmetric_algorithm_the_provider_signs_with(
    make_verifier: MakeVerifier, alg: str
) -> None:
    async with running_idp(alg=alg) as provider:
        token = await provider.token(resource=RESOURCE)
        assert segments(token)[0]["alg"] == alg
        assert (await make_verifier(provider.issuer).verify(token, resource=RESOURCE)).algorithm == alg
        # A verifier narrowed to other algorithms refuses it.
        narrowed = make_verifier(provider.issuer, algorithms=ALGORITHMS - {alg})
        await refused(narrowed, token, "algorithm is not accepted")


async def test_a_provider_that_is_down_is_unavailable_not_invalid(make_verifier: MakeVerifier) -> None:
    async with running_idp() as provider:
        token = await provider.token(resource=RESOURCE)
        issuer = provider.issuer
    verifier = make_verifier(issuer)
    with pytest.raises(IssuerUnavailable) as caught:
        await verifier.verify(token, resource=RESOURCE)
    assert caught.value.http_status == 503


def test_plain_http_is_refused_unless_allowed_for_loopback() -> None:
    with pytest.raises(ValueError, match="only https"):
        JwtVerifier(issuers=["http://127.0.0.1:1"])
    with pytest.raises(ValueError, match="only https"):
        JwtVerifier(issuers=["http://idp.example.com"], fetch=FetchPolicy(allow_http_loopback=True))
    JwtVerifier(issuers=["https://idp.example.com"])  # nothing is fetched until a token arrives
