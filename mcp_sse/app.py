"""create_app(settings): the ordered middleware pipeline, the routes, and the lifecycle. Nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp_session import session_middleware

from .gateway import Gateway
from .oauth.clients import DEFAULT_REDIRECT_URIS
from .oauth.gate import ResourceGate, resource_path
from .oauth.metadata import protected_resource_metadata, well_known_path
from .oauth.resource import FetchPolicy, JwtVerifier
from .oauth.server import AUTHORIZE_PATH, LOGIN_PATH, OAuthServer, add_oauth_server_routes
from .oauth.server import PUBLIC_PATHS as OAUTH_SERVER_PATHS
from .oauth.tokens import SigningKey
from .ops.health import health, servers
from .protocol.session import SessionStore
from .security.audit import AuditLog
from .security.auth import ROUTE_BACKENDS, AuthSettings, authentication, authorization
from .security.client_ip import client_ip_middleware
from .security.cookies import CookieStorage, Logins, add_auth_routes
from .security.cors import setup_cors
from .security.errors import error_middleware
from .security.headers import install_security_headers
from .security.ipfilter import ip_allowlist_middleware
from .security.keys import KeysFileError, KeyStore, digest
from .security.origin import origin_middleware
from .security.policy import KeyPolicy
from .security.principals import Principals
from .security.ratelimit import (
    FailureLockout,
    RateLimiter,
    install_rate_limit_headers,
    ip_rate_limit_middleware,
)
from .security.request_id import install_request_id, request_id_middleware
from .settings import GATEWAY_SECRETS, Settings, SettingsError, is_loopback, read_env_file
from .state import (
    AUDIT,
    BACKENDS,
    KEYS,
    LOGINS,
    PRINCIPALS,
    SESSIONS,
    TASKS,
    TRANSPORT,
    TransportSettings,
)
from .store.sqlite import SQLiteStore
from .transport.legacy_sse import LegacySSE
from .transport.streamable import StreamableHTTP
from .upstream.aggregate import AggregateBackend
from .upstream.backend import Backend
from .upstream.breaker import observe
from .upstream.builtin import BuiltinBackend
from .upstream.config import load_servers
from .upstream.default import default_toolset
from .upstream.factory import build_backend

__all__ = ["build_backends", "create_app", "end_identities", "reload_keys", "revive_backends"]

log = logging.getLogger("mcp_sse")

REAP_INTERVAL: Final = 5.0


def build_backends(
    settings: Settings, environ: Mapping[str, str], env_file: Path | None = None
) -> dict[str, Backend]:
    backends: dict[str, Backend] = {}
    if settings.servers_file is None:
        toolset = default_toolset(lambda: {"backends": [b.status() for b in backends.values()]})
        backends[toolset.name] = BuiltinBackend(toolset)
        return backends
    # Backends see the environment and `.env` (their API keys), never the gateway's own secrets.
    merged = {**(read_env_file(env_file) if env_file else {}), **environ}
    base_env = {k: v for k, v in merged.items() if k not in GATEWAY_SECRETS}
    for spec in load_servers(settings.servers_file, merged):
        backends[spec.name] = build_backend(spec, max_line=settings.max_line, base_env=base_env)
    return backends


def _mcp_paths(prefix: str) -> list[str]:
    return [f"{prefix}/sse", f"{prefix}/messages", f"{prefix}/mcp", f"{prefix}/mcp/"]


def _add_mcp_routes(app: web.Application, prefix: str, gateway: Gateway) -> None:
    legacy = LegacySSE(gateway, f"{prefix}/messages")
    streamable = StreamableHTTP(gateway)
    paths = _mcp_paths(prefix)
    app.router.add_get(paths[0], legacy.stream)
    app.router.add_post(paths[1], legacy.post)
    # Both spellings are served: a redirect from /mcp to /mcp/ breaks POSTing clients.
    for path in paths[2:]:
        app.router.add_post(path, streamable.post)
        app.router.add_get(path, streamable.get, allow_head=False)
        app.router.add_delete(path, streamable.delete)
    for path in paths:
        app[ROUTE_BACKENDS][path] = gateway.name


def create_app(
    settings: Settings,
    *,
    environ: Mapping[str, str] | None = None,
    env_file: Path | None = None,
    backends: dict[str, Backend] | None = None,
) -> web.Application:
    """The whole server for these settings. Secrets must be set: the CLI fails closed before this."""
    if backends is None:
        backends = build_backends(settings, os.environ if environ is None else environ, env_file)
    keys = KeyStore(settings.auth_token, settings.keys_file)
    audit = AuditLog(
        settings.audit_log,
        log_values=settings.audit_arguments,
        rotate=settings.audit_rotate,
        max_bytes=settings.audit_max_bytes,
        retention_days=settings.audit_retention_days,
        security_retention_days=settings.audit_security_retention_days,
    )
    for backend in backends.values():  # circuit changes go to the audit trail (backend.circuit)
        observe(backend, audit)
    logins = Logins(lifetime=settings.cookie_lifetime, idle=settings.cookie_idle)
    if settings.session_secret is None:
        raise ValueError("create_app needs settings.session_secret; the CLI makes one for loopback runs")
    limiter = RateLimiter(
        window_ms=settings.rate_limit_window_ms, max_requests=settings.rate_limit_max_requests
    )
    auth_settings = AuthSettings(
        url_auth=settings.url_auth,
        health_public=settings.health_public,
        allowed_origins=frozenset(settings.allowed_origins),
        rate_limit=settings.key_rate_limit,
        max_streams=settings.max_streams_per_key,
        # The token a loopback start generates (256 random bits) is never refused by a lockout.
        unguessable=frozenset(
            {digest(settings.auth_token.reveal())} if settings.token_generated and settings.auth_token else ()
        ),
    )
    principals = Principals(keys)
    oauth = _OAuthWiring(settings, backends, keys=keys, logins=logins, audit=audit, principals=principals)
    if oauth.public_paths:
        auth_settings = dataclasses.replace(auth_settings, public_paths=oauth.public_paths)
    # Outermost first: reading this list is reading the path of every request.
    middlewares = [
        error_middleware(),
        request_id_middleware(),
        client_ip_middleware(trusted_proxies=settings.trusted_proxies),
        ip_allowlist_middleware(allowed=settings.allowed_ips, audit=audit),
        origin_middleware(
            allowed_origins=settings.allowed_origins,
            allowed_hosts=settings.allowed_hosts or None,
            audit=audit,
            path_origins=oauth.page_origins,
        ),
        ip_rate_limit_middleware(
            limiter=limiter,
            lockout=FailureLockout(
                max_failures=settings.lockout_failures, lockout_seconds=settings.lockout_seconds
            ),
            audit=audit,
            login_paths=oauth.login_paths,
        ),
        session_middleware(CookieStorage(settings.session_secret, lifetime=settings.cookie_lifetime)),
        authentication(
            keys=keys, logins=logins, limiter=limiter, audit=audit, settings=auth_settings, oauth=oauth.gate
        ),
        authorization(),
    ]
    app = web.Application(middlewares=middlewares, client_max_size=settings.max_body)
    app[SESSIONS] = SessionStore(
        max_sessions=settings.max_sessions,
        idle_timeout=settings.session_idle,
        buffer_size=settings.event_buffer,
    )
    app[TRANSPORT] = TransportSettings(
        keepalive=settings.keepalive,
        max_body=settings.max_body,
        write_timeout=settings.write_timeout,
        shutdown_grace=settings.shutdown_grace,
        body_timeout=settings.body_timeout,
    )
    app[TASKS] = set()
    app[BACKENDS] = backends
    app[KEYS] = keys
    app[AUDIT] = audit
    app[LOGINS] = logins
    app[PRINCIPALS] = principals
    app[ROUTE_BACKENDS] = {}

    app.router.add_get("/health", health)
    app.router.add_get("/mcp/servers", servers)
    add_auth_routes(app)

    def gateway(name: str, backend: Backend) -> Gateway:
        return Gateway(
            backend,
            name=name,
            policy=KeyPolicy(principals, name),
            audit=audit,
            audit_arguments=settings.audit_arguments,
        )

    if len(backends) == 1:
        _add_mcp_routes(app, "", gateway(*next(iter(backends.items()))))
    else:
        aggregate = AggregateBackend(backends, separator=settings.tool_separator)
        _add_mcp_routes(app, "", gateway("*", aggregate))
        app.on_startup.append(lambda app: _report_collisions(app, aggregate))
    for name, backend in backends.items():
        _add_mcp_routes(app, f"/servers/{name}", gateway(name, backend))
    oauth.add_routes(app)

    setup_cors(app, allowed_origins=settings.allowed_origins)
    install_security_headers(app, hsts=settings.tls)
    install_request_id(app)
    install_rate_limit_headers(app)
    app.cleanup_ctx.append(_backends_lifecycle)
    app.cleanup_ctx.append(_reaper)
    app.on_shutdown.append(_close_streams)
    app.on_cleanup.append(lambda app: _close_audit(app))
    return app


def reload_keys(app: web.Application) -> None:
    """SIGHUP: load the keys again; the sessions and logins of keys that are gone end at once."""
    try:
        removed = app[KEYS].reload()
    except KeysFileError as exc:
        app[AUDIT].event("keys.reload", None, outcome="failed", error=str(exc))
        log.error("keys not reloaded, the old ones stay in force: %s", exc)
        return
    # A key reloaded with an expiry already past ends now too, not at the reaper's next turn.
    ended = end_identities(app, removed | _gone_identities(app))
    app[AUDIT].event(
        "keys.reload",
        None,
        outcome="ok",
        loaded=len(app[KEYS].by_id),  # not "keys": the audit log masks fields named like secrets
        removed=", ".join(sorted(removed)),
        sessions_closed=ended,
    )


def _gone_identities(app: web.Application) -> set[str]:
    """Identities of open sessions whose key (or token) is no longer in force: revoked or expired."""
    return {
        s.identity for s in app[SESSIONS].all() if s.identity and app[PRINCIPALS].current(s.identity) is None
    }


def revive_backends(app: web.Application) -> int:
    """SIGHUP, after the keys: every failed backend (or per-session child) starts again with a
    fresh crash count, each audited; running ones and their sessions are left alone."""
    started = 0
    for name, backend in app[BACKENDS].items():
        if children := backend.revive():
            app[AUDIT].event("backend.restart", None, backend=name, reason="reload", children=children)
            started += children
    return started


def end_identities(app: web.Application, key_ids: set[str]) -> int:
    """Close every MCP session and cookie login of these keys (revoked or expired)."""
    if not key_ids:
        return 0
    ended = 0
    # The OAuth callers whose tokens these keys approved end with them.
    identities = set(key_ids) | app[PRINCIPALS].derived_from(key_ids)
    for session in app[SESSIONS].all():
        if session.identity in identities:
            session.close()
            ended += 1
    logins = app[LOGINS]
    if logins is not None:
        for key_id in key_ids:
            logins.end_key(key_id)
    return ended


class _OAuthWiring:
    """What OAUTH_SERVER and OAUTH_ISSUERS add to the app; with neither set, nothing at all."""

    def __init__(
        self,
        settings: Settings,
        backends: Mapping[str, Backend],
        *,
        keys: KeyStore,
        logins: Logins,
        audit: AuditLog,
        principals: Principals,
    ) -> None:
        self.gate: ResourceGate | None = None
        self.server: OAuthServer | None = None
        self.verifier: JwtVerifier | None = None
        self.public_paths: frozenset[str] = frozenset()
        self.page_origins: dict[str, list[str]] = {}
        self.login_paths: tuple[str, ...] = ("/auth/login",)
        self.documents: dict[str, dict[str, object]] = {}
        if not settings.oauth:
            return
        public = settings.public_origin
        routes = [
            path for prefix in ["", *(f"/servers/{n}" for n in backends)] for path in _mcp_paths(prefix)
        ]
        # "" is the gateway itself (PUBLIC_URL): the resource of its routes that are no MCP route.
        resources = ["", *dict.fromkeys(resource_path(path) for path in routes)]
        issuers: list[str] = []
        if settings.oauth_server:
            state_dir = settings.state_dir
            try:
                signing_key = SigningKey.load_or_create(state_dir)
            except (OSError, ValueError) as exc:  # unreadable, not a key, or readable by others
                raise SettingsError(f"STATE_DIR={state_dir}: {exc}") from None
            self.server = OAuthServer(
                issuer=public,
                resource_urls=[public + path for path in resources],
                keys=keys,
                logins=logins,
                store=SQLiteStore(state_dir / "oauth.sqlite3"),
                audit=audit,
                signing_key=signing_key,
                token_ttl=settings.oauth_token_ttl,
                refresh_ttl=settings.oauth_refresh_ttl,
                backends=lambda: tuple(backends),
                redirect_uri_patterns=settings.oauth_redirect_uris or DEFAULT_REDIRECT_URIS,
            )
            principals.approver = self.server.tokens.approver
            issuers.append(self.server.issuer)
            # The sign-in and consent forms post to themselves from the gateway's own origin.
            self.page_origins = {AUTHORIZE_PATH: [public], LOGIN_PATH: [public]}
            # A key typed into the sign-in page is a guess like any other: counted by the lockout.
            self.login_paths = ("/auth/login", LOGIN_PATH)
            self.public_paths = OAUTH_SERVER_PATHS
        if settings.oauth_issuers:
            loopback = any(
                urlsplit(i).scheme == "http" and is_loopback(urlsplit(i).hostname or "")
                for i in settings.oauth_issuers
            )
            self.verifier = JwtVerifier(
                issuers=list(settings.oauth_issuers),
                fetch=FetchPolicy(timeout=settings.oauth_fetch_timeout, allow_http_loopback=loopback),
            )
            issuers.extend(settings.oauth_issuers)
        self.gate = ResourceGate(
            public_url=public,
            routes=routes,
            principals=principals,
            own=self.server.tokens if self.server is not None else None,
            verifier=self.verifier,
        )
        for path in resources:
            self.documents[well_known_path(path)] = protected_resource_metadata(public + path, issuers)
        self.public_paths = self.public_paths | frozenset(self.documents)

    def add_routes(self, app: web.Application) -> None:
        for path, document in self.documents.items():
            app.router.add_get(path, _metadata_handler(document))
        if self.server is not None:
            add_oauth_server_routes(app, self.server)  # and its store's lifecycle
        if (verifier := self.verifier) is not None:

            async def close_verifier(app: web.Application) -> None:
                await verifier.close()

            app.on_cleanup.append(close_verifier)


def _metadata_handler(document: Mapping[str, object]) -> Callable[[web.Request], Awaitable[web.Response]]:
    """RFC 9728 protected-resource metadata: public, the same for everyone."""

    async def handler(request: web.Request) -> web.Response:
        return web.json_response(document, headers={"Cache-Control": "public, max-age=3600"})

    return handler


async def _backends_lifecycle(app: web.Application) -> AsyncIterator[None]:
    for backend in app[BACKENDS].values():
        await backend.start()
    yield
    await asyncio.gather(*(b.stop() for b in app[BACKENDS].values()), return_exceptions=True)


async def _reaper(app: web.Application) -> AsyncIterator[None]:
    """Idle sessions and expired keys: checked often enough that an expired key's streams end promptly."""

    async def reap() -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL)
            if expired := app[SESSIONS].expire_idle():
                log.info("closed %d idle sessions", expired)
            gone = _gone_identities(app)
            if gone and (ended := end_identities(app, gone)):
                app[AUDIT].event(
                    "session.expired", None, key_ids=", ".join(sorted(gone)), sessions_closed=ended
                )
            if (logins := app[LOGINS]) is not None:
                logins.prune()

    task = asyncio.create_task(reap())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _report_collisions(app: web.Application, aggregate: AggregateBackend) -> None:
    async def report() -> None:
        if collisions := await aggregate.report_collisions():
            app[AUDIT].event("backend.resource_collision", None, uris=", ".join(collisions[:50]))

    task = asyncio.create_task(report())
    app[TASKS].add(task)
    task.add_done_callback(app[TASKS].discard)


async def _close_audit(app: web.Application) -> None:
    app[AUDIT].close()


async def _close_streams(app: web.Application) -> None:
    """Drain on SIGTERM: calls in flight may finish within the grace period; what cannot is
    failed explicitly and its error delivered; only then do the sessions and streams close."""
    grace = app[TRANSPORT].shutdown_grace
    if pending := app[TASKS].copy():
        await asyncio.wait(pending, timeout=max(0.0, grace - 1.0))
    for backend in app[BACKENDS].values():
        backend.abort("the gateway is shutting down; the request was not completed")
    if pending := app[TASKS].copy():
        _, still = await asyncio.wait(pending, timeout=0.5)
        for task in still:
            task.cancel()
    # Ending every session finishes its streams: each delivers what it holds, then its handler returns.
    app[SESSIONS].close_all()
