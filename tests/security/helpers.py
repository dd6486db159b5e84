"""A tiny app for the security layers' tests: a JSON route and an SSE route, behind the layers under test.

The SSE route prepares a StreamResponse and writes one event, so a header that reaches it
can only have come from `on_response_prepare`, as it must for the real event streams.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from aiohttp import ClientResponse, web
from aiohttp.typedefs import Middleware

from mcp_sse.state import CLIENT_IP, REQUEST_ID, SECURE


async def json_route(request: web.Request) -> web.Response:
    ip = request.get(CLIENT_IP)
    return web.json_response(
        {
            "ip": None if ip is None else str(ip),
            "secure": request.get(SECURE),
            "request_id": request.get(REQUEST_ID),
        }
    )


async def sse_route(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    await response.write(b'event: message\ndata: {"hello": "world"}\n\n')
    await response.write_eof()
    return response


async def refuse_route(request: web.Request) -> web.StreamResponse:
    raise web.HTTPConflict(text="raised past every middleware")


def make_app(
    middlewares: Iterable[Middleware] = (),
    *,
    setup: Callable[[web.Application], None] | None = None,
) -> web.Application:
    app = web.Application(middlewares=list(middlewares))
    app.router.add_get("/json", json_route)
    app.router.add_post("/json", json_route)
    app.router.add_get("/sse", sse_route)
    app.router.add_delete("/json", json_route)
    app.router.add_get("/refuse", refuse_route)
    if setup is not None:
        setup(app)
    return app


async def read_event(response: ClientResponse) -> str:
    """The data line of the first event on an SSE response: proves the stream really flowed."""
    assert response.headers["Content-Type"].startswith("text/event-stream")
    body = (await response.read()).decode()
    data = [line[6:] for line in body.splitlines() if line.startswith("data: ")]
    assert data, body
    return data[0]


def audit_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of an audit file as JSON; fails on any line that is not one JSON object."""
    lines = path.read_text().splitlines()
    parsed = [json.loads(line) for line in lines]
    assert all(isinstance(p, dict) for p in parsed)
    return parsed
