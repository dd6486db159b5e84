"""Children that misbehave: hang, garbage, oversize lines, closed stdout, and a bad neighbour.

tests/upstream/test_supervision.py already covers crashes, crash loops, a missing command, a
garbage first line, an over-limit answer and the per-backend timeout. Here: what the child
itself receives (cancellations), faults in the middle of serving, and isolation between
backends. Each fault must end in a clear JSON-RPC error for the affected request only, and
`/mcp/servers` must say what happened.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mcp_sse.state import BACKENDS
from mcp_sse.upstream import backend as backend_module
from mcp_sse.upstream.breaker import unwrap
from tests.conftest import SDK_SERVER, Running, StartGateway
from tests.reliability.harness import (
    Legacy,
    Streamable,
    alive,
    call,
    fault_server,
    poll,
    rss_mb,
    text_result,
    wait_until,
)


async def status_of(http: aiohttp.ClientSession, gw: Running, name: str) -> dict[str, Any]:
    async with http.get(f"{gw.url}/mcp/servers", headers=gw.headers) as response:
        assert response.status == 200
        return next(s for s in (await response.json())["servers"] if s["name"] == name)


async def running(http: aiohttp.ClientSession, gw: Running, name: str) -> dict[str, Any]:
    status = await poll(lambda: status_of(http, gw, name), lambda s: s["state"] == "running", 15)
    assert status["state"] == "running", status
    return status


@pytest.fixture
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend_module, "BACKOFF_BASE", 0.02)


def recorded(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def upstream_id_of(path: Path, tool: str) -> int:
    """The id the gateway gave the child for the (last) call of `tool`."""
    calls = [m for m in recorded(path) if m.get("method") == "tools/call" and m["params"]["name"] == tool]
    assert calls, recorded(path)
    return int(calls[-1]["id"])


def cancellations(path: Path) -> list[dict[str, Any]]:
    return [m["params"] for m in recorded(path) if m.get("method") == "notifications/cancelled"]


# -- hangs: the timeout reaches the child as a cancellation --------------------------------------


async def test_timeout_sends_notifications_cancelled_to_the_child(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    record = tmp_path / "received.jsonl"
    gw = await start_gateway({"f": fault_server(record=record, timeout=1)})
    async with aiohttp.ClientSession() as http:
        pid = (await running(http, gw, "f"))["pid"]
        for client in (
            await Streamable(http, gw.url, gw.token).initialize(),
            await Legacy(http, gw.url, gw.token).open(),
        ):
            reply = await client.request(call(7, "hang"))  # only the timeout can end it
            assert reply["id"] == 7  # the client's own id, not the one the child saw
            assert reply["error"]["code"] == -32001
            assert "did not answer within 1 s" in reply["error"]["message"]  # this backend's timeout
            upstream = upstream_id_of(record, "hang")
            assert await wait_until(
                lambda u=upstream: any(c["requestId"] == u for c in cancellations(record)), 30
            )
            # The hung call was abandoned, not the child: the same process keeps serving.
            assert text_result(await client.request(call(8, "echo", text="after"))) == "after"
            if isinstance(client, Legacy):
                await client.close()
        status = await status_of(http, gw, "f")
    assert status["state"] == "running" and status["pid"] == pid and status["restarts"] == 0
    # Exactly one cancellation per hung call, each naming the child's id, with a reason.
    hung = [
        m["id"] for m in recorded(record) if m.get("method") == "tools/call" and m["params"]["name"] == "hang"
    ]
    assert sorted(c["requestId"] for c in cancellations(record)) == sorted(hung)
    assert all("timed out" in c["reason"] for c in cancellations(record))


async def test_client_cancellation_reaches_the_child_with_its_own_id(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    record = tmp_path / "received.jsonl"
    gw = await start_gateway({"f": fault_server(record=record, timeout=30)})
    async with aiohttp.ClientSession() as http:
        await running(http, gw, "f")
        client = await Streamable(http, gw.url, gw.token).initialize()
        pending = asyncio.create_task(client.request(call("mine", "hang")))
        assert await wait_until(lambda: record.exists() and '"name":"hang"' in record.read_text(), 30)
        cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": "mine"}}
        assert (await client.post(cancel))[0] == 202
        reply = await pending
        assert reply["error"]["code"] == -32800  # cancelled: the 30 s timeout would be -32001
        upstream = upstream_id_of(record, "hang")
        assert await wait_until(lambda: [c["requestId"] for c in cancellations(record)] == [upstream], 30)


# -- garbage and oversize lines in the middle of serving ------------------------------------------


async def test_garbage_lines_mid_call_are_dropped_and_the_call_still_answered(
    start_gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "mcp_sse.upstream")
    gw = await start_gateway({"f": fault_server(timeout=10)})
    async with aiohttp.ClientSession() as http:
        pid = (await running(http, gw, "f"))["pid"]
        client = await Streamable(http, gw.url, gw.token).initialize()
        for n in range(3):
            # Answered, by the child: a timeout would be an error, not this text.
            assert text_result(await client.request(call(n, "garbage"))) == "after garbage"
        assert text_result(await client.request(call("e", "echo", text="clean"))) == "clean"
        status = await status_of(http, gw, "f")
    assert status["pid"] == pid and status["restarts"] == 0 and status["state"] == "running"
    messages = [r.getMessage() for r in caplog.records]
    assert any("not JSON" in m for m in messages)
    assert any("not a JSON-RPC message" in m for m in messages)


async def test_deeply_nested_line_from_the_child_is_dropped_like_other_garbage(
    start_gateway: StartGateway,
) -> None:
    gw = await start_gateway({"f": fault_server(timeout=3)})
    async with aiohttp.ClientSession() as http:
        pid = (await running(http, gw, "f"))["pid"]
        client = await Streamable(http, gw.url, gw.token).initialize()
        assert text_result(await client.request(call("deep", "deep", depth=100_000))) == "after deep"
        assert text_result(await client.request(call("next", "echo", text="still read"))) == "still read"
        status = await status_of(http, gw, "f")
    assert status["pid"] == pid and status["state"] == "running"


@pytest.mark.parametrize("id_first", [True, False], ids=["id-first", "id-last"])
async def test_line_far_over_the_limit_fails_its_call_with_bounded_memory(
    start_gateway: StartGateway, id_first: bool
) -> None:
    limit = 64 * 1024
    huge = 48 * 1024 * 1024  # 768 times the limit
    # With the id first, no timeout to fall back on (an hour): only the refusal can answer the call.
    gw = await start_gateway({"f": fault_server(timeout=3600 if id_first else 4)}, max_line=limit)
    async with aiohttp.ClientSession() as http:
        pid = (await running(http, gw, "f"))["pid"]
        client = await Streamable(http, gw.url, gw.token).initialize()
        await client.request(call("warm", "oversize", size=limit // 2))  # under the limit: answered
        before = rss_mb()
        reply = await client.request(call("big", "oversize", size=huge, id_first=id_first))
        grown = rss_mb() - before
        if id_first:
            # The id leads the line, so its caller is told as it arrives.
            assert reply["error"]["code"] == -32603
            assert f"over {limit} bytes" in reply["error"]["message"]
        else:
            # Nothing in the first bytes names the call: it ends by the backend's timeout instead.
            assert reply["error"]["code"] == -32001
        assert grown < 24, f"RSS grew {grown:.1f} MB while a {huge >> 20} MB line went by"
        assert text_result(await client.request(call("next", "echo", text="fine"))) == "fine"
        status = await status_of(http, gw, "f")
    assert status["pid"] == pid and status["restarts"] == 0


# -- a child that closes stdout but keeps running --------------------------------------------------


async def test_child_that_closes_stdout_but_keeps_running_is_restarted(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    record = tmp_path / "received.jsonl"
    # No request timeout to fall back on (an hour): only the closed stdout can end the calls.
    gw = await start_gateway({"f": fault_server(record=record, timeout=3600)})
    async with aiohttp.ClientSession() as http:
        old_pid = (await running(http, gw, "f"))["pid"]
        client = await Streamable(http, gw.url, gw.token).initialize()
        in_flight = asyncio.create_task(client.request(call("slow", "sleep", seconds=3600)))
        assert await wait_until(lambda: record.exists() and '"name":"sleep"' in record.read_text(), 30)
        closing = await client.request(call("close", "close_stdout"))
        slow = await in_flight
        # Both calls end with an error, as soon as the output closes.
        assert "stopped" in closing["error"]["message"] and "stopped" in slow["error"]["message"]
        # The gateway says so, and replaces the child.
        status = await poll(
            lambda: status_of(http, gw, "f"), lambda s: s["state"] == "running" and s["pid"] != old_pid, 30
        )
        assert status["pid"] != old_pid and status["restarts"] >= 1, status
        assert "stdout" in (status["last_error"] or "")
        assert text_result(await client.request(call("after", "echo", text="back"))) == "back"
        assert await wait_until(lambda: not alive(old_pid), 30), "the old child was left running"


# -- a wedged child ----------------------------------------------------------------------------------


async def test_child_that_stops_reading_refuses_requests_with_bounded_memory(
    start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The wedge check (a ping after a timeout) would restart the child part-way through the burst,
    # at a time: here it never gives up on the ping, so the child stays wedged throughout.
    monkeypatch.setattr(backend_module, "PING_TIMEOUT", 3600.0)
    limit = 64 * 1024
    gw = await start_gateway({"f": fault_server(timeout=2)}, max_line=limit)
    async with aiohttp.ClientSession() as http:
        await running(http, gw, "f")
        client = await Streamable(http, gw.url, gw.token).initialize()
        stall = await client.request(call("stall", "stall"))
        assert stall["error"]["code"] == -32001
        child = unwrap(gw.app[BACKENDS]["f"])._child  # type: ignore[attr-defined]
        # 200 requests of 16 KB (3 MB) at a child that reads nothing: the pipe and a bounded buffer
        # fill, the rest are refused at once, and every one is answered with an error.
        before = rss_mb()
        started = time.monotonic()
        replies = await asyncio.gather(
            *(client.request(call(n, "echo", text="z" * 16_384)) for n in range(200))
        )
        elapsed = time.monotonic() - started
        grown = rss_mb() - before
        # Nothing drains a pipe nobody reads: what is buffered now is the most it ever held.
        assert unwrap(gw.app[BACKENDS]["f"])._child is child  # type: ignore[attr-defined]
        buffered = child.process.stdin.transport.get_write_buffer_size()
        refused = [r for r in replies if "not reading its input" in r.get("error", {}).get("message", "")]
        timed_out = [r for r in replies if r.get("error", {}).get("code") == -32001]
        print(
            f"[measure] wedged child: {len(refused)} refused, {len(timed_out)} timed out in {elapsed:.1f} s; "
            f"{buffered} bytes buffered for it; RSS +{grown:.1f} MB (client and gateway)"
        )
        assert buffered <= limit + 17_000, buffered  # at most one request past MAX_MESSAGE_BYTES
        assert len(refused) + len(timed_out) == 200
        assert refused, (
            "nothing was refused: the gateway buffered every request for a child that reads nothing"
        )
        assert grown < 32


async def test_wedged_child_is_restarted_and_reported(
    start_gateway: StartGateway, fast_backoff: None
) -> None:
    gw = await start_gateway({"f": fault_server(timeout=1)})
    async with aiohttp.ClientSession() as http:
        old_pid = (await running(http, gw, "f"))["pid"]
        client = await Streamable(http, gw.url, gw.token).initialize()
        assert (await client.request(call("stall", "stall")))["error"]["code"] == -32001
        status = await poll(
            lambda: status_of(http, gw, "f"), lambda s: s["state"] == "running" and s["pid"] != old_pid, 30
        )
        assert status["pid"] != old_pid and status["last_error"], status
        assert text_result(await client.request(call("after", "echo", text="back"))) == "back"


# -- one bad backend among good ones ---------------------------------------------------------------


async def test_one_misbehaving_backend_does_not_disturb_another(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    record = tmp_path / "received.jsonl"
    # No request timeout on the bad backend (an hour): a call it never answers stays in flight
    # through every fault below, and the good backend must serve calls meanwhile. An order of
    # events, not a latency: how long the good calls took is printed, not bounded.
    gw = await start_gateway(
        {"bad": fault_server(record=record, timeout=3600), "good": SDK_SERVER},
        max_line=256 * 1024,
        keepalive=1,
    )
    async with aiohttp.ClientSession() as http:
        bad_pid = (await running(http, gw, "bad"))["pid"]
        good_pid = (await running(http, gw, "good"))["pid"]
        good = [
            await Streamable(http, gw.url, gw.token, "/servers/good/mcp").initialize(),
            await Legacy(http, gw.url, gw.token, "/servers/good").open(),
        ]
        bad = await Streamable(http, gw.url, gw.token, "/servers/bad/mcp").initialize()
        stop = asyncio.Event()
        served: list[float] = []

        async def keep_calling(client: Streamable | Legacy, tag: str) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                started = time.monotonic()
                reply = await client.request(call(f"{tag}-{n}", "add", a=n, b=1))
                assert text_result(reply) == str(n + 1), reply
                served.append(time.monotonic() - started)

        async def good_calls_served_while_hung() -> None:
            """Each good caller is answered again, while the bad backend's hung call is in flight."""
            enough = len(served) + 2 * len(good)
            async with asyncio.timeout(60):
                while len(served) < enough:
                    assert not any(c.done() for c in callers), [c.exception() for c in callers if c.done()]
                    await asyncio.sleep(0.01)
            assert not hung.done(), hung.result()

        callers = [asyncio.create_task(keep_calling(c, f"g{i}")) for i, c in enumerate(good)]
        hung = asyncio.create_task(bad.request(call("hang", "hang")))
        assert await wait_until(lambda: record.exists() and '"name":"hang"' in record.read_text(), 30)
        await good_calls_served_while_hung()
        # The bad backend, one fault after another, each answered with an error for its caller only.
        assert text_result(await bad.request(call("garbage", "garbage"))) == "after garbage"
        await good_calls_served_while_hung()
        over = await bad.request(call("over", "oversize", size=1 << 20))
        assert "over 262144 bytes" in over["error"]["message"]
        await good_calls_served_while_hung()
        flood = await bad.request(call("flood", "flood", count=300, size=2000))
        assert text_result(flood) == "flooded 300"
        await good_calls_served_while_hung()
        crash = await bad.request(call("crash", "exit", code=3))
        assert "exited" in crash["error"]["message"]
        assert "exited" in (await hung)["error"]["message"]  # ended by the crash, not by a timeout
        status = await poll(
            lambda: status_of(http, gw, "bad"), lambda s: s["state"] == "running" and s["pid"] != bad_pid, 30
        )
        assert status["restarts"] == 1 and "exited with code 3" in status["last_error"], status
        assert text_result(await bad.request(call("back", "echo", text="back"))) == "back"
        served_before = len(served)
        async with asyncio.timeout(60):
            while len(served) < served_before + 2 * len(good):
                await asyncio.sleep(0.01)
        stop.set()
        await asyncio.gather(*callers)
        await good[1].close()  # type: ignore[union-attr]
        good_status = await status_of(http, gw, "good")
    print(f"[measure] good backend: {len(served)} calls, slowest {max(served):.3f} s")
    assert good_status == {**good_status, "state": "running", "pid": good_pid, "restarts": 0}


# -- malformed messages: each one warning line, dropped; the child and its sessions serve on ------

_DEEP = "[" * 300 + "]" * 300  # decodes, but past what the gateway forwards (MAX_DEPTH)
_NOTE = '{"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": %s}}'
MALFORMED = {
    "method a number": '{"jsonrpc": "2.0", "method": 5}',
    "response with an object id": '{"jsonrpc": "2.0", "id": {}, "result": 1}',
    "request with an object id": '{"jsonrpc": "2.0", "id": {}, "method": "ping"}',
    "request with an array id": '{"jsonrpc": "2.0", "id": [1], "method": "roots/list"}',
    "response with a boolean id": '{"jsonrpc": "2.0", "id": true, "result": {}}',
    "progress with numeric params": '{"jsonrpc": "2.0", "method": "notifications/progress", "params": 5}',
    "log message with list params": '{"jsonrpc": "2.0", "method": "notifications/message", "params": [1]}',
    "list_changed with string params": (
        '{"jsonrpc": "2.0", "method": "notifications/tools/list_changed", "params": "x"}'
    ),
    "resource update with null params": (
        '{"jsonrpc": "2.0", "method": "notifications/resources/updated", "params": null}'
    ),
    "request with numeric params": (
        '{"jsonrpc": "2.0", "id": "s", "method": "sampling/createMessage", "params": 7}'
    ),
    "cancellation with numeric params": (
        '{"jsonrpc": "2.0", "method": "notifications/cancelled", "params": 1}'
    ),
    "empty method": '{"jsonrpc": "2.0", "method": ""}',
    "wrong jsonrpc version": '{"jsonrpc": "1.0", "method": "notifications/tools/list_changed"}',
    "no jsonrpc member": '{"method": "notifications/tools/list_changed"}',
    "a batch": '[{"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}]',
    "a string": '"just a string"',
    "a number": "42",
    "null": "null",
    "NaN": _NOTE % "NaN",
    "Infinity": _NOTE % "-Infinity",
    "a lone surrogate": _NOTE % '"\\ud800"',
    "nested 300 deep": _NOTE % _DEEP,
    "huge and malformed": '{"jsonrpc": "2.0", "method": 5, "pad": "' + "p" * 200_000 + '"}',
}


def _problems(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What in the log is not a clean one-line warning: tracebacks, errors, very long lines."""
    found = []
    for record in caplog.records:
        line = record.getMessage()
        if record.exc_info or "Traceback" in line:
            found.append(f"traceback from {record.name}: {line[:200]}")
        elif record.levelno >= logging.ERROR:
            found.append(f"error from {record.name}: {line[:200]}")
        elif len(line) > 1000:
            found.append(f"{len(line)} characters from {record.name}: {line[:200]}")
    return found


async def test_each_malformed_message_is_one_warning_and_the_child_serves_on(
    start_gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    gw = await start_gateway({"f": fault_server(timeout=30)})
    failures: dict[str, Any] = {}
    async with aiohttp.ClientSession() as http:
        pid = (await running(http, gw, "f"))["pid"]
        client = await Streamable(http, gw.url, gw.token).initialize()
        for case, line in MALFORMED.items():
            caplog.clear()
            # As bytes: the gateway's own parser refuses a client body with a "\\ud800" in a string.
            status, messages = await client.post(call(case, "emit", raw=[line.encode().hex()]))
            # The call that carried the bad line is answered, and nothing of the line reaches the client.
            if status != 200 or [m.get("id") for m in messages] != [case]:
                failures[case] = ("answer", status, str(messages)[:300])
            elif text_result(messages[0]) != "after emit":
                failures[case] = ("answer", messages[0])
            elif problems := _problems(caplog):
                failures[case] = problems
            else:
                warnings = [r.getMessage() for r in caplog.records if r.name == "mcp_sse.upstream"]
                if not any(w.startswith("backend f ") for w in warnings):
                    failures[case] = ("no warning naming the backend", warnings)
            # The next call is served, by the same child.
            assert text_result(await client.request(call(f"{case}-next", "echo", text="next"))) == "next"
        status_after = await status_of(http, gw, "f")
    assert failures == {}, "\n".join(f"{case}: {failure}" for case, failure in failures.items())
    assert status_after["pid"] == pid and status_after["restarts"] == 0 and status_after["state"] == "running"


MALFORMED_ANSWERS = {
    "result a number": '{"jsonrpc": "2.0", "id": {id}, "result": 1}',
    "result an array": '{"jsonrpc": "2.0", "id": {id}, "result": [1]}',
    "error a string": '{"jsonrpc": "2.0", "id": {id}, "error": "boom"}',
    "error code a string": '{"jsonrpc": "2.0", "id": {id}, "error": {"code": "x", "message": "m"}}',
    "error message a number": '{"jsonrpc": "2.0", "id": {id}, "error": {"code": 1, "message": 5}}',
    "both result and error": (
        '{"jsonrpc": "2.0", "id": {id}, "result": {}, "error": {"code": 1, "message": "m"}}'
    ),
    "neither result nor error": '{"jsonrpc": "2.0", "id": {id}}',
    "wrong jsonrpc version": '{"jsonrpc": "1.0", "id": {id}, "result": {}}',
}


@pytest.mark.parametrize("line", MALFORMED_ANSWERS.values(), ids=MALFORMED_ANSWERS.keys())
async def test_malformed_answer_fails_its_call_with_a_clear_error(
    start_gateway: StartGateway, caplog: pytest.LogCaptureFixture, line: str
) -> None:
    caplog.set_level(logging.WARNING)
    # A long timeout: the call must end because its answer was refused, not because it timed out.
    gw = await start_gateway({"f": fault_server(timeout=60)})
    async with aiohttp.ClientSession() as http:
        pid = (await running(http, gw, "f"))["pid"]
        client = await Streamable(http, gw.url, gw.token).initialize()
        reply = await client.request(call("bad", "emit", lines=[line], answer=False))
        assert reply["error"]["code"] == -32603, reply
        assert reply["error"]["message"].startswith("backend 'f' sent an invalid answer"), reply
        assert text_result(await client.request(call("next", "echo", text="next"))) == "next"
        status = await status_of(http, gw, "f")
    assert _problems(caplog) == []
    assert any(
        r.getMessage().startswith("backend f ") for r in caplog.records if r.levelno == logging.WARNING
    )
    assert status["pid"] == pid and status["restarts"] == 0


async def test_malformed_request_from_the_child_is_answered_with_invalid_request(
    start_gateway: StartGateway, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    record = tmp_path / "received.jsonl"
    gw = await start_gateway({"f": fault_server(record=record, timeout=30)})
    bad = '{"jsonrpc": "2.0", "id": "ask", "method": "sampling/createMessage", "params": 7}'
    async with aiohttp.ClientSession() as http:
        await running(http, gw, "f")
        client = await Streamable(http, gw.url, gw.token).initialize()
        status, messages = await client.post(call("c", "emit", lines=[bad]))
        assert status == 200 and [m.get("id") for m in messages] == ["c"], messages  # not sent to the client

        def answers() -> list[dict[str, Any]]:
            return [m for m in recorded(record) if m.get("id") == "ask" and "method" not in m]

        # The child is told, so it does not wait for an answer that will never come.
        assert await wait_until(lambda: bool(answers()), 30)
    (answer,) = answers()
    assert answer["error"]["code"] == -32600
    assert answer["error"]["message"] == 'Invalid Request: "params" must be an object'
    assert _problems(caplog) == []
