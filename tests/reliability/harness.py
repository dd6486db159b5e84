"""What the reliability tests share: raw clients for both transports, resource gauges, a real gateway process.

Raw clients rather than the SDK: these tests misbehave on purpose (drop connections, stall
reads, resume streams) and count every request and answer, which the SDK hides.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.fernet import Fernet

from tests.conftest import Launched, launch, next_event, next_message_with_id
from tests.conftest import init_message as raw_init_message

HERE = Path(__file__).parent
FAULT_SERVER = str(HERE / "fault_server.py")
ACCEPT_BOTH = "application/json, text/event-stream"
STREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=10, sock_read=None)
"""A stream lives as long as its session: not aiohttp's default 5-minute total."""


def fault_server(*, record: Path | None = None, timeout: float | None = None) -> dict[str, Any]:
    """A servers-file entry for the misbehaving child (see fault_server.py)."""
    entry: dict[str, Any] = {"command": sys.executable, "args": [FAULT_SERVER]}
    if record is not None:
        entry["args"] += ["--record", str(record)]
    if timeout is not None:
        entry["timeout"] = timeout
    return entry


def call(request_id: str | int, tool: str, **arguments: Any) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "tools/call",
        "params": {"name": tool, "arguments": arguments},
    }


def init_message(version: str, request_id: str | int = "init") -> dict[str, Any]:
    return raw_init_message(version, request_id, capabilities={"sampling": {}})


def text_result(message: dict[str, Any]) -> str:
    return str(message["result"]["content"][0]["text"])


# -- gauges ----------------------------------------------------------------------------------------


def rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def fd_count(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def task_count() -> int:
    return len(asyncio.all_tasks())


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def child_pids(parent: int | None = None) -> set[int]:
    """Live (non-zombie) direct children of `parent` (default: this process)."""
    parent = os.getpid() if parent is None else parent
    found = set()
    for entry in Path("/proc").iterdir():
        fields = _stat(int(entry.name)) if entry.name.isdigit() else None
        if fields is not None and int(fields[1]) == parent and fields[0] != "Z":
            found.add(int(entry.name))
    return found


def group_members(pgid: int) -> set[int]:
    """Live processes whose process group is `pgid`."""
    found = set()
    for entry in Path("/proc").iterdir():
        fields = _stat(int(entry.name)) if entry.name.isdigit() else None
        if fields is not None and int(fields[2]) == pgid and fields[0] != "Z":
            found.add(int(entry.name))
    return found


async def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval)
    return True


async def poll(
    probe: Callable[[], Awaitable[Any]], accept: Callable[[Any], bool], timeout: float, interval: float = 0.05
) -> Any:
    """Call `probe` until `accept(result)`; return the last result either way."""
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if accept(result) or time.monotonic() > deadline:
            return result
        await asyncio.sleep(interval)


def kill_groups(pids: Iterable[int]) -> None:
    """Last-resort cleanup for a failing test: SIGKILL these process groups."""
    for pid in pids:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)


# -- SSE -------------------------------------------------------------------------------------------


def parse_sse(body: str) -> list[dict[str, Any]]:
    """The JSON messages in a complete SSE body (priming events and comments skipped)."""
    messages = []
    for block in body.replace("\r\n", "\n").split("\n\n"):
        data = [line[5:].removeprefix(" ") for line in block.split("\n") if line.startswith("data:")]
        if data and "".join(data):
            messages.append(json.loads("\n".join(data)))
    return messages


# -- raw clients -----------------------------------------------------------------------------------


class Streamable:
    """A hand-driven Streamable HTTP session."""

    def __init__(self, http: aiohttp.ClientSession, url: str, token: str, path: str = "/mcp") -> None:
        self.http, self.url, self.token = http, url + path, token
        self.session_id: str | None = None
        self.version = "2025-11-25"

    def headers(self, **extra: str) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.token}", "Accept": ACCEPT_BOTH}
        if self.session_id:
            headers["Mcp-Session-Id"] = self.session_id
            headers["MCP-Protocol-Version"] = self.version
        return {**headers, **extra}

    async def initialize(self, version: str = "2025-11-25") -> Streamable:
        async with self.http.post(self.url, json=init_message(version), headers=self.headers()) as response:
            assert response.status == 200, await response.text()
            self.session_id = response.headers["Mcp-Session-Id"]
            await response.read()
        self.version = version
        status, _ = await self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        assert status == 202
        return self

    async def post(self, message: Any, **headers: str) -> tuple[int, list[dict[str, Any]]]:
        """POST one message (or a batch); the status and every JSON-RPC message in the answer."""
        data = message if isinstance(message, bytes) else json.dumps(message).encode()
        async with self.http.post(
            self.url, data=data, headers=self.headers(**{"Content-Type": "application/json", **headers})
        ) as response:
            body = await response.text()
            if response.content_type == "text/event-stream":
                return response.status, parse_sse(body)
            if response.content_type == "application/json" and body:
                parsed = json.loads(body)
                return response.status, parsed if isinstance(parsed, list) else [parsed]
            return response.status, []

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """POST a request; its one answer (asserting there is one, with its id)."""
        status, messages = await self.post(message)
        answers = [m for m in messages if "method" not in m]
        assert status == 200 and len(answers) == 1, (status, messages)
        assert answers[0]["id"] == message["id"], answers
        return answers[0]

    async def delete(self) -> int:
        async with self.http.delete(self.url, headers=self.headers()) as response:
            return response.status


class Legacy:
    """A hand-driven legacy HTTP+SSE session: the stream is read in the background, answers matched by id."""

    def __init__(
        self, http: aiohttp.ClientSession, url: str, token: str, prefix: str = "", read_delay: float = 0.0
    ) -> None:
        self.http, self.base, self.token, self.prefix = http, url, token, prefix
        self.read_delay = read_delay  # a slow reader: pause after every message
        self.stream: aiohttp.ClientResponse | None = None
        self.endpoint = ""
        self.answers: dict[Any, dict[str, Any]] = {}
        self.notifications: list[dict[str, Any]] = []
        self.ended = asyncio.Event()
        self._arrived = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def session_id(self) -> str:
        return self.endpoint.split("session_id=", 1)[1]

    async def open(self, version: str | None = "2024-11-05") -> Legacy:
        self.stream = await self.http.get(
            f"{self.base}{self.prefix}/sse",
            headers={**self.headers, "Accept": "text/event-stream"},
            timeout=STREAM_TIMEOUT,
        )
        assert self.stream.status == 200, self.stream.status
        event = await next_event(self.stream)
        assert event.event == "endpoint", event
        self.endpoint = event.data
        self._reader = asyncio.create_task(self._read())
        if version is not None:
            reply = await self.request(init_message(version))
            assert "result" in reply, reply
            assert await self.post({"jsonrpc": "2.0", "method": "notifications/initialized"}) == 202
        return self

    async def _read(self) -> None:
        assert self.stream is not None
        try:
            while True:
                _, message = await next_message_with_id(self.stream, timeout=3600)
                if "method" in message:
                    self.notifications.append(message)
                else:
                    self.answers[_key(message.get("id"))] = message
                self._arrived.set()
                if self.read_delay:
                    await asyncio.sleep(self.read_delay)
        except (EOFError, aiohttp.ClientError, ConnectionError, TimeoutError, asyncio.CancelledError):
            pass
        finally:
            self.ended.set()
            self._arrived.set()

    async def post(self, message: Any, **headers: str) -> int:
        data = message if isinstance(message, bytes) else json.dumps(message).encode()
        async with self.http.post(
            self.base + self.endpoint,
            data=data,
            headers={**self.headers, "Content-Type": "application/json", **headers},
        ) as response:
            await response.read()
            return response.status

    async def answer(self, request_id: Any, timeout: float = 10.0) -> dict[str, Any]:
        key = _key(request_id)
        async with asyncio.timeout(timeout):
            while key not in self.answers:
                if self.ended.is_set():
                    raise EOFError(f"stream ended before the answer to {request_id!r}")
                self._arrived.clear()
                await self._arrived.wait()
        return self.answers.pop(key)

    async def request(self, message: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        status = await self.post(message)
        assert status == 202, status
        return await self.answer(message["id"], timeout)

    async def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


def _key(request_id: Any) -> tuple[str, Any]:
    """Keep 1 and "1" apart, as JSON-RPC does."""
    return (type(request_id).__name__, request_id)


# -- a real gateway process ------------------------------------------------------------------------


@dataclass
class GatewayProcess(Launched):
    """`python -m mcp_sse` as production runs it, on a free loopback port."""

    token: str = ""

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    async def servers(self, http: aiohttp.ClientSession) -> list[dict[str, Any]]:
        async with http.get(f"{self.url}/mcp/servers", headers=self.headers) as response:
            assert response.status == 200
            return list((await response.json())["servers"])

    async def wait_running(self, http: aiohttp.ClientSession, timeout: float = 20.0) -> list[dict[str, Any]]:
        servers = await poll(
            lambda: self.servers(http), lambda s: all(b["state"] == "running" for b in s), timeout
        )
        assert all(b["state"] == "running" for b in servers), servers
        return servers

    async def wait_exit(self, timeout: float) -> int | None:
        try:
            return await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            return None


async def start_gateway_process(
    tmp_path: Path,
    servers: dict[str, dict[str, Any]],
    *,
    env: dict[str, str] | None = None,
    token: str | None = None,
    session_secret: str | None = None,
    extra_args: Iterable[str] = (),
) -> GatewayProcess:
    config = tmp_path / "servers.json"
    config.write_text(json.dumps({"mcpServers": servers}))
    token = token or secrets.token_urlsafe(32)
    environ = {
        **os.environ,
        "AUTH_TOKEN": token,
        "SESSION_SECRET": session_secret or Fernet.generate_key().decode(),
        "AUDIT_LOG": str(tmp_path / "audit.log"),
        "RATE_LIMIT_MAX_REQUESTS": "100000",
        **(env or {}),
    }
    argv = [sys.executable, "-m", "mcp_sse", "--host", "127.0.0.1", "--port", "0", "--config", str(config)]
    # cwd: the test's own directory, so no stray ./.env from the repository is read.
    launched = await launch([*argv, *extra_args], env=environ, cwd=tmp_path)
    return GatewayProcess(**vars(launched), token=token)


@contextlib.asynccontextmanager
async def gateway_process(
    tmp_path: Path, servers: dict[str, dict[str, Any]], **kwargs: Any
) -> AsyncIterator[GatewayProcess]:
    """A gateway process that is killed, with every child group it started, however the test ends."""
    gateway = await start_gateway_process(tmp_path, servers, **kwargs)
    seen: set[int] = set()
    try:
        yield gateway
    finally:
        seen |= child_pids(gateway.process.pid)
        if gateway.process.returncode is None:
            gateway.process.kill()
            await gateway.process.wait()
        kill_groups(seen)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(gateway.drain, 5)


_counter = itertools.count(1)


def unique_id(prefix: str = "r") -> str:
    return f"{prefix}-{next(_counter)}"
