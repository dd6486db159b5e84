"""The four measurements. Each takes one target and returns plain numbers; run.py interleaves them."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from .clients import (
    ARGUMENTS,
    CALL_TIMEOUT,
    TOOL,
    counting_foreign_replies,
    http_session,
    raw_client,
    sdk_client,
    sse_events,
    timed_calls,
)
from .procs import Gateway, cpu_seconds, rss_kib


@dataclass(frozen=True)
class Target:
    """A gateway and one of its transports; gateway "stdio" is the child spoken to directly."""

    gateway: str
    transport: str  # "sse", "mcp" (Streamable HTTP) or "stdio"
    url: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    pid: int | None = None
    """The gateway process, whose CPU time per call is reported."""

    @property
    def label(self) -> str:
        return "stdio" if self.gateway == "stdio" else f"{self.gateway} {self.transport}"

    @property
    def header_dict(self) -> dict[str, str]:
        return dict(self.headers)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


# -- 1. serial calls through the SDK client ----------------------------------------------


async def sdk_serial(target: Target, calls: int) -> dict[str, Any]:
    async with sdk_client(target.transport, target.url, target.header_dict) as client:
        for _ in range(5):  # warm: the SDK lists tools on the first call to check output schemas
            await client.call_tool(TOOL, ARGUMENTS)
        started, cpu, mine = time.perf_counter(), cpu_seconds(target.pid), time.process_time()
        for _ in range(calls):
            result = await client.call_tool(TOOL, ARGUMENTS)
            if result.is_error:
                raise RuntimeError(f"tool error: {result}")
        elapsed = time.perf_counter() - started
        cpu, mine = cpu_seconds(target.pid) - cpu, time.process_time() - mine
    return {
        "calls_per_s": calls / elapsed,
        "gateway_cpu_ms": cpu / calls * 1000,
        "client_cpu_ms": mine / calls * 1000,  # the SDK client, in this process: it also reads our replies
    }


# -- 2. concurrent SDK clients on one shared child ----------------------------------------


def _expected(client: int, call: int) -> str:
    return f"{client:02d}:{call % 60:02d}"


async def sdk_concurrent(target: Target, clients: int, calls: int) -> dict[str, Any]:
    """`clients` SDK clients at once, each its own session; every reply is checked against its request.

    Each call converts a time unique among the calls in flight (hour = client, minute = call), so a
    reply meant for another client cannot pass for the right one.
    """
    connected, go = asyncio.Semaphore(0), asyncio.Event()
    tally = {"ok": 0, "errors": 0, "wrong": 0}
    finished: list[float] = []

    async def one(index: int) -> None:
        attempted = 0
        try:
            async with sdk_client(target.transport, target.url, target.header_dict) as client:
                await client.list_tools()
                connected.release()
                await go.wait()
                for call in range(calls):
                    attempted += 1
                    when = _expected(index, call)
                    arguments = {"source_timezone": "UTC", "time": when, "target_timezone": "UTC"}
                    try:
                        result = await client.call_tool("convert_time", arguments)
                    except Exception:
                        tally["errors"] += 1
                        continue
                    source = (result.structured_content or {}).get("source", {})
                    if result.is_error:
                        tally["errors"] += 1
                    elif f"T{when}:00" not in str(source.get("datetime")):
                        tally["wrong"] += 1
                    else:
                        tally["ok"] += 1
                finished.append(time.perf_counter())
        except Exception:
            tally["errors"] += calls - attempted  # what a client that failed never got to send
            if not attempted:
                connected.release()

    with counting_foreign_replies() as foreign:
        tasks = [asyncio.create_task(one(i)) for i in range(clients)]
        try:
            async with asyncio.timeout(120):
                for _ in range(clients):
                    await connected.acquire()
                started = time.perf_counter()
                go.set()
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    elapsed = (max(finished) if finished else time.perf_counter()) - started
    return {
        "calls_per_s": tally["ok"] / elapsed if elapsed > 0 else 0.0,
        "errors": tally["errors"],
        "wrong": tally["wrong"],
        "foreign": foreign.count,
    }


# -- 3. raw JSON-RPC latency ---------------------------------------------------------------


async def raw_latency(target: Target, calls: int) -> dict[str, Any]:
    async with http_session() as http:
        client = await raw_client(http, target.transport, target.url, target.header_dict)
        try:
            await timed_calls(client, 20)
            cpu = cpu_seconds(target.pid)
            samples = await timed_calls(client, calls)
            cpu = cpu_seconds(target.pid) - cpu
        finally:
            await client.close()
    return {
        "gateway_cpu_ms": cpu / calls * 1000,
        "p50_ms": percentile(samples, 50) * 1000,
        "p99_ms": percentile(samples, 99) * 1000,
        "foreign": client.foreign,
    }


# -- 4. idle SSE streams: memory, and a tool call while they are held ----------------------


async def _open_stream(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str]
) -> aiohttp.ClientResponse:
    response = await http.get(url, headers={**headers, "Accept": "text/event-stream"})
    try:
        if response.status != 200:
            raise ConnectionError(f"HTTP {response.status}")
        async with asyncio.timeout(CALL_TIMEOUT):
            async for event, _ in sse_events(response.content):
                if event == "endpoint":
                    return response
        raise ConnectionError("stream ended before its endpoint event")
    except BaseException:
        response.close()
        raise


async def idle_streams(
    gateway: Gateway, streams: int, hold_seconds: float, open_timeout: float, calls: int
) -> dict[str, Any]:
    """Open `streams` authenticated SSE streams, measure the gateway's RSS, time calls while held."""
    url, headers = gateway.url("sse"), gateway.headers
    held: list[aiohttp.ClientResponse] = []
    failures: list[str] = []
    async with http_session() as http:
        await asyncio.sleep(1.0)
        before = rss_kib(gateway.pid)
        limit = asyncio.Semaphore(200)

        async def open_one() -> None:
            async with limit:
                try:
                    held.append(await _open_stream(http, url, headers))
                except Exception as exc:
                    failures.append(type(exc).__name__ + ": " + str(exc)[:100])

        started = time.perf_counter()
        tasks = [asyncio.create_task(open_one()) for _ in range(streams)]
        _, pending = await asyncio.wait(tasks, timeout=open_timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        open_seconds = time.perf_counter() - started
        await asyncio.sleep(2.0)  # let the gateway settle before reading its memory
        after = rss_kib(gateway.pid)
        latency: dict[str, Any] = {}
        try:
            client = await raw_client(http, "sse", url, headers)
            try:
                samples = await timed_calls(client, calls, seconds=hold_seconds)
            finally:
                await client.close()
            latency = {
                "calls": len(samples),
                "p50_ms": percentile(samples, 50) * 1000,
                "p99_ms": percentile(samples, 99) * 1000,
            }
        except Exception as exc:
            latency = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        alive = sum(1 for r in held if not r.content.at_eof() and not r.closed)
        after_calls = rss_kib(gateway.pid)
        for response in held:
            response.close()
    reasons = sorted(set(failures))[:5]
    opened = len(held)
    return {
        "streams_wanted": streams,
        "streams_opened": opened,
        "streams_alive_after": alive,
        "open_seconds": open_seconds,
        "failures": len(failures) + len(pending),
        "failure_reasons": reasons + (["timed out opening"] if pending else []),
        "rss_before_kib": before,
        "rss_after_kib": after,
        "rss_after_calls_kib": after_calls,
        "kib_per_stream": (after - before) / opened if opened else None,
        **latency,
    }
