"""The floor for any aiohttp gateway: a bare relay to the bench's child, with nothing else.

Not a gateway: no authentication, no checks, no sessions, no audit, and every line the child
writes goes to every open stream. It answers the serial SDK measurement only, so that
`python -m bench --candidate bench/floor --only serial` shows, in the same run, how fast the
SDK client can go through aiohttp at all; a target above it cannot be met by an aiohttp gateway.
"""

import asyncio
import json
import sys

import uvloop
from aiohttp import web

CHILD = [sys.executable, "-m", "mcp_server_time", "--local-timezone", "UTC"]
ACCEPTED = {"status": 202, "text": "Accepted"}


async def main() -> None:
    port = int(sys.argv[sys.argv.index("--port") + 1])
    child = await asyncio.create_subprocess_exec(
        *CHILD, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=2**20
    )
    assert child.stdin is not None and child.stdout is not None
    stdin, stdout = child.stdin, child.stdout
    streams: dict[int, asyncio.Queue[bytes]] = {}
    waiting: dict[object, asyncio.Future[bytes]] = {}

    async def read_child() -> None:
        while line := await stdout.readline():
            if (future := waiting.pop(json.loads(line).get("id"), None)) is not None:
                future.set_result(line)
            for queue in streams.values():
                queue.put_nowait(line)

    async def sse(request: web.Request) -> web.StreamResponse:
        queue = streams[id(request)] = asyncio.Queue()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"event: endpoint\ndata: /messages\n\n")
        try:
            while True:
                await response.write(b"event: message\ndata: " + (await queue.get()).rstrip() + b"\n\n")
        finally:
            streams.pop(id(request), None)

    async def messages(request: web.Request) -> web.Response:
        stdin.write(await request.read() + b"\n")
        return web.Response(**ACCEPTED)

    async def mcp(request: web.Request) -> web.Response:
        body = await request.read()
        message = json.loads(body)
        if "id" not in message:
            stdin.write(body + b"\n")
            return web.Response(**ACCEPTED)
        future = waiting[message["id"]] = asyncio.get_running_loop().create_future()
        stdin.write(body + b"\n")
        reply = await future
        return web.Response(body=reply, content_type="application/json", headers={"Mcp-Session-Id": "floor"})

    app = web.Application()
    app.router.add_get("/sse", sse)
    app.router.add_post("/messages", messages)
    app.router.add_post("/mcp", mcp)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await read_child()


uvloop.run(main())
