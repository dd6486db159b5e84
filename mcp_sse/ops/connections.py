"""Below HTTP: what happens to a TCP connection before a request is read from it.

Every connection is a file descriptor, and so is every pipe to a backend's child. At the usual
soft limit of 1,024 open files (shells, and systemd's default) MAX_SESSIONS=1000 cannot be
reached: accept() fails with EMFILE first. asyncio's own loop then logs a traceback for each
connection waiting in the backlog and schedules a retry for each, and every retry does the same
(a million log lines in four seconds, measured); uvloop copes, but the connections still fail
with no answer. So running out of descriptors must not happen:

* at start-up the soft limit is raised to what MAX_CONNECTIONS and the backends' children need,
  never past the hard limit; a limit that still falls short lowers the cap, with a warning;
* a connection over the cap is answered 503 at once and closed, before its request is read.

The IP allowlist is applied here too, to the socket's peer (an allowed address, or a trusted
proxy): a connection from anywhere else is answered 403 and closed at once, so it can hold
neither a descriptor nor a place under the cap while its headers are awaited.

With native TLS the site listens in plain TCP and each connection is screened first, then
upgraded (`loop.start_tls`): a TLS site would do the handshake before handing the connection
over, so a socket that never said hello would be neither counted nor checked. This runs on
asyncio's loop only (cli.event_loop_factory): uvloop reads a new connection at once, before
the upgrade could start, and its ClientHello would go to the HTTP parser.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import ssl
from typing import Any, Final, cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ..security.audit import AuditLog
from ..security.client_ip import peer_address
from ..security.headers import HSTS, SECURITY_HEADERS, SERVER
from ..security.ipfilter import DENIED, Allowlist
from ..security.ratelimit import LogThrottle, address_key

__all__ = ["BACKLOG", "PER_CHILD", "RESERVE", "AppRunner", "fit_open_file_limit", "quiet_accept_errors"]

log = logging.getLogger("mcp_sse")

BACKLOG: Final = 128
"""aiohttp's listen backlog: asyncio accepts up to this many connections per loop turn."""
RESERVE: Final = 4 * BACKLOG + 64
"""Descriptors kept out of the cap, beyond those open at start: log files, and the connections
a flood has accepted but not yet seen closed. A refused connection is closed about three loop
turns after its accept, and each turn may accept a backlog's worth."""
MIN_CAP: Final = 2
"""A legacy SSE session needs two connections: its stream, and the one its POSTs come on."""
PER_CHILD: Final = 4
"""A backend child's stdin, stdout and stderr pipes, and one more while it is being spawned."""


# What the app's on_response_prepare would add, for the answers given before (or without) it.
_HEADERS: Final = {**SECURITY_HEADERS, "Server": SERVER}


def _answer(status: str, error: str, *headers: str) -> bytes:
    """A whole HTTP response, written to a connection before any request was read from it."""
    body = json.dumps({"error": error}).encode()
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in _HEADERS.items())]
    lines += [*headers, "Content-Type: application/json", f"Content-Length: {len(body)}", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


_UNAVAILABLE: Final = _answer(
    "503 Service Unavailable", "too many connections; retry later", "Retry-After: 5"
)
_FORBIDDEN: Final = _answer("403 Forbidden", DENIED)


def fit_open_file_limit(connections: int, children: int) -> int:
    """Raise the soft open-file limit to fit `connections` and `children`; the connection cap
    that fits the limit as it then is (`connections`, or fewer with a warning)."""
    in_use = len(os.listdir("/proc/self/fd"))  # what the process already holds
    needed = in_use + connections + RESERVE + PER_CHILD * children
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return connections
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:  # a seccomp filter may refuse it; the check below still holds
            log.warning("cannot raise the open-file limit from %d: %s", soft, exc)
        else:
            log.info("open-file limit raised from %d to %d", soft, target)
            soft = target
    if soft >= needed:
        return connections
    cap = soft - in_use - RESERVE - PER_CHILD * children
    if cap < MIN_CAP:
        raise OSError(
            f"the open-file limit is {soft}, too low to serve anything: {needed} is what "
            f"MAX_CONNECTIONS={connections} needs. Raise it (LimitNOFILE=, ulimit -n)."
        )
    log.warning(
        "the open-file limit is %d, but %d connections and %d backend processes need %d: "
        "at most %d connections will be served at once. Raise the limit (LimitNOFILE= in the "
        "systemd unit, ulimit -n in a shell) or lower MAX_CONNECTIONS / MAX_SESSIONS.",
        soft,
        connections,
        children,
        needed,
        cap,
    )
    return cap


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Should the descriptors run out anyway, asyncio's loop reports every accept() it cannot
    make, with a traceback, as often as a flood retries: make that one line a minute."""
    quiet = LogThrottle(seconds=60)

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") == "socket.accept() out of system resource":
            if quiet.allow("accept"):
                log.warning("cannot accept connections: %s", context.get("exception"))
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


class _RequestHandler(web.RequestHandler):
    """aiohttp's per-connection handler, with three changes.

    A connection from outside the allowlist, or over the server's cap, is answered and closed
    before anything is read. Under TLS, the handshake comes after that, and then this handler.

    SECURITY: for a request its HTTP parser refuses, aiohttp answers with the parser's message,
    which quotes the raw bytes around the fault (the Authorization header and its token
    included), and logs those bytes with a traceback at ERROR. The token would land in the log
    and in any proxy's, and any client could fill the log with tracebacks. No middleware ever
    sees these requests and aiohttp has no setting for them (aio-libs/aiohttp#3287): here they
    get a 400 that quotes nothing, and one log line that names only the peer and the kind of fault.
    """

    __slots__ = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        manager = self._manager
        if isinstance(manager, _Server):
            if manager.refused(transport):
                self.force_close()  # nothing more is read from it
                self._manager = None  # and connection_lost() has nothing to undo
                return
            if manager.tls is not None:
                tcp = cast(asyncio.Transport, transport)
                tcp.pause_reading()  # nothing may reach aiohttp before the handshake
                manager.upgrade(self, tcp, manager.tls)
                return
        super().connection_made(transport)

    def take_over(self, transport: asyncio.BaseTransport, early: _Early) -> None:
        """Serve `transport` (TLS now), with whatever arrived while the handshake ended."""
        transport.set_protocol(self)
        super().connection_made(transport)
        for data in early.data:
            self.data_received(data)
        if early.eof:
            self.eof_received()
        if early.lost:
            self.connection_lost(early.lost[0])

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500 or not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)  # a handler's failure: as aiohttp does
        self.logger.info("refused a malformed HTTP request from %s (%s)", request.remote, type(exc).__name__)
        # The application's on_response_prepare never runs for it: give it the same headers here.
        headers = dict(_HEADERS)
        if self.transport is not None and self.transport.get_extra_info("sslcontext") is not None:
            headers["Strict-Transport-Security"] = HSTS
        response = web.json_response({"error": "malformed HTTP request"}, status=status, headers=headers)
        response.force_close()  # where the next request would start is unknown
        return response


class _Early(asyncio.Protocol):
    """Holds what the TLS layer delivers between the end of the handshake and aiohttp's handler
    taking the connection over (TLS 1.3 clients send their request right behind it)."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.eof = False
        self.lost: list[BaseException | None] = []

    def data_received(self, data: bytes) -> None:
        self.data.append(data)

    def eof_received(self) -> None:
        self.eof = True  # replayed to the handler; over TLS the return value is ignored anyway

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost.append(exc)


class _Server(web.Server):
    """aiohttp's low-level server, serving each connection with _RequestHandler, at most
    `max_connections` at once."""

    def __init__(
        self,
        *args: Any,
        max_connections: int,
        gate: Allowlist | None,
        audit: AuditLog | None,
        tls: ssl.SSLContext | None,
        handshake_timeout: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.max_connections = max_connections
        self.gate = gate
        self.tls = tls
        self.handshake_timeout = handshake_timeout
        self.open = 0  # connections aiohttp serves, and those still in their TLS handshake
        self._handshakes: set[asyncio.Task[None]] = set()
        self.audit = audit
        self._quiet = LogThrottle(seconds=60)  # a flood of refusals is not a flood of audit lines

    def __call__(self) -> web.RequestHandler:
        return _RequestHandler(self, loop=self._loop, **self._kwargs)  # as web.Server.__call__ does

    def refused(self, transport: asyncio.BaseTransport) -> bool:
        """Answer and close a connection from outside the allowlist, or over the cap: True if so."""
        if self.gate is not None:
            peer = peer_address(transport.get_extra_info("peername"))
            if peer is None or not self.gate.admits(peer):
                self._answer(transport, _FORBIDDEN)
                if peer is not None and self._quiet.allow(address_key(peer)):
                    self._audit("ip.denied", ip=str(peer), reason="refused when it connected")
                return True
        if self.open < self.max_connections:
            return False
        self._answer(transport, _UNAVAILABLE)
        if self._quiet.allow("connections"):
            peer = peer_address(transport.get_extra_info("peername"))
            reason = f"{self.max_connections} connections are open (MAX_CONNECTIONS)"
            self._audit("connection.refused", ip=None if peer is None else str(peer), reason=reason)
        return True

    def _answer(self, transport: asyncio.BaseTransport, response: bytes) -> None:
        if self.tls is not None:
            cast(asyncio.Transport, transport).abort()  # a TLS client could not read a plain answer
            return
        # cast, not isinstance: uvloop's transports do not derive from asyncio's classes.
        cast(asyncio.Transport, transport).write(response)
        transport.close()  # after the write is flushed

    def upgrade(self, handler: _RequestHandler, transport: asyncio.Transport, tls: ssl.SSLContext) -> None:
        """TLS on a connection already screened and counted; then aiohttp's handler serves it."""

        async def handshake() -> None:
            early = _Early()
            try:
                secured = await asyncio.get_running_loop().start_tls(
                    transport,
                    early,
                    tls,
                    server_side=True,
                    ssl_handshake_timeout=self.handshake_timeout,
                )
            except BaseException as exc:  # a failed or abandoned handshake, or shutdown
                transport.abort()  # start_tls closes it on most failures, not on all
                self.open -= 1
                if not isinstance(exc, Exception):
                    raise
                log.debug("TLS handshake failed: %s", exc)
                return
            self.open -= 1  # counted again, as aiohttp's, by connection_made()
            if secured is None:  # the peer closed cleanly during the handshake
                transport.close()
                return
            handler.take_over(secured, early)

        self.open += 1
        task = asyncio.get_running_loop().create_task(handshake())
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    def _audit(self, event: str, **fields: str | None) -> None:
        if self.audit is not None:
            self.audit.event(event, None, **fields)

    def connection_made(self, handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self.open += 1

    def connection_lost(self, handler: web.RequestHandler, exc: BaseException | None = None) -> None:
        self.open -= 1
        super().connection_lost(handler, exc)


class AppRunner(web.AppRunner):
    """web.AppRunner, with _Server in place of the web.Server it builds (no public hook for it)."""

    def __init__(
        self,
        app: web.Application,
        *,
        max_connections: int,
        gate: Allowlist | None = None,
        audit: AuditLog | None = None,
        tls: ssl.SSLContext | None = None,
        handshake_timeout: float = 30.0,
        **kwargs: Any,
    ) -> None:
        """`tls`: the site listens in plain TCP and each connection is screened (allowlist, cap)
        before its TLS handshake, which a TLS site would do first, holding the socket meanwhile."""
        super().__init__(app, **kwargs)
        self._max_connections = max_connections
        self._gate = gate
        self._audit = audit
        self._tls = tls
        self._handshake_timeout = handshake_timeout

    async def _make_server(self) -> web.Server:
        built = await super()._make_server()  # starts the application, exactly as AppRunner does
        return _Server(
            built.request_handler,
            request_factory=built.request_factory,
            handler_cancellation=built.handler_cancellation,
            max_connections=self._max_connections,
            gate=self._gate,
            audit=self._audit,
            tls=self._tls,
            handshake_timeout=self._handshake_timeout,
            **built._kwargs,  # the handler settings given to the runner, plus the app's own
        )
