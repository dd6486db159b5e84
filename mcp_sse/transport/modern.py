"""Streamable HTTP at MCP 2026-07-28: every request is one self-contained POST, with no session.

The request carries its protocol version and client capabilities in `params._meta`, and
routing headers that must agree with the body (`MCP-Protocol-Version`, `Mcp-Method`,
`Mcp-Name`). A backend that needs something from the client mid-call (sampling,
elicitation, roots) is answered with an `InputRequiredResult`: the call stays in flight
here, keyed by an unguessable `requestState`, until the client retries with its answers.
Closing a request's stream cancels the request downstream.

A listen stream, and a call from the moment it waits for the client's input until it ends, are
held in the session store: they count toward MAX_SESSIONS, and end when their key is revoked.
"""

from __future__ import annotations

import asyncio
import functools
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from ..gateway import Gateway
from ..protocol.jsonrpc import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    Message,
    ProtocolError,
    dumps,
    error_response,
    is_request,
    validate_message,
)
from ..protocol.param_headers import decode_header_value, param_header_problem
from ..protocol.session import EventStream, Session, forwardable_headers
from ..protocol.versions import ALL_VERSIONS, HANDSHAKE_VERSIONS, MODERN_VERSIONS
from ..state import IDENTITY, SESSIONS, TRANSPORT
from ..upstream.backend import READY_WAIT
from .common import http_error, spawn
from .sse import encode, open_sse

__all__ = ["ModernHTTP", "is_modern"]

VERSION_META: Final = "io.modelcontextprotocol/protocolVersion"
CAPABILITIES_META: Final = "io.modelcontextprotocol/clientCapabilities"
INFO_META: Final = "io.modelcontextprotocol/clientInfo"
LOG_LEVEL_META: Final = "io.modelcontextprotocol/logLevel"
SUBSCRIPTION_META: Final = "io.modelcontextprotocol/subscriptionId"
HEADER_MISMATCH: Final = -32020
UNSUPPORTED_VERSION: Final = -32022
NAME_PARAM: Final = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
HTTP_STATUS: Final = {
    PARSE_ERROR: 400,
    INVALID_REQUEST: 400,
    INVALID_PARAMS: 400,
    HEADER_MISMATCH: 400,
    -32021: 400,
    UNSUPPORTED_VERSION: 400,
    METHOD_NOT_FOUND: 404,
}
STATE_TTL: Final = 300.0
"""How long a call waiting for the client's input is kept before it is cancelled."""
LISTEN_FILTERS: Final = {
    "toolsListChanged": ("notifications/tools/list_changed", "tools"),
    "promptsListChanged": ("notifications/prompts/list_changed", "prompts"),
    "resourcesListChanged": ("notifications/resources/list_changed", "resources"),
}


def is_modern(request: web.Request) -> bool:
    """The era is chosen per request by its version header: anything not a handshake version is modern."""
    version = request.headers.get("MCP-Protocol-Version")
    return version is not None and version not in HANDSHAKE_VERSIONS


def unsupported(request_id: str | int | None, version: str) -> Message:
    """-32022 with every version we speak, so the client can pick one."""
    data = {"supported": list(ALL_VERSIONS), "requested": version[:40]}
    return error_response(request_id, UNSUPPORTED_VERSION, "Unsupported protocol version", data)


def too_many() -> web.HTTPException:
    """The refusal a 2025 session gets when the store is full."""
    return http_error(web.HTTPServiceUnavailable, "too many sessions; retry later", **{"Retry-After": "5"})


def reply(message: Message) -> web.Response:
    error = message.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    status = HTTP_STATUS.get(code, 200) if isinstance(code, int) else 200
    return web.Response(text=dumps(message), status=status, content_type="application/json")


@dataclass(eq=False)
class _Waiting:
    """A call paused on the client's input: its session, stream and task outlive the HTTP request."""

    session: Session
    stream: EventStream
    task: asyncio.Task[None]
    method: str
    after: int
    expires: float


class ModernHTTP:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._waiting: dict[str, _Waiting] = {}

    def _ladder(self, request: web.Request, message: Message) -> Message | None:
        """The first envelope rule the request breaks, as its JSON-RPC error; None when it passes."""
        request_id = message["id"]
        params = message.get("params") or {}
        meta = params.get("_meta")
        if not isinstance(meta, dict) or VERSION_META not in meta or CAPABILITIES_META not in meta:
            return error_response(
                request_id,
                INVALID_PARAMS,
                f"params._meta must carry {VERSION_META!r} and {CAPABILITIES_META!r}",
            )
        for header in ("MCP-Protocol-Version", "Mcp-Method", "Mcp-Name"):
            if len(request.headers.getall(header, [])) > 1:
                return error_response(request_id, HEADER_MISMATCH, f"{header} header appears more than once")
        if request.headers.get("MCP-Protocol-Version") != meta[VERSION_META]:
            return error_response(
                request_id, HEADER_MISMATCH, "MCP-Protocol-Version header does not match params._meta"
            )
        method = message["method"]
        if request.headers.get("Mcp-Method") != method:
            return error_response(request_id, HEADER_MISMATCH, "Mcp-Method header does not match the method")
        name_key = NAME_PARAM.get(method)
        named = params.get(name_key) if name_key is not None else None
        # A name header for a body that names nothing did not come from this request either.
        if name_key is not None and decode_header_value(request.headers.get("Mcp-Name")) != named:
            return error_response(
                request_id, HEADER_MISMATCH, f"Mcp-Name header does not match params.{name_key}"
            )
        if meta[VERSION_META] not in MODERN_VERSIONS:
            return unsupported(request_id, str(meta[VERSION_META]))
        return None

    async def _param_headers(self, request: web.Request, message: Message) -> Message | None:
        """-32020 when `Mcp-Param-*` headers disagree with the arguments the tool's schema marks."""
        params = message.get("params") or {}
        tool = str(params.get("name"))
        schema = self.gateway.tool_schema(tool)
        if schema is None and await self.gateway.backend.wait_ready(READY_WAIT):
            schema = self.gateway.tool_schema(tool)  # a backend still starting had not listed its tools
        problem = param_header_problem(schema, params.get("arguments"), request.headers) if schema else None
        return None if problem is None else error_response(message["id"], HEADER_MISMATCH, problem)

    def _session(self, request: web.Request, message: Message) -> Session:
        """A session for this one request: it carries the caller's identity and declared capabilities."""
        meta = message["params"]["_meta"]
        store = request.app[SESSIONS]
        session = Session(
            secrets.token_urlsafe(16), "modern", self.gateway, request.get(IDENTITY), store.buffer_size
        )
        session.protocol_version = meta[VERSION_META]
        capabilities = meta.get(CAPABILITIES_META)
        session.client_capabilities = capabilities if isinstance(capabilities, dict) else {}
        info = meta.get(INFO_META)
        session.client_info = info if isinstance(info, dict) else {}
        level = meta.get(LOG_LEVEL_META)
        session.log_level = level if isinstance(level, str) else "emergency"  # no opt-in, no log messages
        session.initialized = True
        session.http_headers = forwardable_headers(request.headers)
        return session

    async def post(self, request: web.Request, body: Any) -> web.StreamResponse:
        version = request.headers.get("MCP-Protocol-Version", "")
        if version not in MODERN_VERSIONS:
            # A version nobody speaks: say which ones we do, so the client can pick one.
            request_id = body.get("id") if isinstance(body, dict) else None
            return reply(unsupported(request_id if isinstance(request_id, str | int) else None, version))
        if isinstance(body, dict) and "method" in body and "id" not in body:
            # 2026-07-28 defines no client notifications over HTTP (closing a stream is the
            # cancellation); they are acknowledged and dropped, as the revision allows.
            return web.Response(status=202)
        try:
            message = validate_message(body)
        except ProtocolError as exc:
            return reply(exc.to_message())
        if not is_request(message):
            return reply(error_response(None, INVALID_REQUEST, "Invalid Request: POST one JSON-RPC request"))
        if (refusal := self._ladder(request, message)) is not None:
            return reply(refusal)
        if message["method"] == "tools/call" and (refusal := await self._param_headers(request, message)):
            return reply(refusal)
        if message["method"] == "subscriptions/listen":
            return await self._listen(request, message)
        return await self._answer(request, message)

    def _expire(self) -> None:
        now = time.monotonic()
        for token in [t for t, w in self._waiting.items() if w.expires < now]:
            self._waiting.pop(token).task.cancel()

    async def _answer(self, request: web.Request, message: Message) -> web.StreamResponse:
        self._expire()
        params = message.get("params") or {}
        token = params.get("requestState")
        if token is None:
            session = self._session(request, message)
            stream = session.open_request_stream(message["id"])

            async def run() -> None:
                try:
                    stream.push(await self.gateway.handle_modern(session, message))
                finally:
                    session.close()  # finishes the stream; a call that waited leaves the store

            task = spawn(request.app, run())  # a call in flight, which a drain waits for
            after = 0
        else:
            waiting = self._waiting.pop(str(token), None)
            if (
                waiting is None
                or waiting.session.identity != request.get(IDENTITY)
                or waiting.method != message["method"]
            ):
                # Unknown, expired, or someone else's: all look the same from outside.
                return reply(error_response(message["id"], INVALID_PARAMS, "unknown or expired requestState"))
            session, stream, task, after = waiting.session, waiting.stream, waiting.task, waiting.after
            responses = params.get("inputResponses") or {}
            for key, value in responses.items() if isinstance(responses, dict) else ():
                self.gateway.handle_response(session, {"jsonrpc": "2.0", "id": key, "result": value})
        return await self._relay(request, message, session, stream, task, after)

    async def _relay(
        self,
        request: web.Request,
        message: Message,
        session: Session,
        stream: EventStream,
        task: asyncio.Task[None],
        after: int,
    ) -> web.StreamResponse:
        """Carry the call's events to this POST: JSON when only the answer comes, SSE when more does."""
        response: web.StreamResponse | None = None
        keepalive = request.app[TRANSPORT].keepalive
        paused = False
        try:
            async for item in stream.read(after, request, keepalive):
                if item is None:
                    if response is not None:
                        await response.write(b": keep-alive\n\n")
                    continue
                after, data = item
                event = json.loads(data)
                if "method" in event and "id" in event:
                    token = self._park(request, session, stream, task, after, message["method"])
                    paused = bool(token)
                    if paused:
                        final = self._input_required(message, event, token)
                    elif response is None:
                        raise too_many()  # the finally cancels the call: no room to hold it
                    else:
                        final = error_response(
                            message["id"], INVALID_REQUEST, "too many sessions; retry later"
                        )
                elif "method" in event:
                    if response is None:
                        response = await open_sse(request)
                    await response.write(encode(data, event="message"))
                    continue
                else:
                    final = {**event, "id": message["id"]}
                if response is None:
                    return reply(final)
                await response.write(encode(dumps(final), event="message"))
                return response
            return reply(error_response(message["id"], INVALID_REQUEST, "the call ended without an answer"))
        finally:
            stream.release(request)
            if not paused and not task.done():
                task.cancel()  # the client closed the stream: that is the cancellation

    def _park(
        self,
        request: web.Request,
        session: Session,
        stream: EventStream,
        task: asyncio.Task[None],
        after: int,
        method: str,
    ) -> str:
        """Keep the call until the client retries with its input: its `requestState`, or "" when
        the store is full. It holds memory and a child's request with no connection open, so it
        is held (and counted) as a session from its first pause until it ends."""
        store = request.app[SESSIONS]
        if store.get(session.id) is None:
            if store.full():
                return ""
            store.add(session)
        token = secrets.token_urlsafe(32)
        self._waiting[token] = _Waiting(session, stream, task, method, after, time.monotonic() + STATE_TTL)
        session.on_close.append(functools.partial(self._drop, token))
        return token

    def _drop(self, token: str, session: Session) -> None:
        """The session ended (its key revoked, or shutdown) while the call waited: cancel it now."""
        if (waiting := self._waiting.pop(token, None)) is not None:
            waiting.task.cancel()

    def _input_required(self, message: Message, server_request: Message, token: str) -> Message:
        """A backend's request to the client, as the InputRequiredResult that answers the call."""
        request_entry = {"method": server_request["method"], "params": server_request.get("params") or {}}
        return {
            "jsonrpc": "2.0",
            "id": message["id"],
            "result": {
                "resultType": "input_required",
                "inputRequests": {str(server_request["id"]): request_entry},
                "requestState": token,
            },
        }

    async def _listen(self, request: web.Request, message: Message) -> web.StreamResponse:
        """`subscriptions/listen`: a long-lived stream of the change notifications the client asked for."""
        store = request.app[SESSIONS]
        if store.full():
            raise too_many()
        session = self._session(request, message)
        store.add(session)
        try:
            return await self._stream_changes(request, message, session)
        finally:
            session.close()
            # Also what was attached or subscribed after a revocation closed it mid-setup.
            self.gateway.backend.detach(session)

    async def _stream_changes(
        self, request: web.Request, message: Message, session: Session
    ) -> web.StreamResponse:
        backend = self.gateway.backend
        await backend.wait_ready(READY_WAIT)  # what can be agreed depends on what the backend offers
        wanted = (message.get("params") or {}).get("notifications") or {}
        agreed: dict[str, Any] = {}
        for field, (_, capability) in LISTEN_FILTERS.items():
            offered = backend.capabilities.get(capability)
            if wanted.get(field) and isinstance(offered, dict) and offered.get("listChanged"):
                agreed[field] = True
        uris = [u for u in wanted.get("resourceSubscriptions") or [] if isinstance(u, str)]
        if uris and (backend.capabilities.get("resources") or {}).get("subscribe"):
            agreed["resourceSubscriptions"] = uris
        methods = {LISTEN_FILTERS[f][0] for f in agreed if f in LISTEN_FILTERS}
        backend.attach(session)
        subscribed: set[str] = set()
        for uri in agreed.get("resourceSubscriptions", []):
            sub = {
                "jsonrpc": "2.0",
                "id": f"listen-{uri}",
                "method": "resources/subscribe",
                "params": {"uri": uri},
            }
            if "result" in await backend.subscribe(session, sub):
                subscribed.add(uri)
        tag = {SUBSCRIPTION_META: message["id"]}
        response = await open_sse(request)
        try:
            ack = {
                "jsonrpc": "2.0",
                "method": "notifications/subscriptions/acknowledged",
                "params": {"notifications": agreed, "_meta": tag},
            }
            await response.write(encode(dumps(ack), event="message"))
            async for item in session.standalone.read(0, response, request.app[TRANSPORT].keepalive):
                if item is None:
                    await response.write(b": keep-alive\n\n")
                    continue
                event = json.loads(item[1])
                method = event.get("method")
                uri = (event.get("params") or {}).get("uri")
                if method in methods or (method == "notifications/resources/updated" and uri in subscribed):
                    params = {**(event.get("params") or {}), "_meta": tag}
                    await response.write(encode(dumps({**event, "params": params}), event="message"))
        except (ConnectionError, RuntimeError):
            pass
        return response
