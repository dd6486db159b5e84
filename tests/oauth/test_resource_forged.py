"""JwtVerifier against an issuer of our own on loopback, whose keys we hold: the claims and headers no real
provider would sign, the JWKS cache and its refetch limit counted exactly, and the bounds on every fetch."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web

from mcp_sse.oauth.resource import (
    Fetcher,
    FetchError,
    FetchPolicy,
    IssuerUnavailable,
    JwtVerifier,
    TokenError,
    discovery_urls,
    role_for_scopes,
    scopes_of,
)

from .conftest import FakeIssuer, MakeVerifier
from .helpers import Clock, make_key


async def refused(verifier: JwtVerifier, token: str, message: str, resource: str) -> None:
    with pytest.raises(TokenError) as caught:
        await verifier.verify(token, resource=resource)
    assert message in str(caught.value)
    assert "user-1" not in str(caught.value)  # never a claim's value


async def test_a_good_token_of_ours_is_accepted(fake_issuer: FakeIssuer, make_verifier: MakeVerifier) -> None:
    token = fake_issuer.key.sign(fake_issuer.claims(scope="mcp:operator other"))
    verified = await make_verifier(fake_issuer.url).verify(token, resource=fake_issuer.resource)
    assert (verified.subject, verified.client_id, verified.role) == ("user-1", "client-1", "operator")
    assert (fake_issuer.metadata_fetches, fake_issuer.jwks_fetches) == (1, 1)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"exp": None}, "lacks the 'exp' claim"),
        ({"aud": None}, "lacks the 'aud' claim"),
        ({"exp": "never"}, "'exp' claim is not a number"),
        ({"exp": True}, "'exp' claim is not a number"),
        ({"nbf": "soon"}, "'nbf' claim is not a number"),
        ({"aud": []}, "audience is malformed"),
        ({"aud": [1, 2]}, "audience is malformed"),
        ({"aud": {"url": "x"}}, "audience is malformed"),
        ({"aud": ["client-1", "https://elsewhere.example/mcp"]}, "not issued for this resource"),
        ({"aud": "client-1"}, "not issued for this resource"),  # an ID token's audience
    ],
)
async def test_required_and_malformed_claims(
    fake_issuer: FakeIssuer, make_verifier: MakeVerifier, overrides: dict[str, Any], message: str
) -> None:
    token = fake_issuer.key.sign(fake_issuer.claims(**overrides))
    await refused(make_verifier(fake_issuer.url), token, message, fake_issuer.resource)


async def test_an_audience_list_holding_ours_is_accepted(
    fake_issuer: FakeIssuer, make_verifier: MakeVerifier
) -> None:
    audience = ["client-1", "https://elsewhere.example/mcp", fake_issuer.resource.replace("http:", "HTTP:")]
    token = fake_issuer.key.sign(fake_issuer.claims(aud=audience))
    verified = await make_verifier(fake_issuer.url).verify(token, resource=fake_issuer.resource)
    assert verified.audience == tuple(audience)


async def test_a_root_resource_matches_with_or_without_its_slash(
    fake_issuer: FakeIssuer, make_verifier: MakeVerifier
) -> None:
    token = fake_issuer.key.sign(fake_issuer.claims(aud=fake_issuer.url + "/"))
    await make_verifier(fake_issuer.url).verify(token, resource=fake_issuer.url)


async def test_not_before_and_issued_at_in_the_future_wait_for_the_clock(
    fake_issuer: FakeIssuer, make_verifier: MakeVerifier, clock: Clock
) -> None:
    verifier = make_verifier(fake_issuer.url, leeway=30)
    now = int(clock.now)
    later = fake_issuer.key.sign(fake_issuer.claims(nbf=now + 100))
    await refused(verifier, later, "not valid yet", fake_issuer.resource)
    future = fake_issuer.key.sign(fake_issuer.claims(iat=now + 100))
    await refused(verifier, future, "issued in the future", fake_issuer.resource)
    clock.advance(70)  # 100 - leeway
    await verifier.verify(later, resource=fake_issuer.resource)
    await verifier.verify(future, resource=fake_issuer.resource)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ({"typ": "logout+jwt"}, "not an access token"),
        ({"typ": "dpop+jwt"}, "not an access token"),
        ({"typ": 7}, "not an access token"),
        ({"crit": ["exp"]}, "not a well-formed JWT"),  # PyJWT knows no such extension
        ({"crit": ["b64"], "b64": False}, "not a well-formed JWT"),  # a detached payload: none here
    ],
)
async def test_headers_no_access_token_carries(
    fake_issuer: FakeIssuer, make_verifier: MakeVerifier, header: dict[str, Any], message: str
) -> None:
    token = fake_issuer.key.sign(fake_issuer.claims(), **header)
    await refused(make_verifier(fake_issuer.url), token, message, fake_issuer.resource)
    assert fake_issuer.jwks_fetches == 0


@pytest.mark.parametrize("typ", [None, "JWT", "at+JWT", "application/at+jwt"])
async def test_the_access_token_types_in_use_pass(
    fake_issuer: FakeIssuer, make_verifier: MakeVerifier, typ: str | None
) -> None:
    token = fake_issuer.key.sign(fake_issuer.claims(), typ=typ)
    await make_verifier(fake_issuer.url).verify(token, resource=fake_issuer.resource)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "not-a-jwt",
        "a.b",
        "a.b.c",
        "eyJhbGciOiJSU0EtT0FFUCJ9.a.b.c.d",  # JWE compact form: five parts
        "eyJ" + "a" * 9000 + ".e30.x",
        "é.é.é",
    ],
)
async def test_what_is_no_jws_is_refused_before_any_fetch(
    fake_issuer: FakeIssuer, make_verifier: MakeVerifier, token: str
) -> None:
    await refused(make_verifier(fake_issuer.url), token, "", fake_issuer.resource)
    assert fake_issuer.metadata_fetches == 0


async def test_a_key_must_be_of_the_algorithms_type_and_its_own_alg(
    fake_issuer: FakeIssuer, make_verifier: MakeVerifier
) -> None:
    ec_key = make_key("ES256", "ec-1")
    ed_key = make_key("EdDSA", "ed-1")
    rs512 = make_key("RS256", "rs-512-only")
    fake_issuer.keys = [ec_key.jwk, ed_key.jwk, {**rs512.jwk, "alg": "RS512"}]
    verifier = make_verifier(fake_issuer.url)
    claims = fake_issuer.claims()
    # Each key verifies its own kind of signature.
    await verifier.verify(ec_key.sign(claims), resource=fake_issuer.resource)
    await verifier.verify(ed_key.sign(claims), resource=fake_issuer.resource)
    # A token naming the EC key but saying RS256 finds no RSA key under that kid.
    rsa_forged = make_key("RS256", "ec-1").sign(claims)
    await refused(verifier, rsa_forged, "not among its issuer's keys", fake_issuer.resource)
    # ES384 on a P-256 key: the curve does not fit the algorithm.
    await refused(verifier, make_key("ES384", "ec-1").sign(claims), "not among", fake_issuer.resource)
    # A key published for RS512 only does not verify RS256, even though its type fits.
    await refused(verifier, rs512.sign(claims), "not among its issuer's keys", fake_issuer.resource)


async def test_one_kid_for_keys_of_two_types_and_two_keys_of_one(
    fake_issuer: FakeIssuer, make_verifier: MakeVerifier, clock: Clock
) -> None:
    rsa_key, ec_key = make_key("RS256", "shared"), make_key("ES256", "shared")
    fake_issuer.keys = [rsa_key.jwk, ec_key.jwk]
    verifier = make_verifier(fake_issuer.url)
    claims = fake_issuer.claims(exp=int(clock.now) + 86400)
    await verifier.verify(rsa_key.sign(claims), resource=fake_issuer.resource)
    await verifier.verify(ec_key.sign(claims), resource=fake_issuer.resource)
    # Two RSA keys under one kid: which one is meant cannot be known, so neither is used.
    fake_issuer.keys.append(make_key("RS256", "shared").jwk)
    clock.advance(3600)
    await refused(verifier, rsa_key.sign(claims), "not among its issuer's keys", fake_issuer.resource)
    await verifier.verify(ec_key.sign(claims), resource=fake_issuer.resource)


async def test_private_symmetric_and_encryption_keys_in_a_jwks_are_ignored(
    fake_issuer: FakeIssuer, make_verifier: MakeVerifier
) -> None:
    leaked = make_key("RS256", "leaked")
    private_jwk = json.loads(jwt.get_algorithm_by_name("RS256").to_jwk(leaked.private))
    enc = make_key("RS256", "enc-1")
    fake_issuer.keys = [
        {**private_jwk, "kid": "leaked"},
        {"kty": "oct", "k": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0", "kid": "oct-1"},
        {**enc.jwk, "use": "enc"},
        {**make_key("RS256", "verify-no").jwk, "key_ops": ["encrypt"]},
        "not a key",
        {"kty": "RSA", "kid": "broken", "n": "AQAB", "e": "AQAB"},
        fake_issuer.key.jwk,
    ]
    verifier = make_verifier(fake_issuer.url)
    await verifier.verify(fake_issuer.key.sign(fake_issuer.claims()), resource=fake_issuer.resource)
    assert verifier.issuers[fake_issuer.url].kids == {"good-1", "broken"}
    await refused(verifier, leaked.sign(fake_issuer.claims()), "not among", fake_issuer.resource)
    await refused(verifier, enc.sign(fake_issuer.claims()), "not among", fake_issuer.resource)
    broken = make_key("RS256", "broken").sign(fake_issuer.claims())
    await refused(verifier, broken, "signing key cannot be used", fake_issuer.resource)


async def test_a_short_rsa_key_is_refused(fake_issuer: FakeIssuer, make_verifier: MakeVerifier) -> None:
    weak = make_key("RS256", "weak", bits=1024)
    fake_issuer.keys = [weak.jwk]
    await refused(
        make_verifier(fake_issuer.url), weak.sign(fake_issuer.claims()), "not valid", fake_issuer.resource
    )


async def test_a_token_without_kid_needs_a_single_fitting_key(
    fake_issuer: FakeIssuer, make_verifier: MakeVerifier, clock: Clock
) -> None:
    token = jwt.encode(
        fake_issuer.claims(exp=int(clock.now) + 86400), fake_issuer.key.private, algorithm="RS256"
    )
    verifier = make_verifier(fake_issuer.url)
    fake_issuer.keys = [fake_issuer.key.jwk, make_key("ES256", "ec-1").jwk]  # one RSA key: unambiguous
    await verifier.verify(token, resource=fake_issuer.resource)
    fake_issuer.keys.append(make_key("RS256", "second").jwk)
    clock.advance(3600)  # past max_age: the JWKS is fetched again and now holds two RSA keys
    await refused(verifier, token, "not among its issuer's keys", fake_issuer.resource)


async def test_the_unknown_kid_refetch_is_one_per_interval_however_many_ask(
    fake_issuer: FakeIssuer, make_verifier: MakeVerifier, clock: Clock
) -> None:
    verifier = make_verifier(fake_issuer.url, refetch_interval=30)
    claims = fake_issuer.claims()
    await verifier.verify(fake_issuer.key.sign(claims), resource=fake_issuer.resource)
    assert fake_issuer.jwks_fetches == 1
    clock.advance(30)
    made_up = [make_key("RS256", f"made-up-{i}") for i in range(4)]
    tokens = [k.sign(claims) for k in made_up] * 25
    results = await asyncio.gather(
        *(verifier.verify(t, resource=fake_issuer.resource) for t in tokens), return_exceptions=True
    )
    assert all(isinstance(r, TokenError) and "not among" in str(r) for r in results)
    assert fake_issuer.jwks_fetches == 2  # a hundred requests, four kids: one fetch
    clock.advance(29)
    await refused(verifier, tokens[0], "not among", fake_issuer.resource)
    assert fake_issuer.jwks_fetches == 2
    # The issuer publishes one of them; the next interval's refetch finds it.
    fake_issuer.keys.append(made_up[0].jwk)
    clock.advance(1)
    await verifier.verify(tokens[0], resource=fake_issuer.resource)
    await verifier.verify(tokens[0], resource=fake_issuer.resource)
    assert fake_issuer.jwks_fetches == 3
    assert fake_issuer.metadata_fetches == 1  # discovery is not repeated while the JWKS answers


async def test_keys_are_refreshed_after_max_age_and_a_withdrawn_key_stops_verifying(
    fake_issuer: FakeIssuer, make_verifier: MakeVerifier, clock: Clock
) -> None:
    verifier = make_verifier(fake_issuer.url, refetch_interval=30, max_age=600)
    token = fake_issuer.key.sign(fake_issuer.claims(exp=int(clock.now) + 7200))
    await verifier.verify(token, resource=fake_issuer.resource)
    clock.advance(599)
    await verifier.verify(token, resource=fake_issuer.resource)
    assert fake_issuer.jwks_fetches == 1
    fake_issuer.keys = [make_key("RS256", "replacement").jwk]  # the issuer withdraws good-1
    clock.advance(1)
    await refused(verifier, token, "not among its issuer's keys", fake_issuer.resource)
    assert fake_issuer.jwks_fetches == 2


async def test_cached_keys_outlive_an_outage_until_max_stale(
    fake_issuer: FakeIssuer, make_verifier: MakeVerifier, clock: Clock
) -> None:
    verifier = make_verifier(fake_issuer.url, refetch_interval=30, max_age=600, max_stale=3600)
    token = fake_issuer.key.sign(fake_issuer.claims(exp=int(clock.now) + 86400))
    await verifier.verify(token, resource=fake_issuer.resource)
    fake_issuer.jwks_status = 500
    clock.advance(600)
    await verifier.verify(token, resource=fake_issuer.resource)  # refresh failed: the cached key serves
    assert fake_issuer.jwks_fetches == 2
    clock.advance(3000)
    with pytest.raises(IssuerUnavailable) as caught:
        await verifier.verify(token, resource=fake_issuer.resource)
    assert caught.value.http_status == 503 and caught.value.error == "invalid_token"
    fake_issuer.jwks_status = 200
    clock.advance(30)
    await verifier.verify(token, resource=fake_issuer.resource)  # back, once the interval allows a fetch


@pytest.mark.parametrize(
    "metadata",
    [
        {"issuer": "http://127.0.0.1:1"},  # metadata of another issuer
        {"jwks_uri": None},
        {"jwks_uri": "http://idp.example.com/jwks"},  # plain http off loopback: never fetched
        {"jwks_uri": "file:///etc/passwd"},
    ],
)
async def test_metadata_that_does_not_hold_is_not_used(
    fake_issuer: FakeIssuer, make_verifier: MakeVerifier, metadata: dict[str, Any]
) -> None:
    fake_issuer.metadata = metadata
    with pytest.raises(IssuerUnavailable):
        await make_verifier(fake_issuer.url).verify(
            fake_issuer.key.sign(fake_issuer.claims()), resource=fake_issuer.resource
        )
    assert fake_issuer.jwks_fetches == 0


def test_discovery_urls_follow_the_mcp_pages_order() -> None:
    assert discovery_urls("https://auth.example.com") == [
        "https://auth.example.com/.well-known/oauth-authorization-server",
        "https://auth.example.com/.well-known/openid-configuration",
    ]
    assert discovery_urls("https://auth.example.com/tenant1") == [
        "https://auth.example.com/.well-known/oauth-authorization-server/tenant1",
        "https://auth.example.com/.well-known/openid-configuration/tenant1",
        "https://auth.example.com/tenant1/.well-known/openid-configuration",
    ]


def test_scopes_and_roles() -> None:
    assert scopes_of({"scope": "a  b\tc"}) == {"a", "b", "c"}
    assert scopes_of({"scp": ["a", "b c"]}) == {"a", "b", "c"}
    assert scopes_of({"scp": "mcp:viewer"}) == {"mcp:viewer"}
    assert scopes_of({"scope": "mcp:viewer", "scp": ["mcp:admin"]}) == {"mcp:viewer"}  # scope wins
    assert scopes_of({"scope": ["mcp:admin", 1]}) == frozenset()
    assert scopes_of({}) == frozenset()
    assert role_for_scopes(["mcp:viewer", "mcp:admin", "mcp:operator"]) == "admin"
    assert role_for_scopes(["mcp:operator", "mcp:viewer"]) == "operator"
    assert role_for_scopes(["mcp:viewer"]) == "viewer"
    assert role_for_scopes(["mcp:Admin", "mcp:*", "admin", "mcp:admin2"]) is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"issuers": []}, "at least one issuer"),
        ({"algorithms": []}, "non-empty subset"),
        ({"algorithms": ["none"]}, "never none or HMAC"),
        ({"algorithms": ["RS256", "HS256"]}, "never none or HMAC"),
        ({"leeway": 3600}, "leeway"),
        ({"refetch_interval": 0}, "refetch_interval"),
        ({"issuers": ["https://idp.example.com/?x=1"]}, "no query or fragment"),
        ({"issuers": ["https://user:pw@idp.example.com"]}, "no credentials"),
    ],
)
def test_a_verifier_refuses_a_loose_configuration(kwargs: dict[str, Any], message: str) -> None:
    kwargs.setdefault("issuers", ["https://idp.example.com"])
    with pytest.raises(ValueError, match=message):
        JwtVerifier(**kwargs)


# The fetcher's bounds, against small loopback servers of our own.

Serve = Callable[[web.Application], Any]


@pytest.fixture
async def serve(aiohttp_server: Callable[..., Any]) -> Serve:
    async def start(app: web.Application) -> str:
        server = await aiohttp_server(app, host="127.0.0.1")
        return f"http://127.0.0.1:{server.port}"

    return start


def answering(answers: dict[str, Callable[[], web.StreamResponse]]) -> web.Application:
    """An app answering each path with a response made afresh per request."""
    app = web.Application()
    for path, make in answers.items():

        async def handler(
            request: web.Request, make: Callable[[], web.StreamResponse] = make
        ) -> web.StreamResponse:
            return make()

        app.router.add_get(path, handler)
    return app


def redirect(location: str) -> Callable[[], web.StreamResponse]:
    return lambda: web.Response(status=302, headers={"Location": location})


async def fetch(url: str, **policy: Any) -> Any:
    async with aiohttp.ClientSession() as session:
        return await Fetcher(session, FetchPolicy(allow_http_loopback=True, **policy)).get_json(url)


async def test_a_redirect_within_the_origin_is_followed_and_one_elsewhere_is_not(serve: Serve) -> None:
    other_app = web.Application()
    hits: list[str] = []

    async def elsewhere(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({"keys": []})

    other_app.router.add_get("/jwks", elsewhere)
    other = await serve(other_app)

    base = await serve(
        answering(
            {
                "/a": redirect("/b"),
                "/b": lambda: web.json_response({"ok": True}),
                "/away": redirect(other + "/jwks"),
                "/loop": redirect("/loop"),
            }
        )
    )
    assert await fetch(base + "/a") == {"ok": True}
    with pytest.raises(FetchError, match="another origin"):
        await fetch(base + "/away")
    assert hits == []
    with pytest.raises(FetchError, match="more than 3 redirects"):
        await fetch(base + "/loop")


async def test_bodies_are_bounded_whether_announced_or_streamed(serve: Serve) -> None:
    async def announced(request: web.Request) -> web.Response:
        return web.Response(body=b"[" + b"0," * 600_000 + b"0]", content_type="application/json")

    async def streamed(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(40):
            await response.write(b" " * 65536)
        await response.write_eof()
        return response

    app = answering(
        {
            "/small": lambda: web.json_response([1]),
            "/text": lambda: web.Response(text="<html>"),
            "/404": lambda: web.Response(status=404),
        }
    )
    app.router.add_get("/announced", announced)
    app.router.add_get("/streamed", streamed)
    base = await serve(app)
    with pytest.raises(FetchError, match="larger than 1048576 bytes"):
        await fetch(base + "/announced")
    with pytest.raises(FetchError, match="larger than 1048576 bytes"):
        await fetch(base + "/streamed")
    assert await fetch(base + "/small", max_bytes=3) == [1]
    with pytest.raises(FetchError, match="not JSON"):
        await fetch(base + "/text")
    with pytest.raises(FetchError, match="HTTP 404") as caught:
        await fetch(base + "/404")
    assert caught.value.status == 404


async def test_a_server_that_never_answers_is_given_up_on(serve: Serve) -> None:
    never = asyncio.Event()

    async def stall(request: web.Request) -> web.Response:
        await never.wait()
        return web.Response()

    app = web.Application()
    app.router.add_get("/stall", stall)
    base = await serve(app)
    with pytest.raises(FetchError, match=r"no answer within 0\.2 s"):
        await fetch(base + "/stall", timeout=0.2)


@pytest.mark.parametrize(
    ("url", "allow"),
    [
        ("http://127.0.0.1:1/x", False),
        ("http://10.0.0.1/x", True),
        ("http://idp.example.com/x", True),
        ("ftp://127.0.0.1/x", True),
        ("https://user@idp.example.com/x", True),
        ("https:///x", True),
        ("https://idp.example.com:port/x", True),
    ],
)
def test_only_https_is_fetched_and_plain_http_only_on_loopback(url: str, allow: bool) -> None:
    with pytest.raises(FetchError):
        FetchPolicy(allow_http_loopback=allow).check(url)


@pytest.mark.parametrize(
    "url", ["https://idp.example.com/x", "http://127.0.0.2:8/x", "http://[::1]/x", "http://localhost/x"]
)
def test_what_may_be_fetched(url: str) -> None:
    FetchPolicy(allow_http_loopback=True).check(url)
