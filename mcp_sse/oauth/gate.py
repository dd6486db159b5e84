"""The resource server in the auth chain: an OAuth access token in, a Principal (or a refusal) out.

The auth chain asks this only for a bearer token that is no gateway key. The token must be for
the resource the request is for (RFC 8707): an MCP route's canonical URL (`PUBLIC_URL/mcp`,
`PUBLIC_URL/servers/<name>/sse`; `/messages` belongs to its `/sse`), or `PUBLIC_URL` itself for
the other routes (`/health`, `/mcp/servers`). The cookie-login routes under `/auth/` take keys
only.

Our own tokens (OAUTH_SERVER) are checked by OwnTokens: grant live, approving key in force with
the same secret, role capped by the key's. Other issuers' JWTs (OAUTH_ISSUERS) by JwtVerifier;
their role is the highest mcp:* scope, and a token without one is 403 insufficient_scope.

Refusals carry `WWW-Authenticate: Bearer resource_metadata="..."` (RFC 9728 section 5.1) naming
the metadata document of the resource the request was for. The token itself is never logged,
never kept, and never passed on to a backend.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from ..principal import Principal
from ..security.keys import ApiKey
from ..security.principals import Principals, oauth_identity
from .metadata import SCOPES, ErrorCode, metadata_url, well_known_path, www_authenticate
from .resource import JwtVerifier, TokenError
from .tokens import OwnTokens, TokenRefused, key_fingerprint

__all__ = ["CHALLENGE_SCOPES", "Authenticated", "ResourceGate", "resource_path"]

CHALLENGE_SCOPES: Final = SCOPES
"""The scopes a 401 or 403 names. All three, not just the least (mcp:viewer): MCP clients ask for
exactly the challenge's `scope` when it has one (the SDK does), and the consent page and the
token endpoint cap what is granted at the approving key's role (an IdP at its own policy), so
asking for mcp:viewer alone would leave every operator with a token that cannot call tools."""
KEY_ONLY_PREFIX: Final = "/auth/"


def resource_path(route_path: str) -> str:
    """The resource an MCP route belongs to: `/mcp/` is `/mcp`, `/x/messages` is `/x/sse`."""
    path = route_path.rstrip("/")
    if path.endswith("/messages"):
        path = path.removesuffix("/messages") + "/sse"
    return path


@dataclass(frozen=True)
class Authenticated:
    principal: Principal
    budget: str
    """What rate limits and stream caps count against: the approving key for our own tokens (a
    token has its key's budget, not one more), else the principal."""


class ResourceGate:
    def __init__(
        self,
        *,
        public_url: str,
        route_path: Callable[[web.Request], str | None],
        principals: Principals,
        own: OwnTokens | None = None,
        verifier: JwtVerifier | None = None,
    ) -> None:
        if own is None and verifier is None:
            raise ValueError("a resource gate needs own tokens (OAUTH_SERVER) or issuers (OAUTH_ISSUERS)")
        self.public_url = public_url.rstrip("/")
        self.route_path = route_path
        """The MCP route a request is on, its backend's name filled in; None off them (or for a
        name no backend has: those get the gateway's own resource, as any unknown path does)."""
        self.principals = principals
        self.own = own
        self.verifier = verifier

    def _resource_path(self, request: web.Request) -> str | None:
        """The resource path of this request; None where OAuth tokens are not taken."""
        if (path := self.route_path(request)) is not None:
            return resource_path(path)
        if request.path.startswith(KEY_ONLY_PREFIX):
            return None
        return ""

    def metadata_url(self, request: web.Request) -> str:
        path = self._resource_path(request) or ""
        return self.public_url + well_known_path(path) if path else metadata_url(self.public_url)

    def challenge(self, request: web.Request, error: ErrorCode | None = None, description: str = "") -> str:
        return www_authenticate(
            self.metadata_url(request),
            scope=CHALLENGE_SCOPES,
            error=error,
            error_description=description or None,
        )

    def unauthorized(
        self, request: web.Request, reason: str, *, error: ErrorCode | None = None
    ) -> web.HTTPException:
        """A 401 with the RFC 9728 challenge (`error` when a token was presented)."""
        return web.HTTPUnauthorized(
            text=json.dumps({"error": reason}),
            content_type="application/json",
            headers={"WWW-Authenticate": self.challenge(request, error, reason if error else "")},
        )

    def refusal(self, request: web.Request, exc: TokenError) -> web.HTTPException:
        body = json.dumps({"error": exc.description})
        if exc.http_status == 403:
            return web.HTTPForbidden(
                text=body,
                content_type="application/json",
                headers={"WWW-Authenticate": self.challenge(request, "insufficient_scope", exc.description)},
            )
        if exc.http_status == 503:
            return web.HTTPServiceUnavailable(
                text=body, content_type="application/json", headers={"Retry-After": "30"}
            )
        return self.unauthorized(request, exc.description, error=exc.error)

    async def authenticate(self, request: web.Request, token: str) -> Authenticated:
        """The caller of a valid access token for this request's resource; TokenError otherwise."""
        path = self._resource_path(request)
        if path is None:
            raise TokenError("invalid_token", "OAuth access tokens are not accepted here; use a gateway key")
        resource = self.public_url + path
        if self.own is not None and (self.verifier is None or self.own.looks_like_own(token)):
            result = await self.own.verify(token, resource)
            if isinstance(result, TokenRefused):
                raise TokenError("invalid_token", result.reason)
            key: ApiKey = result.key
            principal = Principal(
                id=oauth_identity(result.issuer, result.subject, result.client_id, result.role),
                name=key.name,
                role=result.role,
                source="oauth",
                backends=key.backends,
                tools_allow=key.tools_allow,
                tools_deny=key.tools_deny,
                expires=_expiry(result.expires_at, key),
                rate_limit=key.rate_limit,
                issuer=result.issuer,
                subject=result.subject,
                scopes=result.scopes,
                client_id=result.client_id,
            )
            self.principals.remember(
                principal, key_id=key.id, key_fp=key_fingerprint(key), grant_id=result.grant_id
            )
            return Authenticated(principal, budget=key.id)
        if self.verifier is None:
            raise TokenError("invalid_token", "Invalid token")
        verified = await self.verifier.verify(token, resource=resource)
        role = verified.role
        if role is None:
            raise TokenError("insufficient_scope", "the token grants no mcp:* scope (mcp:viewer at least)")
        try:
            principal = Principal.from_token(verified, role=role)
        except ValueError:
            raise TokenError("invalid_token", "the token names neither a subject nor a client") from None
        assert principal.issuer is not None and principal.subject is not None  # an oauth principal has both
        principal = dataclasses.replace(
            principal, id=oauth_identity(principal.issuer, principal.subject, principal.client_id, role)
        )
        self.principals.remember(principal)
        return Authenticated(principal, budget=principal.id)


def _expiry(expires_at: float, key: ApiKey) -> dt.datetime:
    token = dt.datetime.fromtimestamp(expires_at, dt.UTC)
    return token if key.expires is None else min(token, key.expires)
