"""Reconnect storms: 1,000 connect/disconnect cycles per transport leave nothing behind.

Counted in-process before and after: live MCP sessions (app[SESSIONS]), sessions attached to
the child's multiplexer, spawned tasks (app[TASKS]), every asyncio task, open file
descriptors (/proc/self/fd) and live child processes, plus a functional check that every
per-key stream slot was given back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import pytest

from mcp_sse import app as app_module
from mcp_sse.state import BACKENDS, SESSIONS, TASKS
from mcp_sse.upstream.breaker import unwrap
from tests.conftest import SDK_SERVER, Running, StartGateway
from tests.reliability.harness import (
    Legacy,
    Streamable,
    call,
    child_pids,
    fd_count,
    rss_mb,
    task_count,
    text_result,
    wait_until,
)

pytestmark = pytest.mark.slow  # long: `pytest -m 'not slow'` skips it in a quick local loop; CI runs it

CYCLES = 1000
CONCURRENCY = 16
STREAM_SLOTS = 2 * CONCURRENCY  # a client may reconnect before the server has seen its last stream close


@dataclass(frozen=True)
class Gauges:
    sessions: int
    attached: int
    spawned: int
    tasks: int
    fds: int
    children: frozenset[int]
    rss: float

    @classmethod
    def read(cls, gw: Running) -> Gauges:
        return cls(
            sessions=len(gw.app[SESSIONS]),
            attached=sum(len(unwrap(b).mux.sessions) for b in gw.app[BACKENDS].values()),  # type: ignore[attr-defined]
            spawned=len(gw.app[TASKS]),
            tasks=task_count(),
            fds=fd_count(),
            children=frozenset(child_pids()),
            rss=rss_mb(),
        )

    def back_to(self, baseline: Gauges) -> bool:
        return (
            self.sessions == 0
            and self.attached == 0
            and self.spawned == 0
            and self.tasks <= baseline.tasks
            and self.fds <= baseline.fds
            and self.children == baseline.children
        )


@pytest.fixture
def fast_reaper(monkeypatch: pytest.MonkeyPatch) -> None:
    """Abandoned Streamable sessions are reaped after MCP_SESSION_IDLE_SECONDS; check for them often."""
    monkeypatch.setattr(app_module, "REAP_INTERVAL", 0.2)


async def storm_gateway(start_gateway: StartGateway) -> Running:
    gw = await start_gateway(
        {"test": SDK_SERVER}, session_idle=1.0, max_streams_per_key=STREAM_SLOTS, keepalive=5
    )
    assert await wait_until(lambda: gw.app[BACKENDS]["test"].state == "running", 15)
    return gw


async def storm(
    gw: Running, cycle: Callable[[aiohttp.ClientSession, int], Awaitable[None]], cycles: int
) -> None:
    counter = iter(range(cycles))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY * 2)) as http:

        async def worker() -> None:
            for n in counter:
                await cycle(http, n)

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


def server_connections(gw: Running) -> int:
    """Connections the gateway's HTTP server still holds (a handler, its socket, its task)."""
    runner = gw.server.runner
    assert runner is not None and runner.server is not None
    return len(runner.server.connections)


async def measured_storm(
    gw: Running, cycle: Callable[[aiohttp.ClientSession, int], Awaitable[None]], label: str
) -> None:
    await storm(gw, cycle, 40)  # warm-up: first-use allocations and caches are not leaks
    # Quiet before the baseline: no session, no spawned task, and the server has let go of every
    # connection of the warm-up (their sockets and handler tasks), rather than 0.3 s having passed.
    quiet = lambda: len(gw.app[SESSIONS]) == 0 and not gw.app[TASKS] and server_connections(gw) == 0  # noqa: E731
    assert await wait_until(quiet, 30)
    baseline = Gauges.read(gw)
    started = asyncio.get_running_loop().time()
    await storm(gw, cycle, CYCLES)
    elapsed = asyncio.get_running_loop().time() - started
    peak = Gauges.read(gw)
    settled = await wait_until(lambda: Gauges.read(gw).back_to(baseline), 30, interval=0.1)
    after = Gauges.read(gw)
    print(
        f"[measure] {label}: {CYCLES} cycles in {elapsed:.1f} s; baseline {baseline}; "
        f"right after {peak}; settled {after}"
    )
    assert settled, f"not back to baseline: before {baseline}, after {after}"
    assert after.rss - baseline.rss < 20, f"RSS grew {after.rss - baseline.rss:.1f} MB"
    # Every per-key stream slot was released: the whole allowance can be opened at once again.
    async with aiohttp.ClientSession() as http:
        streams = [Legacy(http, gw.url, gw.token) for _ in range(STREAM_SLOTS)]
        await asyncio.gather(*(s.open(version=None) for s in streams))
        for s in streams:
            await s.close()


async def test_reconnect_storm_legacy_sse(start_gateway: StartGateway) -> None:
    gw = await storm_gateway(start_gateway)

    async def cycle(http: aiohttp.ClientSession, n: int) -> None:
        client = Legacy(http, gw.url, gw.token)
        try:
            kind = n % 4
            await client.open(version=None if kind == 0 else "2024-11-05")
            if kind == 2:
                assert text_result(await client.request(call(n, "echo", text=str(n)))) == str(n)
            elif kind == 3:  # leave with a call in flight
                assert await client.post(call(n, "sleep", seconds=0.05)) == 202
        finally:
            await client.close()

    await measured_storm(gw, cycle, "legacy SSE storm")


async def test_reconnect_storm_streamable_http(start_gateway: StartGateway, fast_reaper: None) -> None:
    gw = await storm_gateway(start_gateway)

    async def cycle(http: aiohttp.ClientSession, n: int) -> None:
        client = await Streamable(http, gw.url, gw.token).initialize("2025-11-25" if n % 2 else "2025-06-18")
        kind = n % 5
        if kind == 1:  # open the GET stream, then drop it
            async with http.get(client.url, headers=client.headers(Accept="text/event-stream")) as stream:
                assert stream.status == 200
                if client.version == "2025-11-25":
                    await stream.content.readline()
        elif kind == 2:
            assert text_result(await client.request(call(n, "echo", text=str(n)))) == str(n)
        elif kind == 3:  # leave mid-request
            request = asyncio.create_task(client.post(call(n, "sleep", seconds=0.05)))
            await asyncio.sleep(0.01)
            request.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await request
        if kind == 4:
            return  # abandoned without DELETE: the idle reaper must end it
        assert await client.delete() == 204

    await measured_storm(gw, cycle, "Streamable HTTP storm")
