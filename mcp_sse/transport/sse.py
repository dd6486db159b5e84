"""Server-sent events on aiohttp: headers, encoding, and the loop that drains an EventStream."""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from aiohttp import web

from ..protocol.session import EventStream, StreamOverrun
from ..state import TRANSPORT

__all__ = ["SSE_HEADERS", "encode", "open_sse", "pump"]

log = logging.getLogger("mcp_sse.transport")


SSE_HEADERS: Final = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache, no-transform",
    # nginx and friends buffer responses by default, which holds SSE events back.
    "X-Accel-Buffering": "no",
}


def encode(data: str, *, event: str | None = None, event_id: str | None = None) -> bytes:
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    if event is not None:
        lines.append(f"event: {event}")
    lines.extend(f"data: {line}" for line in data.split("\n"))
    return ("\n".join(lines) + "\n\n").encode()


async def open_sse(request: web.Request, headers: dict[str, str] | None = None) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers={**SSE_HEADERS, **(headers or {})})
    await response.prepare(request)
    return response


def _stalled(transport: asyncio.Transport) -> None:
    log.warning("closing a stream whose reader stopped reading")
    transport.abort()  # the blocked write fails with ConnectionResetError, which ends the pump


async def pump(
    request: web.Request,
    response: web.StreamResponse,
    stream: EventStream,
    after: int,
    *,
    with_ids: bool,
) -> bool:
    """Write the stream's events until it finishes; False when the client went away or fell behind."""
    settings = request.app[TRANSPORT]
    transport = request.transport
    loop = asyncio.get_running_loop()
    try:
        if transport is None:
            return False  # the connection is already gone
        async for item in stream.read(after, response, settings.keepalive):
            if item is None:
                chunk = b": keep-alive\n\n"
            else:
                seq, data = item
                chunk = encode(data, event="message", event_id=stream.event_id(seq) if with_ids else None)
            # A peer that keeps its TCP window shut must not hold the stream (and its memory,
            # socket and per-key slot) forever: a write that cannot finish in time ends it.
            # A bare timer rather than asyncio.timeout: this runs for every event.
            watchdog = loop.call_later(settings.write_timeout, _stalled, transport)
            try:
                await response.write(chunk)
            finally:
                watchdog.cancel()
    except StreamOverrun as exc:
        log.warning("closing a stream whose reader fell behind: %s", exc)
        return False
    except (ConnectionError, RuntimeError):
        # The peer closed the connection (aiohttp raises ClientConnectionResetError, a
        # ConnectionError, or RuntimeError once the transport is gone), or it stopped reading
        # and the watchdog aborted it. Events not yet written stay in the buffer for a
        # Last-Event-ID resume.
        return False
    finally:
        stream.release(response)
    return True
