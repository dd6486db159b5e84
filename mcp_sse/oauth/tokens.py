"""The gateway's own access tokens: JWTs (RFC 9068 profile) signed with a key made on first start.

The signing key is an ES256 (P-256) key in `<state_dir>/oauth-signing-key.pem`, created 0600
and never rewritten; its public half is published at `/oauth/jwks.json`. Verification is
PyJWT with a fixed configuration: only ES256 and only our key (the header's `alg` chooses
nothing, another `kid` is refused), `typ` at+jwt, `iss` ours, `aud` exactly the resource asked
about (RFC 8707), and the required claims present. Expiry is checked against the server's
clock, so tests can move time instead of waiting.

`OwnTokens.verify` is what the auth chain calls. A signature is not enough for a token to
count: its grant must still be live (revocation, refresh-token reuse and code reuse end it at
once) and the approving key must still be in force with the same secret (`KeyStore.current`,
after every SIGHUP reload or expiry).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import stat
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..security.keys import ApiKey, KeyStore, Role
from ..store import GrantRecord, OAuthStore
from .metadata import canonical_resource

if TYPE_CHECKING:
    from jwt.types import Options  # a TypedDict only newer PyJWT releases ship: typing only

__all__ = [
    "ALGORITHM",
    "ROLE_SCOPES",
    "SCOPE_ROLES",
    "TOKEN_TYPE",
    "OwnToken",
    "OwnTokens",
    "SigningKey",
    "TokenRefused",
    "capped_role",
    "key_fingerprint",
    "top_role",
]

ALGORITHM: Final = "ES256"
# RFC 9068 section 2.1: no other JWT can be mistaken for an access token.
TOKEN_TYPE: Final = "at+jwt"  # noqa: S105 (a media type, not a secret)
SIGNING_KEY_FILE: Final = "oauth-signing-key.pem"
SCOPE_ROLES: Final[dict[str, Role]] = {
    "mcp:admin": "admin",
    "mcp:operator": "operator",
    "mcp:viewer": "viewer",
}
ROLE_SCOPES: Final[dict[Role, str]] = {role: scope for scope, role in SCOPE_ROLES.items()}
_RANK: Final[dict[Role, int]] = {"viewer": 0, "operator": 1, "admin": 2}
REQUIRED_CLAIMS: Final = ("iss", "aud", "sub", "exp", "iat", "jti", "scope", "client_id", "gid")
MAX_TOKEN: Final = 8192  # ours are under 1 KB; a huge one is not worth parsing
VERIFIED_CACHE: Final = 4096


def capped_role(a: Role, b: Role) -> Role:
    """The lesser of two roles: a token never grants more than its key or its scope."""
    return a if _RANK[a] <= _RANK[b] else b


def top_role(roles: Iterable[Role]) -> Role:
    """The greatest of some roles (ValueError for none)."""
    return max(roles, key=_RANK.__getitem__)


def key_fingerprint(key: ApiKey) -> str:
    """Names the key's secret without revealing it: a key re-issued under the same id (a new
    secret) has a new fingerprint, so grants the old secret approved end with it."""
    return hashlib.sha256(b"mcp-sse-oauth-key:" + key.sha256).hexdigest()[:32]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class SigningKey:
    """The ES256 key tokens are signed with, and its JWK (RFC 7517) with an RFC 7638 thumbprint kid."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise ValueError("the OAuth signing key must be a P-256 (ES256) key")
        self.private_key = private_key
        self.public_key = private_key.public_key()
        numbers = self.public_key.public_numbers()
        x, y = _b64(numbers.x.to_bytes(32, "big")), _b64(numbers.y.to_bytes(32, "big"))
        # RFC 7638 section 3.2: the required members, in lexicographic order, no whitespace.
        canonical = json.dumps({"crv": "P-256", "kty": "EC", "x": x, "y": y}, separators=(",", ":"))
        self.kid = _b64(hashlib.sha256(canonical.encode()).digest())
        self.jwk: dict[str, str] = {
            "kty": "EC",
            "crv": "P-256",
            "x": x,
            "y": y,
            "kid": self.kid,
            "use": "sig",
            "alg": ALGORITHM,
        }

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def load_or_create(cls, state_dir: Path) -> SigningKey:
        """The key in `state_dir`, made there (0600) on first start.

        Refuses a key file others can read: whoever reads it can mint tokens for every key.
        """
        path = state_dir / SIGNING_KEY_FILE
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            return cls._load(path)
        except FileNotFoundError:
            pass
        key = cls.generate()
        pem = key.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        temporary = state_dir / f".{SIGNING_KEY_FILE}.{os.getpid()}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(pem)
                file.flush()
                os.fsync(file.fileno())
            # link() never replaces: if another process made the key meanwhile, theirs is kept.
            with contextlib.suppress(FileExistsError):
                os.link(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        return cls._load(path)

    @classmethod
    def _load(cls, path: Path) -> SigningKey:
        fd = os.open(path, os.O_RDONLY)
        with os.fdopen(fd, "rb") as file:
            mode = stat.S_IMODE(os.fstat(file.fileno()).st_mode)
            if mode & 0o077:
                raise ValueError(
                    f"{path} is readable by others (mode {mode:o}): chmod 600 it; anyone who can read it "
                    "can sign tokens for every key"
                )
            data = file.read()
        try:
            private = serialization.load_pem_private_key(data, password=None)
        except ValueError:
            raise ValueError(f"{path} is not a PEM private key; move it away to make a new one") from None
        if not isinstance(private, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{path} is not an EC private key; move it away to make a new one")
        return cls(private)

    def sign(self, claims: Mapping[str, Any]) -> str:
        return jwt.encode(
            dict(claims), self.private_key, algorithm=ALGORITHM, headers={"kid": self.kid, "typ": TOKEN_TYPE}
        )

    def decode(self, token: str, *, issuer: str, audience: str | None) -> dict[str, Any]:
        """The claims of a token this key signed, for this issuer and (if given) audience.

        Raises jwt.PyJWTError. `exp`/`nbf` are not checked here: the caller checks them on its
        own clock. Without an audience (revocation, RFC 7009) the audience is not checked.
        """
        options: Options = {
            "require": list(REQUIRED_CLAIMS),
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
            "verify_aud": audience is not None,
            "strict_aud": audience is not None,  # one audience, equal to ours: no list, no prefix
        }
        complete = jwt.decode_complete(
            token, self.public_key, algorithms=[ALGORITHM], issuer=issuer, audience=audience, options=options
        )
        header = complete["header"]
        if header.get("typ") != TOKEN_TYPE or header.get("kid") != self.kid:
            raise jwt.InvalidTokenError("not an access token of this server")
        claims: dict[str, Any] = complete["payload"]
        return claims


class OwnTokens:
    """Mints this server's access tokens and decides whether one still counts."""

    def __init__(
        self,
        *,
        issuer: str,
        signing_key: SigningKey,
        store: OAuthStore,
        keys: KeyStore,
        ttl: float,
        clock: Callable[[], float],
    ) -> None:
        self.issuer = issuer
        self.signing_key = signing_key
        self.store = store
        self.keys = keys
        self.ttl = ttl
        self.clock = clock
        self._verified: OrderedDict[bytes, dict[str, Any]] = OrderedDict()

    def approver(self, key_id: str, key_fp: str) -> ApiKey | None:
        """The approving key if it is still in force with the secret it approved with."""
        key = self.keys.current(key_id)
        return key if key is not None and hmac.compare_digest(key_fingerprint(key), key_fp) else None

    async def grant_live(self, grant_id: str) -> bool:
        """Whether a grant is still in force (not revoked on any instance, not expired)."""
        return await self.store.get_grant(grant_id, self.clock()) is not None

    def mint(self, *, grant: GrantRecord, key: ApiKey, client_id: str, scope: str, now: float) -> str:
        return self.signing_key.sign(
            {
                "iss": self.issuer,
                "aud": grant.resource,
                "sub": key.id,
                "client_id": client_id,
                "scope": scope,
                "gid": grant.grant_id,
                "jti": secrets.token_urlsafe(16),
                "iat": int(now),
                "exp": int(now + self.ttl),
            }
        )

    def looks_like_own(self, token: str) -> bool:
        """Cheap and unverified: does the token name our key? Picks the verifier, decides nothing."""
        try:
            return jwt.get_unverified_header(token).get("kid") == self.signing_key.kid
        except jwt.PyJWTError:
            return False

    def claims_for_revocation(self, token: str) -> dict[str, Any] | None:
        """The claims of a token we signed, any audience, expired or not (RFC 7009 revokes those too)."""
        if len(token) > MAX_TOKEN:
            return None
        try:
            return self.signing_key.decode(token, issuer=self.issuer, audience=None)
        except jwt.PyJWTError:
            return None

    def _claims(self, token: str, audience: str) -> dict[str, Any] | TokenRefused:
        """The token's checked claims. A token string's signature and claims never change, so
        what passed is remembered (bounded): MCP clients send the same token for an hour, and
        the signature check is most of the cost of a request's authentication."""
        cache_key = hashlib.sha256(f"{audience}\0{token}".encode()).digest()
        if (cached := self._verified.get(cache_key)) is not None:
            self._verified.move_to_end(cache_key)
            return cached
        if len(token) > MAX_TOKEN:
            return TokenRefused("invalid token")
        try:
            claims = self.signing_key.decode(token, issuer=self.issuer, audience=audience)
        except jwt.InvalidAudienceError:
            return TokenRefused("the token is for another resource")
        except jwt.InvalidIssuerError:
            return TokenRefused("the token is not from this server")
        except jwt.MissingRequiredClaimError as exc:
            return TokenRefused(f"the token has no {exc.claim} claim")
        except jwt.PyJWTError:
            return TokenRefused("invalid token")
        exp = claims["exp"]
        if not isinstance(exp, int) or isinstance(exp, bool):
            return TokenRefused("invalid token")
        if not all(isinstance(claims[name], str) for name in ("sub", "gid", "client_id", "scope")):
            return TokenRefused("invalid token")
        self._verified[cache_key] = claims
        if len(self._verified) > VERIFIED_CACHE:
            self._verified.popitem(last=False)
        return claims

    async def verify(self, token: str, resource: str) -> OwnToken | TokenRefused:
        """An access token of this server, for `resource`, whose grant is live and whose approving
        key is still in force: checked on every request, so revocation takes effect at once."""
        try:
            audience = canonical_resource(resource)
        except ValueError:
            return TokenRefused("not a resource URL")
        claims = self._claims(token, audience)
        if isinstance(claims, TokenRefused):
            return claims
        exp: int = claims["exp"]
        sub: str = claims["sub"]
        gid: str = claims["gid"]
        client_id: str = claims["client_id"]
        now = self.clock()
        if now >= exp:
            return TokenRefused("the token has expired")
        grant = await self.store.get_grant(gid, now)
        if grant is None:
            return TokenRefused("the grant was revoked")
        if grant.key_id != sub or grant.client_id != client_id or grant.resource != audience:
            return TokenRefused("invalid token")
        key = self.approver(sub, grant.key_fp)
        if key is None:
            return TokenRefused("the key that approved the token was revoked or has expired")
        scopes = frozenset(str(claims["scope"]).split())
        roles = [SCOPE_ROLES[s] for s in scopes if s in SCOPE_ROLES]
        if not roles:
            return TokenRefused("the token has no scope of this server")
        return OwnToken(
            issuer=self.issuer,
            subject=sub,
            client_id=client_id,
            scopes=scopes,
            expires_at=float(exp),
            claims=claims,
            grant_id=gid,
            resource=audience,
            key=key,
            role=capped_role(top_role(roles), key.role),
        )


@dataclass(frozen=True)
class OwnToken:
    """A verified access token of this server. Field names follow oauth.resource's VerifiedToken."""

    issuer: str
    subject: str  # the approving key's id
    client_id: str
    scopes: frozenset[str]
    expires_at: float
    claims: Mapping[str, Any]
    grant_id: str
    resource: str
    key: ApiKey  # as it stands now: its policy (backends, tools, rate limit) applies
    role: Role  # the lesser of the token's scope and the key's current role


@dataclass(frozen=True)
class TokenRefused:
    """Why a token does not count, fit for an audit line and an `error_description`; never the token."""

    reason: str
