"""Streamable HTTP (MCP 2025-03-26 to 2025-11-25): one endpoint for POST, GET and DELETE.

A request is answered as plain JSON when nothing else needs to flow before its answer,
and is upgraded to an SSE stream the moment the backend sends something related to
it (progress, a sampling or elicitation request). Every SSE event carries an id
`<stream>-<seq>`, so a client can resume any stream with `Last-Event-ID`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Final

from aiohttp import web

from ..cluster.hooks import claim
from ..gateway import Gateway
from ..protocol.jsonrpc import (
    INVALID_REQUEST,
    Message,
    ProtocolError,
    dumps,
    id_key,
    is_notification,
    is_request,
    validate_message,
)
from ..protocol.session import Session
from ..protocol.versions import supports_batches, supports_priming
from ..state import IDENTITY, SESSIONS
from .common import (
    answer_safely,
    find_session,
    http_error,
    jsonrpc_reply,
    protocol_error,
    read_message,
    spawn,
)
from .modern import ModernHTTP, is_modern
from .sse import encode, open_sse, pump

__all__ = ["SESSION_HEADER", "VERSION_HEADER", "StreamableHTTP"]

log = logging.getLogger("mcp_sse.transport")

SESSION_HEADER: Final = "Mcp-Session-Id"
VERSION_HEADER: Final = "MCP-Protocol-Version"


@functools.lru_cache(maxsize=256)
def _media_types(accept: str) -> frozenset[str]:
    # Cached: a client sends the same Accept on every request.
    return frozenset(part.split(";")[0].strip().lower() for part in accept.split(","))


def _accepts(request: web.Request, *types: str) -> bool:
    offered = _media_types(request.headers.get("Accept", ""))
    return "*/*" in offered or all(t in offered for t in types)


class StreamableHTTP:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.modern = ModernHTTP(gateway)

    def _check_version(self, request: web.Request, session: Session) -> None:
        version = request.headers.get(VERSION_HEADER)
        # Absent means 2025-03-26, which every session accepts; a 2026 version never gets here.
        if version is not None and session.protocol_version and version != session.protocol_version:
            raise http_error(
                web.HTTPBadRequest,
                f"{VERSION_HEADER} {version[:40]} does not match this session's {session.protocol_version}",
            )

    async def post(self, request: web.Request) -> web.StreamResponse:
        if not _accepts(request, "application/json", "text/event-stream"):
            raise http_error(
                web.HTTPNotAcceptable, "Accept must include application/json and text/event-stream"
            )
        if request.content_type != "application/json":
            raise http_error(web.HTTPUnsupportedMediaType, "Content-Type must be application/json")
        session_id = request.headers.get(SESSION_HEADER)
        try:
            body = await read_message(request)
        except ProtocolError as exc:
            return protocol_error(exc)
        if is_modern(request):
            return await self.modern.post(request, body)
        if isinstance(body, dict) and body.get("method") == "initialize":
            return await self._initialize(request, body)
        session = find_session(request, session_id, "streamable", self.gateway)
        self._check_version(request, session)
        try:
            if isinstance(body, list):
                if not body or not supports_batches(session.protocol_version):
                    raise ProtocolError(INVALID_REQUEST, "Invalid Request: batches need protocol 2025-03-26")
                return await self._batch(session, [validate_message(m) for m in body])
            message = validate_message(body)
        except ProtocolError as exc:
            return protocol_error(exc)
        if not is_request(message):
            if is_notification(message):
                self.gateway.handle_notification(session, message)
            else:
                self.gateway.handle_response(session, message)
            return web.Response(status=202)
        return await self._answer(request, session, message)

    async def _initialize(self, request: web.Request, body: Message) -> web.Response:
        try:
            message = validate_message(body)
        except ProtocolError as exc:
            return protocol_error(exc)
        if not is_request(message):
            return protocol_error(ProtocolError(INVALID_REQUEST, "Invalid Request: initialize needs an id"))
        store = request.app[SESSIONS]
        if store.full():
            raise http_error(
                web.HTTPServiceUnavailable, "too many sessions; retry later", **{"Retry-After": "5"}
            )
        session = store.create("streamable", self.gateway, request.get(IDENTITY), request.headers)
        reply = await self.gateway.handle_request(session, message)
        if "error" in reply:
            session.close()
            return jsonrpc_reply(reply)
        await claim(request, session)  # with REDIS_URL: owned here, before the id leaves
        return jsonrpc_reply(reply, headers={SESSION_HEADER: session.id})

    async def _batch(self, session: Session, messages: list[Message]) -> web.Response:
        if any(m.get("method") == "initialize" for m in messages):
            return protocol_error(
                ProtocolError(INVALID_REQUEST, "Invalid Request: initialize cannot be batched")
            )
        replies = []
        for message in messages:
            if is_request(message):
                replies.append(self.gateway.handle_request(session, message))
            elif is_notification(message):
                self.gateway.handle_notification(session, message)
            else:
                self.gateway.handle_response(session, message)
        if not replies:
            return web.Response(status=202)
        return web.Response(text=dumps(list(await asyncio.gather(*replies))), content_type="application/json")

    async def _answer(self, request: web.Request, session: Session, message: Message) -> web.StreamResponse:
        request_id = message["id"]
        if id_key(request_id) in session.request_streams:
            # Two answers for one id could not be told apart by the client: refuse the second.
            return protocol_error(
                ProtocolError(INVALID_REQUEST, "Invalid Request: that id is already in flight")
            )
        stream = session.open_request_stream(request_id)

        async def run() -> None:
            try:
                stream.push(await answer_safely(self.gateway, session, message))
            finally:
                session.end_request_stream(request_id)

        spawn(request.app, run())
        await stream.wait_first()
        if (only := stream.sole_event()) is not None:
            session.forget_stream(stream.number)
            return web.Response(text=only, content_type="application/json")
        response = await open_sse(request)
        try:
            if supports_priming(session.protocol_version):
                await response.write(encode("", event_id=stream.event_id(0)))
            await pump(request, response, stream, 0, with_ids=True)
        except (ConnectionError, RuntimeError):
            pass  # the answer stays buffered for a Last-Event-ID resume
        return response

    async def get(self, request: web.Request) -> web.StreamResponse:
        if not _accepts(request, "text/event-stream"):
            raise http_error(web.HTTPNotAcceptable, "Accept must include text/event-stream")
        session = self._legacy_session(request)
        stream, after = session.standalone, session.standalone.resume_point()
        last = request.headers.get("Last-Event-ID")
        if last is not None and (resolved := session.resolve_event_id(last)) is not None:
            stream, after = resolved
        response = await open_sse(request)
        try:
            if supports_priming(session.protocol_version):
                await response.write(encode("", event_id=stream.event_id(after)))
            await pump(request, response, stream, after, with_ids=True)
        except (ConnectionError, RuntimeError):
            pass
        return response

    def _legacy_session(self, request: web.Request) -> Session:
        """GET and DELETE exist only for handshake-era sessions; without one they are not allowed."""
        if is_modern(request) or SESSION_HEADER not in request.headers:
            raise web.HTTPMethodNotAllowed(request.method, ["POST"])
        session = find_session(request, request.headers.get(SESSION_HEADER), "streamable", self.gateway)
        self._check_version(request, session)
        return session

    async def delete(self, request: web.Request) -> web.Response:
        session = self._legacy_session(request)
        session.close()
        return web.Response(status=204)
