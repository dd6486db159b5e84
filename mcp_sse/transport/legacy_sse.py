"""The HTTP+SSE transport of MCP 2024-11-05: `GET /sse` opens the stream, POSTs go to `/messages`."""

from __future__ import annotations

import logging

from aiohttp import web

from ..cluster.hooks import claim
from ..gateway import Gateway
from ..protocol.jsonrpc import (
    INVALID_REQUEST,
    Message,
    ProtocolError,
    is_request,
    is_response,
    validate_message,
)
from ..protocol.session import Session
from ..protocol.versions import supports_batches
from ..state import IDENTITY, SESSIONS
from .common import (
    answer_safely,
    find_session,
    http_error,
    protocol_error,
    read_message,
    spawn,
)
from .sse import encode, open_sse, pump

__all__ = ["LegacySSE"]

log = logging.getLogger("mcp_sse.transport")


class LegacySSE:
    def __init__(self, gateway: Gateway, messages_path: str) -> None:
        self.gateway = gateway
        self.messages_path = messages_path

    async def stream(self, request: web.Request) -> web.StreamResponse:
        store = request.app[SESSIONS]
        if store.full():
            raise http_error(
                web.HTTPServiceUnavailable, "too many sessions; retry later", **{"Retry-After": "5"}
            )
        session = store.create("sse", self.gateway, request.get(IDENTITY), request.headers)
        try:
            await claim(request, session)  # with REDIS_URL: owned here, before the id leaves
            response = await open_sse(request)
            endpoint = f"{self.messages_path}?session_id={session.id}"
            await response.write(encode(endpoint, event="endpoint"))
            await pump(request, response, session.standalone, 0, with_ids=False)
        except (ConnectionError, RuntimeError):
            pass  # the client left before the endpoint event was written
        finally:
            session.close()
        return response

    async def post(self, request: web.Request) -> web.StreamResponse:
        session_id = request.query.get("session_id") or request.query.get("sessionId")
        session = find_session(request, session_id, "sse", self.gateway)
        try:
            body = await read_message(request)
            messages = body if isinstance(body, list) else [body]
            if isinstance(body, list) and (not body or not supports_batches(session.protocol_version)):
                raise ProtocolError(INVALID_REQUEST, "Invalid Request: batches need protocol 2025-03-26")
            valid = [validate_message(m) for m in messages]
        except ProtocolError as exc:
            # A bad POST is answered here and never touches the session or its stream.
            return protocol_error(exc)
        for message in valid:
            spawn(request.app, self._handle(session, message))
        return web.Response(status=202, text="Accepted")

    async def _handle(self, session: Session, message: Message) -> None:
        if is_request(message):
            session.send(await answer_safely(self.gateway, session, message))
        elif is_response(message):
            self.gateway.handle_response(session, message)
        else:
            self.gateway.handle_notification(session, message)
