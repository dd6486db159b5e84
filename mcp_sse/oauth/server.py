"""The built-in OAuth 2.1 authorization server (OAUTH_SERVER=true): one host, nothing else to run.

    GET  /.well-known/oauth-authorization-server   RFC 8414 metadata (also at the OIDC path)
    GET  /oauth/authorize                           sign-in, then consent (pages.py)
    POST /oauth/authorize/login                     the sign-in form: a gateway key
    POST /oauth/authorize                           the consent form: approve or deny
    POST /oauth/token                               authorization_code (PKCE S256) and refresh_token
    POST /oauth/register                            RFC 7591 dynamic registration
    POST /oauth/revoke                              RFC 7009 revocation
    GET  /oauth/jwks.json                           the public key access tokens are signed with

The person who approves is a gateway key holder: they sign in with their key (the same
server-side cookie login as POST /auth/login) and the grant carries that key's identity; its
policy applies to every call made with the token, and the token dies when the key is revoked
or expires. Scopes never exceed the key's role (mcp:admin, mcp:operator, mcp:viewer).

Only the authorization code grant with PKCE S256 (OAuth 2.1 section 4.1); no implicit, no
password grant, no plain PKCE. Codes live 60 s and are single-use; a second use revokes what
the first issued (RFC 6749 section 4.1.2). Refresh tokens rotate on every use, and a spent one
presented again ends its whole family (OAuth 2.1 section 4.3.1, RFC 9700 section 4.14.2).
Every token is bound to one resource of this server (RFC 8707).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, NoReturn
from urllib.parse import unquote_plus, urlencode, urlsplit, urlunsplit

from aiohttp import web
from multidict import MultiMapping

from ..security.audit import AuditLog, digest
from ..security.cookies import Login, LoginStore, login_from_cookie, start_cookie_session
from ..security.keys import ApiKey, KeyStore, Role
from ..security.origin import normalise_origin
from ..state import SECURE
from ..store import AUTH_METHODS, ClientRecord, CodeRecord, GrantRecord, OAuthStore, RefreshRecord
from . import pages
from .clients import (
    DEFAULT_REDIRECT_URIS,
    FETCH_TIMEOUT,
    LOOPBACK_HOSTS,
    ClientError,
    ClientRegistry,
    MetadataFetcher,
    RedirectPolicy,
    RegistrationError,
    is_url_client_id,
    secret_digest,
)
from .metadata import SCOPES, canonical_resource
from .tokens import (
    ROLE_SCOPES,
    SCOPE_ROLES,
    OwnToken,
    OwnTokens,
    SigningKey,
    TokenRefused,
    capped_role,
    key_fingerprint,
    top_role,
)

__all__ = [
    "AUTHORIZE_PATH",
    "LOGIN_PATH",
    "PUBLIC_PATHS",
    "REGISTER_PATH",
    "REVOKE_PATH",
    "TOKEN_PATH",
    "OAuthServer",
    "add_oauth_server_routes",
]

log = logging.getLogger("mcp_sse.oauth")

WELL_KNOWN_AS: Final = "/.well-known/oauth-authorization-server"
WELL_KNOWN_OIDC: Final = "/.well-known/openid-configuration"
AUTHORIZE_PATH: Final = "/oauth/authorize"
LOGIN_PATH: Final = "/oauth/authorize/login"
TOKEN_PATH: Final = "/oauth/token"  # noqa: S105 (a path)
REGISTER_PATH: Final = "/oauth/register"
REVOKE_PATH: Final = "/oauth/revoke"
JWKS_PATH: Final = "/oauth/jwks.json"
PUBLIC_PATHS: Final = frozenset(
    {
        WELL_KNOWN_AS,
        WELL_KNOWN_OIDC,
        AUTHORIZE_PATH,
        LOGIN_PATH,
        TOKEN_PATH,
        REGISTER_PATH,
        REVOKE_PATH,
        JWKS_PATH,
        pages.STYLESHEET_PATH,
    }
)
"""Paths that authenticate their callers themselves (or need no caller): the auth chain lets them by."""

AUTHORIZATION_PARAMS: Final = (
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "code_challenge",
    "code_challenge_method",
    "resource",
)
NO_STORE: Final = {"Cache-Control": "no-store", "Pragma": "no-cache"}  # RFC 6749 section 5.1
CODE_MEMORY: Final = 600.0
"""Seconds a spent or expired code is remembered, so its reuse still revokes what it issued."""
PRUNE_INTERVAL: Final = 600.0
MAX_STATE: Final = 2048
MAX_REGISTRATION: Final = 16 * 1024
_VERIFIER: Final = re.compile(r"[A-Za-z0-9._~-]{43,128}")  # RFC 7636 section 4.1
_CHALLENGE: Final = re.compile(r"[A-Za-z0-9_-]{43}")  # base64url of a SHA-256, unpadded
_SCOPE_TEXT: Final[dict[Role, str]] = {
    "admin": "Everything an operator can do, and administer this gateway",
    "operator": "See and call tools, read resources and use prompts",
    "viewer": "See tools, prompts and resources, and read resources; no tool calls",
}
PRE_LOGIN_COOKIE: Final = "mcp-sse-oauth"
SECURE_PRE_LOGIN_COOKIE: Final = "__Host-mcp-sse-oauth"


class OAuthError(Exception):
    """An RFC 6749 section 5.2 error from the token, registration or revocation endpoint."""

    def __init__(self, error: str, description: str, *, status: int = 400) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status

    def response(self) -> web.HTTPException:
        headers = dict(NO_STORE)
        if self.status == 401:
            # RFC 6749 section 5.2 asks it of a client that tried Basic; HTTP asks it of every 401.
            headers["WWW-Authenticate"] = 'Basic realm="mcp-sse-oauth"'
        body = json.dumps({"error": self.error, "error_description": self.description})
        cls: type[web.HTTPException] = {401: web.HTTPUnauthorized, 503: web.HTTPServiceUnavailable}.get(
            self.status, web.HTTPBadRequest
        )
        return cls(text=body, content_type="application/json", headers=headers)


class _PageError(Exception):
    """Shown to the person; never a redirect (an unverified redirect URI is an open redirector)."""

    def __init__(self, status: int, heading: str, message: str, reason: str) -> None:
        super().__init__(message)
        self.status = status
        self.heading = heading
        self.message = message
        self.reason = reason


class _RedirectError(Exception):
    """An authorization error the client learns through its (verified) redirect URI."""

    def __init__(self, redirect_uri: str, state: str | None, error: str, description: str) -> None:
        super().__init__(description)
        self.redirect_uri = redirect_uri
        self.state = state
        self.error = error
        self.description = description


@dataclass(frozen=True)
class _AuthRequest:
    client: ClientRecord
    redirect_uri: str
    state: str | None
    code_challenge: str
    resource: str
    requested: tuple[str, ...]  # known scopes asked for
    params: dict[str, str]  # as received: carried through the forms, checked again on each POST

    def digest(self) -> bytes:
        return hashlib.sha256(json.dumps(self.params, sort_keys=True).encode()).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _sha256(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def _single(values: MultiMapping[Any], names: Collection[str]) -> tuple[dict[str, str], set[str]]:
    """The parameters named `names` (RFC 6749 section 3.1: each at most once), and those repeated."""
    found: dict[str, str] = {}
    repeated: set[str] = set()
    for name in names:
        got = values.getall(name, [])
        if len(got) > 1:
            repeated.add(name)
        if got and isinstance(got[0], str):
            found[name] = got[0]
    return found, repeated


async def _urlencoded(request: web.Request) -> MultiMapping[Any] | None:
    """The form body (RFC 6749 appendix B: application/x-www-form-urlencoded, UTF-8), or None
    for another content type or bytes that do not decode (aiohttp raises on those)."""
    if request.content_type != "application/x-www-form-urlencoded":
        return None
    try:
        return await request.post()
    except (UnicodeDecodeError, ValueError):
        return None


def _issuer(issuer: str) -> str:
    parts = urlsplit(issuer.strip())
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"OAuth issuer {issuer!r} must be an absolute https URL (PUBLIC_URL)")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(
            f"OAuth issuer {issuer!r} must be scheme://host[:port] only: the endpoints live at its root"
        )
    host = parts.hostname.lower()
    if parts.scheme == "http" and (f"[{host}]" if ":" in host else host) not in LOOPBACK_HOSTS:
        # OAuth 2.1 section 1.5, MCP authorization pages: every authorization server endpoint is https.
        raise ValueError(f"OAuth issuer {issuer!r} must use https (http only on a loopback address)")
    return normalise_origin(issuer.strip())


class OAuthServer:
    """The authorization server. Add it to an app with `add_oauth_server_routes(app, server)`."""

    def __init__(
        self,
        *,
        issuer: str,
        resource_urls: Collection[str],
        keys: KeyStore,
        logins: LoginStore,
        store: OAuthStore,
        audit: AuditLog,
        signing_key: SigningKey,
        redirect_uri_patterns: Sequence[str] = DEFAULT_REDIRECT_URIS,
        allow_loopback_metadata: bool = False,
        metadata_fetch_timeout: float = FETCH_TIMEOUT,
        token_ttl: float = 3600.0,
        refresh_ttl: float = 30 * 86400.0,
        code_ttl: float = 60.0,
        client_unused_ttl: float = 86400.0,
        max_clients: int = 10_000,
        backends: Callable[[], Sequence[str]] = tuple,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 < code_ttl <= 600 or token_ttl <= 0 or refresh_ttl < token_ttl:
            raise ValueError(
                "OAuth lifetimes: code_ttl must be in (0, 600], token_ttl positive, refresh_ttl >= token_ttl"
            )
        pages.assets()  # the pages' templates are installed: fail at start, not at the first sign-in
        self.issuer = _issuer(issuer)
        if not resource_urls or isinstance(resource_urls, str):
            raise ValueError("resource_urls must list at least one resource URL of this server")
        self.resources = frozenset(canonical_resource(url) for url in resource_urls)
        self.keys = keys
        self.logins = logins
        self.store = store
        self.audit = audit
        self.signing_key = signing_key
        self.tokens = OwnTokens(
            issuer=self.issuer, signing_key=signing_key, store=store, keys=keys, ttl=token_ttl, clock=clock
        )
        self.policy = RedirectPolicy(redirect_uri_patterns)
        self.fetcher = MetadataFetcher(
            self.policy, allow_loopback=allow_loopback_metadata, clock=clock, timeout=metadata_fetch_timeout
        )
        self.clients = ClientRegistry(
            store,
            self.policy,
            self.fetcher,
            unused_ttl=client_unused_ttl,
            max_clients=max_clients,
            clock=clock,
        )
        self.token_ttl = token_ttl
        self.refresh_ttl = refresh_ttl
        self.code_ttl = code_ttl
        self.backends = backends
        self.clock = clock
        self.gateway = urlsplit(self.issuer).netloc
        # Form tokens only need to outlive a page view; a restart ends every cookie login anyway.
        self._csrf_secret = secrets.token_bytes(32)

    # -- metadata -----------------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        """RFC 8414 section 2 authorization server metadata."""
        methods = list(AUTH_METHODS)
        return {
            "issuer": self.issuer,
            "authorization_endpoint": self.issuer + AUTHORIZE_PATH,
            "token_endpoint": self.issuer + TOKEN_PATH,
            "registration_endpoint": self.issuer + REGISTER_PATH,
            "revocation_endpoint": self.issuer + REVOKE_PATH,
            "jwks_uri": self.issuer + JWKS_PATH,
            "scopes_supported": list(SCOPES),
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": methods,
            "revocation_endpoint_auth_methods_supported": methods,
            "client_id_metadata_document_supported": True,
            "authorization_response_iss_parameter_supported": True,  # RFC 9207 section 3
        }

    async def _metadata(self, request: web.Request) -> web.Response:
        # Public, the same for everyone, read by browser-based clients too: cacheable, any origin.
        return web.json_response(
            self.metadata(),
            headers={"Cache-Control": "public, max-age=3600", "Access-Control-Allow-Origin": "*"},
        )

    async def _jwks(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"keys": [self.signing_key.jwk]},
            headers={"Cache-Control": "public, max-age=3600", "Access-Control-Allow-Origin": "*"},
        )

    # -- the authorization request --------------------------------------------------------------

    async def _authorization_request(self, values: MultiMapping[Any]) -> _AuthRequest:
        """The request checked (RFC 6749 section 4.1.2.1): client and redirect URI problems are
        _PageError (nobody is redirected to an unverified URI), the rest _RedirectError."""
        params, repeated = _single(values, AUTHORIZATION_PARAMS)
        if repeated & {"client_id", "redirect_uri"}:
            raise _PageError(400, "Invalid request", "The request names its client twice.", "repeated client")
        client_id = params.get("client_id", "")
        if not client_id:
            raise _PageError(
                400, "Invalid request", "The request does not say which app it is from.", "no client_id"
            )
        try:
            client = await self.clients.resolve(client_id)
        except ClientError as exc:
            raise _PageError(400, "Unknown app", f"This app cannot sign in here: {exc}.", str(exc)) from None
        redirect_uri = params.get("redirect_uri")
        if redirect_uri is None:
            # OAuth 2.1 section 4.1.1: optional only when the client has exactly one.
            if len(client.redirect_uris) != 1:
                raise _PageError(
                    400, "Invalid request", "The request does not say where to return to.", "no redirect_uri"
                )
            redirect_uri = client.redirect_uris[0]
        elif redirect_uri not in client.redirect_uris:  # exact string match, OAuth 2.1 section 2.3.1
            raise _PageError(
                400,
                "Unknown return address",
                "The app asked to return to an address it has not registered here, or one this gateway "
                "does not allow. Nothing was sent to that address.",
                "redirect_uri not registered",
            )
        state = params.get("state")
        target: str = redirect_uri  # verified: errors from here on go back to it

        def refuse(error: str, description: str) -> NoReturn:
            raise _RedirectError(target, state, error, description)

        if repeated:
            refuse("invalid_request", f"parameter {sorted(repeated)[0]} is repeated")
        if state is not None and len(state) > MAX_STATE:
            refuse("invalid_request", "state is too long")
        if params.get("response_type") != "code":
            refuse("unsupported_response_type", "only response_type=code is supported")
        if "authorization_code" not in client.grant_types:
            refuse("unauthorized_client", "the client did not register for the authorization_code grant")
        challenge = params.get("code_challenge")
        if not challenge:
            refuse("invalid_request", "code_challenge is required (PKCE with S256)")
        if params.get("code_challenge_method") != "S256":
            # Absent means plain (RFC 7636 section 4.3), which a stolen code's thief could satisfy.
            refuse("invalid_request", "code_challenge_method must be S256")
        if not _CHALLENGE.fullmatch(challenge):
            refuse("invalid_request", "code_challenge must be the base64url SHA-256 of the verifier")
        resource = params.get("resource")
        if not resource:
            refuse("invalid_target", "resource is required: the URL of the MCP server (RFC 8707)")
        try:
            canonical = canonical_resource(resource)
        except ValueError:
            refuse("invalid_target", "resource is not a valid resource URL")
        if canonical not in self.resources:
            refuse("invalid_target", "resource is not an MCP server of this gateway")
        # Unknown scopes (openid, offline_access, ...) are ignored, as RFC 6749 section 3.3 lets us.
        requested = tuple(s for s in params.get("scope", "").split() if s in SCOPE_ROLES)
        return _AuthRequest(client, target, state, challenge, canonical, requested, params)

    def _redirect(self, uri: str, params: Mapping[str, str | None], status: type[web.HTTPMove]) -> NoReturn:
        """Send the browser back to the client. RFC 9207: `iss` on every response, errors too."""
        query = {k: v for k, v in params.items() if v is not None}
        query["iss"] = self.issuer
        parts = urlsplit(uri)
        joined = f"{parts.query}&{urlencode(query)}" if parts.query else urlencode(query)
        raise status(
            location=urlunsplit((parts.scheme, parts.netloc, parts.path, joined, "")), headers=NO_STORE
        )

    def _redirect_error(
        self, request: web.Request, exc: _RedirectError, status: type[web.HTTPMove]
    ) -> NoReturn:
        self.audit.event(
            "oauth.authorize", request, outcome="refused", reason=exc.description, error=exc.error
        )
        self._redirect(
            exc.redirect_uri,
            {"error": exc.error, "error_description": exc.description, "state": exc.state},
            status,
        )

    def _page_error(self, request: web.Request, exc: _PageError) -> web.HTTPException:
        self.audit.event("oauth.authorize", request, outcome="refused", reason=exc.reason)
        return self._html_error(exc.status, exc.heading, exc.message)

    def _html_error(self, status: int, heading: str, message: str) -> web.HTTPException:
        body = pages.error_page(gateway=self.gateway, heading=heading, message=message)
        cls: type[web.HTTPException] = {401: web.HTTPUnauthorized, 403: web.HTTPForbidden}.get(
            status, web.HTTPBadRequest
        )
        return cls(text=body, content_type="text/html", headers=pages.page_headers())

    # -- sign-in and consent ----------------------------------------------------------------------

    async def _current_login(self, request: web.Request) -> tuple[Login, ApiKey] | None:
        login = await login_from_cookie(request, self.logins)
        key = self.keys.current(login.key_id) if login is not None else None
        return None if login is None or key is None else (login, key)

    def _csrf(self, purpose: str, binding: str, auth: _AuthRequest) -> str:
        message = b"\0".join((purpose.encode(), binding.encode(), auth.digest()))
        return _b64(hmac.new(self._csrf_secret, message, hashlib.sha256).digest())

    def _csrf_ok(self, form: MultiMapping[Any], expected: str) -> bool:
        sent = form.get("csrf")
        return isinstance(sent, str) and hmac.compare_digest(sent.encode(), expected.encode())

    def _same_origin(self, request: web.Request) -> bool:
        """A form post from our own page: browsers always send Origin on a POST, and our pages'
        Referrer-Policy keeps it the real origin (not "null"). Login CSRF and consent CSRF both
        fail here before any token is compared."""
        values = request.headers.getall("Origin", [])
        if len(values) != 1:
            return False
        try:
            return normalise_origin(values[0], header=True) == self.issuer
        except ValueError:
            return False

    def _pre_login_cookie(self, request: web.Request) -> tuple[str, str, bool]:
        name = SECURE_PRE_LOGIN_COOKIE if request.get(SECURE, False) else PRE_LOGIN_COOKIE
        value = request.cookies.get(name, "")
        if re.fullmatch(r"[A-Za-z0-9_-]{43}", value):
            return name, value, False
        return name, secrets.token_urlsafe(32), True

    def _login_page(self, request: web.Request, auth: _AuthRequest, *, error: str = "") -> web.Response:
        response = web.Response(content_type="text/html", headers=pages.page_headers())
        self._fill_login_page(request, auth, response, error)
        return response

    def _login_refused(self, request: web.Request, auth: _AuthRequest) -> web.HTTPUnauthorized:
        # Raised, not returned: the failed-login lockout counts the 401s it sees raised.
        refusal = web.HTTPUnauthorized(content_type="text/html", headers=pages.page_headers())
        self._fill_login_page(request, auth, refusal, "That key is not valid.")
        return refusal

    def _fill_login_page(
        self, request: web.Request, auth: _AuthRequest, response: web.Response, error: str
    ) -> None:
        name, value, fresh = self._pre_login_cookie(request)
        response.text = pages.login_page(
            gateway=self.gateway,
            action=LOGIN_PATH,
            client_name=self._display_name(auth.client, auth.redirect_uri),
            fields={**auth.params, "csrf": self._csrf("login", value, auth)},
            error=error,
        )
        if fresh:
            # Double-submit binding for the sign-in form (login CSRF, RFC 6749 section 10.12).
            response.set_cookie(
                name,
                value,
                max_age=3600,
                path="/",
                secure=request.get(SECURE, False),
                httponly=True,
                samesite="Strict",
            )

    @staticmethod
    def _host(uri: str) -> tuple[str, bool]:
        parts = urlsplit(uri)
        host = (parts.hostname or "").lower()
        shown = f"[{host}]" if ":" in host else host
        loopback = shown in LOOPBACK_HOSTS
        port = f":{parts.port}" if parts.port is not None else ""
        return shown + port, loopback

    def _display_name(self, client: ClientRecord, redirect_uri: str) -> str:
        return client.client_name or self._host(redirect_uri)[0]

    def _granted(self, auth: _AuthRequest, key: ApiKey) -> str:
        """The scope to grant: the highest role asked for (all of them if none was), never above the key's."""
        asked: list[Role] = [SCOPE_ROLES[s] for s in auth.requested] or [key.role]
        return ROLE_SCOPES[capped_role(top_role(asked), key.role)]

    def _consent_view(self, auth: _AuthRequest, key: ApiKey) -> pages.ConsentView:
        scope = self._granted(auth, key)
        role = SCOPE_ROLES[scope]
        every = list(self.backends())
        if key.backends is None:
            backends = "All backends" + (f": {', '.join(every)}" if every else "")
        else:
            backends = ", ".join(key.backends) or "None"
        if role == "viewer":
            tools = "Listed, not called"
        elif key.tools_allow == ("*",) and not key.tools_deny:
            tools = "All tools"
        else:
            tools = "Only " + ", ".join(key.tools_allow)
            if key.tools_deny:
                tools += "; never " + ", ".join(key.tools_deny)
        host, loopback = self._host(auth.redirect_uri)
        if auth.client.from_document:
            provenance = f"Identified by its metadata document at {urlsplit(auth.client.client_id).hostname}"
        else:
            provenance = (
                "Registered itself with this gateway; the name is its own claim, check the address below"
            )
        return pages.ConsentView(
            client_name=self._display_name(auth.client, auth.redirect_uri),
            provenance=provenance,
            redirect_uri=auth.redirect_uri,
            redirect_host=host,
            loopback=loopback,
            scope=scope,
            scope_text=_SCOPE_TEXT[role],
            backends=backends,
            tools=tools,
            key_name=key.name,
            role=key.role,
            resource=auth.resource,
            lifetime=(
                f"{_duration(self.token_ttl)} at a time, renewed for up to {_duration(self.refresh_ttl)} "
                "after each use, until your key is revoked"
            ),
        )

    def _consent_page(self, auth: _AuthRequest, login: Login, key: ApiKey) -> web.Response:
        fields = {**auth.params, "csrf": self._csrf("consent", login.sid, auth)}
        body = pages.consent_page(
            gateway=self.gateway, action=AUTHORIZE_PATH, view=self._consent_view(auth, key), fields=fields
        )
        return web.Response(
            text=body, content_type="text/html", headers=pages.page_headers([auth.redirect_uri])
        )

    async def _authorize(self, request: web.Request) -> web.Response:
        """GET: who is asking, then the sign-in page or the consent page."""
        try:
            auth = await self._authorization_request(request.query)
        except _PageError as exc:
            raise self._page_error(request, exc) from None
        except _RedirectError as exc:
            self._redirect_error(request, exc, web.HTTPFound)
        signed_in = await self._current_login(request)
        if signed_in is None:
            return self._login_page(request, auth)
        return self._consent_page(auth, *signed_in)

    async def _posted(self, request: web.Request, what: str) -> tuple[MultiMapping[Any], _AuthRequest]:
        """A sign-in or consent form: from this gateway's own page (CSRF), as a browser sends it,
        carrying an authorization request that is still valid."""
        if not self._same_origin(request):
            self.audit.event(
                "oauth.authorize", request, outcome="refused", reason=f"{what} from another origin"
            )
            page = "sign-in" if what == "sign-in" else "approval"
            raise self._html_error(
                403, "Request refused", f"This {page} did not come from this gateway's page."
            )
        form = await _urlencoded(request)
        if form is None:
            raise self._html_error(400, "Invalid request", "This form was not sent by a browser.")
        try:
            return form, await self._authorization_request(form)
        except _PageError as exc:
            raise self._page_error(request, exc) from None
        except _RedirectError as exc:
            self._redirect_error(request, exc, web.HTTPSeeOther)

    async def _login(self, request: web.Request) -> web.Response:
        """POST: the sign-in form. The key is checked as POST /auth/login checks it, and the login
        made by the same function, so logout, key revocation and the lifetime apply alike."""
        form, auth = await self._posted(request, "sign-in")
        _, cookie, fresh = self._pre_login_cookie(request)
        if fresh or not self._csrf_ok(form, self._csrf("login", cookie, auth)):
            self.audit.event(
                "oauth.authorize", request, outcome="refused", reason="sign-in without a valid form token"
            )
            raise self._html_error(403, "Request refused", "The sign-in form expired. Go back and try again.")
        presented = form.get("key")
        key = self.keys.verify(presented) if isinstance(presented, str) and presented else None
        if key is None:
            self.audit.event("auth.failed", request, reason="login")
            raise self._login_refused(request, auth)
        await start_cookie_session(request, self.logins, key.id)
        self.audit.event("session.login", request, identity=key.id, via="oauth")
        raise web.HTTPSeeOther(location=f"{AUTHORIZE_PATH}?{urlencode(auth.params)}", headers=NO_STORE)

    async def _decide(self, request: web.Request) -> web.Response:
        """POST: the consent form's Approve or Deny."""
        form, auth = await self._posted(request, "consent")
        signed_in = await self._current_login(request)
        if signed_in is None:
            return self._login_page(request, auth, error="Your sign-in ended. Sign in again to continue.")
        login, key = signed_in
        if not self._csrf_ok(form, self._csrf("consent", login.sid, auth)):
            self.audit.event(
                "oauth.authorize", request, outcome="refused", reason="consent without a valid form token"
            )
            raise self._html_error(
                403, "Request refused", "The approval form expired. Go back and try again."
            )
        decision = form.get("decision")
        client_id = auth.client.client_id
        if decision == "deny":
            self.audit.event(
                "oauth.authorize", request, outcome="denied", client_id=client_id, identity=key.id
            )
            self._redirect(
                auth.redirect_uri,
                {
                    "error": "access_denied",
                    "error_description": "the user denied the request",
                    "state": auth.state,
                },
                web.HTTPSeeOther,
            )
        if decision != "approve":
            raise self._html_error(400, "Invalid request", "Choose Approve or Deny.")
        scope = self._granted(auth, key)
        code = secrets.token_urlsafe(32)
        record = CodeRecord(
            code_sha256=_sha256(code),
            client_id=client_id,
            redirect_uri=auth.redirect_uri,
            code_challenge=auth.code_challenge,
            resource=auth.resource,
            scope=scope,
            key_id=key.id,
            key_fp=key_fingerprint(key),
            grant_id=secrets.token_urlsafe(16),
            expires_at=self.clock() + self.code_ttl,
        )
        await self.store.add_code(record)
        self.audit.event(
            "oauth.authorize",
            request,
            outcome="approved",
            client_id=client_id,
            identity=key.id,
            scope=scope,
            resource=auth.resource,
            redirect_host=self._host(auth.redirect_uri)[0],
            grant_id=record.grant_id,
        )
        self._redirect(auth.redirect_uri, {"code": code, "state": auth.state}, web.HTTPSeeOther)

    # -- client authentication (token and revocation endpoints) ------------------------------------

    async def _token_form(self, request: web.Request) -> dict[str, str]:
        form = await _urlencoded(request)
        if form is None:
            raise OAuthError(
                "invalid_request", "send the parameters as application/x-www-form-urlencoded UTF-8"
            )
        values: dict[str, str] = {}
        for name in set(form.keys()):
            got = form.getall(name)
            if len(got) > 1:
                raise OAuthError("invalid_request", f"parameter {name[:40]} is repeated")
            if isinstance(got[0], str):
                values[name] = got[0]
        return values

    async def _client(self, request: web.Request, form: Mapping[str, str]) -> ClientRecord:
        """The client, authenticated as it registered (RFC 6749 section 2.3): a public client by
        its id alone (PKCE and refresh rotation protect it), a confidential one by its secret."""
        header = request.headers.get("Authorization")
        secret = form.get("client_secret") or None
        client_id = form.get("client_id") or None
        if header is not None:
            scheme, _, encoded = header.partition(" ")
            if scheme.lower() != "basic":
                raise OAuthError("invalid_client", "use HTTP Basic client authentication", status=401)
            if secret is not None:
                raise OAuthError("invalid_request", "use one client authentication method")
            try:
                decoded = base64.b64decode(encoded.strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise OAuthError("invalid_client", "malformed Basic credentials", status=401) from None
            raw_id, sep, raw_secret = decoded.partition(":")
            if not sep:
                raise OAuthError("invalid_client", "malformed Basic credentials", status=401)
            # RFC 6749 section 2.3.1: both halves are form-urlencoded before base64.
            # An empty password (some public clients send "id:") is no secret.
            header_id, secret = unquote_plus(raw_id), unquote_plus(raw_secret) or None
            if client_id is not None and client_id != header_id:
                raise OAuthError("invalid_request", "client_id differs from the Basic credentials")
            client_id = header_id
        if not client_id:
            raise OAuthError("invalid_client", "client_id is required", status=401)
        unknown = OAuthError(
            "invalid_client",
            "unknown client (registrations that go unused expire): register again",
            status=401,
        )
        if is_url_client_id(client_id):
            # A metadata-document client is public by construction; the code or grant it presents
            # names the client_id it was issued to, so nothing needs fetching here.
            if secret is not None:
                raise OAuthError("invalid_client", "this client has no secret", status=401)
            now = self.clock()
            return ClientRecord(client_id, "", (), "none", None, ("authorization_code",), now, now, True)
        client = await self.store.get_client(client_id) if len(client_id) <= 200 else None
        if client is None:
            raise unknown
        if client.auth_method == "none":
            if secret is not None:
                raise OAuthError("invalid_client", "this client is public: it has no secret", status=401)
            return client
        if secret is None or client.secret_sha256 is None:
            raise OAuthError("invalid_client", "client authentication is required", status=401)
        if not hmac.compare_digest(secret_digest(secret), client.secret_sha256):
            raise OAuthError("invalid_client", "client authentication failed", status=401)
        return client

    # -- the token endpoint ------------------------------------------------------------------------

    async def _token(self, request: web.Request) -> web.Response:
        grant_type = ""
        client_id: str | None = None
        try:
            form = await self._token_form(request)
            grant_type = form.get("grant_type", "")
            client = await self._client(request, form)
            client_id = client.client_id
            if grant_type == "authorization_code":
                body = await self._code_grant(request, client, form)
            elif grant_type == "refresh_token":
                body = await self._refresh_grant(request, client, form)
            elif not grant_type:
                raise OAuthError("invalid_request", "grant_type is required")
            else:
                raise OAuthError(
                    "unsupported_grant_type", "only authorization_code and refresh_token are supported"
                )
        except OAuthError as exc:
            self.audit.event(
                "oauth.token",
                request,
                outcome="refused",
                reason=exc.description,
                error=exc.error,
                grant_type=grant_type[:40],
                client_id=client_id,
            )
            raise exc.response() from None
        return web.json_response(body, headers=NO_STORE)

    def _resource_matches(self, form: Mapping[str, str], bound: str) -> None:
        resource = form.get("resource")
        if resource is None:
            return  # RFC 8707 section 2.2: the token is for the resource the grant is bound to
        try:
            same = canonical_resource(resource) == bound
        except ValueError:
            same = False
        if not same:
            raise OAuthError("invalid_target", "resource is not the one this grant was made for")

    async def _code_grant(
        self, request: web.Request, client: ClientRecord, form: Mapping[str, str]
    ) -> dict[str, Any]:
        code, verifier = form.get("code"), form.get("code_verifier")
        if not code:
            raise OAuthError("invalid_request", "code is required")
        if not verifier:
            raise OAuthError("invalid_request", "code_verifier is required (PKCE)")
        if not _VERIFIER.fullmatch(verifier):
            raise OAuthError(
                "invalid_request", "code_verifier must be 43-128 unreserved characters (RFC 7636)"
            )
        taken = await self.store.take_code(_sha256(code)) if len(code) <= 200 else None
        if taken is None:
            raise OAuthError("invalid_grant", "unknown authorization code")
        record, first = taken
        now = self.clock()
        if not first:
            # RFC 6749 section 4.1.2 / OAuth 2.1 section 4.1.3: a code used twice was stolen by one
            # of the two; what it issued is revoked, and the grant id stays refused.
            revoked = await self.store.revoke_grant(
                record.grant_id, now, remember_until=record.expires_at + CODE_MEMORY
            )
            self.audit.event(
                "oauth.code_reuse",
                request,
                client_id=record.client_id,
                grant_id=record.grant_id,
                identity=record.key_id,
                revoked=revoked,
                msg="an authorization code was presented again; the grant it issued is revoked",
            )
            raise OAuthError("invalid_grant", "authorization code already used")
        if record.client_id != client.client_id:
            raise OAuthError("invalid_grant", "the code was issued to another client")
        if now >= record.expires_at:
            raise OAuthError("invalid_grant", "authorization code expired")
        if "redirect_uri" in form and form["redirect_uri"] != record.redirect_uri:
            raise OAuthError("invalid_grant", "redirect_uri differs from the authorization request")
        self._resource_matches(form, record.resource)
        challenge = _b64(hashlib.sha256(verifier.encode("ascii")).digest())
        if not hmac.compare_digest(challenge, record.code_challenge):
            raise OAuthError("invalid_grant", "code_verifier does not match the code_challenge")
        key = self.tokens.approver(record.key_id, record.key_fp)
        if key is None:
            raise OAuthError("invalid_grant", "the key that approved this grant is no longer valid")
        refresh = secrets.token_urlsafe(32)
        grant = GrantRecord(
            grant_id=record.grant_id,
            client_id=client.client_id,
            key_id=key.id,
            key_fp=record.key_fp,
            resource=record.resource,
            scope=record.scope,
            created_at=now,
            expires_at=now + self.refresh_ttl,
        )
        if not await self.store.create_grant(
            grant, RefreshRecord(_sha256(refresh), grant.grant_id, grant.expires_at)
        ):
            raise OAuthError("invalid_grant", "authorization code already used")
        return await self._issue(request, client, grant, key, refresh, "authorization_code", now)

    async def _refresh_grant(
        self, request: web.Request, client: ClientRecord, form: Mapping[str, str]
    ) -> dict[str, Any]:
        presented = form.get("refresh_token")
        if not presented:
            raise OAuthError("invalid_request", "refresh_token is required")
        if len(presented) > 200:
            raise OAuthError("invalid_grant", "unknown refresh token")
        old = _sha256(presented)
        now = self.clock()
        grant = await self.store.find_refresh(old, now)
        if grant is None:
            raise OAuthError("invalid_grant", "unknown, expired or revoked refresh token")
        if grant.client_id != client.client_id:
            raise OAuthError("invalid_grant", "the refresh token was issued to another client")
        self._resource_matches(form, grant.resource)
        # Everything that can refuse is checked before the rotation: a refused refresh must leave
        # the client's token unspent, or its next try would look like reuse and end the family.
        scope = form.get("scope")
        if scope is not None:
            # RFC 6749 section 6: a narrower scope may be asked for, never a wider one.
            asked = [SCOPE_ROLES[s] for s in scope.split() if s in SCOPE_ROLES]
            granted = SCOPE_ROLES[grant.scope]
            if not asked or any(capped_role(role, granted) != role for role in asked):
                raise OAuthError("invalid_scope", "a refresh may only keep or narrow the granted scope")
        key = self.tokens.approver(grant.key_id, grant.key_fp)
        if key is None:
            await self.store.revoke_grant(grant.grant_id, now, remember_until=now)
            raise OAuthError("invalid_grant", "the key that approved this grant is no longer valid")
        refresh = secrets.token_urlsafe(32)
        rotation = await self.store.rotate_refresh(
            old, RefreshRecord(_sha256(refresh), grant.grant_id, now + self.refresh_ttl), now
        )
        if rotation.outcome == "reused":
            self.audit.event(
                "oauth.refresh_reuse",
                request,
                client_id=grant.client_id,
                grant_id=grant.grant_id,
                identity=grant.key_id,
                refresh_sha256=digest(presented.encode()),
                msg="a spent refresh token was presented again; its whole family is revoked",
            )
            raise OAuthError("invalid_grant", "refresh token already used; the grant is revoked")
        if rotation.outcome != "rotated" or rotation.grant is None:
            raise OAuthError("invalid_grant", "unknown, expired or revoked refresh token")
        return await self._issue(
            request, client, rotation.grant, key, refresh, "refresh_token", now, narrowed=scope
        )

    async def _issue(
        self,
        request: web.Request,
        client: ClientRecord,
        grant: GrantRecord,
        key: ApiKey,
        refresh: str,
        grant_type: str,
        now: float,
        *,
        narrowed: str | None = None,
    ) -> dict[str, Any]:
        role = capped_role(SCOPE_ROLES[grant.scope], key.role)  # a downgraded key narrows its tokens
        if narrowed is not None:
            role = capped_role(top_role(SCOPE_ROLES[s] for s in narrowed.split() if s in SCOPE_ROLES), role)
        scope = ROLE_SCOPES[role]
        access = self.tokens.mint(grant=grant, key=key, client_id=client.client_id, scope=scope, now=now)
        if not client.from_document:
            await self.store.touch_client(client.client_id, now)
        self.audit.event(
            "oauth.token",
            request,
            outcome="issued",
            grant_type=grant_type,
            client_id=client.client_id,
            grant_id=grant.grant_id,
            identity=key.id,
            scope=scope,
            resource=grant.resource,
        )
        return {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": int(self.token_ttl),
            "refresh_token": refresh,
            "scope": scope,
        }

    # -- registration and revocation ---------------------------------------------------------------

    async def _register(self, request: web.Request) -> web.Response:
        try:
            if request.content_type != "application/json":
                raise RegistrationError(
                    "invalid_client_metadata", "send the client metadata as application/json"
                )
            raw = await request.content.read(MAX_REGISTRATION + 1)
            if len(raw) > MAX_REGISTRATION:
                raise RegistrationError("invalid_client_metadata", "the registration request is too large")
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested a thousand deep
                raise RegistrationError(
                    "invalid_client_metadata", "the registration request is not JSON"
                ) from None
            client, secret = await self.clients.register(body)
        except RegistrationError as exc:
            self.audit.event(
                "oauth.register", request, outcome="refused", reason=exc.description, error=exc.error
            )
            status = 503 if exc.error == "temporarily_unavailable" else 400
            raise OAuthError(exc.error, exc.description, status=status).response() from None
        self.audit.event(
            "oauth.register",
            request,
            outcome="registered",
            client_id=client.client_id,
            client_name=client.client_name,
            auth_method=client.auth_method,
            redirect_hosts=sorted({self._host(u)[0] for u in client.redirect_uris}),
        )
        answer: dict[str, Any] = {
            "client_id": client.client_id,
            "client_id_issued_at": int(client.created_at),
            "client_name": client.client_name,
            "redirect_uris": list(client.redirect_uris),
            "token_endpoint_auth_method": client.auth_method,
            "grant_types": list(client.grant_types),
            "response_types": ["code"],
        }
        if secret is not None:
            answer["client_secret"] = secret
            answer["client_secret_expires_at"] = 0  # RFC 7591 section 3.2.1: does not expire
        if not client.client_name:
            del answer["client_name"]
        return web.json_response(answer, status=201, headers=NO_STORE)

    async def _revoke(self, request: web.Request) -> web.Response:
        """RFC 7009. Revoking either token ends the grant: its refresh family and its access tokens.
        An unknown token, or one of another client, gets the same 200 (section 2.2): nothing to learn."""
        client_id: str | None = None
        try:
            form = await self._token_form(request)
            client = await self._client(request, form)
            client_id = client.client_id
            token = form.get("token")
            if not token:
                raise OAuthError("invalid_request", "token is required")
        except OAuthError as exc:
            self.audit.event(
                "oauth.revoke", request, outcome="refused", reason=exc.description, client_id=client_id
            )
            raise exc.response() from None
        now = self.clock()
        grant_id: str | None = None
        kind = "unknown"
        if len(token) <= 200 and (grant := await self.store.find_refresh(_sha256(token), now)) is not None:
            grant_id, kind = (
                (grant.grant_id, "refresh") if grant.client_id == client_id else (None, "foreign")
            )
        elif len(token) <= 8192:
            claims = self.tokens.claims_for_revocation(token)
            if claims is not None:
                same = claims.get("client_id") == client_id and isinstance(claims.get("gid"), str)
                grant_id, kind = (claims["gid"], "access") if same else (None, "foreign")
        revoked = grant_id is not None and await self.store.revoke_grant(grant_id, now, remember_until=now)
        self.audit.event(
            "oauth.revoke",
            request,
            outcome="revoked" if revoked else "nothing to revoke",
            kind=kind,
            client_id=client_id,
            grant_id=grant_id,
            token_sha256=digest(token.encode()),
        )
        return web.Response(status=200, headers=NO_STORE)

    # -- for the resource server ----------------------------------------------------------------------

    def looks_like_own_token(self, token: str) -> bool:
        """Cheap and unverified: does the token say it is ours? Picks the verifier, decides nothing."""
        return self.tokens.looks_like_own(token)

    async def verify_own_token(self, token: str, resource: str) -> OwnToken | TokenRefused:
        """For the auth chain: see `OwnTokens.verify`."""
        return await self.tokens.verify(token, resource)

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def prune(self) -> None:
        now = self.clock()
        pruned = await self.store.prune(
            now, unused_clients_before=now - self.clients.unused_ttl, codes_before=now - CODE_MEMORY
        )
        if any(pruned):
            log.info("OAuth store pruned: %d clients, %d codes, %d grants", *pruned)

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        """cleanup_ctx: the store open while the app runs, pruned every few minutes."""
        await self.store.open()

        async def prune_forever() -> None:
            while True:
                await asyncio.sleep(PRUNE_INTERVAL)
                try:
                    await self.prune()
                except Exception:
                    log.exception("pruning the OAuth store failed; it is tried again later")

        task = asyncio.create_task(prune_forever())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self.fetcher.close()
            await self.store.close()


def _duration(seconds: float) -> str:
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{int(seconds)} seconds"


def add_oauth_server_routes(app: web.Application, server: OAuthServer) -> None:
    """The authorization server's routes, and its store's lifecycle, on `app`."""
    app.router.add_get(WELL_KNOWN_AS, server._metadata)
    app.router.add_get(WELL_KNOWN_OIDC, server._metadata)
    app.router.add_get(JWKS_PATH, server._jwks)
    app.router.add_get(AUTHORIZE_PATH, server._authorize)
    app.router.add_post(AUTHORIZE_PATH, server._decide)
    app.router.add_post(LOGIN_PATH, server._login)
    app.router.add_post(TOKEN_PATH, server._token)
    app.router.add_post(REGISTER_PATH, server._register)
    app.router.add_post(REVOKE_PATH, server._revoke)
    app.router.add_get(pages.STYLESHEET_PATH, pages.stylesheet)
    app.cleanup_ctx.append(server.lifecycle)
