"""Access-token verification for external issuers: JWTs signed by a key from the issuer's JWKS.

The checks, each for a reason (MCP authorization pages, "Token Handling" and "Access Token
Privilege Restriction"; RFC 9068; RFC 8725, JWT best current practice):

- The algorithm comes from an allowlist of asymmetric ones, and the key must be of that
  algorithm's type (and curve). `none` and HS* are never accepted: with a public key as the
  HMAC secret, anyone could sign (the classic RS256 -> HS256 confusion).
- The key is found by `kid` in the JWKS of the issuer the token names, and that issuer must be
  one configured here, compared exactly. The JWKS is discovered through the issuer's metadata
  (RFC 8414, then OpenID Connect discovery, in the order the MCP pages give), cached, and
  refetched when a token names a `kid` it lacks (key rotation) - at most once per
  `refetch_interval` per issuer, so a flood of made-up `kid`s cannot make us flood the issuer.
- `aud` must name this resource exactly (RFC 8707): a token for another MCP server, or for
  `https://host/mcp-other` when we are `https://host/mcp`, is refused. Only scheme and host are
  compared case-insensitively, as RFC 3986 says they are.
- `exp` is required; `exp`, `nbf` and `iat` are checked with a small leeway for clock skew.

Signatures and claims are checked by PyJWT; the time claims are compared here, against an
injectable clock, so tests can let a token expire without waiting. Outbound fetches use aiohttp
(never blocking the loop), https only (http for loopback only when allowed), bounded in size and
time, and never follow a redirect to another origin.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Any, ClassVar, Final
from urllib.parse import urljoin, urlsplit

import aiohttp
import jwt

from ..security.keys import Role
from ..settings import is_loopback
from .metadata import ROLE_SCOPES, ErrorCode, canonical_resource

__all__ = [
    "ALGORITHMS",
    "FetchError",
    "FetchPolicy",
    "Fetcher",
    "IssuerKeys",
    "IssuerUnavailable",
    "JwtVerifier",
    "TokenError",
    "VerifiedToken",
    "discovery_urls",
    "role_for_scopes",
    "scopes_of",
]

log = logging.getLogger("mcp_sse.oauth")

ALGORITHMS: Final = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
"""Every asymmetric JWS algorithm we accept; a verifier may narrow it, never widen it."""
# The key type (and curve) each algorithm needs: a token cannot pick how its key is used.
_KEY_TYPES: Final[Mapping[str, tuple[str, frozenset[str] | None]]] = {
    **{alg: ("RSA", None) for alg in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")},
    "ES256": ("EC", frozenset({"P-256"})),
    "ES384": ("EC", frozenset({"P-384"})),
    "ES512": ("EC", frozenset({"P-521"})),
    "EdDSA": ("OKP", frozenset({"Ed25519", "Ed448"})),
}
# RFC 9068 section 2.1 says `at+jwt`; many issuers (Keycloak, Entra, Auth0) still send `JWT`.
# Other types (logout, DPoP proof, security event tokens) are JWTs that are no access token.
_ACCESS_TOKEN_TYPES: Final = frozenset({"at+jwt", "application/at+jwt", "jwt"})
MAX_TOKEN_BYTES: Final = 8192  # aiohttp's header line limit; bounds the work on a hostile token
DEFAULT_LEEWAY: Final = 30.0
DEFAULT_REFETCH_INTERVAL: Final = 60.0
DEFAULT_MAX_AGE: Final = 3600.0
DEFAULT_MAX_STALE: Final = 86400.0
_UNVERIFIED: Final[jwt.types.Options] = {
    "verify_signature": False,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": False,
    "verify_iss": False,
    "verify_sub": False,
    "verify_jti": False,
}
_ROLE_ORDER: Final[tuple[tuple[Role, str], ...]] = tuple(
    (role, ROLE_SCOPES[role]) for role in ("admin", "operator", "viewer")
)


class TokenError(Exception):
    """A token is refused. `str()` and `description` are safe to show the client (they never quote the
    token or its claims); `error` is the RFC 6750 code and `status` the HTTP status to answer with."""

    status: ClassVar[int] = 401

    def __init__(self, error: ErrorCode, description: str) -> None:
        super().__init__(description)
        self.error: ErrorCode = error
        self.description = description

    @property
    def http_status(self) -> int:
        return 403 if self.error == "insufficient_scope" else self.status


class IssuerUnavailable(TokenError):
    """The issuer's metadata or keys cannot be had now (and none are cached): not the client's fault."""

    status: ClassVar[int] = 503

    def __init__(self, description: str = "the token's issuer cannot be reached; try again later") -> None:
        super().__init__("invalid_token", description)


class FetchError(Exception):
    """An outbound fetch failed. The message names the URL and why (for the server log, not a client)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def role_for_scopes(scopes: Iterable[str]) -> Role | None:
    """The highest role the scopes grant: mcp:admin > mcp:operator > mcp:viewer; None without any."""
    granted = set(scopes)
    return next((role for role, scope in _ROLE_ORDER if scope in granted), None)


def scopes_of(claims: Mapping[str, Any]) -> frozenset[str]:
    """The scopes of a token: `scope`, a space-separated string (RFC 9068, RFC 8693), else `scp`, which
    some issuers send as a list (Okta) and others as a string (Entra). Anything else counts as none."""
    value = claims.get("scope", claims.get("scp"))
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return frozenset(s for v in value for s in v.split())
    return frozenset()


@dataclass(frozen=True)
class VerifiedToken:
    """What a verified access token says. `claims` is read-only; never log it whole (it may hold
    personal data), and never forward the token itself (the MCP pages forbid token passthrough)."""

    issuer: str
    subject: str | None
    client_id: str | None
    scopes: frozenset[str]
    audience: tuple[str, ...]
    expires_at: float
    issued_at: float | None
    key_id: str | None
    algorithm: str
    claims: Mapping[str, Any] = field(repr=False)

    @property
    def role(self) -> Role | None:
        return role_for_scopes(self.scopes)


@dataclass(frozen=True)
class FetchPolicy:
    """Bounds on every outbound fetch (issuer metadata, JWKS)."""

    timeout: float = 5.0
    max_bytes: int = 1 << 20
    max_redirects: int = 3
    allow_http_loopback: bool = False
    """Plain http to 127.0.0.0/8, ::1 or localhost: for tests and a provider on the same host only."""

    def __post_init__(self) -> None:
        if self.timeout <= 0 or self.max_bytes <= 0 or self.max_redirects < 0:
            raise ValueError("timeout and max_bytes must be positive, max_redirects not negative")

    def check(self, url: str) -> None:
        """Raise FetchError unless `url` may be fetched."""
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError for a port that is no number
        except ValueError:
            raise FetchError(f"{url!r}: not a URL") from None
        if parts.username is not None or parts.password is not None or not parts.hostname:
            raise FetchError(f"{url!r}: needs a host and no credentials")
        if parts.scheme == "https":
            return
        if parts.scheme == "http" and self.allow_http_loopback and is_loopback(parts.hostname):
            return
        raise FetchError(
            f"{url!r}: only https is fetched"
            + ("" if self.allow_http_loopback else " (http only for loopback, when allowed)")
        )


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


class Fetcher:
    """GET a JSON document under a FetchPolicy with an aiohttp session (owned by the caller)."""

    def __init__(self, session: aiohttp.ClientSession, policy: FetchPolicy) -> None:
        self.session = session
        self.policy = policy

    async def get_json(self, url: str) -> Any:
        try:
            async with asyncio.timeout(self.policy.timeout):
                return await self._get_json(url)
        except TimeoutError:
            raise FetchError(f"{url}: no answer within {self.policy.timeout:g} s") from None
        except aiohttp.ClientError as exc:
            raise FetchError(f"{url}: {type(exc).__name__}: {exc}") from None

    async def _get_json(self, url: str) -> Any:
        for _ in range(self.policy.max_redirects + 1):
            self.policy.check(url)
            async with self.session.get(
                url, allow_redirects=False, headers={"Accept": "application/json"}
            ) as response:
                if response.status in (301, 302, 303, 307, 308):
                    target = urljoin(url, response.headers.get("Location", ""))
                    if _origin(target) != _origin(url):
                        # An issuer's documents stay on its own origin; anything else is refused
                        # rather than followed (no detour to an internal address, no downgrade).
                        raise FetchError(f"{url}: redirect to another origin refused")
                    url = target
                    continue
                if response.status != 200:
                    raise FetchError(f"{url}: HTTP {response.status}", status=response.status)
                if response.content_length is not None and response.content_length > self.policy.max_bytes:
                    raise FetchError(f"{url}: larger than {self.policy.max_bytes} bytes")
                body = bytearray()
                async for chunk in response.content.iter_chunked(1 << 16):
                    body += chunk
                    if len(body) > self.policy.max_bytes:
                        raise FetchError(f"{url}: larger than {self.policy.max_bytes} bytes")
            try:
                return json.loads(body)
            except (ValueError, RecursionError):
                raise FetchError(f"{url}: not JSON") from None
        raise FetchError(f"{url}: more than {self.policy.max_redirects} redirects")


def discovery_urls(issuer: str) -> list[str]:
    """Where an issuer's metadata may be, in the order the MCP pages give (RFC 8414 section 3.1 path
    insertion, then OpenID Connect discovery inserted, then appended)."""
    parts = urlsplit(issuer)
    base = f"{parts.scheme}://{parts.netloc}"
    path = parts.path.rstrip("/")
    if not path:
        return [f"{base}/.well-known/oauth-authorization-server", f"{base}/.well-known/openid-configuration"]
    return [
        f"{base}/.well-known/oauth-authorization-server{path}",
        f"{base}/.well-known/openid-configuration{path}",
        f"{base}{path}/.well-known/openid-configuration",
    ]


FetchJson = Callable[[str], Awaitable[Any]]


class IssuerKeys:
    """One issuer's signing keys: discovered, cached, refreshed after `max_age`, refetched when a token
    names an unknown `kid`. Every fetch attempt (successful or not) counts against `refetch_interval`,
    so however many requests arrive, the issuer sees at most one JWKS fetch per interval. When a
    refresh fails the cached keys stay in use (an identity provider's outage should not lock everyone
    out) for at most `max_stale` seconds after the last successful fetch."""

    def __init__(
        self,
        issuer: str,
        fetch_json: FetchJson,
        *,
        check_url: Callable[[str], None],
        refetch_interval: float = DEFAULT_REFETCH_INTERVAL,
        max_age: float = DEFAULT_MAX_AGE,
        max_stale: float = DEFAULT_MAX_STALE,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self.issuer = issuer
        self._fetch_json = fetch_json
        self._check_url = check_url
        self.refetch_interval = refetch_interval
        self.max_age = max_age
        self.max_stale = max_stale
        self._timer = timer
        self._lock = asyncio.Lock()
        self._jwks_uri: str | None = None
        self._keys: dict[str, list[dict[str, Any]]] = {}  # kid -> its JWKs (public, for signatures)
        self._unnamed: list[dict[str, Any]] = []  # JWKs without a kid
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._prepared: dict[tuple[str | None, str], tuple[dict[str, Any], jwt.PyJWK]] = {}
        self.fetches = 0
        """JWKS documents fetched (successfully or not): what the rate limit bounds."""

    @property
    def jwks_uri(self) -> str | None:
        return self._jwks_uri

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._keys)

    async def key(self, kid: str | None, alg: str) -> jwt.PyJWK:
        """The key to verify a token signed with `alg` by `kid`. Raises TokenError (unknown key) or
        IssuerUnavailable (no keys can be had)."""
        now = self._timer()
        stale = self._fetched_at is None or now - self._fetched_at >= self.max_age
        jwk = None if stale else self._find(kid, alg)
        if jwk is None:
            await self._refresh()
            if self._fetched_at is None or self._timer() - self._fetched_at >= self.max_stale:
                self._drop()
                raise IssuerUnavailable()
            jwk = self._find(kid, alg)
        if jwk is None:
            raise TokenError("invalid_token", "the token's signing key is not among its issuer's keys")
        cached = self._prepared.get((kid, alg))
        if cached is not None and cached[0] is jwk:
            return cached[1]
        try:
            prepared = jwt.PyJWK(jwk, algorithm=alg)
        except jwt.PyJWTError:
            raise TokenError("invalid_token", "the token's signing key cannot be used") from None
        self._prepared[(kid, alg)] = (jwk, prepared)
        return prepared

    def _find(self, kid: str | None, alg: str) -> dict[str, Any] | None:
        if kid is not None:
            candidates = self._keys.get(kid, [])
        else:  # no kid (RFC 7515 allows it): every published key is a candidate
            candidates = [*(j for named in self._keys.values() for j in named), *self._unnamed]
        # A kid may name keys of several types (one RSA, one EC); a token's alg picks among them. Two
        # keys that both fit are ambiguous: neither is used.
        fitting = [j for j in candidates if _fits(j, alg)]
        return fitting[0] if len(fitting) == 1 else None

    def _drop(self) -> None:
        self._keys, self._unnamed, self._prepared = {}, [], {}
        self._fetched_at = None

    async def _refresh(self) -> None:
        async with self._lock:
            now = self._timer()
            if self._attempted_at is not None and now - self._attempted_at < self.refetch_interval:
                return  # fetched (or tried) just now, possibly by a request that held the lock before us
            self._attempted_at = now
            try:
                if self._jwks_uri is None:
                    self._jwks_uri = await self._discover()
                self.fetches += 1
                document = await self._fetch_json(self._jwks_uri)
                keys, unnamed = _parse_jwks(document)
            except FetchError as exc:
                self._jwks_uri = None  # discover again next time: the issuer may have moved its keys
                log.warning("oauth: keys of issuer %s not refreshed: %s", self.issuer, exc)
                return
            self._keys, self._unnamed, self._prepared = keys, unnamed, {}
            self._fetched_at = self._timer()

    async def _discover(self) -> str:
        problems = []
        for url in discovery_urls(self.issuer):
            try:
                document = await self._fetch_json(url)
            except FetchError as exc:
                problems.append(str(exc))
                continue
            if not isinstance(document, dict):
                problems.append(f"{url}: not a JSON object")
                continue
            # RFC 8414 section 3.3 / OIDC discovery section 4.3: the metadata must name the issuer
            # it was fetched for, exactly, or it is not that issuer's.
            if document.get("issuer") != self.issuer:
                problems.append(f"{url}: names another issuer")
                continue
            jwks_uri = document.get("jwks_uri")
            if not isinstance(jwks_uri, str):
                problems.append(f"{url}: no jwks_uri")
                continue
            self._check_url(jwks_uri)
            return jwks_uri
        raise FetchError("no usable metadata: " + "; ".join(problems))


def _parse_jwks(document: Any) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise FetchError('JWKS is not {"keys": [...]}')
    keys: dict[str, list[dict[str, Any]]] = {}
    unnamed: list[dict[str, Any]] = []
    for jwk in document["keys"]:
        if not isinstance(jwk, dict) or not _signing_key(jwk):
            continue
        kid = jwk.get("kid")
        if kid is None:
            unnamed.append(jwk)
        elif isinstance(kid, str):
            keys.setdefault(kid, []).append(jwk)
    return keys, unnamed


def _signing_key(jwk: Mapping[str, Any]) -> bool:
    """A public key published for signatures (RFC 7517 `use` and `key_ops`)."""
    if "d" in jwk or jwk.get("kty") == "oct":
        return False  # a private or symmetric key has no place in a published JWKS
    if jwk.get("use", "sig") != "sig":
        return False
    ops = jwk.get("key_ops")
    return ops is None or (isinstance(ops, list) and "verify" in ops)


def _fits(jwk: Mapping[str, Any], alg: str) -> bool:
    """Whether `jwk` may verify `alg`: its type and curve match, and its own `alg`, if any, is `alg`."""
    kty, curves = _KEY_TYPES[alg]
    if jwk.get("kty") != kty or jwk.get("alg", alg) != alg:
        return False
    return curves is None or jwk.get("crv") in curves


class JwtVerifier:
    """Verifies JWT access tokens from the configured issuers for a resource of this server.

    Use as `async with JwtVerifier(issuers=[...]) as verifier: token = await verifier.verify(raw,
    resource=url)`; or call `close()` when done. An aiohttp session is made on first use unless one is
    given (then its owner closes it)."""

    def __init__(
        self,
        *,
        issuers: Sequence[str],
        algorithms: Iterable[str] = ALGORITHMS,
        leeway: float = DEFAULT_LEEWAY,
        refetch_interval: float = DEFAULT_REFETCH_INTERVAL,
        max_age: float = DEFAULT_MAX_AGE,
        max_stale: float = DEFAULT_MAX_STALE,
        fetch: FetchPolicy = FetchPolicy(),
        session: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.time,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        if not issuers:
            raise ValueError("issuers must name at least one issuer URL")
        allowed = frozenset(algorithms)
        if not allowed or not allowed <= ALGORITHMS:
            raise ValueError(
                "algorithms must be a non-empty subset of "
                + ", ".join(sorted(ALGORITHMS))
                + " (never none or HMAC: a resource server holds no shared secret)"
            )
        if not 0 <= leeway <= 300:
            raise ValueError("leeway must be between 0 and 300 seconds")
        if refetch_interval <= 0 or max_age < refetch_interval or max_stale < max_age:
            raise ValueError("need 0 < refetch_interval <= max_age <= max_stale")
        for issuer in issuers:
            try:
                fetch.check(issuer)  # its metadata is fetched below it: https, or loopback http if allowed
            except FetchError as exc:
                raise ValueError(f"issuer {exc}") from None
            if urlsplit(issuer).query or urlsplit(issuer).fragment:
                raise ValueError(f"issuer {issuer!r} must have no query or fragment (RFC 8414 section 2)")
        self.algorithms = allowed
        self.leeway = leeway
        self.fetch = fetch
        self._clock = clock
        self._session = session
        self._own_session = session is None
        self._issuers = {
            issuer: IssuerKeys(
                issuer,
                self._get_json,
                check_url=self._check_url,
                refetch_interval=refetch_interval,
                max_age=max_age,
                max_stale=max_stale,
                timer=timer,
            )
            for issuer in issuers
        }

    @property
    def issuers(self) -> Mapping[str, IssuerKeys]:
        return MappingProxyType(self._issuers)

    def _check_url(self, url: str) -> None:
        self.fetch.check(url)

    async def _get_json(self, url: str) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=8),
                trust_env=False,  # never route the issuer's keys through a proxy named by the environment
                timeout=aiohttp.ClientTimeout(total=self.fetch.timeout),
            )
        return await Fetcher(self._session, self.fetch).get_json(url)

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> JwtVerifier:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def verify(self, token: str, *, resource: str) -> VerifiedToken:
        """The verified token, or TokenError (IssuerUnavailable when its issuer cannot be reached).
        `resource` is the canonical URL of the resource the request is for; the token's `aud` must name
        it. Scopes are not checked here: see `VerifiedToken.role`."""
        expected = canonical_resource(resource)
        if len(token) > MAX_TOKEN_BYTES or not token.isascii():
            raise TokenError("invalid_token", "the token is not a JWT")
        if token.count(".") != 2:
            raise TokenError("invalid_token", "the token is not a signed JWT (JWS compact form)")
        try:
            header = jwt.get_unverified_header(token)
            # Read only to pick the issuer's keys; everything in it is checked again below.
            unverified = jwt.decode(token, options=_UNVERIFIED)
        except jwt.PyJWTError:
            raise TokenError("invalid_token", "the token is not a well-formed JWT") from None
        alg = header.get("alg")
        # Checked before any key is looked up: the header is the attacker's to write.
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise TokenError("invalid_token", "the token's algorithm is not accepted")
        # PyJWT refuses every `crit` it does not know and `b64: false` without a detached payload;
        # should it learn more extensions, an access token still has no use for any of them.
        if "crit" in header or "b64" in header:
            raise TokenError("invalid_token", "the token uses JWS extensions this server does not support")
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.lower() not in _ACCESS_TOKEN_TYPES):
            raise TokenError("invalid_token", "the token is not an access token")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise TokenError("invalid_token", "the token is not a well-formed JWT")
        issuer = unverified.get("iss") if isinstance(unverified, dict) else None
        keys = self._issuers.get(issuer) if isinstance(issuer, str) else None
        if keys is None or issuer is None:
            raise TokenError("invalid_token", "the token's issuer is not trusted here")
        key = await keys.key(kid, alg)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                issuer=issuer,
                options={
                    "require": ["iss", "aud", "exp"],
                    "verify_signature": True,
                    "verify_iss": True,
                    # Audience and time are checked below: the audience as RFC 8707 wants it, the
                    # time against our clock (which tests can move).
                    "verify_aud": False,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "enforce_minimum_key_length": True,
                },
            )
        except jwt.InvalidSignatureError:
            raise TokenError("invalid_token", "the token's signature does not verify") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenError("invalid_token", f"the token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidIssuerError:
            raise TokenError("invalid_token", "the token's issuer is not trusted here") from None
        except jwt.PyJWTError:
            raise TokenError("invalid_token", "the token is not valid") from None
        expires_at, issued_at = self._check_time(claims)
        audience = self._check_audience(claims, expected)
        subject = claims.get("sub")
        client_id = claims.get("client_id", claims.get("azp"))
        return VerifiedToken(
            issuer=issuer,
            subject=subject if isinstance(subject, str) and subject else None,
            client_id=client_id if isinstance(client_id, str) and client_id else None,
            scopes=scopes_of(claims),
            audience=audience,
            expires_at=expires_at,
            issued_at=issued_at,
            key_id=kid,
            algorithm=alg,
            claims=MappingProxyType(claims),
        )

    def _check_time(self, claims: Mapping[str, Any]) -> tuple[float, float | None]:
        now = self._clock()
        exp = _numeric_date(claims, "exp")
        if exp is None:
            raise TokenError("invalid_token", "the token lacks the 'exp' claim")
        if exp <= now - self.leeway:
            raise TokenError("invalid_token", "the token has expired")
        nbf = _numeric_date(claims, "nbf")
        if nbf is not None and nbf > now + self.leeway:
            raise TokenError("invalid_token", "the token is not valid yet")
        iat = _numeric_date(claims, "iat")
        if iat is not None and iat > now + self.leeway:
            raise TokenError("invalid_token", "the token was issued in the future")
        return exp, iat

    @staticmethod
    def _check_audience(claims: Mapping[str, Any], expected: str) -> tuple[str, ...]:
        aud = claims.get("aud")
        values = [aud] if isinstance(aud, str) else aud
        if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
            raise TokenError("invalid_token", "the token's audience is malformed")
        for value in values:
            try:
                if canonical_resource(value) == expected:
                    return tuple(values)
            except ValueError:
                continue  # not a URL: some other audience (a client id, an API name), never ours
        raise TokenError("invalid_token", "the token was not issued for this resource")


def _numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:  # NaN
        raise TokenError("invalid_token", f"the token's {name!r} claim is not a number")
    return float(value)
