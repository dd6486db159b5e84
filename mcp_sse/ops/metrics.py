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
import bisect
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path
from typing import Any, Final

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
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
_LE: Final = (*(str(float(bound)) for bound in LATENCY_BUCKETS), "+Inf")
CLIENT_CLOSED: Final = "499"
"""The status counted for a request whose client went away before it was answered (nginx's)."""

# auth.failed's reasons, as the audit log gives them, to a fixed label; anything else is `other`
# (an OAuth refusal's description names what was wrong with the token: text we do not label by).
_FAILURE_REASONS: Final = {None: "invalid_token", "no credentials": "no_credentials", "login": "login"}
_HANDSHAKE_TRANSPORTS: Final = ("sse", "streamable", "modern")


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


class _Histogram:
    """One backend's latency buckets: counted with bisect, exposed cumulative at scrape time."""

    __slots__ = ("buckets", "count", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.count += 1
        self.sum += seconds


class Metrics:
    """One app's metrics, in a registry of its own (so apps in one test process stay apart).

    The counters are plain dicts of ints under bounded keys, turned into metric families when
    scraped: prometheus-client's Counter takes a lock and several calls per increment, which on a
    gateway spending about a millisecond of CPU per call measured over 5 % of it (bench.instructions);
    a dict increment is a few dozen instructions. Everything runs on the event loop's thread."""

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
        self.http_requests: dict[tuple[str, str, int | str], int] = {}
        """(route, method, status) -> count."""
        self.auth: dict[tuple[str, str], int] = {}
        """(outcome, reason) -> count."""
        self.rate_limited: dict[str, int] = {}
        self.tool_calls: dict[tuple[str, str, str], int] = {}
        """(backend, tool, outcome) -> count."""
        self.tool_seconds: dict[str, _Histogram] = {}
        self.audit_events: dict[str, int] = {}
        self.tls_not_after: float | None = None
        """TLS_CERT's notAfter; the series is absent without native TLS (a 0 would page someone)."""
        if tls_cert is not None:
            try:
                self.tls_not_after = certificate_expiry(tls_cert)
            except (OSError, ValueError) as exc:  # the TLS setup reports the file itself
                log.warning("cannot read the expiry of %s: %s", tls_cert, exc)
        self.registry = registry = CollectorRegistry(auto_describe=True)
        registry.register(_CountsCollector(self))
        ProcessCollector(registry=registry)  # process_resident_memory_bytes, process_cpu_seconds_total ...
        registry.register(_StateCollector(self))

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

        @web.middleware
        async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                counted(request, exc.status)
                if exc.status == 429:
                    scope = _limited_scope(request, exc)
                    self.rate_limited[scope] = self.rate_limited.get(scope, 0) + 1
                raise
            except asyncio.CancelledError:
                counted(request, CLIENT_CLOSED)
                raise
            except Exception:
                counted(request, 500)  # the error layer outside answers it so
                raise
            counted(request, response.status)
            return response

        return middleware

    def _http_counter(self, request: web.Request, status: int | str) -> None:
        resource = request.match_info.route.resource
        method = request.method
        key = (
            UNMATCHED if resource is None else resource.canonical,
            method if method in METHODS else OTHER,  # any token is a method to aiohttp's parser
            status,
        )
        counts = self.http_requests
        counts[key] = counts.get(key, 0) + 1
        if request.get(IDENTITY) is not None and status != 429:  # authenticated (a 429 was not served)
            if request.get(API_KEY) is not None:
                via = "bearer" if "Authorization" in request.headers else "cookie"
            elif request.get(PRINCIPAL) is not None:
                via = "oauth"
            else:
                via = "metrics_token"  # the only other caller authentication names (security/auth.py)
            auth = self.auth
            auth["success", via] = auth.get(("success", via), 0) + 1

    # -- the audit observer ---------------------------------------------------------------------

    def on_audit(self, name: str, fields: Mapping[str, Any]) -> None:
        """Called by AuditLog.event for every event, before it is written."""
        events = self.audit_events
        events[name] = events.get(name, 0) + 1
        if name == "tool.invoked":
            backend, tool = self._tool_labels(str(fields.get("backend", "")), str(fields.get("tool", "")))
            outcome = str(fields.get("outcome"))
            key = (backend, tool, outcome if outcome in TOOL_OUTCOMES else OTHER)
            self.tool_calls[key] = self.tool_calls.get(key, 0) + 1
            duration = fields.get("duration_ms")
            if isinstance(duration, int | float):
                histogram = self.tool_seconds.get(backend)
                if histogram is None:
                    histogram = self.tool_seconds[backend] = _Histogram()
                histogram.observe(duration / 1000)
        elif name == "auth.failed":
            reason = _FAILURE_REASONS.get(fields.get("reason"), OTHER)
            self.auth["failure", reason] = self.auth.get(("failure", reason), 0) + 1

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


class _CountsCollector(Collector):
    """The counters, as metric families: declared here, counted by Metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        m = self.metrics
        http = CounterMetricFamily(
            f"{NAMESPACE}_http_requests",
            "HTTP requests answered, by route (the matched path template, or unmatched), method and "
            "status (499: the client left first)",
            labels=["route", "method", "status"],
        )
        for (route, method, status), count in list(m.http_requests.items()):
            http.add_metric([route, method, str(status)], count)
        auth = CounterMetricFamily(
            f"{NAMESPACE}_auth",
            "Authentications: outcome success (by credential: bearer, cookie, oauth, metrics_token) "
            "or failure (by reason: invalid_token, no_credentials, login, other)",
            labels=["outcome", "reason"],
        )
        for (outcome, reason), count in list(m.auth.items()):
            auth.add_metric([outcome, reason], count)
        limited = CounterMetricFamily(
            f"{NAMESPACE}_rate_limited",
            "Requests refused 429, by scope: address (per-IP limit), key (per-key limit or stream cap), "
            "lockout (an address locked out after failed credentials)",
            labels=["scope"],
        )
        for scope, count in list(m.rate_limited.items()):
            limited.add_metric([scope], count)
        tools = CounterMetricFamily(
            f"{NAMESPACE}_tool_calls",
            "tools/call answered, by backend, tool (names the backend lists, else other) and outcome",
            labels=["backend", "tool", "outcome"],
        )
        for (backend, tool, outcome), count in list(m.tool_calls.items()):
            tools.add_metric([backend, tool, outcome], count)
        latency = HistogramMetricFamily(
            f"{NAMESPACE}_tool_call_duration_seconds",
            "tools/call latency through the gateway, by backend",
            labels=["backend"],
        )
        for backend, histogram in list(m.tool_seconds.items()):
            cumulative, buckets = 0, []
            for le, count in zip(_LE, histogram.buckets, strict=True):
                cumulative += count
                buckets.append((le, cumulative))
            latency.add_metric([backend], buckets, histogram.sum)
        events = CounterMetricFamily(
            f"{NAMESPACE}_audit_events", "Audit log events written, by name", labels=["event"]
        )
        for event, count in list(m.audit_events.items()):
            events.add_metric([event[:64]], count)
        return [http, auth, limited, tools, latency, events]


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
