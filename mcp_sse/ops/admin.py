"""The admin API under /api/: keys, the audit trail, backends and sessions, as JSON.

Who may call it is decided where every route's caller is: security/auth.py's authorization()
lets only an unrestricted `admin` key through to /api/ (a bearer key, or a cookie login of one,
whose POST and DELETE need an allowed Origin as any cookie request does); an OAuth access token
never. Each handler here is one `admin.<action>` audit line, ok or refused, naming the acting
identity (the request's) and what was acted on, never a secret.

Key changes go to KEYS_FILE (KeyStore.edit: read again, changed, checked, written atomically,
in force at once) and end what the old credential opened: the key's MCP sessions and their
streams, its cookie logins, and the OAuth tokens it approved (`end_identities`, as a SIGHUP
does). A new secret is in the answer once, never in a log, an audit line or the file (only
its SHA-256 is stored).

Errors are `{"error": "..."}` with the status that names the problem: 400 a bad body or
parameter, 404 an unknown key, backend, session or route, 409 what the setup does not allow
(no KEYS_FILE, no AUDIT_LOG, AUTH_TOKEN, the last admin key), 413 a body over MAX_BODY, 415
a body that is not JSON.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
import threading
import time
from collections.abc import Awaitable, Callable, Generator, Iterator
from typing import Any, Final
from urllib.parse import urlencode

from aiohttp import web

from ..protocol.session import Session
from ..security.keys import (
    AUTH_TOKEN_ID,
    ROLES,
    ApiKey,
    KeysFileError,
    KeysFileMissing,
    KeyStore,
    digest,
    generate_key,
)
from ..state import AUDIT, BACKENDS, KEYS, SESSIONS, TRANSPORT
from ..store import ClientRecord, GrantRecord, OAuthStore
from ..store.redis_keys import keys_changed
from ..upstream.breaker import OPEN, CircuitBreaker
from . import audit_query

__all__ = ["ADMIN_PATHS", "MAX_BODY", "EndIdentities", "add_admin_routes", "unrestricted_admin"]

MAX_BODY: Final = 16 * 1024
"""A key's settings fit in far less; anything bigger is refused before it is read."""
MAX_NAME: Final = 64
MAX_PATTERNS: Final = 100
MAX_PATTERN: Final = 200
MAX_DAYS: Final = 36_500
NO_STORE: Final = {"Cache-Control": "no-store"}
CREATE_FIELDS: Final = frozenset({"name", "role", "backends", "tools", "expires", "rate_limit"})
ADMIN_PATHS: Final = (
    "GET /api/keys",
    "POST /api/keys",
    "DELETE /api/keys/{id}",
    "POST /api/keys/{id}/rotate",
    "GET /api/audit",
    "GET /api/audit/export",
    "GET /api/backends",
    "POST /api/backends/{name}/restart",
    "GET /api/sessions",
    "DELETE /api/sessions/{id}",
    "GET /api/oauth/clients",
    "GET /api/oauth/grants",
    "DELETE /api/oauth/grants/{id}",
)
MAX_LISTED: Final = 1000
"""OAuth clients or grants in one answer, most recent first."""

EndIdentities = Callable[[web.Application, set[str]], int]
"""app.end_identities: close the sessions, streams and logins of these keys (and their OAuth callers)."""
_END: Final[web.AppKey[EndIdentities]] = web.AppKey("admin_end_identities")
_OAUTH: Final[web.AppKey[OAuthStore | None]] = web.AppKey("admin_oauth_store")

Fields = dict[str, Any]
Handler = Callable[[web.Request, Fields], Awaitable[web.StreamResponse]]


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _action(name: str) -> Callable[[Handler], Callable[[web.Request], Awaitable[web.StreamResponse]]]:
    """One audit line per call, `admin.<name>`: outcome ok, refused (with the status and reason)
    or aborted (the client went away mid-answer); `fields` are what the handler acted on."""

    def wrap(handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def run(request: web.Request) -> web.StreamResponse:
            fields: Fields = {}
            audit = request.app[AUDIT]
            try:
                response = await handler(request, fields)
            except _Refused as exc:
                refused = {"outcome": "refused", "status": exc.status, "reason": exc.message}
                audit.event(f"admin.{name}", request, **refused, **fields)
                return web.json_response({"error": exc.message}, status=exc.status, headers=NO_STORE)
            except asyncio.CancelledError:
                audit.event(f"admin.{name}", request, outcome="aborted", **fields)
                raise
            audit.event(f"admin.{name}", request, outcome="ok", **fields)
            return response

        return run

    return wrap


def _iso(when: dt.datetime | float | None) -> str | None:
    if when is None:
        return None
    if isinstance(when, float | int):
        when = dt.datetime.fromtimestamp(when, dt.UTC)
    return when.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def unrestricted_admin(key: ApiKey) -> bool:
    """Whether `key` may use /api/ and /console: an admin limited to no backend or tool, not expired."""
    return (
        key.role == "admin"
        and key.backends is None
        and key.tools_allow == ("*",)
        and not key.tools_deny
        and not key.expired()
    )


async def _body(request: web.Request) -> dict[str, Any]:
    """The JSON object of the request ({} when there is none), read to MAX_BODY bytes at most."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise _Refused(413, f"the body is over {MAX_BODY} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(request.app[TRANSPORT].body_timeout):
            async for chunk in request.content.iter_chunked(4096):
                size += len(chunk)
                if size > MAX_BODY:
                    raise _Refused(413, f"the body is over {MAX_BODY} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise _Refused(408, "the body did not arrive in time") from None
    raw = b"".join(chunks)
    if not raw.strip():
        return {}
    if request.content_type != "application/json":
        raise _Refused(415, "send the body as application/json")
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise _Refused(400, f"the body is not valid JSON ({exc.msg})") from None
    except ValueError:  # not UTF-8
        raise _Refused(400, "the body is not valid JSON (not UTF-8)") from None
    if not isinstance(body, dict):
        raise _Refused(400, "the body must be a JSON object")
    return body


# -- keys -----------------------------------------------------------------------------------------


def _key_view(store: KeyStore, key: ApiKey) -> dict[str, Any]:
    """A key as the API shows it: its policy and its use, never its secret or digest."""
    by_day = store.uses.by_day(key.id)
    return {
        "id": key.id,
        "name": key.name,
        "role": key.role,
        "source": "AUTH_TOKEN" if key.id == AUTH_TOKEN_ID else "KEYS_FILE",
        "backends": None if key.backends is None else list(key.backends),
        "tools": {"allow": list(key.tools_allow), "deny": list(key.tools_deny)},
        "expires": _iso(key.expires),
        "expired": key.expired(),
        "rate_limit": key.rate_limit,
        "created": _iso(key.created),
        "last_used": _iso(store.uses.last_used(key.id)),
        "uses_7d": sum(by_day.values()),
        "uses_by_day": by_day,
    }


def _known(request: web.Request, key_id: str) -> ApiKey:
    key = request.app[KEYS].by_id.get(key_id)
    if key is None:
        raise _Refused(404, f"no key with id {key_id[:64]!r}")
    return key


def _no_keys_file() -> _Refused:
    return _Refused(
        409,
        "KEYS_FILE is not set: keys made or changed here are stored in a keys file; set KEYS_FILE "
        '(a JSON file such as {"keys": []}, mode 0600) and restart',
    )


def _edit(store: KeyStore, change: Callable[[list[dict[str, Any]]], None]) -> set[str]:
    """KeyStore.edit with its failures as the API's answers."""
    try:
        return store.edit(change)
    except KeysFileMissing:
        raise _no_keys_file() from None
    except KeysFileError as exc:
        raise _Refused(409, f"KEYS_FILE was not changed: {exc}") from None
    except OSError as exc:
        raise _Refused(
            409,
            f"KEYS_FILE cannot be written ({exc.strerror or exc}); under systemd its directory must "
            "be in ReadWritePaths",
        ) from None


def _strings(value: Any, name: str) -> list[str]:
    if (
        not isinstance(value, list)
        or len(value) > MAX_PATTERNS
        or not all(isinstance(v, str) and 0 < len(v) <= MAX_PATTERN and v.isprintable() for v in value)
    ):
        raise _Refused(
            400,
            f"{name} must be a list of at most {MAX_PATTERNS} non-empty strings, {MAX_PATTERN} long at most",
        )
    return list(value)


def _expiry(value: Any) -> dt.datetime | None:
    now = dt.datetime.now(dt.UTC)
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not (math.isfinite(value) and 0 < value <= MAX_DAYS):
            raise _Refused(400, f"expires in days must be more than 0 and at most {MAX_DAYS}")
        return now + dt.timedelta(days=value)
    if isinstance(value, str):
        try:
            when = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise _Refused(400, "expires must be an ISO 8601 date-time or a number of days") from None
        when = when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when
        if when <= now:
            raise _Refused(400, "expires must be in the future")
        return when
    raise _Refused(400, "expires must be an ISO 8601 date-time or a number of days")


def _new_entry(request: web.Request, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The secret and keys-file entry of a key made from a POST body, every field checked."""
    unknown = sorted(set(body) - CREATE_FIELDS)
    if unknown:
        allowed = ", ".join(sorted(CREATE_FIELDS))
        raise _Refused(400, f"unknown field {unknown[0][:64]!r} (allowed: {allowed})")
    name = body.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME or not name.isprintable():
        raise _Refused(400, f"name is required: printable text of 1 to {MAX_NAME} characters")
    role = body.get("role")
    if role not in ROLES:
        raise _Refused(400, f"role is required: one of {', '.join(ROLES)}")
    secret, entry = generate_key(name.strip(), role)  # generate-key's secret and id formats
    if (backends := body.get("backends")) is not None:
        names = _strings(backends, "backends")
        known = request.app[BACKENDS]
        if missing := [n for n in names if n not in known]:
            raise _Refused(
                400, f"backends: no backend {missing[0][:64]!r} (there are: {', '.join(known) or 'none'})"
            )
        entry["backends"] = names
    if (tools := body.get("tools")) is not None:
        if not isinstance(tools, dict) or not tools or set(tools) - {"allow", "deny"}:
            raise _Refused(400, 'tools must be {"allow": [globs], "deny": [globs]}')
        entry["tools"] = {k: _strings(v, f"tools.{k}") for k, v in tools.items()}
    if (expires := _expiry(body.get("expires"))) is not None:
        entry["expires"] = _iso(expires)
    if (rate_limit := body.get("rate_limit")) is not None:
        if not isinstance(rate_limit, int) or isinstance(rate_limit, bool) or rate_limit < 1:
            raise _Refused(400, "rate_limit must be a positive whole number (requests per window)")
        entry["rate_limit"] = rate_limit
    entry["created"] = _iso(dt.datetime.now(dt.UTC))
    return secret, entry


@_action("keys.list")
async def _list_keys(request: web.Request, fields: Fields) -> web.StreamResponse:
    store = request.app[KEYS]
    keys = [_key_view(store, key) for key in store.by_id.values()]
    fields["count"] = len(keys)
    return web.json_response({"keys": keys, "keys_file": store.keys_file is not None}, headers=NO_STORE)


@_action("key.create")
async def _create_key(request: web.Request, fields: Fields) -> web.StreamResponse:
    store = request.app[KEYS]
    if store.keys_file is None:  # before the body: the answer is the same whatever it holds
        raise _no_keys_file()
    secret, entry = _new_entry(request, await _body(request))
    fields.update(key_id=entry["id"], display_name=entry["name"], role=entry["role"])
    _edit(store, lambda entries: entries.append(entry))
    keys_changed(request.app)  # with REDIS_URL the other instances reload theirs
    key = store.by_id[entry["id"]]
    return web.json_response(
        {
            "id": key.id,
            "secret": secret,
            "note": "the secret is shown this once; only its SHA-256 is stored",
            "key": _key_view(store, key),
        },
        status=201,
        headers=NO_STORE,
    )


def _not_auth_token(key_id: str, doing: str) -> None:
    if key_id == AUTH_TOKEN_ID:
        raise _Refused(
            409,
            f"the AUTH_TOKEN key cannot be {doing} through the API: it is set in the environment or "
            ".env, not in KEYS_FILE; change AUTH_TOKEN there (setup_secure.py --rotate-token) and restart",
        )


@_action("key.delete")
async def _delete_key(request: web.Request, fields: Fields) -> web.StreamResponse:
    key_id = request.match_info["key_id"]
    fields["key_id"] = key_id[:64]
    key = _known(request, key_id)
    _not_auth_token(key_id, "deleted")
    store = request.app[KEYS]
    if unrestricted_admin(key) and not any(
        unrestricted_admin(k) for k in store.by_id.values() if k.id != key_id
    ):
        raise _Refused(
            409,
            f"key {key_id!r} is the last admin key: without it no one could use the admin API; "
            "make another admin key first",
        )

    def remove(entries: list[dict[str, Any]]) -> None:
        entries[:] = [e for e in entries if not (isinstance(e, dict) and e.get("id") == key_id)]

    gone = _edit(store, remove) | {key_id}
    keys_changed(request.app)  # with REDIS_URL: revoked on every instance, recorded in Redis
    ended = request.app[_END](request.app, gone)
    fields.update(sessions_closed=ended, removed_ids=", ".join(sorted(gone)))
    return web.json_response({"deleted": key_id, "sessions_closed": ended}, headers=NO_STORE)


@_action("key.rotate")
async def _rotate_key(request: web.Request, fields: Fields) -> web.StreamResponse:
    key_id = request.match_info["key_id"]
    fields["key_id"] = key_id[:64]
    key = _known(request, key_id)
    _not_auth_token(key_id, "rotated")
    body = await _body(request)
    if body:
        # No grace period: rotation is what is done to a key that may be compromised, so what
        # the old secret opened ends now. Rolling clients over is done with a second key.
        raise _Refused(
            400,
            f"rotate takes no fields (got {sorted(body)[0][:64]!r}): the old secret stops at once; "
            "for a rollover without a gap, create a second key and delete the first later",
        )
    secret, _ = generate_key(key.name, key.role)
    found = False

    def replace(entries: list[dict[str, Any]]) -> None:
        nonlocal found
        for entry in entries:
            if isinstance(entry, dict) and entry.get("id") == key_id:
                entry["sha256"] = digest(secret).hex()
                found = True
        if not found:
            raise _Refused(404, f"key {key_id!r} is no longer in KEYS_FILE (edited since the last reload)")

    gone = _edit(request.app[KEYS], replace)
    keys_changed(request.app)  # with REDIS_URL: the old secret revoked on every instance
    # Sessions, streams and logins opened with the old secret end; OAuth tokens it approved end
    # too (they name the secret's fingerprint, which is new now).
    ended = request.app[_END](request.app, gone | {key_id})
    fields["sessions_closed"] = ended
    return web.json_response(
        {
            "id": key_id,
            "secret": secret,
            "note": "the secret is shown this once; the old one no longer works",
            "sessions_closed": ended,
        },
        headers=NO_STORE,
    )


# -- audit ----------------------------------------------------------------------------------------


def _query(request: web.Request, fields: Fields, *, export: bool) -> tuple[Any, audit_query.AuditQuery]:
    fields["query"] = urlencode(sorted(request.query.items()))[:512]
    path = request.app[AUDIT].path
    if path is None:
        raise _Refused(409, "AUDIT_LOG is not set: the audit trail goes to stderr (the journal) only")
    try:
        return path, audit_query.parse_query(request.query, export=export)
    except ValueError as exc:
        raise _Refused(400, str(exc)) from None


@_action("audit.query")
async def _audit(request: web.Request, fields: Fields) -> web.StreamResponse:
    path, query = _query(request, fields, export=False)
    page = await asyncio.to_thread(audit_query.search, path, query)
    fields["count"] = len(page.events)
    return web.json_response(
        {"events": page.events, "next_cursor": page.next_cursor, "skipped": page.skipped}, headers=NO_STORE
    )


@_action("audit.export")
async def _export(request: web.Request, fields: Fields) -> web.StreamResponse:
    path, query = _query(request, fields, export=True)
    csv = query.format == "csv"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/csv; charset=utf-8" if csv else "application/x-ndjson",
            "Content-Disposition": f'attachment; filename="audit-{stamp}.{query.format}"',
            **NO_STORE,
        }
    )
    chunks = audit_query.export(path, query)
    assert isinstance(chunks, Generator)  # a generator function's: closing it closes its file
    lock = threading.Lock()  # one step of the generator at a time, its close included

    def step(it: Iterator[str]) -> str | None:
        with lock:
            return next(it, None)

    def close() -> None:
        with lock:
            chunks.close()  # its open file too

    loop = asyncio.get_running_loop()
    sent = 0
    try:
        await response.prepare(request)
        while (chunk := await loop.run_in_executor(None, step, chunks)) is not None:
            data = chunk.encode()
            await response.write(data)
            sent += len(data)
        await response.write_eof()
    finally:
        fields["bytes"] = sent
        # In a thread: a step still running there (the client went away) finishes first.
        loop.run_in_executor(None, close)
    return response


# -- backends and sessions ------------------------------------------------------------------------


@_action("backends.list")
async def _backends(request: web.Request, fields: Fields) -> web.StreamResponse:
    backends = request.app[BACKENDS]
    fields["count"] = len(backends)
    return web.json_response({"backends": [b.status() for b in backends.values()]}, headers=NO_STORE)


@_action("backend.restart")
async def _restart(request: web.Request, fields: Fields) -> web.StreamResponse:
    name = request.match_info["name"]
    fields["backend"] = name[:64]
    backend = request.app[BACKENDS].get(name)
    if backend is None:
        raise _Refused(404, f"no backend {name[:64]!r}")
    circuit_open = isinstance(backend, CircuitBreaker) and backend.current() == OPEN
    if backend.state != "failed" and not circuit_open:
        # A backend's stop() is final (its supervisor ends for good): a running one is replaced
        # by a reload of a changed servers-file entry, never stopped and started in place.
        raise _Refused(
            409,
            f"backend {name!r} is {backend.state}: only a failed backend (or one whose circuit is "
            "open) is restarted here; its supervisor already restarts a child that exits",
        )
    children = backend.revive()  # fresh crash count, started at once; an open circuit closes
    request.app[AUDIT].event("backend.restart", request, backend=name, reason="admin", children=children)
    fields["children"] = children
    return web.json_response({"backend": name, "restarted": children, "status": backend.status()})


def _wall(monotonic: float) -> str | None:
    return _iso(time.time() - (time.monotonic() - monotonic))


def _session_view(session: Session) -> dict[str, Any]:
    return {
        "id": session.id,
        "identity": session.identity,
        "transport": session.kind,
        "protocol": session.protocol_version or None,
        "backend": session.gateway.name if session.gateway is not None else None,
        "client": session.client_info.get("name") if isinstance(session.client_info, dict) else None,
        "opened": _wall(session.created),
        "last_seen": _wall(session.last_seen),
        "streams_open": sum(1 for s in session.streams.values() if s.reader is not None),
    }


@_action("sessions.list")
async def _sessions(request: web.Request, fields: Fields) -> web.StreamResponse:
    sessions = [_session_view(s) for s in request.app[SESSIONS].all() if not s.closed]
    fields["count"] = len(sessions)
    return web.json_response({"sessions": sessions}, headers=NO_STORE)


@_action("session.delete")
async def _end_session(request: web.Request, fields: Fields) -> web.StreamResponse:
    session_id = request.match_info["session_id"]
    fields["session"] = session_id[:8]  # enough to match it with the list; the whole id stays out
    session = request.app[SESSIONS].get(session_id)
    if session is None or session.closed:
        raise _Refused(404, "no such session")
    fields["identity_ended"] = session.identity
    session.close()
    return web.json_response({"ended": session_id}, headers=NO_STORE)


# -- OAuth clients and grants (OAUTH_SERVER) ------------------------------------------------------


def _oauth_store(request: web.Request) -> OAuthStore:
    store = request.app[_OAUTH]
    if store is None:
        raise _Refused(409, "OAUTH_SERVER is not on: there are no OAuth clients or grants here")
    return store


def _client_view(client: ClientRecord) -> dict[str, Any]:
    # No secret digest: it is only ever compared, never shown.
    return {
        "client_id": client.client_id,
        "client_name": client.client_name,
        "redirect_uris": list(client.redirect_uris),
        "auth_method": client.auth_method,
        "confidential": client.secret_sha256 is not None,
        "grant_types": list(client.grant_types),
        "created": _iso(client.created_at),
        "last_used": _iso(client.last_used_at),
    }


def _grant_view(grant: GrantRecord) -> dict[str, Any]:
    return {
        "id": grant.grant_id,
        "client_id": grant.client_id,
        "key_id": grant.key_id,
        "resource": grant.resource,
        "scope": grant.scope,
        "created": _iso(grant.created_at),
        "expires": _iso(grant.expires_at),
    }


@_action("oauth.clients.list")
async def _oauth_clients(request: web.Request, fields: Fields) -> web.StreamResponse:
    clients = [_client_view(c) for c in await _oauth_store(request).list_clients(MAX_LISTED)]
    fields["count"] = len(clients)
    return web.json_response({"clients": clients}, headers=NO_STORE)


@_action("oauth.grants.list")
async def _oauth_grants(request: web.Request, fields: Fields) -> web.StreamResponse:
    grants = [_grant_view(g) for g in await _oauth_store(request).list_grants(time.time(), MAX_LISTED)]
    fields["count"] = len(grants)
    return web.json_response({"grants": grants}, headers=NO_STORE)


@_action("oauth.grant.revoke")
async def _revoke_grant(request: web.Request, fields: Fields) -> web.StreamResponse:
    grant_id = request.match_info["grant_id"]
    fields["grant_id"] = grant_id[:64]
    store = _oauth_store(request)
    now = time.time()
    if len(grant_id) > 64 or await store.get_grant(grant_id, now) is None:  # nothing written for it
        raise _Refused(404, f"no live grant with id {grant_id[:64]!r}")
    # As POST /oauth/revoke does: its refresh tokens end, and its access tokens at their next use.
    await store.revoke_grant(grant_id, now, remember_until=now)
    return web.json_response({"revoked": grant_id}, headers=NO_STORE)


@_action("unknown")
async def _unknown(request: web.Request, fields: Fields) -> web.StreamResponse:
    routes = "; ".join(ADMIN_PATHS)
    raise _Refused(404, f"no admin route {request.method} {request.path[:100]} (routes: {routes})")


def add_admin_routes(
    app: web.Application, *, end_identities: EndIdentities, oauth_store: OAuthStore | None = None
) -> None:
    """The /api/ routes; `end_identities` is app.end_identities (passed in: app.py imports this);
    `oauth_store` the built-in authorization server's (None without OAUTH_SERVER)."""
    app[_END] = end_identities
    app[_OAUTH] = oauth_store
    router = app.router
    router.add_get("/api/keys", _list_keys)
    router.add_post("/api/keys", _create_key)
    router.add_delete("/api/keys/{key_id}", _delete_key)
    router.add_post("/api/keys/{key_id}/rotate", _rotate_key)
    router.add_get("/api/audit", _audit)
    router.add_get("/api/audit/export", _export)
    router.add_get("/api/backends", _backends)
    router.add_post("/api/backends/{name}/restart", _restart)
    router.add_get("/api/sessions", _sessions)
    router.add_delete("/api/sessions/{session_id}", _end_session)
    router.add_get("/api/oauth/clients", _oauth_clients)
    router.add_get("/api/oauth/grants", _oauth_grants)
    router.add_delete("/api/oauth/grants/{grant_id}", _revoke_grant)
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):  # not "*": CORS answers OPTIONS itself
        router.add_route(method, "/api/{tail:.*}", _unknown)
