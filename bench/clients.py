"""The clients: the official MCP SDK client, and a raw JSON-RPC generator with no SDK in the way.

Raw clients speak exactly what a gateway must carry: for legacy SSE a GET stream and POSTs
whose replies come back on the stream, for Streamable HTTP one POST per call, and for the
floor a JSON line to the child's stdin and the reply line from its stdout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from itertools import count
from typing import Any, Final, Protocol, TextIO
from urllib.parse import urljoin

import aiohttp
import httpx2
from mcp import Client
from mcp.client.sse import sse_client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

from .procs import CHILD

CALL_TIMEOUT: Final = 30.0
PROTOCOL: Final = "2025-06-18"
INIT_PARAMS: Final = {
    "protocolVersion": PROTOCOL,
    "capabilities": {},
    "clientInfo": {"name": "mcp-sse-bench", "version": "1"},
}
TOOL: Final = "get_current_time"
ARGUMENTS: Final[dict[str, Any]] = {"timezone": "UTC"}
TIME_CALL: Final[dict[str, Any]] = {"name": TOOL, "arguments": ARGUMENTS}

Message = dict[str, Any]


# -- the official SDK client ---------------------------------------------------------------


@asynccontextmanager
async def sdk_client(
    transport: str, url: str = "", headers: dict[str, str] | None = None
) -> AsyncIterator[Client]:
    """An initialized SDK client over "sse", "mcp" (Streamable HTTP) or "stdio" (the child directly)."""
    options: dict[str, Any] = {"mode": "legacy", "cache": None, "read_timeout_seconds": CALL_TIMEOUT}
    if transport == "stdio":
        with _devnull() as devnull:
            params = StdioServerParameters(command=CHILD[0], args=CHILD[1:])
            async with Client(stdio_client(params, errlog=devnull), **options) as client:
                yield client
        return
    if transport == "sse":
        async with Client(sse_client(url, headers=headers), **options) as client:
            yield client
        return
    timeout = httpx2.Timeout(CALL_TIMEOUT, read=300)
    async with (
        httpx2.AsyncClient(headers=headers, timeout=timeout) as http,
        Client(streamable_http_client(url, http_client=http), **options) as client,
    ):
        yield client


def _devnull() -> TextIO:
    return open(os.devnull, "w")  # the child's stderr: it logs nothing we measure


class ForeignReplies(logging.Handler):
    """Counts replies the SDK dropped because no request of that client had their id."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("dropping response for unknown"):
            self.count += 1


@contextlib.contextmanager
def counting_foreign_replies() -> Any:
    logger = logging.getLogger("mcp.shared.jsonrpc_dispatcher")
    handler, level, propagate = ForeignReplies(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


# -- raw JSON-RPC ---------------------------------------------------------------------------


class RawClient(Protocol):
    foreign: int

    async def call(self, method: str, params: Message) -> Message: ...

    async def close(self) -> None: ...


async def sse_events(content: aiohttp.StreamReader) -> AsyncIterator[tuple[str, str]]:
    """(event, data) for each server-sent event; comments and ids are skipped."""
    event, data = "message", list[str]()
    async for raw in content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", list[str]()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif line.startswith("event:"):
            event = line[6:].strip()


class RawSSE:
    """Legacy SSE: replies arrive on the GET stream and are matched to their request by id."""

    def __init__(self, http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> None:
        self.http, self.url, self.headers = http, url, headers
        self.ids = count(1)
        self.pending: dict[int, asyncio.Future[Message]] = {}
        self.foreign = 0
        self.post_url = ""
        self._reader: asyncio.Task[None] | None = None
        self._stream: aiohttp.ClientResponse | None = None

    async def open(self) -> RawSSE:
        self._stream = await self.http.get(self.url, headers={**self.headers, "Accept": "text/event-stream"})
        self._stream.raise_for_status()
        events = sse_events(self._stream.content)
        async with asyncio.timeout(CALL_TIMEOUT):
            async for event, data in events:
                if event == "endpoint":
                    self.post_url = urljoin(self.url, data)
                    break
        if not self.post_url:
            raise ConnectionError("the SSE stream ended before its endpoint event")
        self._reader = asyncio.create_task(self._read(events))
        await self.call("initialize", INIT_PARAMS)
        await self._post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        await self.call("tools/list", {})
        return self

    async def _read(self, events: AsyncIterator[tuple[str, str]]) -> None:
        async for _, data in events:
            message = json.loads(data)
            if "method" in message:
                continue  # notifications and server requests: nothing a tool call waits for
            future = self.pending.pop(message.get("id"), None)
            if future is None:
                self.foreign += 1
            elif not future.done():
                future.set_result(message)
        for future in self.pending.values():
            if not future.done():
                future.set_exception(ConnectionError("the SSE stream ended"))

    async def _post(self, message: Message) -> None:
        async with self.http.post(self.post_url, json=message, headers=self.headers) as response:
            await response.read()
            response.raise_for_status()

    async def call(self, method: str, params: Message) -> Message:
        request_id = next(self.ids)
        future = self.pending[request_id] = asyncio.get_running_loop().create_future()
        try:
            await self._post({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
            return await asyncio.wait_for(future, CALL_TIMEOUT)
        finally:
            self.pending.pop(request_id, None)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._stream is not None:
            self._stream.close()


class RawStreamable:
    """Streamable HTTP: one POST per call, answered as JSON or as an SSE stream."""

    def __init__(self, http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> None:
        self.http, self.url = http, url
        self.headers = {**headers, "Accept": "application/json, text/event-stream"}
        self.ids = count(1)
        self.foreign = 0

    async def open(self) -> RawStreamable:
        message = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": INIT_PARAMS}
        async with self.http.post(self.url, json=message, headers=self.headers) as response:
            response.raise_for_status()
            session = response.headers.get("Mcp-Session-Id")
            reply = await self._reply(response, 0)
        if session:
            self.headers["Mcp-Session-Id"] = session
        self.headers["MCP-Protocol-Version"] = reply["result"]["protocolVersion"]
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        async with self.http.post(self.url, json=note, headers=self.headers) as response:
            response.raise_for_status()
        await self.call("tools/list", {})
        return self

    async def _reply(self, response: aiohttp.ClientResponse, request_id: int) -> Message:
        if response.content_type == "application/json":
            message: Message = await response.json()
            return message
        async for _, data in sse_events(response.content):
            message = json.loads(data)
            if "method" in message:
                continue
            if message.get("id") == request_id:
                return message
            self.foreign += 1
        raise ConnectionError(f"no reply to {request_id}")

    async def call(self, method: str, params: Message) -> Message:
        request_id = next(self.ids)
        message = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
        async with (
            asyncio.timeout(CALL_TIMEOUT),
            self.http.post(self.url, json=message, headers=self.headers) as response,
        ):
            response.raise_for_status()
            return await self._reply(response, request_id)

    async def close(self) -> None:
        if "Mcp-Session-Id" in self.headers:
            with contextlib.suppress(aiohttp.ClientError):
                async with self.http.delete(self.url, headers=self.headers):
                    pass


class RawStdio:
    """The floor: the child itself, a JSON-RPC line in and a line out."""

    def __init__(self) -> None:
        self.ids = count(1)
        self.foreign = 0
        self.process: asyncio.subprocess.Process | None = None

    async def open(self) -> RawStdio:
        self.process = await asyncio.create_subprocess_exec(
            *CHILD,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        await self.call("initialize", INIT_PARAMS)
        self._write({"jsonrpc": "2.0", "method": "notifications/initialized"})
        await self.call("tools/list", {})
        return self

    def _write(self, message: Message) -> None:
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(json.dumps(message).encode() + b"\n")

    async def call(self, method: str, params: Message) -> Message:
        assert self.process is not None and self.process.stdout is not None
        request_id = next(self.ids)
        self._write({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
        async with asyncio.timeout(CALL_TIMEOUT):
            while True:
                line = await self.process.stdout.readline()
                if not line:
                    raise ConnectionError("the child closed stdout")
                message: Message = json.loads(line)
                if message.get("id") == request_id and "method" not in message:
                    return message

    async def close(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        assert process.stdin is not None
        process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), 5)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()


async def raw_client(
    http: aiohttp.ClientSession, transport: str, url: str, headers: dict[str, str]
) -> RawClient:
    if transport == "stdio":
        return await RawStdio().open()
    if transport == "sse":
        return await RawSSE(http, url, headers).open()
    return await RawStreamable(http, url, headers).open()


async def timed_calls(
    client: RawClient, calls: int, *, seconds: float = 0.0, budget: float = 120.0
) -> list[float]:
    """Latency in seconds of serial tools/call requests: `calls` of them, or more to fill `seconds`;
    never longer than `budget` seconds (a gateway that slows to a crawl gets fewer samples)."""
    samples: list[float] = []
    begun = time.perf_counter()
    while len(samples) < calls or time.perf_counter() - begun < seconds:
        if samples and time.perf_counter() - begun > budget:
            break
        started = time.perf_counter()
        reply = await client.call("tools/call", TIME_CALL)
        samples.append(time.perf_counter() - started)
        if "result" not in reply or reply["result"].get("isError"):
            raise RuntimeError(f"tool call failed: {json.dumps(reply)[:300]}")
    return samples


def http_session() -> aiohttp.ClientSession:
    """Unlimited connections, no overall timeout: streams are held open on purpose."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=30),
    )
