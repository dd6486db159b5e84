"""create_app(settings): the ordered middleware pipeline, the routes, the lifecycle, and what a
reload (SIGHUP) changes in them. Nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp_session import session_middleware

from .cluster import node as cluster
from .cluster.hop import cluster_secret
from .gateway import Gateway
from .oauth.clients import DEFAULT_REDIRECT_URIS
from .oauth.gate import ResourceGate, resource_path
from .oauth.metadata import canonical_resource, protected_resource_metadata, well_known_path
from .oauth.resource import FetchPolicy, JwtVerifier
from .oauth.server import AUTHORIZE_PATH, LOGIN_PATH, OAuthServer, add_oauth_server_routes
from .oauth.server import PUBLIC_PATHS as OAUTH_SERVER_PATHS
from .oauth.tokens import SigningKey
from .ops.admin import add_admin_routes
from .ops.console import LOGIN_PATH as CONSOLE_LOGIN_PATH
from .ops.console import add_console_routes
from .ops.health import health, servers
from .ops.metrics import Metrics
from .ops.tracing import Tracing, from_environ
from .protocol.session import SessionStore
from .security.audit import AuditLog
from .security.auth import ROUTE_BACKENDS, AuthSettings, authentication, authorization
from .security.client_ip import client_ip_middleware
from .security.cookies import CookieStorage, Logins, LoginStore, add_auth_routes
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
    MOUNTS,
    PRINCIPALS,
    SESSIONS,
    SPECS,
    TASKS,
    TRANSPORT,
    TransportSettings,
)
from .store import redis as redis_store
from .store import redis_keys
from .store.redis_counters import RedisCounters
from .store.redis_logins import RedisLogins
from .store.redis_oauth import RedisOAuthStore
from .store.sqlite import SQLiteStore
from .transport.common import spawn
from .transport.routes import MCP_PATHS, SERVER_PREFIX, Mounts, add_mcp_routes
from .upstream import reload
from .upstream.aggregate import AggregateBackend
from .upstream.backend import Backend
from .upstream.breaker import observe
from .upstream.builtin import BuiltinBackend
from .upstream.config import ConfigError, ServerSpec, load_servers
from .upstream.default import default_toolset
from .upstream.factory import build_backend

__all__ = [
    "build_backends",
    "create_app",
    "end_identities",
    "reload_keys",
    "reload_servers",
    "revive_backends",
]

log = logging.getLogger("mcp_sse")

REAP_INTERVAL: Final = 5.0


Builder = Callable[[ServerSpec], Backend]


def _load_servers(
    settings: Settings, environ: Mapping[str, str], env_file: Path | None
) -> tuple[list[ServerSpec], Builder]:
    """SERVERS_FILE's entries, and how to build each one's backend. A reload calls this again:
    `.env` is read again with the file, since the file's ${VAR}s and the children's environment
    come from it (the gateway's own settings are not reloaded)."""
    assert settings.servers_file is not None
    # Backends see the environment and `.env` (their API keys), never the gateway's own secrets.
    merged = {**(read_env_file(env_file) if env_file else {}), **environ}
    base_env = {k: v for k, v in merged.items() if k not in GATEWAY_SECRETS}

    def build(spec: ServerSpec) -> Backend:
        return build_backend(spec, max_line=settings.max_line, base_env=base_env)

    return load_servers(settings.servers_file, merged), build


def build_backends(
    settings: Settings, environ: Mapping[str, str], env_file: Path | None = None
) -> dict[str, Backend]:
    backends: dict[str, Backend] = {}
    if settings.servers_file is None:
        toolset = default_toolset(lambda: {"backends": [b.status() for b in backends.values()]})
        backends[toolset.name] = BuiltinBackend(toolset)
        return backends
    specs, build = _load_servers(settings, environ, env_file)
    return {spec.name: build(spec) for spec in specs}


def create_app(
    settings: Settings,
    *,
    environ: Mapping[str, str] | None = None,
    env_file: Path | None = None,
    backends: dict[str, Backend] | None = None,
    tracing: Tracing | None = None,
) -> web.Application:
    """The whole server for these settings. Secrets must be set: the CLI fails closed before this.
    `tracing`: instead of what the OTEL_* variables configure (tests pass one with their exporter)."""
    environ = os.environ if environ is None else environ
    tracing = tracing or from_environ(environ)  # None (off) unless OTEL_* ask; SettingsError sans the extra
    specs: list[ServerSpec] = []
    if backends is None and settings.servers_file is not None:
        specs, build = _load_servers(settings, environ, env_file)
        backends = {spec.name: build(spec) for spec in specs}
    elif backends is None:
        backends = build_backends(settings, environ)
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
    # With REDIS_URL the logins are shared by every instance (a logout on one ends it on all).
    logins: LoginStore = (
        RedisLogins(lifetime=settings.cookie_lifetime, idle=settings.cookie_idle, audit=audit)
        if settings.redis_url
        else Logins(lifetime=settings.cookie_lifetime, idle=settings.cookie_idle)
    )
    if settings.session_secret is None:
        raise ValueError("create_app needs settings.session_secret; the CLI makes one for loopback runs")
    limiter = RateLimiter(
        window_ms=settings.rate_limit_window_ms, max_requests=settings.rate_limit_max_requests
    )
    lockout = FailureLockout(max_failures=settings.lockout_failures, lockout_seconds=settings.lockout_seconds)
    # With REDIS_URL every instance counts in Redis (the memory ones are its fallback in an outage).
    counters = (
        RedisCounters(
            limiter=limiter,
            lockout=lockout,
            max_streams=settings.max_streams_per_key,
            secret=settings.session_secret.reveal().encode(),
            audit=audit,
        )
        if settings.redis_url is not None
        else None
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
        metrics_token=settings.metrics_token,
    )
    metrics = (
        Metrics(separator=settings.tool_separator, tls_cert=settings.tls_cert, listen=settings.metrics_listen)
        if settings.metrics
        else None
    )
    principals = Principals(keys)

    def gateway(name: str, backend: Backend) -> Gateway:
        return Gateway(
            backend,
            name=name,
            policy=KeyPolicy(principals, name),
            audit=audit,
            audit_arguments=settings.audit_arguments,
            tracing=tracing,
        )

    separator = settings.tool_separator
    if len(backends) == 1:
        mounts = Mounts(gateway(*next(iter(backends.items()))))
    else:
        mounts = Mounts(gateway("*", AggregateBackend(backends, separator=separator)))
    for name, backend in backends.items():
        mounts.mount(name, gateway(name, backend))
    oauth = _OAuthWiring(
        settings,
        backends,
        keys=keys,
        logins=logins,
        audit=audit,
        principals=principals,
        route_path=mounts.route_path,
    )
    auth_settings = dataclasses.replace(auth_settings, public_paths=oauth.public_paths)
    # Outermost first: reading this list is reading the path of every request.
    middlewares = [
        error_middleware(),
        *([metrics.middleware()] if metrics is not None else []),  # sees the final status of each
        *([tracing.middleware()] if tracing is not None else []),  # a span per request, as final
        request_id_middleware(),
        client_ip_middleware(trusted_proxies=settings.trusted_proxies),
        ip_allowlist_middleware(allowed=settings.allowed_ips, audit=audit),
        origin_middleware(
            allowed_origins=settings.allowed_origins,
            allowed_hosts=settings.host_names or None,
            audit=audit,
            path_origins=oauth.page_origins,
            own_origin_paths=("/api/", "/console/"),  # the console's page and its fetches
            public_url=settings.public_url,
        ),
        ip_rate_limit_middleware(
            limiter=limiter,
            lockout=lockout,
            shared=counters,
            audit=audit,
            login_paths=(*oauth.login_paths, CONSOLE_LOGIN_PATH),
            probe_paths=("/health",) if settings.health_public else (),
        ),
        session_middleware(CookieStorage(settings.session_secret, lifetime=settings.cookie_lifetime)),
        authentication(
            keys=keys,
            logins=logins,
            limiter=limiter,
            audit=audit,
            settings=auth_settings,
            oauth=oauth.gate,
            shared=counters,
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
    if metrics is not None:
        metrics.install(app)  # GET /metrics, the audit observer, METRICS_LISTEN
    if tracing is not None:
        tracing.install(app)  # SSE spans end when prepared; the exporter flushed at cleanup
    app[LOGINS] = logins
    app[PRINCIPALS] = principals
    app[MOUNTS] = mounts
    redis_store.install(app, settings.redis_url.reveal() if settings.redis_url else None)
    if (redis := app[redis_store.REDIS]) is not None:  # the engines that share state use its one pool
        if isinstance(logins, RedisLogins):
            logins.bind(redis)
        if oauth.server is not None and isinstance(oauth.server.store, RedisOAuthStore):
            oauth.server.store.bind(redis)
    redis_keys.install(  # key changes told to the other instances, and theirs heard here
        app, redis, reload=lambda: reload_keys(app, announce=False), end=lambda ids: end_identities(app, ids)
    )
    if counters is not None:
        counters.install(app)  # on app[REDIS]; its heartbeat keeps this process's streams counted
    if (shared := app[redis_store.REDIS]) is not None:  # 2025-era sessions: owned here, or forwarded
        cluster.install(
            app,
            redis=shared,
            secret=cluster_secret(settings.cluster_secret, settings.session_secret),
            listen=settings.cluster_listen,
            advertise=settings.cluster_advertise,
            mounts=mounts,
            tracing=tracing,
        )
    app[ROUTE_BACKENDS] = mounts.backend_of
    app[SPECS] = {spec.name: spec for spec in specs}
    app[_RELOAD] = _Reload(
        load=lambda: _load_servers(settings, environ, env_file),
        gateway=gateway,
        separator=separator,
        oauth=oauth,
    )

    app.router.add_get("/health", health)
    app.router.add_get("/mcp/servers", servers)
    add_auth_routes(app)
    add_admin_routes(
        app,
        end_identities=end_identities,
        oauth_store=oauth.server.store if oauth.server is not None else None,
    )
    add_console_routes(app, oauth=oauth.server is not None)
    add_mcp_routes(app, mounts)
    if isinstance(aggregate := mounts.root.gateway.backend, AggregateBackend):
        app.on_startup.append(lambda app: _report_collisions(app, aggregate))
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


def reload_keys(app: web.Application, *, announce: bool = True) -> None:
    """SIGHUP: load the keys again; the sessions and logins of keys that are gone end at once.
    With REDIS_URL, `announce` tells the other instances (not done for a reload they asked for)."""
    try:
        removed = app[KEYS].reload()
    except KeysFileError as exc:
        app[AUDIT].event("keys.reload", None, outcome="failed", error=str(exc))
        log.error("keys not reloaded, the old ones stay in force: %s", exc)
        return
    redis_keys.keys_changed(app, announce=announce)
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


@dataclass
class _Reload:
    """What a servers reload needs besides the app's state, from create_app."""

    load: Callable[[], tuple[list[ServerSpec], Builder]]
    gateway: Callable[[str, Backend], Gateway]
    separator: str
    oauth: _OAuthWiring
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """One reload at a time, each planned from what the one before left."""


_RELOAD: Final = web.AppKey("servers_reload", _Reload)


def reload_servers(app: web.Application) -> None:
    """SIGHUP, after the keys: SERVERS_FILE again (upstream/reload.py says how). Returns at once,
    the reload running as a task; nothing happens to backends that came from no servers file."""
    if app[SPECS]:
        spawn(app, _reload_servers(app))


async def _reload_servers(app: web.Application) -> None:
    wiring, audit = app[_RELOAD], app[AUDIT]
    async with wiring.lock:
        built: dict[str, Backend] = {}
        try:
            specs, build = wiring.load()
            running: dict[str, ServerSpec] = app[SPECS]
            change = reload.plan(running, specs)
            for spec in change.to_build:
                built[spec.name] = backend = build(spec)
                observe(backend, audit)
            await reload.start(list(built.values()))
        except BaseException as exc:  # refused whole, as a bad keys file is: the old servers stay
            await asyncio.gather(*(b.stop() for b in built.values()), return_exceptions=True)
            if not isinstance(exc, Exception):
                raise  # cancelled: shutting down
            audit.event("servers.reload", None, outcome="failed", error=str(exc)[:500])
            # A file that does not validate says why; anything else is a bug, with its trace.
            log.error(
                "servers not reloaded, the old ones stay in force: %s",
                exc,
                exc_info=not isinstance(exc, ConfigError),
            )
            return
        retired, gone = _swap(app, wiring, change, built)
        root = app[MOUNTS].root.gateway
        if isinstance(aggregate := root.backend, AggregateBackend):
            # Where the aggregate stays, so do its sessions: they get the new backends, and relist.
            sessions = [s for s in app[SESSIONS].all() if s.gateway is root and s.initialized]
            await reload.join(sessions, list(built.values()))
            reload.announce(sessions, [*retired, *built.values()])
            if built:
                await _report_collisions(app, aggregate)
        audit.event(
            "servers.reload",
            None,
            outcome="ok",
            added=", ".join(s.name for s in change.added),
            removed=", ".join(change.removed),
            changed=", ".join(s.name for s in change.changed),
        )
        log.info(
            "servers reloaded: %d added, %d removed, %d changed, %d unchanged",
            *(len(names) for names in (change.added, change.removed, change.changed, change.unchanged)),
        )
    if retired or gone:
        in_flight = app[TASKS] - {asyncio.current_task()}
        spawn(
            app,
            reload.retire(
                retired,
                lambda: [s for s in app[SESSIONS].all() if s.gateway in gone],
                in_flight,
                app[TRANSPORT].shutdown_grace,
            ),
        )


def _swap(
    app: web.Application, wiring: _Reload, change: reload.Plan, built: Mapping[str, Backend]
) -> tuple[list[Backend], set[Gateway]]:
    """Put the new backends in place of the old, all at once (nothing here waits): the backends
    to retire, and the gateways whose sessions end with them."""
    backends, specs, mounts = app[BACKENDS], app[SPECS], app[MOUNTS]
    retired: list[Backend] = []
    gone: set[Gateway] = set()
    for name in change.removed:
        retired.append(backends.pop(name))
        del specs[name]
        if (endpoint := mounts.unmount(name)) is not None:
            gone.add(endpoint.gateway)
    for spec in change.to_build:
        if (old := backends.get(spec.name)) is not None:
            retired.append(old)
        backends[spec.name] = built[spec.name]  # a changed one keeps its place in the order
        specs[spec.name] = spec
        if (endpoint := mounts.mount(spec.name, wiring.gateway(spec.name, built[spec.name]))) is not None:
            gone.add(endpoint.gateway)
    # The root serves one backend as it is, several through the aggregate. When that changes,
    # or the one it served is replaced, its sessions end: their tool names would no longer hold.
    root = mounts.root.gateway
    new_root: Gateway | None = None
    if len(backends) == 1:
        name, only = next(iter(backends.items()))
        new_root = None if root.backend is only else wiring.gateway(name, only)
    elif not isinstance(root.backend, AggregateBackend):
        new_root = wiring.gateway("*", AggregateBackend(backends, separator=wiring.separator))
    else:
        _forget(root, {b.name for b in retired}, wiring.separator)
    if new_root is not None:
        gone.add(mounts.replace_root(new_root).gateway)
    if isinstance(aggregate := mounts.root.gateway.backend, AggregateBackend):
        aggregate.timeout = max(b.timeout for b in backends.values())
    wiring.oauth.refresh(backends)
    return retired, gone


def _forget(root: Gateway, names: set[str], separator: str) -> None:
    """What the aggregate and its gateway remember of backends that are gone: resource owners
    (a read would go to a backend no longer there) and tool schemas (arguments would be checked
    against a replaced backend's)."""
    aggregate = root.backend
    assert isinstance(aggregate, AggregateBackend)
    for uri in [u for u, owner in aggregate.resource_owner.items() if owner in names]:
        del aggregate.resource_owner[uri]
    prefixes = tuple(name + separator for name in names)
    for cache in (root._schemas, root._validators):
        for tool in [t for t in cache if t.startswith(prefixes)]:
            del cache[tool]


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
        logins: LoginStore,
        audit: AuditLog,
        principals: Principals,
        route_path: Callable[[web.Request], str | None],
    ) -> None:
        self.gate: ResourceGate | None = None
        self.server: OAuthServer | None = None
        self.verifier: JwtVerifier | None = None
        self.public_paths: set[str] = set()
        """Live: a reload changes the metadata documents, and the auth chain holds this set."""
        self.page_origins: dict[str, list[str]] = {}
        self.login_paths: tuple[str, ...] = ("/auth/login",)
        self.documents: dict[str, dict[str, object]] = {}
        self.public = settings.public_origin
        self.issuers: list[str] = []
        self._fixed_public: frozenset[str] = frozenset()
        if not settings.oauth:
            return
        public = self.public
        issuers = self.issuers
        if settings.oauth_server:
            state_dir = settings.state_dir
            try:
                signing_key = SigningKey.load_or_create(state_dir)
            except (OSError, ValueError) as exc:  # unreadable, not a key, or readable by others
                raise SettingsError(f"STATE_DIR={state_dir}: {exc}") from None
            self.server = OAuthServer(
                issuer=public,
                resource_urls=[public + path for path in _resources(backends)],
                keys=keys,
                logins=logins,
                # Shared by every instance with REDIS_URL; else on this host's disk.
                store=RedisOAuthStore(audit=audit)
                if settings.redis_url
                else SQLiteStore(state_dir / "oauth.sqlite3"),
                audit=audit,
                signing_key=signing_key,
                token_ttl=settings.oauth_token_ttl,
                refresh_ttl=settings.oauth_refresh_ttl,
                backends=lambda: tuple(backends),
                redirect_uri_patterns=settings.oauth_redirect_uris or DEFAULT_REDIRECT_URIS,
            )
            principals.approver = self.server.tokens.approver
            principals.grant_live = self.server.tokens.grant_live
            issuers.append(self.server.issuer)
            # The sign-in and consent forms post to themselves from the gateway's own origin.
            self.page_origins = {AUTHORIZE_PATH: [public], LOGIN_PATH: [public]}
            # A key typed into the sign-in page is a guess like any other: counted by the lockout.
            self.login_paths = ("/auth/login", LOGIN_PATH)
            self._fixed_public = OAUTH_SERVER_PATHS
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
            route_path=route_path,
            principals=principals,
            own=self.server.tokens if self.server is not None else None,
            verifier=self.verifier,
        )
        self.refresh(backends)

    def refresh(self, names: Iterable[str]) -> None:
        """The resources of these backends' routes and their metadata: at start, after a reload."""
        if self.gate is None:
            return
        resources = _resources(names)
        if self.server is not None:  # the resources a token may be asked for (RFC 8707)
            self.server.resources = frozenset(canonical_resource(self.public + path) for path in resources)
        self.documents = {
            well_known_path(path): protected_resource_metadata(self.public + path, self.issuers)
            for path in resources
        }
        self.public_paths.clear()
        self.public_paths.update(self._fixed_public, self.documents)

    async def _document(self, request: web.Request) -> web.Response:
        """RFC 9728 protected-resource metadata: public, the same for everyone."""
        document = self.documents.get(request.path)
        if document is None:  # a backend gone, or never there
            raise web.HTTPNotFound()
        return web.json_response(document, headers={"Cache-Control": "public, max-age=3600"})

    def add_routes(self, app: web.Application) -> None:
        if self.gate is not None:  # routes for any name ("{name}"): which documents exist is `documents`
            for path in _resources(["{name}"]):
                app.router.add_get(well_known_path(path), self._document)
        if self.server is not None:
            add_oauth_server_routes(app, self.server)  # and its store's lifecycle
        if (verifier := self.verifier) is not None:

            async def close_verifier(app: web.Application) -> None:
                await verifier.close()

            app.on_cleanup.append(close_verifier)


def _resources(names: Iterable[str]) -> list[str]:
    """The paths of the protected resources: "" is the gateway itself (PUBLIC_URL), the resource
    of its routes that are no MCP route; then the root's MCP routes, then each backend's."""
    prefixes = ["", *(SERVER_PREFIX.format(name=name) for name in names)]
    return ["", *dict.fromkeys(resource_path(prefix + path) for prefix in prefixes for path in MCP_PATHS)]


async def _backends_lifecycle(app: web.Application) -> AsyncIterator[None]:
    for backend in app[BACKENDS].values():
        await backend.start()
    yield
    await asyncio.gather(*(b.stop() for b in app[BACKENDS].values()), return_exceptions=True)


async def _reaper(app: web.Application) -> AsyncIterator[None]:
    """Idle sessions and expired keys: checked often enough that an expired key's streams end promptly."""

    async def reap_once() -> None:
        if expired := app[SESSIONS].expire_idle():
            log.info("closed %d idle sessions", expired)
        gone = _gone_identities(app)
        if gone and (ended := end_identities(app, gone)):
            app[AUDIT].event("session.expired", None, key_ids=", ".join(sorted(gone)), sessions_closed=ended)
        # A grant revoked here or on another instance (console, RFC 7009, a replayed code or
        # refresh token): its tokens were refused at once; the streams they opened end now.
        open_identities = {s.identity for s in app[SESSIONS].all() if s.identity}
        ungranted = await app[PRINCIPALS].ungranted(open_identities)
        if ungranted and (ended := end_identities(app, ungranted)):
            app[AUDIT].event(
                "session.revoked", None, identities=", ".join(sorted(ungranted)), sessions_closed=ended
            )
        if (logins := app[LOGINS]) is not None:
            logins.prune()

    async def reap() -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL)
            try:
                await reap_once()
            except Exception as exc:  # a pass that fails must not end the reaper (expiry, revocation)
                log.error("reaper pass failed (%s); the next one runs as usual", type(exc).__name__)

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
