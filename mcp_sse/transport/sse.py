"""Server-sent events on aiohttp: headers, encoding, and the loop that drains an EventStream."""

from __future__ import annotations

import logging
from typing import Final

from aiohttp import web

from ..protocol.session import EventStream, StreamOverrun

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


async def pump(
    response: web.StreamResponse,
    stream: EventStream,
    after: int,
    *,
    keepalive: float,
    with_ids: bool,
) -> bool:
    """Write the stream's events until it finishes; False when the client went away or fell behind."""
    try:
        async for item in stream.read(after, response, keepalive):
            if item is None:
                await response.write(b": keep-alive\n\n")
                continue
            seq, data = item
            event_id = stream.event_id(seq) if with_ids else None
            await response.write(encode(data, event="message", event_id=event_id))
    except StreamOverrun as exc:
        log.warning("closing a stream whose reader fell behind: %s", exc)
        return False
    except (ConnectionError, RuntimeError):
        # The peer closed the connection (aiohttp raises ClientConnectionResetError, a
        # ConnectionError, or RuntimeError once the transport is gone). Events not yet
        # written stay in the buffer for a Last-Event-ID resume.
        return False
    finally:
        stream.release(response)
    return True
