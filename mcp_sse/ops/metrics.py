"""Prometheus metrics: `GET /metrics` in the text exposition format, declared once, here.

Every metric has a bounded label set: routes are the matched resource's canonical path
(`/servers/{name}/mcp`, or `unmatched`), never the raw path; tools are named only when the
backend listed them (its `schemas`), else `other`; reasons, scopes, outcomes and states come
from fixed lists. So no request creates a series, and no label carries a secret or a caller's text.

Where each figure comes from:
- the HTTP middleware (placed just inside the error layer, so it sees final statuses): requests
  by route, method and status; authenticated requests (`auth`, outcome success, by credential);
  429s by scope (address, key, lockout);
- the audit log, through its observer hook: every event by name, auth failures by reason, tool
  calls by backend, tool and outcome with their latency;
- read at scrape time from the app's state: sessions and SSE streams open (SessionStore), backend
  state, restarts, circuit state, child memory (/proc/<pid>/status of the pids `status()` names);
  the gateway's own memory and CPU (prometheus-client's ProcessCollector);
- read once at start: the TLS certificate's expiry (TLS_CERT, with native TLS).

Who may read it: `admin` keys (security/auth.py), METRICS_TOKEN (that route only), or anyone on
the METRICS_LISTEN loopback listener, which answers /metrics only and only to a loopback Host.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Final

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..protocol.versions import ALL_VERSIONS
from ..security.ratelimit import LockedOut
from ..state import API_KEY, BACKENDS, IDENTITY, PRINCIPAL, SESSIONS

__all__ = ["METRICS", "METRICS_PATH", "Metrics", "certificate_expiry", "child_rss_bytes"]

log = logging.getLogger("mcp_sse.metrics")

METRICS_PATH: Final = "/metrics"
NAMESPACE: Final = "mcp_sse"
UNMATCHED: Final = "unmatched"
OTHER: Final = "other"
METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
BACKEND_STATES: Final = ("starting", "running", "restarting", "failed", "stopped")
CIRCUIT_STATES: Final = ("closed", "open", "half-open")
TOOL_OUTCOMES: Final = frozenset({"ok", "error", "tool_error"})
LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
CLIENT_CLOSED: Final = "499"
"""The status counted for a request whose client went away before it was answered (nginx's)."""

# auth.failed's reasons, as the audit log gives them, to a fixed label; anything else is `other`
# (an OAuth refusal's description names what was wrong with the token: text we do not label by).
_FAILURE_REASONS: Final = {None: "invalid_token", "no credentials": "no_credentials", "login": "login"}
_HANDSHAKE_TRANSPORTS: Final = ("sse", "streamable", "modern")

# Counters are exposed as <name>_total only: the _created series double the output for nothing.
disable_created_metrics()  # type: ignore[no-untyped-call]


def certificate_expiry(path: Path) -> float:
    """notAfter of the first certificate in a PEM file, as seconds since the epoch."""
    from cryptography import x509

    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc.timestamp()


def child_rss_bytes(pid: int) -> int | None:
    """Resident memory of a process (VmRSS), in bytes; None when it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _pids(status: Mapping[str, Any]) -> list[int]:
    pids = [status.get("pid"), *(status.get("pids") or ())]
    return [p for p in pids if isinstance(p, int) and not isinstance(p, bool)]


class _StateCollector(Collector):
    """What is read from the app at scrape time: never stale, and gone with what it measured."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        app = self.metrics.app
        if app is None:
            return []
        found = [*self._sessions(app), *self._backends(app)]
        if self.metrics.tls_not_after is not None:
            found.append(
                GaugeMetricFamily(
                    f"{NAMESPACE}_tls_certificate_expiry_timestamp_seconds",
                    "notAfter of TLS_CERT (native TLS), as seconds since the epoch",
                    value=self.metrics.tls_not_after,
                )
            )
        return found

    @staticmethod
    def _sessions(app: web.Application) -> list[Metric]:
        sessions = GaugeMetricFamily(
            f"{NAMESPACE}_sessions_open",
            "MCP sessions held, by transport (sse, streamable, modern) and protocol revision",
            labels=["transport", "protocol"],
        )
        streams = GaugeMetricFamily(
            f"{NAMESPACE}_sse_streams_open",
            "SSE streams being read by a client now, by transport and protocol revision",
            labels=["transport", "protocol"],
        )
        open_sessions: dict[tuple[str, str], int] = {}
        open_streams: dict[tuple[str, str], int] = {}
        for session in app[SESSIONS].all():
            version = session.protocol_version
            key = (
                session.kind if session.kind in _HANDSHAKE_TRANSPORTS else OTHER,
                version if version in ALL_VERSIONS else "modern" if session.kind == "modern" else "none",
            )
            open_sessions[key] = open_sessions.get(key, 0) + 1
            reading = sum(1 for stream in session.streams.values() if stream.reader is not None)
            if reading:
                open_streams[key] = open_streams.get(key, 0) + reading
        for (transport, protocol), count in sorted(open_sessions.items()):
            sessions.add_metric([transport, protocol], count)
        for (transport, protocol), count in sorted(open_streams.items()):
            streams.add_metric([transport, protocol], count)
        return [sessions, streams]

    @staticmethod
    def _backends(app: web.Application) -> list[Metric]:
        state = GaugeMetricFamily(
            f"{NAMESPACE}_backend_state",
            "1 for the state each backend is in, 0 for the others",
            labels=["backend", "state"],
        )
        up = GaugeMetricFamily(f"{NAMESPACE}_backend_up", "1 when the backend is running", labels=["backend"])
        restarts = CounterMetricFamily(
            f"{NAMESPACE}_backend_restarts",
            "Restarts (stdio children) or reconnects (remote servers) since the backend was built",
            labels=["backend"],
        )
        circuit = GaugeMetricFamily(
            f"{NAMESPACE}_backend_circuit_state",
            "1 for the circuit breaker's state (closed, open, half-open), 0 for the others",
            labels=["backend", "state"],
        )
        memory = GaugeMetricFamily(
            f"{NAMESPACE}_backend_resident_memory_bytes",
            "Resident memory of the backend's child processes, summed (VmRSS)",
            labels=["backend"],
        )
        children = GaugeMetricFamily(
            f"{NAMESPACE}_backend_children", "Child processes the backend runs now", labels=["backend"]
        )
        for name, backend in list(app[BACKENDS].items()):
            status = backend.status()
            current = str(status.get("state", backend.state))
            for known in BACKEND_STATES:
                state.add_metric([name, known], 1.0 if current == known else 0.0)
            up.add_metric([name], 1.0 if current == "running" else 0.0)
            count = status.get("restarts", status.get("reconnects"))
            if isinstance(count, int):
                restarts.add_metric([name], count)
            breaker = status.get("circuit")
            if isinstance(breaker, dict):
                for known in CIRCUIT_STATES:
                    circuit.add_metric([name, known], 1.0 if breaker.get("state") == known else 0.0)
            pids = _pids(status)
            if pids or "pid" in status or "pids" in status:  # a kind that runs children
                sizes = [size for size in map(child_rss_bytes, pids) if size is not None]
                memory.add_metric([name], float(sum(sizes)))
                children.add_metric([name], len(sizes))
        return [state, up, restarts, circuit, memory, children]


class Metrics:
    """One app's metrics, in a registry of its own (so apps in one test process stay apart)."""

    def __init__(
        self,
        *,
        separator: str = "__",
        tls_cert: Path | None = None,
        listen: tuple[str, int] | None = None,
    ) -> None:
        self.separator = separator
        self.listen = listen
        self.listening: tuple[str, int] | None = None
        """Where the METRICS_LISTEN listener is bound once started (its port when given 0)."""
        self.app: web.Application | None = None
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.http_requests = Counter(
            f"{NAMESPACE}_http_requests",
            "HTTP requests answered, by route (the matched path template), method and status",
            ["route", "method", "status"],
            registry=registry,
        )
        self.auth = Counter(
            f"{NAMESPACE}_auth",
            "Authentications: outcome success (by credential: bearer, cookie, oauth, metrics_token) "
            "or failure (by reason)",
            ["outcome", "reason"],
            registry=registry,
        )
        self.rate_limited = Counter(
            f"{NAMESPACE}_rate_limited",
            "Requests refused 429, by scope: address (per-IP limit), key (per-key limit or stream cap), "
            "lockout (an address locked out after failed credentials)",
            ["scope"],
            registry=registry,
        )
        self.tool_calls = Counter(
            f"{NAMESPACE}_tool_calls",
            "tools/call answered, by backend, tool (names the backend lists, else other) and outcome",
            ["backend", "tool", "outcome"],
            registry=registry,
        )
        self.tool_seconds = Histogram(
            f"{NAMESPACE}_tool_call_duration_seconds",
            "tools/call latency through the gateway, by backend",
            ["backend"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.audit_events = Counter(
            f"{NAMESPACE}_audit_events", "Audit log events written, by name", ["event"], registry=registry
        )
        self.tls_not_after: float | None = None
        """TLS_CERT's notAfter; the series is absent without native TLS (a 0 would page someone)."""
        if tls_cert is not None:
            try:
                self.tls_not_after = certificate_expiry(tls_cert)
            except (OSError, ValueError) as exc:  # the TLS setup reports the file itself
                log.warning("cannot read the expiry of %s: %s", tls_cert, exc)
        ProcessCollector(registry=registry)  # process_resident_memory_bytes, process_cpu_seconds_total ...
        registry.register(_StateCollector(self))
        # Label children looked up once: .labels() takes a lock and builds a tuple on every call.
        self._http: dict[tuple[str, str, int | str], Callable[[], None]] = {}
        self._counters: dict[tuple[object, ...], Callable[[], None]] = {}
        self._latency: dict[str, Callable[[float], None]] = {}

    # -- wiring ---------------------------------------------------------------------------------

    def install(self, app: web.Application) -> None:
        """Bind to this app: its state is read at scrape time, its audit log observed, /metrics
        served (authorization in security/auth.py), and the loopback listener run with it."""
        from ..state import AUDIT

        self.app = app
        app[METRICS] = self
        app[AUDIT].observer = self.on_audit
        app.router.add_get(METRICS_PATH, self.handler)
        if self.listen is not None:
            app.cleanup_ctx.append(self._listener)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    async def handler(self, request: web.Request) -> web.Response:
        return web.Response(body=self.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _listener(self, app: web.Application) -> AsyncIterator[None]:
        """METRICS_LISTEN: /metrics alone, no token, on a loopback address (settings refuse others)."""
        assert self.listen is not None
        local = web.Application(middlewares=[_loopback_host_only()])
        local.router.add_get(METRICS_PATH, self.handler)
        runner = web.AppRunner(local, access_log=None, handle_signals=False)
        await runner.setup()
        host, port = self.listen
        site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        address = runner.addresses[0]
        self.listening = (str(address[0]), int(address[1]))
        log.info("metrics listening on http://%s:%d%s", host, self.listening[1], METRICS_PATH)
        try:
            yield
        finally:
            await runner.cleanup()

    # -- the HTTP middleware --------------------------------------------------------------------

    def middleware(self) -> Middleware:
        counted = self._http_counter
        auth_success = self._auth_success

        @web.middleware
        async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                counted(request, exc.status)
                if exc.status == 429:
                    self._count(self.rate_limited, _limited_scope(request, exc))
                elif request.get(IDENTITY) is not None:
                    auth_success(request)
                raise
            except asyncio.CancelledError:
                counted(request, CLIENT_CLOSED)
                raise
            except Exception:
                counted(request, 500)  # the error layer outside answers it so
                raise
            counted(request, response.status)
            if request.get(IDENTITY) is not None:
                auth_success(request)
            return response

        return middleware

    def _http_counter(self, request: web.Request, status: int | str) -> None:
        resource = request.match_info.route.resource
        route = UNMATCHED if resource is None else resource.canonical
        method = request.method
        key = (route, method if method in METHODS else OTHER, status)  # any token is a method to aiohttp
        inc = self._http.get(key)
        if inc is None:
            inc = self._http[key] = self.http_requests.labels(key[0], key[1], str(status)).inc
        inc()

    def _auth_success(self, request: web.Request) -> None:
        if request.get(API_KEY) is not None:
            via = "bearer" if "Authorization" in request.headers else "cookie"
        elif request.get(PRINCIPAL) is not None:
            via = "oauth"
        else:
            via = "metrics_token"  # the only other caller authentication names (security/auth.py)
        self._count(self.auth, "success", via)

    def _count(self, counter: Counter, *labels: str) -> None:
        key = (id(counter), *labels)
        inc = self._counters.get(key)
        if inc is None:
            inc = self._counters[key] = counter.labels(*labels).inc
        inc()

    # -- the audit observer ---------------------------------------------------------------------

    def on_audit(self, name: str, fields: Mapping[str, Any]) -> None:
        """Called by AuditLog.event for every event, before it is written."""
        self._count(self.audit_events, name[:64])
        if name == "tool.invoked":
            backend, tool = self._tool_labels(str(fields.get("backend", "")), str(fields.get("tool", "")))
            outcome = str(fields.get("outcome"))
            self._count(self.tool_calls, backend, tool, outcome if outcome in TOOL_OUTCOMES else OTHER)
            duration = fields.get("duration_ms")
            if isinstance(duration, int | float):
                observe = self._latency.get(backend)
                if observe is None:
                    observe = self._latency[backend] = self.tool_seconds.labels(backend).observe
                observe(duration / 1000)
        elif name == "auth.failed":
            reason = fields.get("reason")
            self._count(self.auth, "failure", _FAILURE_REASONS.get(reason, OTHER))

    def _tool_labels(self, backend: str, tool: str) -> tuple[str, str]:
        """(backend, tool) for a call's labels: a backend the app has (a call through the aggregate
        `*` is put on the backend its prefix names), a tool that backend lists, else `other`."""
        backends = self.app[BACKENDS] if self.app is not None else {}
        found = backends.get(backend)
        if found is None and backend == "*":
            prefix, sep, rest = tool.partition(self.separator)
            found = backends.get(prefix) if sep else None
            if found is None:
                return "*", OTHER
            backend, tool = prefix, rest
        if found is None:
            return OTHER, OTHER
        return backend, tool if tool in found.schemas else OTHER


def _limited_scope(request: web.Request, exc: web.HTTPException) -> str:
    if isinstance(exc, LockedOut):
        return "lockout"
    # Authentication names the caller before it charges the key (or counts its streams).
    return "key" if request.get(IDENTITY) is not None else "address"


def _loopback_host_only() -> Middleware:
    """SECURITY: the listener has no token, so a page in a local browser must not reach it through
    DNS rebinding (its own name resolving to 127.0.0.1): only a loopback Host is answered."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            host = request.url.host or ""  # yarl: [::1]:9464 is ::1
        except ValueError:  # a Host header that is no host at all
            host = ""
        loopback = host == "localhost"
        with contextlib.suppress(ValueError):
            loopback = loopback or ipaddress.ip_address(host).is_loopback
        if not loopback:
            raise web.HTTPMisdirectedRequest(text="the metrics listener answers loopback names only")
        return await handler(request)

    return middleware


METRICS: Final = web.AppKey("metrics", Metrics)
