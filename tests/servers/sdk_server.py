"""A test MCP server written on the official SDK's server API, run as a real stdio child.

Its tools exercise what a gateway must route: progress, sampling (a server-to-client
request), log messages, list_changed, resources, prompts, slow calls and crashes.
"""

from __future__ import annotations

import asyncio
import os
import sys

from mcp.server.mcpserver import Context, MCPServer
from mcp.types import SamplingMessage, TextContent

server = MCPServer("sdk-test-server", instructions="A test server for mcp-sse.")


@server.tool()
def echo(text: str) -> str:
    """Echo the text back."""
    return text


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def pid() -> int:
    """The child's process id."""
    return os.getpid()


@server.tool()
async def slow(steps: int, ctx: Context, delay: float = 0.05) -> str:
    """Report progress `steps` times, then answer."""
    for step in range(1, steps + 1):
        await asyncio.sleep(delay)
        await ctx.report_progress(step, steps, f"step {step}")
    return f"done {steps}"


@server.tool()
async def sleep(seconds: float) -> str:
    """Sleep, to hold a request in flight."""
    await asyncio.sleep(seconds)
    return "slept"


@server.tool()
async def ask_llm(question: str, ctx: Context) -> str:
    """Ask the client's model (sampling/createMessage) and return its answer."""
    result = await ctx.session.create_message(
        [SamplingMessage(role="user", content=TextContent(type="text", text=question))], max_tokens=50
    )
    content = result.content
    return content.text if isinstance(content, TextContent) else str(content)


@server.tool()
async def ask_and_record(question: str, path: str, ctx: Context) -> str:
    """Ask the client's model; if the call is cancelled while it waits, write "cancelled" to `path`."""
    try:
        result = await ctx.session.create_message(
            [SamplingMessage(role="user", content=TextContent(type="text", text=question))], max_tokens=50
        )
    except asyncio.CancelledError:
        with open(path, "w") as file:
            file.write("cancelled")
        raise
    content = result.content
    return content.text if isinstance(content, TextContent) else str(content)


@server.tool()
async def log_and_answer(text: str, ctx: Context) -> str:
    """Send a log message to the client, then answer."""
    await ctx.info(f"log: {text}")
    return text


@server.tool()
def env(name: str) -> str:
    """The value of an environment variable in this child ("" when unset)."""
    return os.environ.get(name, "")


@server.tool()
async def record_cancel(seconds: float, path: str) -> str:
    """Write "started" to `path`, sleep; if the call is cancelled meanwhile, write "cancelled" there."""
    with open(path, "w") as file:
        file.write("started")  # the test waits for this, not for a time, before it gives up
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        with open(path, "w") as file:
            file.write("cancelled")
        raise
    return "finished"


@server.tool()
def crash() -> str:
    """Exit the whole server process at once, mid-call."""
    os._exit(3)


@server.tool()
def big(size: int) -> str:
    """Answer with `size` characters."""
    return "x" * size


@server.resource("test://greeting")
def greeting() -> str:
    """A fixed resource."""
    return "hello from a resource"


@server.prompt()
def summarize(topic: str) -> str:
    """A prompt template."""
    return f"Summarize {topic}."


def serve_http(argv: list[str]) -> None:
    """Serve over HTTP as a remote server: `--http [--sse] [--stateless] [--port N]` on 127.0.0.1.
    Binds first, then says `listening on <url>` on stderr, as the gateway does, so a test knows the port."""
    import socket

    import uvicorn

    port = int(argv[argv.index("--port") + 1]) if "--port" in argv else 0
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)  # connections wait in the backlog until uvicorn accepts them
    if "--sse" in argv:
        app, path = server.sse_app(host="127.0.0.1"), "/sse"
    else:
        app, path = server.streamable_http_app(host="127.0.0.1", stateless_http="--stateless" in argv), "/mcp"
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    print(f"listening on http://127.0.0.1:{sock.getsockname()[1]}{path}", file=sys.stderr, flush=True)
    asyncio.run(uvicorn.Server(config).serve(sockets=[sock]))


if __name__ == "__main__":
    if "--http" in sys.argv:
        serve_http(sys.argv)
        sys.exit(0)
    if "--garbage-first" in sys.argv:
        print("this is not json", flush=True)
    server.run("stdio")
