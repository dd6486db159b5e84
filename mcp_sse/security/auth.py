"""Authentication (who is calling) and authorization (may they use this route).

Credentials, in this order: `Authorization: Bearer <key>`; with OAuth on, a bearer OAuth access
token (oauth/gate.py); a cookie login made at `POST /auth/login`. A token in the query string is
refused unless URL_AUTH=true.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ..oauth.resource import TokenError
from ..ops.health import public_health
from ..ops.metrics import METRICS_PATH
from ..settings import Secret
from ..state import API_KEY, AUDIT, CLIENT_IP, IDENTITY, PRINCIPAL, SESSIONS
from .audit import AuditLog, digest
from .cookies import LoginStore, login_from_cookie
from .cors import is_preflight
from .errors import forbidden, unauthorized
from .keys import ApiKey, KeyStore, bearer_token
from .origin import SAME_ORIGIN
from .ratelimit import (
    LOCKED_OUT,
    LOCKOUT_DEFERRED,
    Counters,
    Decision,
    LogThrottle,
    RateLimiter,
    StreamCounter,
    charge_key,
    key_budget,
    lockout_refusal,
)

if TYPE_CHECKING:
    from ..oauth.gate import Authenticated, ResourceGate

__all__ = [
    "ADMIN_PREFIX",
    "METRICS_SCRAPER",
    "ROUTE_BACKENDS",
    "AuthSettings",
    "authentication",
    "authorization",
]

SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
PUBLIC_PATHS: Final = frozenset({"/auth/login"})  # authenticates the token in its body itself
CONSOLE_PREFIX: Final = "/console"
"""The web console (ops/console.py): its pages check the cookie login themselves (a sign-in page,
not a 401, for a browser without one); the data they show comes from /api/, checked here."""
URL_TOKEN_PARAMS: Final = ("access_token", "token")


@dataclass(frozen=True)
class AuthSettings:
    url_auth: bool
    health_public: bool
    allowed_origins: frozenset[str]
    rate_limit: int
    """Requests per window for a key without its own `rate_limit` (KEY_RATE_LIMIT_MAX_REQUESTS)."""
    max_streams: int
    unguessable: frozenset[bytes] = frozenset()
    """SHA-256 digests of secrets this process generated itself (the per-run AUTH_TOKEN of a
    loopback start): 256 random bits, which no guess hits, so a lockout need not refuse them."""
    public_paths: Collection[str] = frozenset()
    """More paths that need no caller (OAuth metadata, the authorization server's endpoints);
    a live set, which a servers reload changes (the metadata of each backend's routes)."""
    metrics_token: Secret | None = None
    """METRICS_TOKEN: a bearer token for GET /metrics and nothing else."""


METRICS_SCRAPER: Final = web.RequestKey("metrics_scraper", bool)
"""Set when METRICS_TOKEN authenticated the request: it may read /metrics, and only that."""


def _presented_token(request: web.Request, url_auth: bool, gate: ResourceGate | None = None) -> str | None:
    def refuse(reason: str) -> web.HTTPException:
        return (
            unauthorized(reason)
            if gate is None
            else gate.unauthorized(request, reason, error="invalid_request")
        )

    header = request.headers.get("Authorization")
    if header is not None:
        if (token := bearer_token(header)) is None:
            raise refuse("Invalid token: use Authorization: Bearer <token>")
        return token
    for name in URL_TOKEN_PARAMS:
        if name in request.query:
            if not url_auth:
                # URLs end up in proxy logs, browser history and Referer headers.
                raise refuse("tokens in the URL are refused; send Authorization: Bearer <token>")
            return request.query[name]
    return None


def _admitted_while_locked(request: web.Request, key: ApiKey | None, unguessable: frozenset[bytes]) -> bool:
    """May this bearer key pass although its address is locked out (LOCKED_OUT)?

    SECURITY: lock out the guesser, not the owner, without handing the guesser an oracle. A
    key passes only on what a guess cannot produce: a secret this process generated (256
    random bits), or a request that names a live MCP session of that very key (its id, 256
    random bits, was given only to the key's client, and a guess of the secret does not come
    with it). So the owner's running sessions and the default loopback run's token keep working
    whoever fails from the same address. A correct secret alone is refused: from a locked
    address the owner and a guesser who just hit it look the same. That rules out letting
    through keys "seen succeeding recently" too: a key in use is the one a guesser sharing the
    address (any local process on 127.0.0.1, a NAT) wants, and each refusal would then be a free
    "wrong", unlimited for the whole lockout. Nothing about the key (its quota headers, an
    audit line of success or failure) is given out before this decision, so a refused right
    secret gets the very 429 a wrong one gets.
    """
    query = request.query  # Streamable HTTP names its session in a header, legacy SSE in the query
    named = request.headers.get("Mcp-Session-Id") or query.get("session_id") or query.get("sessionId")
    session = request.app[SESSIONS].get(named)
    return key is not None and (
        key.sha256 in unguessable
        or (session is not None and not session.closed and session.identity == key.id)
    )


ROUTE_BACKENDS: Final[web.AppKey[Callable[[web.Request], str | None]]] = web.AppKey("route_backends")
"""The backend this request's MCP route serves (None off the MCP routes): asked per request, from
the route it matched, because a servers reload changes what is behind `/servers/{name}/...`."""


def _is_stream(request: web.Request) -> bool:
    """A GET on an MCP route is an event stream, whatever its Accept header says."""
    return request.method == "GET" and request.app[ROUTE_BACKENDS](request) is not None


def authentication(
    *,
    keys: KeyStore,
    logins: LoginStore | None,
    limiter: RateLimiter,
    audit: AuditLog,
    settings: AuthSettings,
    oauth: ResourceGate | None = None,
    shared: Counters | None = None,
) -> Middleware:
    """With `oauth` None (no OAuth setting), exactly the key and cookie chain of before.
    `shared`: the counters every instance shares (REDIS_URL) for key limits and streams."""
    streams = StreamCounter(settings.max_streams)
    # One auth.success line per key and address every 10 minutes: a trail, not a flood.
    successes = LogThrottle(seconds=600)

    def refuse(request: web.Request, reason: str) -> web.HTTPException:
        return unauthorized(reason) if oauth is None else oauth.unauthorized(request, reason)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if (
            is_preflight(request)
            or request.path in PUBLIC_PATHS
            or request.path in settings.public_paths
            or request.path == CONSOLE_PREFIX
            or request.path.startswith(CONSOLE_PREFIX + "/")
        ):
            return await handler(request)
        token = _presented_token(request, settings.url_auth, oauth)
        metrics_token = settings.metrics_token
        if (
            metrics_token is not None
            and token is not None
            and request.path == METRICS_PATH
            and hmac.compare_digest(token.encode(), metrics_token.reveal().encode())
        ):
            # A scraper: no key, no audit line per scrape; a lockout holds it as it holds a key.
            if (
                shared is not None
                and request.get(LOCKOUT_DEFERRED)
                and (deferred := await shared.locked(request[CLIENT_IP])) > 0
            ):
                request[LOCKED_OUT] = deferred
            if (left := request.get(LOCKED_OUT)) is not None:
                raise lockout_refusal(left)
            request[IDENTITY] = "metrics-token"
            request[METRICS_SCRAPER] = True
            try:
                charge_key(
                    request,
                    limiter,
                    "metrics-token",
                    settings.rate_limit,
                    None
                    if shared is None
                    else await shared.hit(key_budget("metrics-token"), limit=settings.rate_limit),
                )
            except web.HTTPTooManyRequests:
                audit.event("rate_limited", request, scope="key")
                raise
            return await handler(request)
        if token is None and settings.health_public and request.path == "/health":
            return public_health(request.app)  # /health's code and status for load balancers, no names
        authenticated: Authenticated | None = None
        key: ApiKey | None
        charged: Decision | None = None  # the key's charge, made with its lockout check (below)
        if token is not None:
            key = keys.verify(token)
            if key is not None and shared is not None and request.get(LOCKOUT_DEFERRED):
                # The address's lockout and the key's charge in one round trip (LOCKOUT_DEFERRED);
                # charged only when not locked, so a refused right secret learns no quota.
                limit = key.rate_limit or settings.rate_limit
                left, charged = await shared.charge(request[CLIENT_IP], key_budget(key.id), limit=limit)
                if left > 0:
                    request[LOCKED_OUT] = left
            refused: TokenError | None = None
            if key is None and oauth is not None:
                try:
                    authenticated = await oauth.authenticate(request, token)
                except TokenError as exc:
                    refused = exc
            # A verified access token passes a lockout: its signature is nothing a guess produces.
            if (
                (left := request.get(LOCKED_OUT)) is not None
                and authenticated is None
                and not _admitted_while_locked(request, key, settings.unguessable)
            ):
                raise lockout_refusal(left)  # audited by the rate-limit layer, as every refusal of a lockout
            if key is None and authenticated is None:
                if refused is None or oauth is None:
                    audit.event("auth.failed", request, token_sha256=digest(token.encode()))
                    raise (
                        unauthorized("Invalid token")
                        if oauth is None
                        else oauth.unauthorized(request, "Invalid token", error="invalid_token")
                    )
                audit.event(
                    "auth.failed", request, token_sha256=digest(token.encode()), reason=refused.description
                )
                raise oauth.refusal(request, refused)
        else:
            # A cookie login passes a lockout: its id is random and sealed, nothing a guess makes.
            # A dead one is a 401, which the rate-limit layer turns into the lockout's 429.
            login = await login_from_cookie(request, logins) if logins is not None else None
            key = keys.current(login.key_id) if login is not None else None
            if login is None or key is None:
                audit.event("auth.failed", request, reason="no credentials")
                raise refuse(request, "missing bearer token")
            # A cookie rides along on cross-site requests; an allowed Origin proves the page is ours (CSRF).
            # The gateway's own origin is one on /api/ (the console's page; origin.py decides it).
            if (
                request.method not in SAFE_METHODS
                and request.headers.get("Origin") not in settings.allowed_origins
                and not request.get(SAME_ORIGIN, False)
            ):
                audit.event("origin.denied", request, reason="cookie without allowed Origin")
                raise forbidden(
                    "cookie-authenticated requests need an Origin listed in ALLOWED_ORIGINS "
                    "or this gateway's own"
                )
        if authenticated is not None:
            principal = authenticated.principal
            budget, limit = authenticated.budget, principal.rate_limit or settings.rate_limit
            request[IDENTITY] = principal.id
            request[PRINCIPAL] = principal
            if successes.allow(f"{principal.id}:{request.get(CLIENT_IP)}"):
                # Who, by issuer and subject (and the client acting for them); never the token.
                audit.event(
                    "auth.success",
                    request,
                    via="oauth",
                    issuer=principal.issuer,
                    subject=principal.subject,
                    client_id=principal.client_id,
                    role=principal.role,
                )
        else:
            assert key is not None
            budget, limit = key.id, key.rate_limit or settings.rate_limit
            request[IDENTITY] = key.id
            request[API_KEY] = key
            if successes.allow(f"{key.id}:{request.get(CLIENT_IP)}"):
                audit.event("auth.success", request, via="bearer" if token is not None else "cookie")
        try:
            charge_key(
                request,
                limiter,
                budget,
                limit,
                # Made with the lockout check (a key's), or made here; None: the memory limiter's.
                charged
                if charged is not None or shared is None
                else await shared.hit(key_budget(budget), limit=limit),
            )
        except web.HTTPTooManyRequests:
            audit.event("rate_limited", request, scope="key")
            raise
        if not _is_stream(request):
            return await handler(request)
        # A stream holds memory and a socket for as long as it lives: cap them per key.
        if not (streams.acquire(budget) if shared is None else await shared.acquire(budget)):
            audit.event("rate_limited", request, scope="streams")
            raise web.HTTPTooManyRequests(
                text=json.dumps({"error": f"more than {settings.max_streams} open streams for this key"}),
                content_type="application/json",
                headers={"Retry-After": "5"},
            )
        try:
            return await handler(request)
        finally:
            if shared is None:
                streams.release(budget)
            else:
                await shared.release(budget)

    return middleware


ADMIN_PREFIX: Final = "/api/"
"""The admin API (ops/admin.py): for unrestricted admin keys only, decided in authorization()."""


def _admin_refusal(key: ApiKey | None, oauth: bool) -> str | None:
    """Why this caller may not use the admin API, or None when it may."""
    if key is None:
        return (
            "the admin API takes a gateway key (bearer or its cookie login), not an OAuth access token"
            if oauth
            else "the admin API needs an admin key"
        )
    if key.role != "admin":
        return f"the admin API needs role 'admin'; key {key.id!r} has role {key.role!r}"
    if key.backends is not None or key.tools_allow != ("*",) or key.tools_deny:
        return f"the admin API needs an unrestricted admin key; {key.id!r} is limited to backends or tools"
    return None


def authorization() -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        key, principal = request.get(API_KEY), request.get(PRINCIPAL)
        caller = key if key is not None else principal  # a bearer or cookie key, else a token's principal
        # SECURITY: the admin API makes and revokes keys and reads the whole audit trail. Only an
        # admin key limited to nothing: a key narrowed to some backends or tools could otherwise
        # make itself a wider one. Never an OAuth token (a person's client, for the MCP routes)
        # nor METRICS_TOKEN. Unknown /api/ paths too, so a refused caller learns no route names.
        if (request.path == "/api" or request.path.startswith(ADMIN_PREFIX)) and (
            refusal := _admin_refusal(key, principal is not None)
        ) is not None:
            if (audit := request.app.get(AUDIT)) is not None:
                audit.event("policy.denied", request, reason=refusal)
            raise forbidden(refusal)
        # Metrics name backends, tools and traffic: admin keys and the scraper's METRICS_TOKEN only.
        if (
            request.path == METRICS_PATH
            and not request.get(METRICS_SCRAPER)
            and (caller is None or caller.role != "admin")
        ):
            raise forbidden("/metrics needs an admin key or METRICS_TOKEN")
        if caller is not None and caller.backends is not None:  # limited to some backends
            backend = request.app[ROUTE_BACKENDS](request)
            if backend is not None and not caller.may_use_backend(backend):
                who = f"key {key.id!r}" if key is not None else repr(caller.name)
                raise forbidden(f"{who} may not use backend {backend!r}")
        return await handler(request)

    return middleware
