"""What both MCP transports share: state keys, body reading, session lookup, error replies."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Coroutine
from typing import Any, Literal

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from ..cluster.hooks import FORWARDED_BODY
from ..gateway import Gateway
from ..protocol.jsonrpc import INTERNAL_ERROR, Message, ProtocolError, dumps, error_response, parse_body
from ..protocol.session import Session, valid_session_id
from ..state import IDENTITY, SESSIONS, TASKS, TRANSPORT

__all__ = [
    "answer_safely",
    "find_session",
    "http_error",
    "jsonrpc_reply",
    "protocol_error",
    "read_message",
    "spawn",
]


log = logging.getLogger("mcp_sse.transport")


def http_error(status: type[web.HTTPException], message: str, **headers: str) -> web.HTTPException:
    """An HTTP error with a small JSON body that says what to do."""
    return status(
        text=json.dumps({"error": message}),
        content_type="application/json",
        headers=headers or None,
    )


def jsonrpc_reply(message: Message, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=dumps(message), status=status, content_type="application/json", headers=headers)


async def read_message(request: web.Request) -> Any:
    """Read and decode the body within the size and time limits; ProtocolError for bad JSON."""
    if (forwarded := request.get(FORWARDED_BODY)) is not None:
        return parse_body(forwarded)  # read already, to check the hop's signature (cluster/)
    settings = request.app[TRANSPORT]
    limit = settings.max_body
    if request.content_length is None or request.content_length <= limit:
        try:
            if request.content.is_eof():
                # All of it arrived with the headers (the usual case): take what is buffered, with
                # the size check request.read() would make, without its read loop.
                body = request.content.read_nowait()
                if len(body) > limit:
                    raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(body))
            else:
                async with asyncio.timeout(settings.body_timeout):
                    body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            pass  # a chunked body that grew past the limit
        except TimeoutError:
            slow = http_error(web.HTTPRequestTimeout, "request body too slow")
            slow.force_close()  # else aiohttp lingers, reading the rest of a body that never comes
            raise slow from None
        except RequestPayloadError:  # a body that does not decode under its Content-Encoding
            # aiohttp's parser stopped at the bad bytes: the rest of this body, and anything sent
            # after it on the connection, will never be parsed. Left as it is, aiohttp "lingers"
            # after our answer to drain the body, re-raises this error from there and logs it as
            # an unhandled exception, then drops a connection the client was told to keep alive
            # (its next request on it fails). So: mark the body finished, and close the connection.
            request.content.feed_eof()
            bad = http_error(web.HTTPBadRequest, "request body cannot be decoded")
            bad.force_close()
            raise bad from None
        else:
            return parse_body(body)
    raise web.HTTPRequestEntityTooLarge(
        max_size=limit,
        actual_size=request.content_length or limit + 1,
        text=json.dumps({"error": f"body over {limit} bytes"}),
        content_type="application/json",
    )


def protocol_error(exc: ProtocolError, status: int = 400) -> web.Response:
    return jsonrpc_reply(exc.to_message(), status)


def find_session(
    request: web.Request, session_id: str | None, kind: Literal["sse", "streamable"], gateway: Gateway
) -> Session:
    """The live session this request names, or the HTTP error the transport spec asks for."""
    if session_id is None:
        raise http_error(web.HTTPBadRequest, "missing session id")
    if not valid_session_id(session_id):
        raise http_error(web.HTTPBadRequest, "malformed session id")
    session = request.app[SESSIONS].get(session_id)
    # A session of another route, transport or identity is as unknown as one that never existed:
    # answering differently would let a caller probe for other people's session ids.
    if (
        session is None
        or session.closed
        or session.kind != kind
        or session.gateway is not gateway
        or session.identity != request.get(IDENTITY)
    ):
        raise http_error(web.HTTPNotFound, "unknown or ended session; initialize a new one")
    return session


async def answer_safely(gateway: Gateway, session: Session, message: Message) -> Message:
    """The gateway's answer, or a JSON-RPC error: a request that was accepted is always answered."""
    try:
        return await gateway.handle_request(session, message)
    except Exception:
        log.exception("unhandled error answering %s", str(message.get("method"))[:64])
        return error_response(message["id"], INTERNAL_ERROR, "internal error; the request was not completed")


def spawn(app: web.Application, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    """Run work that outlives its request, tracked so shutdown (and a reload's drain) can wait for it."""
    task = asyncio.create_task(coroutine)
    app[TASKS].add(task)
    task.add_done_callback(app[TASKS].discard)
    return task
