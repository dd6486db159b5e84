"""Clients that misbehave: leave mid-request, read too slowly or not at all, half-close, trickle bodies.

What must hold: a 2025-era request outlives its connection and its answer waits for a
`Last-Event-ID` resume; a legacy session that goes away cancels its work in the child;
a reader that falls behind EVENT_BUFFER is cut off (never silently skipped) while memory
stays flat; and nothing (sessions, tasks, pending calls) is left behind.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mcp_sse.protocol.session import FINISHED_STREAMS_KEPT
from mcp_sse.state import BACKENDS, SESSIONS, TASKS
from mcp_sse.upstream.breaker import unwrap
from tests.conftest import (
    SDK_SERVER,
    Running,
    StartGateway,
    next_event,
    next_message_with_id,
    wait_for_dropped_stream,
)
from tests.reliability.harness import (
    GatewayProcess,
    Legacy,
    Streamable,
    call,
    fault_server,
    gateway_process,
    rss_mb,
    text_result,
    wait_until,
)

FLOOD_EVENTS = 3000
FLOOD_SIZE = 8000  # bytes of padding per event: 24 MB in all, against a buffer of 32 events


def recorded(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def quiet_baseline(gw: Running) -> set[asyncio.Task[Any]]:
    """The asyncio tasks alive once every backend is up (its child's reader tasks included)."""
    assert await wait_until(lambda: all(b.state == "running" for b in gw.app[BACKENDS].values()), 30)
    return asyncio.all_tasks()


def tasks_since(baseline: set[asyncio.Task[Any]]) -> set[asyncio.Task[Any]]:
    """Tasks alive now that were not at the baseline: what the test left behind. A set, not a
    count, so a start-up task that ends in the meantime cannot hide a leaked one."""
    return asyncio.all_tasks() - baseline


def pending_calls(gw: Running, name: str = "f") -> int:
    return len(unwrap(gw.app[BACKENDS][name]).mux._pending)  # type: ignore[attr-defined]


async def settled(gw: Running, name: str = "f", timeout: float = 30.0) -> bool:
    """No session, no spawned task and no call in flight: what a quiet gateway looks like."""
    return await wait_until(
        lambda: len(gw.app[SESSIONS]) == 0 and not gw.app[TASKS] and pending_calls(gw, name) == 0, timeout
    )


# -- a client leaves mid-request ----------------------------------------------------------------


@pytest.mark.parametrize("version", ["2025-06-18", "2025-11-25"])
async def test_disconnect_mid_request_2025_the_call_continues_and_its_answer_waits(
    start_gateway: StartGateway, tmp_path: Path, version: str
) -> None:
    record, gate = tmp_path / "received.jsonl", tmp_path / "gate"
    gw = await start_gateway({"f": fault_server(record=record, timeout=30)})
    baseline_tasks = await quiet_baseline(gw)
    async with aiohttp.ClientSession() as http:
        client = await Streamable(http, gw.url, gw.token).initialize(version)
        # The call is at the child, its plain-JSON answer held back by a gate, when the connection drops.
        request = asyncio.create_task(client.post(call("late", "gate", path=str(gate))))
        assert await wait_until(lambda: record.exists() and '"name":"gate"' in record.read_text(), 30)
        request.cancel()
        await asyncio.gather(request, return_exceptions=True)
        session = gw.app[SESSIONS].get(client.session_id)
        assert session is not None and not session.closed
        # The call was not cancelled in the child: it finishes, and the answer is kept.
        gate.touch()
        assert await wait_until(lambda: not session.request_streams, 30)
        assert not [m for m in recorded(record) if m.get("method") == "notifications/cancelled"]
        # The first request of a session answers on stream 1; resuming it replays the answer.
        async with http.get(
            client.url, headers=client.headers(Accept="text/event-stream", **{"Last-Event-ID": "1-0"})
        ) as resumed:
            assert resumed.status == 200
            event_id, answer = await next_message_with_id(resumed)
        assert event_id == "1-1"
        assert answer["id"] == "late" and text_result(answer) == "opened"
        assert await client.delete() == 204
    assert await settled(gw)
    assert await wait_until(lambda: not tasks_since(baseline_tasks), 30), tasks_since(baseline_tasks)


@pytest.mark.parametrize("version", ["2025-06-18", "2025-11-25"])
async def test_disconnect_mid_stream_resume_gets_the_rest_once(
    start_gateway: StartGateway, version: str
) -> None:
    gw = await start_gateway({"test": SDK_SERVER})
    async with aiohttp.ClientSession() as http:
        client = await Streamable(http, gw.url, gw.token).initialize(version)
        slow = call(3, "slow", steps=5, delay=0.15)
        slow["params"]["_meta"] = {"progressToken": "p"}
        async with http.post(
            client.url, json=slow, headers=client.headers(**{"Content-Type": "application/json"})
        ) as streamed:
            assert streamed.content_type == "text/event-stream"
            first = await next_event(streamed)
            # 2025-11-25 primes the stream with an empty event; 2025-06-18 starts with progress 1.
            seen = [] if version == "2025-11-25" else [json.loads(first.data)["params"]["progress"]]
            last_id = first.id
        # The connection is gone; the call goes on, its events buffered for a resume.
        assert client.session_id is not None and last_id is not None
        await wait_for_dropped_stream(gw.app, client.session_id, last_id)
        rest: list[dict[str, Any]] = []
        async with http.get(
            client.url, headers=client.headers(Accept="text/event-stream", **{"Last-Event-ID": last_id})
        ) as resumed:
            while not rest or "method" in rest[-1]:
                rest.append((await next_message_with_id(resumed))[1])
        progress = seen + [m["params"]["progress"] for m in rest[:-1]]
        assert progress == [1, 2, 3, 4, 5]  # nothing lost, nothing repeated
        assert rest[-1]["id"] == 3 and text_result(rest[-1]) == "done 5"
        assert await client.delete() == 204
    assert await settled(gw, "test")


async def test_legacy_disconnect_mid_request_cancels_the_call_in_the_child(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    record = tmp_path / "received.jsonl"
    gw = await start_gateway({"f": fault_server(record=record, timeout=30)})
    baseline_tasks = await quiet_baseline(gw)
    async with aiohttp.ClientSession() as http:
        client = await Legacy(http, gw.url, gw.token).open()
        assert await client.post(call("gone", "sleep", seconds=20)) == 202
        assert await wait_until(lambda: pending_calls(gw) == 1, 30)
        await client.close()
        # The session ends, its call is cancelled in the child, and nothing waits on it any more.
        assert await settled(gw)
        assert await client.post(call("after", "echo", text="x")) == 404
    calls = [m for m in recorded(record) if m.get("method") == "tools/call"]
    cancelled = [m["params"] for m in recorded(record) if m.get("method") == "notifications/cancelled"]
    assert [c["requestId"] for c in cancelled] == [calls[-1]["id"]]
    assert cancelled[0]["reason"] == "client session ended"
    assert await wait_until(lambda: not tasks_since(baseline_tasks), 30), tasks_since(baseline_tasks)


async def test_many_abandoned_requests_keep_the_session_bounded(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    record = tmp_path / "received.jsonl"
    gw = await start_gateway({"f": fault_server(record=record, timeout=30)})
    async with aiohttp.ClientSession() as http:
        client = await Streamable(http, gw.url, gw.token).initialize()
        for n in range(60):
            request = asyncio.create_task(client.post(call(n, "sleep", seconds=0.2)))
            # Abandoned once the child has it: the call goes on without its connection.
            assert await wait_until(
                lambda n=n: record.read_text().count('"name":"sleep"') == n + 1, 30, 0.005
            )
            request.cancel()
        await asyncio.gather(request, return_exceptions=True)
        session = gw.app[SESSIONS].get(client.session_id)
        assert session is not None
        assert await wait_until(lambda: not session.request_streams and not gw.app[TASKS], 30)
        # Finished streams stay replayable, but only the newest few (pruned when the next one opens).
        assert text_result(await client.request(call("alive", "echo", text="yes"))) == "yes"
        assert len(session.streams) <= FINISHED_STREAMS_KEPT + 1
        assert await client.delete() == 204
    assert await settled(gw)


# -- slow readers ---------------------------------------------------------------------------------


def buffered_events(gw: Running) -> int:
    return sum(len(s._events) for session in gw.app[SESSIONS].all() for s in session.streams.values())


async def flood(
    client: Streamable, count: int = FLOOD_EVENTS, size: int = FLOOD_SIZE, pace: float = 0.001
) -> None:
    """Make the child broadcast `count` list_changed notifications, a few at a time (see fault_server)."""
    message = call("flood", "flood", count=count, size=size, kind="list_changed", pace=pace)
    assert text_result(await client.request(message)) == f"flooded {count}"


async def test_slow_reader_is_cut_off_without_a_silent_gap_and_memory_stays_flat(
    start_gateway: StartGateway,
) -> None:
    gw = await start_gateway({"f": fault_server(timeout=30)}, event_buffer=32)
    async with aiohttp.ClientSession() as http:
        control = await Streamable(http, gw.url, gw.token).initialize()
        legacy = await Legacy(http, gw.url, gw.token, read_delay=0.002).open()
        reader = await Streamable(http, gw.url, gw.token).initialize()
        stream = await http.get(reader.url, headers=reader.headers(Accept="text/event-stream"))
        assert (await next_event(stream)).data == ""  # priming
        await flood(control, 50, 100)  # warm up the paths before measuring
        received: list[tuple[str, int]] = []

        async def read_slowly() -> None:
            try:
                while True:
                    event_id, message = await next_message_with_id(stream, timeout=30)
                    received.append((event_id or "", message["params"]["n"]))
                    await asyncio.sleep(0.002)
            except EOFError:
                pass

        peak_buffer = 0

        async def sample() -> None:  # the gateway's buffers, watched through the whole flood
            nonlocal peak_buffer
            while True:
                peak_buffer = max(peak_buffer, buffered_events(gw))
                await asyncio.sleep(0)

        slow = asyncio.create_task(read_slowly())
        sampler = asyncio.create_task(sample())
        before = rss_mb()
        await flood(control)
        await asyncio.wait_for(slow, 30)
        sampler.cancel()
        grown = rss_mb() - before
        # Cut off: far fewer events than were sent, and those in order, without a hole.
        warm, flooded = received[:50], received[50:]
        assert [n for _, n in warm] == list(range(50))
        assert 0 < len(flooded) < FLOOD_EVENTS
        assert [n for _, n in flooded] == list(range(len(flooded)))
        seqs = [int(i.split("-")[1]) for i, _ in received]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        # Resuming after the last event seen cannot skip the lost ones: it is closed at once.
        async with http.get(
            reader.url,
            headers=reader.headers(Accept="text/event-stream", **{"Last-Event-ID": received[-1][0]}),
        ) as resumed:
            with pytest.raises(EOFError):
                while True:
                    event = await next_event(resumed, timeout=30)
                    assert not event.data, f"a resume past lost events delivered {event}"
        # The legacy stream (no resume possible) fell behind too and was ended with its session.
        assert await wait_until(legacy.ended.is_set, 30)
        assert await legacy.post(call("x", "echo", text="x")) == 404
        legacy_seen = [m["params"]["n"] for m in legacy.notifications]
        assert legacy_seen[:50] == list(range(50))
        assert 0 < len(legacy_seen) - 50 < FLOOD_EVENTS
        assert legacy_seen[50:] == list(range(len(legacy_seen) - 50))
        # The cut-off sessions and their neighbours keep working.
        for client in (control, reader):
            assert text_result(await client.request(call("after", "echo", text="ok"))) == "ok"
        print(
            f"[measure] slow readers: streamable got {len(flooded)}, legacy {len(legacy_seen) - 50} of "
            f"{FLOOD_EVENTS} events; peak buffered {peak_buffer} events; RSS +{grown:.1f} MB"
        )
        # Memory stays flat by construction: what the gateway holds for its streams is bounded by
        # EVENT_BUFFER at every moment of the flood, whatever was sent. (RSS is printed, not bounded:
        # this process is the client too, and a busy machine's allocator swings it by megabytes.)
        assert peak_buffer <= 3 * 32 + 3, peak_buffer
        await legacy.close()


async def test_fast_reader_gets_every_event_of_a_burst(start_gateway: StartGateway) -> None:
    gw = await start_gateway({"f": fault_server(timeout=30)})  # the default EVENT_BUFFER, 512
    async with aiohttp.ClientSession() as http:
        client = await Streamable(http, gw.url, gw.token).initialize()
        status, messages = await client.post(call("burst", "flood", count=2000, size=10, kind="log"))
        assert status == 200
        logged = [
            m["params"]["data"].split()[0] for m in messages if m.get("method") == "notifications/message"
        ]
        assert logged == [str(n) for n in range(2000)], f"{len(logged)} of 2000 log messages arrived"
        assert messages[-1]["id"] == "burst" and text_result(messages[-1]) == "flooded 2000"


async def test_a_new_get_stream_works_after_events_were_lost(start_gateway: StartGateway) -> None:
    """More events than EVENT_BUFFER while no GET stream is open: a new GET (no Last-Event-ID)
    must deliver what is still buffered and what comes next, not be cut off at once forever."""
    gw = await start_gateway({"f": fault_server(timeout=30)}, event_buffer=32)
    async with aiohttp.ClientSession() as http:
        client = await Streamable(http, gw.url, gw.token).initialize()
        stream = await http.get(client.url, headers=client.headers(Accept="text/event-stream"))
        await next_event(stream)
        stream.close()
        await flood(client, 100, 100)  # 100 events into a buffer of 32, nobody reading
        async with http.get(client.url, headers=client.headers(Accept="text/event-stream")) as fresh:
            assert fresh.status == 200
            await next_event(fresh)  # priming
            await flood(client, 3, 50)  # new events, told apart by their padding
            replayed, new = [], []
            while len(new) < 3:
                _, message = await next_message_with_id(fresh, timeout=30)
                params = message["params"]
                (new if len(params["pad"]) == 50 else replayed).append(params["n"])
        # What was still buffered, without a hole, then what happened since.
        assert replayed == list(range(100 - len(replayed), 100)) and len(replayed) <= 32
        assert new == [0, 1, 2]


def stalled_get(gw: Running, path: str, headers: dict[str, str]) -> socket.socket:
    """A GET that is sent and then never read, through a receive window of a few KB."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", int(gw.url.rsplit(":", 1)[1])))
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


async def stall_and_flood(gw: Running, http: aiohttp.ClientSession) -> tuple[Any, socket.socket, float]:
    """A Streamable session whose GET stream is never read, flooded; (its stream 0, socket, RSS growth)."""
    client = await Streamable(http, gw.url, gw.token).initialize()
    session = gw.app[SESSIONS].get(client.session_id)
    assert session is not None
    sock = stalled_get(gw, "/mcp", client.headers(Accept="text/event-stream"))
    assert await wait_until(lambda: session.standalone.reader is not None, 30)
    await flood(client, 50, 100)
    before = rss_mb()
    await flood(client)
    return session.standalone, sock, rss_mb() - before


async def test_reader_that_never_drains_keeps_memory_flat(start_gateway: StartGateway) -> None:
    gw = await start_gateway({"f": fault_server(timeout=30)}, event_buffer=32)
    async with aiohttp.ClientSession() as http:
        stream, sock, grown = await stall_and_flood(gw, http)
        try:
            print(
                f"[measure] stalled reader: delivered {stream.delivered}, buffered {len(stream._events)}, "
                f"RSS +{grown:.1f} MB"
            )
            assert len(stream._events) <= 32
            assert stream.delivered < FLOOD_EVENTS  # it really fell behind
            assert grown < 16, (
                f"RSS grew {grown:.1f} MB while {FLOOD_EVENTS * FLOOD_SIZE >> 20} MB were flooded"
            )
        finally:
            sock.close()


async def test_reader_that_never_drains_is_cut_off(start_gateway: StartGateway) -> None:
    """A peer that keeps its TCP window shut loses its stream after SSE_WRITE_TIMEOUT_SECONDS, and
    with it the per-key stream slot it held."""
    gw = await start_gateway(
        {"f": fault_server(timeout=30)},
        event_buffer=32,
        keepalive=1,
        write_timeout=1.0,
        max_streams_per_key=1,
    )
    async with aiohttp.ClientSession() as http:
        stream, sock, _ = await stall_and_flood(gw, http)
        try:
            started = time.monotonic()
            assert await wait_until(lambda: stream.reader is None, 30), "the stalled stream was never closed"
            print(f"[measure] stalled reader cut off {time.monotonic() - started:.2f} s after the flood")
            # Its only stream slot is free again: another stream for the same key is allowed.
            other = await Legacy(http, gw.url, gw.token).open(version=None)
            await other.close()
        finally:
            sock.close()


# -- half-open connections and slow bodies --------------------------------------------------------


@pytest.mark.parametrize("transport", ["sse", "streamable"])
async def test_half_closed_stream_ends_its_session(start_gateway: StartGateway, transport: str) -> None:
    gw = await start_gateway({"f": fault_server(timeout=30)})
    async with aiohttp.ClientSession() as http:
        if transport == "streamable":
            client = await Streamable(http, gw.url, gw.token).initialize()
            path, headers = "/mcp", client.headers(Accept="text/event-stream")
        else:
            path, headers = "/sse", {"Authorization": f"Bearer {gw.token}", "Accept": "text/event-stream"}
        port = int(gw.url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        streams = lambda: sum(s.standalone.reader is not None for s in gw.app[SESSIONS].all())  # noqa: E731
        assert await wait_until(lambda: streams() == 1, 30)
        writer.write_eof()  # FIN from the client: it will never send again
        assert await wait_until(lambda: streams() == 0, 30), "a half-closed stream was kept open"
        if transport == "sse":
            assert len(gw.app[SESSIONS]) == 0
        writer.close()


# Slow requests need the real server: its runner settings are what a fix would change (cli.serve).


async def open_raw(
    gw: GatewayProcess, head: str, body: bytes = b""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(head.encode() + body)
    await writer.drain()
    return reader, writer


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> tuple[bool, bytes]:
    """Whether the server answered or closed the connection within `seconds`, and what it sent."""
    try:
        async with asyncio.timeout(seconds):
            data = await reader.read()
        return True, data
    except TimeoutError:
        return False, b""


async def test_slowloris_headers_are_cut_off(tmp_path: Path) -> None:
    env = {"REQUEST_HEADER_TIMEOUT_SECONDS": "2"}
    async with gateway_process(tmp_path, {"f": fault_server()}, env=env) as gw:
        reader, writer = await open_raw(
            gw, f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {gw.token}\r\n"
        )
        try:
            closed, _ = await closed_within(reader, 5)
            assert closed, "a request whose headers never end is still held open after 5 s"
        finally:
            writer.close()


async def test_slow_request_body_gets_408(tmp_path: Path) -> None:
    env = {"REQUEST_BODY_TIMEOUT_SECONDS": "2"}
    async with gateway_process(tmp_path, {"f": fault_server()}, env=env) as gw:
        head = (
            f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {gw.token}\r\n"
            "Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n"
            "Content-Length: 100\r\n\r\n"
        )
        reader, writer = await open_raw(gw, head, b"{")
        try:
            closed, data = await closed_within(reader, 5)
            assert closed, "a body that never completes is still awaited after 5 s"
            assert data.startswith(b"HTTP/1.1 408"), data[:100]
        finally:
            writer.close()
