"""OpenTelemetry tracing, off unless the standard OTEL_* variables ask for it (`pip install
'mcp-sse[otel]'`). Off, nothing here imports OpenTelemetry, and the hot path pays two `is None`
tests and, per request to a remote over HTTP, one ContextVar read (bench.instructions: no change).

On when OTEL_TRACES_EXPORTER names otlp or console, or (it unset) an OTLP endpoint is set
(OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT); never with OTEL_SDK_DISABLED=true
or OTEL_TRACES_EXPORTER=none. The SDK reads the rest itself (endpoint, headers, timeout, service
name, resource attributes, sampler, batch sizes). Each app has a TracerProvider of its own, never
the global one (tests and apps in one process stay apart), flushed and shut down at cleanup.

Spans, per the OpenTelemetry HTTP and MCP semantic conventions:
- one SERVER span per HTTP request, `METHOD /route/template` (the middleware just inside the error
  layer, beside the metrics one). An SSE response's span ends when its headers are sent: a stream
  open for hours must not hold a span open for hours (its events are not spans);
- one SERVER span per MCP request the gateway handles (`Gateway.handle_request`), child of the
  request span, or of the `params._meta.traceparent` the request carries (MCP SEP-414);
- one CLIENT span per request forwarded to a backend, whose context goes upstream in
  `params._meta.traceparent` (stdio children, WebSocket frames and HTTP bodies alike, SEP-414) and,
  to remote servers over HTTP, in the `traceparent` header of the request that carries it.

SECURITY: a span never holds a header (but the trace context), a cookie, a query string, a path
(only the route template), a body, arguments, an exception's text, or a session id (a digest of
it: the id is the session's capability). A caller's trace context is untrusted: a malformed
traceparent is ignored (a new trace starts), a malformed tracestate dropped before the SDK can log
it, and its `baggage` is neither read nor passed on.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from .. import __version__
from ..protocol.jsonrpc import Message
from ..settings import SettingsError
from ..state import CLIENT_IP, REQUEST_ID, SECURE

if TYPE_CHECKING:
    from opentelemetry.trace import Span, TracerProvider

    from ..gateway import Gateway
    from ..protocol.session import Session

__all__ = ["INSTALL_HINT", "Tracing", "configured", "from_environ", "trace_headers"]

log = logging.getLogger("mcp_sse.tracing")

INSTALL_HINT: Final = "pip install 'mcp-sse[otel]'"
EXPORTERS: Final = frozenset({"otlp", "console", "none"})
METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_NAMED: Final = {"tools/call": "gen_ai.tool.name", "prompts/get": "gen_ai.prompt.name"}
_NO_HEADERS: Final[Mapping[str, str]] = {}
_CONTEXT_KEYS: Final = ("traceparent", "tracestate")

_OUTBOUND: ContextVar[Mapping[str, str]] = ContextVar("mcp_sse_trace_headers", default=_NO_HEADERS)
"""The trace context of the backend call being made, for the HTTP requests that carry it."""


# W3C Trace Context's grammar (a traceparent of any version fits in 512 characters; a tracestate has
# at most 32 members of this shape, 512 characters in all as we take it).
_TRACEPARENT_MAX: Final = 512
_TRACESTATE_MAX: Final = 512
_MEMBER: Final = re.compile(
    r"([a-z][_0-9a-z\-*/]{0,255}|[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13})"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)


def _screened(traceparent: object, tracestate: object) -> dict[str, str]:
    """The caller's trace context, as a carrier for the propagator, with what it would complain of
    left out. SECURITY: the SDK logs a malformed tracestate member, or an oversized header, at
    WARNING, the member verbatim: caller text in our logs, and one line per request for anyone who
    sends it. A malformed traceparent is ignored by the SDK without a word; a malformed tracestate is
    dropped here whole (W3C: a vendor may discard it), the traceparent kept."""
    carrier: dict[str, str] = {}
    if not isinstance(traceparent, str) or len(traceparent) > _TRACEPARENT_MAX:
        return carrier
    carrier["traceparent"] = traceparent
    if isinstance(tracestate, str) and len(tracestate) <= _TRACESTATE_MAX:
        members = [m.strip(" \t") for m in tracestate.split(",")]
        keys = [match.group(1) for m in members if m and (match := _MEMBER.fullmatch(m)) is not None]
        if len(keys) == sum(1 for m in members if m) and len(keys) == len(set(keys)) and len(keys) <= 32:
            carrier["tracestate"] = tracestate
    return carrier


def trace_headers() -> Mapping[str, str]:
    """`traceparent` (and `tracestate`) for an outbound HTTP request made for a traced backend call;
    empty otherwise (tracing off, or a request of the backend's own: its handshake, its GET stream)."""
    return _OUTBOUND.get()


def _exporters(environ: Mapping[str, str]) -> list[str]:
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if unknown := [n for n in names if n not in EXPORTERS]:
        raise SettingsError(
            f"OTEL_TRACES_EXPORTER={unknown[0][:40]!r} is not supported: use otlp, console or none"
        )
    return names


def configured(environ: Mapping[str, str]) -> bool:
    """Do these OTEL_* variables turn tracing on? SettingsError for a value we cannot honour."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    names = _exporters(environ)
    if names:
        on = any(n != "none" for n in names)
    else:  # the SDK's default exporter is otlp; here an endpoint must be named to turn it on
        on = bool(
            environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        )
    if on and (not names or "otlp" in names):
        for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
            protocol = environ.get(name, "").strip()
            if protocol:
                if protocol != "http/protobuf":
                    raise SettingsError(
                        f"{name}={protocol[:40]!r} is not supported: the otel extra exports "
                        "OTLP over HTTP (http/protobuf)"
                    )
                break
    return on


def from_environ(environ: Mapping[str, str]) -> Tracing | None:
    """The app's tracing as the OTEL_* variables configure it, or None (off). Configured without
    the otel extra: SettingsError naming what to install."""
    if not configured(environ):
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
    except ImportError as exc:
        raise SettingsError(
            f"the OTEL_* settings ask for tracing, but OpenTelemetry is not installed ({exc.name or exc}): "
            f"{INSTALL_HINT}, or unset OTEL_EXPORTER_OTLP_ENDPOINT and OTEL_TRACES_EXPORTER"
        ) from None
    resource = Resource.create({SERVICE_VERSION: __version__})  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "mcp-sse"}))
    provider = TracerProvider(resource=resource)  # the sampler from OTEL_TRACES_SAMPLER
    names = _exporters(environ) or ["otlp"]
    for name in dict.fromkeys(names):
        exporter: SpanExporter | None = (
            OTLPSpanExporter() if name == "otlp" else ConsoleSpanExporter() if name == "console" else None
        )
        if exporter is not None:
            provider.add_span_processor(BatchSpanProcessor(exporter))
    log.info("tracing on: spans exported by %s", ", ".join(n for n in names if n != "none"))
    return Tracing(provider, owned=True)


def _session_digest(session: Session) -> str:
    return hashlib.sha256(session.id.encode()).hexdigest()[:16]


class Tracing:
    """One app's tracer: the HTTP middleware, the MCP request and backend call spans."""

    def __init__(self, provider: TracerProvider, *, owned: bool = False) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.owned = owned
        """Made here from OTEL_*, so shut down here; a provider passed in is its owner's to shut."""
        self.tracer = provider.get_tracer("mcp_sse", __version__)
        self.propagator = TraceContextTextMapPropagator()  # W3C trace context only: never baggage
        self._trace = trace
        self._context = context
        self._span_key: web.RequestKey[Span] = web.RequestKey("trace_span")

    def install(self, app: web.Application, *, shutdown: bool = True) -> None:
        """`shutdown`: false for a second app of the same process (the cluster's internal listener)."""
        app.on_response_prepare.append(self._prepared)
        if self.owned and shutdown:
            app.on_cleanup.append(self._shutdown)

    async def _shutdown(self, app: web.Application) -> None:
        # Flushing exports over the network: off the event loop (bounded by OTEL_EXPORTER_OTLP_TIMEOUT).
        await asyncio.to_thread(self.provider.shutdown)  # type: ignore[attr-defined]

    # -- the HTTP request span ------------------------------------------------------------------

    def middleware(self) -> Middleware:
        trace, context, tracer, propagator = self._trace, self._context, self.tracer, self.propagator
        SERVER = trace.SpanKind.SERVER
        key = self._span_key

        @web.middleware
        async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            resource = request.match_info.route.resource
            route = None if resource is None else resource.canonical
            method = request.method if request.method in METHODS else "_OTHER"
            headers = request.headers
            # Neither header: no parent (and no parsing). A malformed traceparent: a new trace.
            parent = None
            if (traceparent := headers.get("traceparent")) is not None:
                tracestate = ",".join(headers.getall("tracestate", ())) or None
                parent = propagator.extract(_screened(traceparent, tracestate))
            attributes: dict[str, Any] = {"http.request.method": method}
            if route is not None:
                attributes["http.route"] = route
            # The local socket, not the Host header: that is the caller's text, and refused ones get here.
            local = request.transport.get_extra_info("sockname") if request.transport else None
            if isinstance(local, tuple):
                attributes["server.address"], attributes["server.port"] = str(local[0]), int(local[1])
            if request.remote is not None:
                attributes["network.peer.address"] = request.remote
            verb = "HTTP" if method == "_OTHER" else method
            name = f"{verb} {route}" if route else verb
            span = tracer.start_span(name, context=parent, kind=SERVER, attributes=attributes)
            request[key] = span
            token = context.attach(trace.set_span_in_context(span, parent))
            status: int | None = None
            try:
                response = await handler(request)
                status = response.status
                return response
            except web.HTTPException as exc:
                status = exc.status
                raise
            except asyncio.CancelledError:
                if span.is_recording():  # not an SSE stream's, ended when it opened
                    span.set_attribute("error.type", "cancelled")  # the client left; not a server error
                raise
            except Exception as exc:  # the error layer outside answers 500; its text stays out
                status = 500
                if span.is_recording():
                    span.set_attribute("error.type", type(exc).__qualname__)
                raise
            finally:
                context.detach(token)
                self._end(request, span, status)

        return middleware

    def _end(self, request: web.Request, span: Span, status: int | None) -> None:
        if not span.is_recording():  # ended already (an SSE response), or not sampled
            return
        # Known once the layers inside have run: TLS per a trusted proxy, the client behind it.
        span.set_attribute("url.scheme", "https" if request.get(SECURE) or request.secure else "http")
        if (client := request.get(CLIENT_IP)) is not None:
            span.set_attribute("client.address", str(client))
        if (request_id := request.get(REQUEST_ID)) is not None:
            span.set_attribute("mcp_sse.request_id", request_id)  # the X-Request-Id, as in the audit log
        if status is not None:
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_attribute("error.type", str(status))
                span.set_status(self._trace.StatusCode.ERROR)
        span.end()

    def context_headers(self) -> dict[str, str]:
        """`traceparent` (and `tracestate`) of the current span: what a hop to another instance carries."""
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier)
        return carrier

    async def _prepared(self, request: web.Request, response: web.StreamResponse) -> None:
        """An SSE stream's span ends as its headers go out; other responses end in the middleware."""
        if response.content_type == "text/event-stream" and (span := request.get(self._span_key)) is not None:
            self._end(request, span, response.status)

    # -- MCP spans --------------------------------------------------------------------------------

    @staticmethod
    def _mcp(message: Message) -> tuple[str, dict[str, Any], dict[str, Any]]:
        """The method, span attributes and params of an MCP request."""
        method = str(message.get("method"))[:100]
        params = message.get("params")
        params = params if isinstance(params, dict) else {}
        attributes: dict[str, Any] = {
            "mcp.method.name": method,
            "jsonrpc.request.id": str(message.get("id"))[:128],
        }
        if (attribute := _NAMED.get(method)) is not None and isinstance(target := params.get("name"), str):
            attributes[attribute] = target[:200]
            if method == "tools/call":
                attributes["gen_ai.operation.name"] = "execute_tool"
        return method, attributes, params

    def _outcome(
        self, span: Span, reply: Message, gateway: Gateway, method: str, params: dict[str, Any]
    ) -> str:
        """Status, error.type and name from the reply; the outcome as the audit log names it."""
        error = reply.get("error")
        result = reply.get("result")
        target = params.get("name") if method in _NAMED else None
        if isinstance(target, str) and (
            not isinstance(error, dict)
            or (method == "tools/call" and gateway.tool_schema(target) is not None)
        ):
            # Only a target that exists (it answered, or is listed) names the span: the caller may
            # send any name, and any number of span names would follow.
            span.update_name(f"{method} {target[:200]}")
        if isinstance(error, dict):
            code = str(error.get("code"))[:20]
            span.set_attributes({"error.type": code, "rpc.response.status_code": code})
            outcome = "error"
        elif isinstance(result, dict) and result.get("isError") is True:
            span.set_attribute("error.type", "tool_error")
            outcome = "tool_error"
        else:
            return "ok"
        span.set_status(self._trace.StatusCode.ERROR)  # no description: an error's text may hold anything
        return outcome

    async def serve(self, gateway: Gateway, session: Session, message: Message) -> Message:
        """Gateway.handle_request, in an MCP server span."""
        trace, context = self._trace, self._context
        method, attributes, params = self._mcp(message)
        attributes["mcp.session.id"] = _session_digest(session)  # a digest: the id is a capability
        parent = None
        links = []
        meta = params.get("_meta")
        if isinstance(meta, dict) and "traceparent" in meta:  # SEP-414: the caller's context for it
            carried = self.propagator.extract(_screened(meta.get("traceparent"), meta.get("tracestate")))
            if trace.get_current_span(carried).get_span_context().is_valid:
                parent = carried
                if (http := trace.get_current_span().get_span_context()).is_valid:
                    links.append(trace.Link(http))
        span = self.tracer.start_span(
            method, context=parent, kind=trace.SpanKind.SERVER, attributes=attributes, links=links
        )
        token = context.attach(trace.set_span_in_context(span, parent))
        try:
            reply = await gateway.handle_untraced(session, message)
        except BaseException as exc:
            self._failed(span, exc)
            raise
        else:
            self._outcome(span, reply, gateway, method, params)
            if session.protocol_version:
                span.set_attribute("mcp.protocol.version", session.protocol_version)
            return reply
        finally:
            context.detach(token)
            span.end()

    def _failed(self, span: Span, exc: BaseException) -> None:
        cancelled = isinstance(exc, asyncio.CancelledError)
        span.set_attribute("error.type", "cancelled" if cancelled else type(exc).__qualname__)
        if not cancelled:
            span.set_status(self._trace.StatusCode.ERROR)

    async def forward(self, gateway: Gateway, session: Session, message: Message) -> Message:
        """backend.request(), in an MCP client span whose context goes with the request."""
        trace = self._trace
        method, attributes, params = self._mcp(message)
        attributes["mcp_sse.backend"] = gateway.name[:100]
        span = self.tracer.start_span(method, kind=trace.SpanKind.CLIENT, attributes=attributes)
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier, context=trace.set_span_in_context(span))
        if carrier and (isinstance(message.get("params"), dict) or "params" not in message):
            # SEP-414: ours replaces the caller's (whose span is this one's ancestor).
            meta = params.get("_meta")
            meta = {k: v for k, v in meta.items() if k not in _CONTEXT_KEYS} if isinstance(meta, dict) else {}
            message = {**message, "params": {**params, "_meta": {**meta, **carrier}}}
        token = _OUTBOUND.set(carrier)
        try:
            reply = await gateway.backend.request(session, message)
        except BaseException as exc:
            self._failed(span, exc)
            raise
        else:
            span.set_attribute("mcp_sse.outcome", self._outcome(span, reply, gateway, method, params))
            return reply
        finally:
            _OUTBOUND.reset(token)
            span.end()
