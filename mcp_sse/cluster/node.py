"""This process as one instance of several sharing a Redis: its id, the sessions it owns, its
internal listener, and the hop that takes a request for another instance's session to its owner.

A 2025-era session lives where it was created: its streams, replay buffers and upstream state stay
in that process. Redis records `session:<SHA-256 of its id>` -> owner id and `instance:<id>` ->
the owner's internal address, both with a TTL the heartbeat refreshes. A request naming a session
this instance does not hold is authenticated here as any request is, then relayed to the owner's
internal listener signed (hop.py) with the caller's identity; the owner checks, as it would for a
request of its own, that the session belongs to that identity. An owner that is gone (no liveness
key, or its listener refuses the connection) leaves the session unknown: 404, and the client
initializes again. 2026-07-28 requests carry no session and are served wherever they land.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Final, NoReturn

import aiohttp
from aiohttp import web
from yarl import URL

from ..protocol.session import Session, SessionStore, valid_session_id
from ..security.audit import AuditLog
from ..state import AUDIT as AUDIT_KEY
from ..state import IDENTITY, REQUEST_ID, SESSIONS, TASKS, TRANSPORT
from ..store.redis import PREFIX
from ..transport.common import http_error
from ..transport.modern import is_modern
from ..transport.routes import Mounts, add_mcp_routes
from ..transport.streamable import SESSION_HEADER
from .hooks import CLUSTER, FORWARDED_BODY
from .hop import HEADER_IDENTITY, HEADER_REQUEST, HopError, Misdirected, Signer

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from ..ops.tracing import Tracing

__all__ = ["HEARTBEAT_SECONDS", "TTL_SECONDS", "Node", "install"]

log = logging.getLogger("mcp_sse.cluster")

TTL_SECONDS: Final = 15
"""An owner silent this long is gone: its liveness key and its sessions' records expire."""
HEARTBEAT_SECONDS: Final = 5.0
ADDRESS_CACHE_SECONDS: Final = 2.0
UNKNOWN_SESSION: Final = "unknown or ended session; initialize a new one"
"""The transport's own 404 message (transport/common.py): a session gone with its owner looks the same."""
_ANSWER_HEADERS: Final = (
    "Content-Type",
    SESSION_HEADER,
    "Cache-Control",
    "X-Accel-Buffering",
    "Retry-After",
    "Allow",
)
"""What of the owner's answer goes back to the client; this instance's own response signals add
the security, CORS and request-id headers, as for any answer of its own."""


def _format(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _redis_errors() -> tuple[type[BaseException], ...]:
    from redis.exceptions import RedisError

    return (RedisError, OSError, TimeoutError)


class Node:
    def __init__(
        self,
        *,
        redis: Redis,
        secret: bytes,
        listen: tuple[str, int],
        advertise: tuple[str, int] | None,
        audit: AuditLog,
        sessions: SessionStore,
        tracing: Tracing | None = None,
    ) -> None:
        self.tracing = tracing
        """A hop continues the relaying request's trace at the owner (its internal listener traces too)."""
        self.instance_id = secrets.token_hex(16)  # 128 random bits, made in this process (after any fork)
        self.redis = redis
        self.signer = Signer(secret, self.instance_id)
        self.listen = listen
        self.advertise = advertise
        self.address = ""
        """host:port the other instances reach this one's internal listener at; set at start."""
        self.audit = audit
        self.sessions = sessions
        self.owned: dict[str, Session] = {}
        self._errors = _redis_errors()
        self._client: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._redis_down = False
        self._addresses: dict[str, tuple[str, float]] = {}
        # A session's owner never changes (it dies with it): known once, asked of Redis no more.
        self._owners: dict[str, str] = {}

    # -- ownership -----------------------------------------------------------------------------

    @staticmethod
    def _session_key(digest: str) -> str:
        return f"{PREFIX}session:{digest}"

    def _instance_key(self, instance_id: str) -> str:
        return f"{PREFIX}instance:{instance_id}"

    async def claim(self, session: Session) -> None:
        # SECURITY: a session id is a capability; Redis holds only its SHA-256.
        digest = hashlib.sha256(session.id.encode()).hexdigest()
        try:
            await self.redis.set(self._session_key(digest), self.instance_id, ex=TTL_SECONDS)
        except self._errors as exc:
            session.close()
            self._unavailable(None, exc)
        self.owned[digest] = session
        session.on_close.append(lambda _: self._release(digest))

    def _release(self, digest: str) -> None:
        if self.owned.pop(digest, None) is not None:
            self._background(self.redis.delete(self._session_key(digest)))

    def _background(self, work: Awaitable[object]) -> None:
        async def run() -> None:
            with contextlib.suppress(*self._errors):
                await work

        task = asyncio.ensure_future(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _unavailable(self, request: web.Request | None, exc: BaseException) -> NoReturn:
        """SECURITY: fail closed. Without Redis no instance can tell who owns a session. One audit
        line and one log line per outage (the heartbeat notes the recovery), not one per request."""
        if not self._redis_down:
            self._redis_down = True
            self.audit.event("cluster.unavailable", request, error=type(exc).__name__)
            log.warning(
                "session ownership: Redis unavailable (%s); refusing (fail closed)", type(exc).__name__
            )
        raise http_error(
            web.HTTPServiceUnavailable, "shared state unavailable; retry shortly", **{"Retry-After": "2"}
        )

    async def _beat(self) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self._instance_key(self.instance_id), self.address, ex=TTL_SECONDS)
        for digest in list(self.owned):
            pipe.set(self._session_key(digest), self.instance_id, ex=TTL_SECONDS)
        await pipe.execute()

    async def _heartbeat(self) -> None:
        """Refresh this instance's liveness and its sessions' records; after an outage, write them
        again (they may have expired meanwhile), so nothing needs a restart."""
        while True:
            try:
                await self._beat()
            except self._errors as exc:
                if not self._redis_down:
                    log.warning("cluster heartbeat failed (Redis unavailable?): %s", type(exc).__name__)
                    self.audit.event("cluster.unavailable", None, error=type(exc).__name__)
                self._redis_down = True
            else:
                if self._redis_down:
                    log.info("cluster heartbeat restored: session ownership shared again")
                    self.audit.event("cluster.recovered", None)
                self._redis_down = False
            await asyncio.sleep(HEARTBEAT_SECONDS)

    # -- forwarding ----------------------------------------------------------------------------

    async def forward(self, request: web.Request) -> web.StreamResponse | None:
        if request.path.endswith("/messages"):
            session_id = request.query.get("session_id") or request.query.get("sessionId")
        elif is_modern(request):
            return None
        else:
            session_id = request.headers.get(SESSION_HEADER)
        if not valid_session_id(session_id) or self.sessions.get(session_id) is not None:
            return None  # ours, or malformed: the transport answers
        assert session_id is not None
        key = self._session_key(hashlib.sha256(session_id.encode()).hexdigest())
        try:
            if (owner := self._owners.get(key)) is None:
                owner = _text(await self.redis.get(key))
                if owner is None or owner == self.instance_id:
                    return None  # unknown, or ours and ended: 404
                if len(self._owners) > 4096:  # sessions come and go: keep this bounded
                    self._owners.clear()
                self._owners[key] = owner
            address = await self._address_of(owner)
            if address is None:  # its owner is gone: so is the session
                self._owners.pop(key, None)
                await self.redis.delete(key)
                return None
        except self._errors as exc:
            self._unavailable(request, exc)
        return await self._relay(request, owner, address, key)

    async def _address_of(self, instance_id: str) -> str | None:
        """An instance's internal address while its liveness key stands, remembered for a moment (one
        Redis round trip less per hop). A death within that moment is seen anyway: the hop's
        connection is refused, and the hop names its target, so no other process could take it."""
        now = time.monotonic()
        if (known := self._addresses.get(instance_id)) is not None and known[1] > now:
            return known[0]
        address = _text(await self.redis.get(self._instance_key(instance_id)))
        if address is None:
            self._addresses.pop(instance_id, None)
        else:
            if len(self._addresses) > 1024:  # instances come and go: keep this small
                self._addresses.clear()
            self._addresses[instance_id] = (address, now + ADDRESS_CACHE_SECONDS)
        return address

    async def _relay(self, request: web.Request, owner: str, address: str, key: str) -> web.StreamResponse:
        try:
            async with asyncio.timeout(request.app[TRANSPORT].body_timeout):
                body = await request.read()  # within client_max_size (MAX_BODY), as the owner reads it
        except TimeoutError:
            slow = http_error(web.HTTPRequestTimeout, "request body too slow")
            slow.force_close()
            raise slow from None
        headers = self.signer.sign(
            request.method,
            request.raw_path,
            owner,
            identity=request.get(IDENTITY) or "",
            request_id=request.get(REQUEST_ID, ""),
            client_headers=request.headers,
            body=body,
            trace=None if self.tracing is None else self.tracing.context_headers(),
        )
        assert self._client is not None
        url = URL(f"http://{address}{request.raw_path}", encoded=True)
        try:
            upstream = await self._client.request(
                request.method, url, data=body or None, headers=headers, allow_redirects=False
            )
        except aiohttp.ClientConnectorError:
            # Nothing listens there: the owner died before its liveness key expired, and its sessions
            # with it. (Answered here: the body is read, so the transport could not answer it.)
            self._addresses.pop(owner, None)
            self._owners.pop(key, None)
            self._background(self.redis.delete(key))
            raise http_error(web.HTTPNotFound, UNKNOWN_SESSION) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("hop to instance %s at %s failed: %s", owner[:8], address, type(exc).__name__)
            raise http_error(web.HTTPBadGateway, "the instance holding this session did not answer") from None
        try:
            if upstream.status == 401:  # the owner refused our signature: not the caller's fault
                log.error("instance %s refused a signed hop: is CLUSTER_SECRET the same?", owner[:8])
                raise http_error(web.HTTPBadGateway, "the instance holding this session refused the hop")
            answer = {name: upstream.headers[name] for name in _ANSWER_HEADERS if name in upstream.headers}
            if upstream.content_type != "text/event-stream":
                return web.Response(body=await upstream.read(), status=upstream.status, headers=answer)
            response = web.StreamResponse(status=upstream.status, headers=answer)
            await response.prepare(request)
            with contextlib.suppress(aiohttp.ClientError, ConnectionError):
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
            return response
        finally:
            # A stream the client left is cut at the owner too (its reader lets go; a resume may follow).
            if upstream.content.is_eof():
                upstream.release()
            else:
                upstream.close()

    # -- the internal listener -----------------------------------------------------------------

    def internal_app(self, app: web.Application, mounts: Mounts) -> web.Application:
        """The owner's side of the hop: the same MCP routes and session state as the public app, behind
        one check instead of the public pipeline (the forwarder ran that): a valid signed hop."""

        @web.middleware
        async def verify(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            try:
                async with asyncio.timeout(request.app[TRANSPORT].body_timeout):
                    body = await request.read()
                self.signer.check(request.method, request.raw_path, request.headers, body)
            except (HopError, TimeoutError) as exc:
                reason = str(exc) if isinstance(exc, HopError) else "body too slow"
                self.audit.event("cluster.hop_refused", None, reason=reason, peer=request.remote or "")
                if isinstance(exc, Misdirected):  # the session's owner is gone: the client starts again
                    return web.json_response({"error": UNKNOWN_SESSION}, status=404)
                return web.json_response({"error": "unauthenticated hop"}, status=401)
            if identity := request.headers.get(HEADER_IDENTITY):
                request[IDENTITY] = identity
            request[REQUEST_ID] = request.headers.get(HEADER_REQUEST, "")[:64]
            request[FORWARDED_BODY] = body
            return await handler(request)

        tracing = [] if self.tracing is None else [self.tracing.middleware()]
        internal = web.Application(middlewares=[*tracing, verify], client_max_size=app[TRANSPORT].max_body)
        if self.tracing is not None:
            self.tracing.install(internal, shutdown=False)  # the public app shuts the exporter down
        internal[SESSIONS] = app[SESSIONS]
        internal[TRANSPORT] = app[TRANSPORT]
        internal[TASKS] = app[TASKS]  # so the drain on shutdown waits for forwarded work too
        add_mcp_routes(internal, mounts)
        return internal

    async def lifecycle(self, internal: web.Application) -> AsyncIterator[None]:
        runner = web.AppRunner(internal, access_log=None, handler_cancellation=True, shutdown_timeout=2.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.listen[0], self.listen[1])
            await site.start()
            bound = runner.addresses[0][:2]
            self.address = _format(*(self.advertise or bound))
            self._client = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=2.0),
                auto_decompress=False,
            )
            with contextlib.suppress(*self._errors):
                await self._beat()
            heartbeat = asyncio.create_task(self._heartbeat())
            log.info("cluster instance %s: internal listener %s", self.instance_id[:8], self.address)
            yield
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            # Leaving on purpose: say so now rather than after the TTL.
            with contextlib.suppress(*self._errors):
                async with asyncio.timeout(2.0):
                    keys = [self._session_key(d) for d in self.owned]
                    await self.redis.delete(self._instance_key(self.instance_id), *keys)
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=2.0)
            await self._client.close()
        finally:
            await runner.cleanup()


def install(
    app: web.Application,
    *,
    redis: Redis,
    secret: bytes,
    listen: tuple[str, int],
    advertise: tuple[str, int] | None,
    mounts: Mounts,
    tracing: Tracing | None = None,
) -> Node:
    """Make this app one instance of a cluster: app[CLUSTER], its internal listener, its heartbeat."""
    node = Node(
        redis=redis,
        secret=secret,
        listen=listen,
        advertise=advertise,
        audit=app[AUDIT_KEY],
        sessions=app[SESSIONS],
        tracing=tracing,
    )
    internal = node.internal_app(app, mounts)
    app[CLUSTER] = node

    app.cleanup_ctx.append(lambda app: node.lifecycle(internal))
    return node
