"""The circuit breaker: its state machine against a scripted backend and a clock the test moves,
then end to end through a real server_secure.py process, a real child and the official SDK client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from mcp import MCPError

from mcp_sse.protocol.jsonrpc import INTERNAL_ERROR, INVALID_PARAMS, Message, error_response
from mcp_sse.protocol.session import Session
from mcp_sse.security.audit import AuditLog
from mcp_sse.upstream.backend import Backend, StdioBackend
from mcp_sse.upstream.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, observe, unwrap
from mcp_sse.upstream.builtin import BuiltinBackend
from mcp_sse.upstream.config import BreakerSpec, ServerSpec
from mcp_sse.upstream.factory import build_backend
from mcp_sse.upstream.isolation import PerSessionBackend
from mcp_sse.upstream.multiplex import REQUEST_CANCELLED, REQUEST_TIMEOUT
from mcp_sse.upstream.remote import RemoteBackend
from tests.conftest import launch, mcp_client, text_of
from tests.reliability.harness import fault_server, poll
from tests.security.helpers import audit_lines

REPO = Path(__file__).resolve().parents[2]
SPEC = BreakerSpec(failure_threshold=2, volume_threshold=4, open_seconds=10.0, success_threshold=2)


class Scripted(Backend):
    """Answers each request as its `params.do` says; "wait" holds it until `release` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.name = "fake"
        self.state = "running"
        self.calls = 0
        self.revived = 0
        self.release = asyncio.Event()

    async def request(self, session: Session, message: Message) -> Message:
        self.calls += 1
        do = message["params"]["do"]
        if do == "wait":
            await self.release.wait()
            do = message["params"].get("then", "ok")
        if do == "raise":
            raise RuntimeError("the backend blew up")
        if do == "cancel":
            raise asyncio.CancelledError
        codes = {
            "internal": INTERNAL_ERROR,
            "timeout": REQUEST_TIMEOUT,
            "cancelled": REQUEST_CANCELLED,
            "invalid": INVALID_PARAMS,
        }
        if do in codes:
            return error_response(message["id"], codes[do], f"{do} from the backend")
        result: dict[str, Any] = {"content": [], "isError": do == "tool_error"}
        return {"jsonrpc": "2.0", "id": message["id"], "result": result}

    def revive(self) -> int:
        self.revived += 1
        return 0

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "pid": 42}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


SESSION = Session("test", "modern", None, None, 16)


def msg(do: str, **params: Any) -> Message:
    return {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"do": do, **params}}


def breaker(
    spec: BreakerSpec = SPEC, changes: list[tuple[str, str, str]] | None = None
) -> tuple[CircuitBreaker, Scripted, Clock]:
    inner, clock = Scripted(), Clock()

    def record(_: CircuitBreaker, previous: str, state: str, reason: str) -> None:
        if changes is not None:
            changes.append((previous, state, reason))

    return CircuitBreaker(inner, spec, on_change=record, clock=clock), inner, clock


async def send(b: CircuitBreaker, do: str, **params: Any) -> Message:
    return await b.request(SESSION, msg(do, **params))


async def trip(b: CircuitBreaker) -> None:
    for _ in range(SPEC.failure_threshold):
        await send(b, "internal")
    assert b.circuit == OPEN


# -- what a failure is ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("do", "failure"),
    [
        ("internal", True),
        ("timeout", True),
        ("raise", True),
        ("ok", False),
        ("tool_error", False),  # the tool failed, the backend answered
        ("invalid", False),  # -32602 from the server is an answer too
        ("cancelled", None),  # the client's doing: neither
        ("cancel", None),
    ],
)
async def test_what_counts_as_a_failure(do: str, failure: bool | None) -> None:
    b, _, _ = breaker()
    raises = do in ("raise", "cancel")  # an exception goes on to the caller, as it came
    with pytest.raises((RuntimeError, asyncio.CancelledError)) if raises else contextlib.nullcontext():
        await send(b, do)
    circuit = b.status()["circuit"]
    assert (circuit["requests"], circuit["failures"]) == {True: (1, 1), False: (1, 0), None: (0, 0)}[failure]


# -- closed -> open ---------------------------------------------------------------------------


async def test_opens_after_the_failures_and_then_fails_fast_naming_why_and_when() -> None:
    changes: list[tuple[str, str, str]] = []
    b, inner, clock = breaker(changes=changes)
    await send(b, "ok")
    await send(b, "timeout")
    assert b.circuit == CLOSED
    await send(b, "internal")
    assert b.circuit == OPEN
    assert changes == [(CLOSED, OPEN, "2 of the last 3 requests failed; last: internal from the backend")]
    clock.now += 2.5
    calls = inner.calls
    reply = await send(b, "ok")
    assert inner.calls == calls  # never reached the backend
    assert reply["error"]["code"] == INTERNAL_ERROR
    message = reply["error"]["message"]
    assert message.startswith("backend 'fake': circuit is open (2 of the last 3 requests failed")
    assert message.endswith("retry in 8 s")
    # The fast failures are not counted.
    assert b.status()["circuit"] == {"state": OPEN, "failures": 2, "requests": 3, "retry_in": 8}


async def test_the_window_slides_old_failures_out() -> None:
    b, _, _ = breaker()
    await send(b, "internal")
    for _ in range(SPEC.volume_threshold - 1):
        await send(b, "ok")
    await send(b, "internal")  # the first failure is out of the window of 4 now
    assert b.circuit == CLOSED
    assert b.status()["circuit"] == {"state": CLOSED, "failures": 1, "requests": 4}


async def test_subscribe_is_counted_too() -> None:
    class NoSubscriptions(Scripted):
        async def subscribe(self, session: Session, message: Message) -> Message:
            return error_response(message["id"], INTERNAL_ERROR, "down")

    b = CircuitBreaker(NoSubscriptions(), SPEC)
    for _ in range(2):
        await b.subscribe(SESSION, msg("x"))
    assert b.circuit == OPEN
    assert "circuit is open" in (await b.subscribe(SESSION, msg("x")))["error"]["message"]


async def test_a_request_let_in_before_it_opened_does_not_count_after() -> None:
    b, inner, _ = breaker()
    slow = asyncio.create_task(send(b, "wait", then="internal"))
    await asyncio.sleep(0)
    await trip(b)
    window = b.status()["circuit"]
    inner.release.set()
    await slow
    assert b.status()["circuit"] == window


# -- open -> half-open -> closed, or open again ---------------------------------------------------


async def test_half_opens_after_the_timeout_and_closes_after_the_successes() -> None:
    changes: list[tuple[str, str, str]] = []
    b, inner, clock = breaker(changes=changes)
    await trip(b)
    clock.now += SPEC.open_seconds
    assert b.status()["circuit"]["state"] == HALF_OPEN
    # At most success_threshold trials at once; the others keep failing fast.
    trials = [asyncio.create_task(send(b, "wait")) for _ in range(SPEC.success_threshold)]
    await asyncio.sleep(0)
    extra = await send(b, "ok")
    assert "circuit is half-open" in extra["error"]["message"]
    inner.release.set()
    assert all("result" in reply for reply in await asyncio.gather(*trials))
    assert b.status()["circuit"] == {"state": CLOSED, "failures": 0, "requests": 0}
    assert [(p, s) for p, s, _ in changes] == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]
    assert "result" in await send(b, "ok")


async def test_a_failed_trial_opens_it_again_for_a_fresh_timeout() -> None:
    changes: list[tuple[str, str, str]] = []
    b, _, clock = breaker(changes=changes)
    await trip(b)
    clock.now += SPEC.open_seconds
    assert "result" in await send(b, "ok")  # one success is not enough
    assert b.circuit == HALF_OPEN
    await send(b, "timeout")
    assert b.circuit == OPEN
    assert changes[-1][:2] == (HALF_OPEN, OPEN) and "a trial request failed" in changes[-1][2]
    assert b.status()["circuit"]["retry_in"] == SPEC.open_seconds


async def test_a_cancelled_trial_frees_its_place() -> None:
    b, _, clock = breaker(BreakerSpec(failure_threshold=1, volume_threshold=1, success_threshold=1))
    await send(b, "internal")
    clock.now += 60
    with pytest.raises(asyncio.CancelledError):
        await send(b, "cancel")
    assert b.current() == HALF_OPEN
    assert "result" in await send(b, "ok")
    assert b.circuit == CLOSED


async def test_reload_closes_an_open_circuit() -> None:
    changes: list[tuple[str, str, str]] = []
    b, inner, _ = breaker(changes=changes)
    await trip(b)
    assert b.revive() == 0 and inner.revived == 1
    assert b.circuit == CLOSED and changes[-1] == (OPEN, CLOSED, "reload")
    assert "result" in await send(b, "ok")


async def test_what_fails_at_shutdown_is_not_counted() -> None:
    b, _, _ = breaker()
    b.abort("the gateway is shutting down")
    for _ in range(5):
        await send(b, "internal")
    assert b.circuit == CLOSED


# -- a wrapper that is the backend in all else ------------------------------------------------------


async def test_attributes_are_the_inner_backends_live_values() -> None:
    b, inner, _ = breaker()
    inner.state = "restarting"
    inner.capabilities = {"tools": {}}
    inner.schemas = {"t": {"type": "object"}}
    assert (b.name, b.state, b.capabilities) == ("fake", "restarting", {"tools": {}})
    assert b.tool_schema("t") == {"type": "object"}
    b.timeout = 5.0
    assert inner.timeout == 5.0
    assert unwrap(b) is inner and unwrap(inner) is inner
    assert b.status() == {"name": "fake", "state": "restarting", "pid": 42, **_closed()}


def _closed() -> dict[str, Any]:
    return {"circuit": {"state": CLOSED, "failures": 0, "requests": 0}}


async def test_observe_audits_every_change(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.log", stream=None)
    b, _, clock = breaker()
    observe(b, audit)
    observe(Scripted(), audit)  # no breaker: nothing to observe, no error
    await trip(b)
    clock.now += SPEC.open_seconds
    b.status()
    audit.close()
    lines = [e for e in audit_lines(tmp_path / "audit.log") if e["event"] == "backend.circuit"]
    assert [(e["backend"], e["previous"], e["state"]) for e in lines] == [
        ("fake", CLOSED, OPEN),
        ("fake", OPEN, HALF_OPEN),
    ]
    assert lines[0]["reason"].startswith("2 of the last 2 requests failed")


def test_every_kind_is_wrapped_unless_the_entry_says_false() -> None:
    def built(**fields: Any) -> Backend:
        return build_backend(ServerSpec(name="s", **fields), max_line=1 << 20, base_env={})

    stdio = built(command="x")
    assert isinstance(stdio, CircuitBreaker) and isinstance(stdio.inner, StdioBackend)
    assert stdio.spec == BreakerSpec()  # the seed's defaults: 5 of 10, 60 s, 3
    remote = built(url="http://127.0.0.1:9/mcp")
    assert isinstance(remote, CircuitBreaker) and isinstance(remote.inner, RemoteBackend)
    isolated = built(command="x", isolation="per-session")
    assert isinstance(isolated, CircuitBreaker) and isinstance(isolated.inner, PerSessionBackend)
    module = built(module="tests.servers.custom_tools:tools")
    assert isinstance(module, CircuitBreaker) and isinstance(module.inner, BuiltinBackend)
    assert isinstance(built(command="x", breaker=BreakerSpec(enabled=False)), StdioBackend)


# -- end to end: a real gateway process, a real child that times out --------------------------------


async def servers_status(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(f"{url}/mcp/servers") as response:
        assert response.status == 200
        return dict((await response.json())["servers"][0])


async def test_a_real_backend_that_times_out_opens_its_circuit_then_recovers(tmp_path: Path) -> None:
    token = secrets.token_urlsafe(32)
    entry = {
        **fault_server(timeout=0.5),
        "circuit_breaker": {"failureThreshold": 2, "volumeThreshold": 4, "timeout": 1, "successThreshold": 2},
    }
    servers = tmp_path / "servers.json"
    servers.write_text(json.dumps({"mcpServers": {"flaky": entry}}))
    audit = tmp_path / "audit.log"
    env = {**os.environ, "AUTH_TOKEN": token, "AUDIT_LOG": str(audit), "MCP_SERVERS_FILE": str(servers)}
    argv = [sys.executable, str(REPO / "server_secure.py"), "--port", "0", "--env-file", os.devnull]
    server = await launch(argv, env=env, cwd=tmp_path)
    try:
        async with (
            aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http,
            mcp_client(server.url, token) as client,
        ):
            for _ in range(2):  # two calls the child answers too late: two failures
                with pytest.raises(MCPError) as info:
                    await client.call_tool("sleep", {"seconds": 30})
                assert info.value.code == REQUEST_TIMEOUT
            with pytest.raises(MCPError) as info:
                await client.call_tool("echo", {"text": "x"})
            assert info.value.code == INTERNAL_ERROR
            assert info.value.message.startswith(
                "backend 'flaky': circuit is open (2 of the last 2 requests failed; last: "
            )
            assert "retry in " in info.value.message
            status = await servers_status(http, server.url)
            assert status["state"] == "running"  # the child is fine; its circuit is not
            assert status["circuit"]["state"] == "open" and status["circuit"]["failures"] == 2
            async with http.get(f"{server.url}/health") as response:
                assert response.status == 503
                assert (await response.json())["circuit_open"] == ["flaky"]

            async def echo() -> str:
                try:
                    return text_of(await client.call_tool("echo", {"text": "back"}))
                except MCPError as exc:
                    return exc.message

            # Retried until the timeout is up: the first call that goes through is a trial.
            assert await poll(echo, lambda answer: answer == "back", 30, 0.1) == "back"
            # Two successes in a row close it (the SDK client may list the tools on its own too).
            assert await echo() == "back"
            circuit = (await servers_status(http, server.url))["circuit"]
            assert (circuit["state"], circuit["failures"]) == ("closed", 0)
    finally:
        assert await server.stop() == 0, server.stderr
    assert "Traceback" not in server.stderr
    changes = [e for e in audit_lines(audit) if e["event"] == "backend.circuit"]
    assert [(e["backend"], e["previous"], e["state"]) for e in changes] == [
        ("flaky", "closed", "open"),
        ("flaky", "open", "half-open"),
        ("flaky", "half-open", "closed"),
    ]
    assert "backend flaky: circuit open (was closed): 2 of the last 2 requests failed" in server.stderr
