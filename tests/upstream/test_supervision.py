"""Supervised stdio children through a real gateway: crashes, crash loops, limits, timeouts, shutdown."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import secrets
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from mcp import MCPError

from mcp_sse.app import revive_backends
from mcp_sse.state import BACKENDS
from mcp_sse.upstream import backend as backend_module
from mcp_sse.upstream.aggregate import UNAVAILABLE_META
from mcp_sse.upstream.breaker import unwrap
from tests.conftest import (
    SDK_SERVER,
    SERVERS,
    Running,
    StartGateway,
    launch,
    mcp_client,
    text_of,
    wait_for_text,
)
from tests.reliability.harness import (
    FAULT_SERVER,
    Streamable,
    call,
    fault_server,
    poll,
    text_result,
    wait_until,
)
from tests.security.helpers import audit_lines

REPO = Path(__file__).resolve().parents[2]
SDK_PATH = str(SERVERS / "sdk_server.py")
RAW_SERVER = {"command": sys.executable, "args": [str(SERVERS / "raw_server.py")]}


async def server_status(gw: Running, name: str = "test") -> dict[str, Any]:
    async with (
        aiohttp.ClientSession(headers=gw.headers) as http,
        http.get(f"{gw.url}/mcp/servers") as response,
    ):
        assert response.status == 200
        body = await response.json()
    return next(s for s in body["servers"] if s["name"] == name)


async def wait_for_state(
    gw: Running, *states: str, name: str = "test", timeout: float = 15.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status = await server_status(gw, name)
        if status["state"] in states:
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"backend {name} stayed {status} instead of reaching {states}")
        await asyncio.sleep(0.05)


@pytest.fixture
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend_module, "BACKOFF_BASE", 0.02)


def no_ready_wait_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """READY_WAIT far past the per-test timeout, in every module that imported it: a caller that
    waited for a backend to become ready, rather than being answered at once, fails the test."""
    for name, module in list(sys.modules.items()):
        if name.startswith("mcp_sse") and hasattr(module, "READY_WAIT"):
            monkeypatch.setattr(module, "READY_WAIT", 3600.0)


# -- crashes -------------------------------------------------------------------------------------


async def test_crash_mid_call_errors_promptly_and_restarts(start_gateway: StartGateway) -> None:
    gw = await start_gateway({"test": SDK_SERVER})
    async with mcp_client(gw.url, gw.token) as victim, mcp_client(gw.url, gw.token, transport="sse") as other:
        old_pid = int(text_of(await victim.call_tool("pid", {})))
        assert int(text_of(await other.call_tool("pid", {}))) == old_pid
        assert (await server_status(gw))["restarts"] == 0

        with pytest.raises(MCPError) as info:
            await victim.call_tool("crash", {})
        # Failed by the exit itself: a timeout would say "did not answer within 60 s" instead.
        assert "exited" in info.value.message

        # The same session, and a session that was idle during the crash, reach the new child.
        new_pid = int(text_of(await victim.call_tool("pid", {})))
        assert new_pid != old_pid
        assert int(text_of(await other.call_tool("pid", {}))) == new_pid
        assert text_of(await other.call_tool("add", {"a": 1, "b": 2})) == "3"
        status = await server_status(gw)
        assert status["state"] == "running"
        assert status["restarts"] >= 1
        assert status["pid"] == new_pid
        assert "exited with code 3" in status["last_error"]
    # The old child is gone, not a zombie or an orphan.
    assert not _alive(old_pid)
    async with mcp_client(gw.url, gw.token) as later:
        assert text_of(await later.call_tool("echo", {"text": "after"})) == "after"


async def test_subscriptions_are_renewed_with_a_restarted_child(
    start_gateway: StartGateway, fast_backoff: None, caplog: pytest.LogCaptureFixture
) -> None:
    gw = await start_gateway({"test": RAW_SERVER})
    async with mcp_client(gw.url, gw.token) as client, mcp_client(gw.url, gw.token, transport="sse") as other:
        await client.subscribe_resource("raw://thing")
        await other.subscribe_resource("raw://thing")  # shared: one upstream subscription
        assert json.loads(text_of(await client.call_tool("subscriptions", {}))) == ["raw://thing"]
        old_pid = (await server_status(gw))["pid"]
        with pytest.raises(MCPError):
            await client.call_tool("crash", {})
        deadline = time.monotonic() + 15
        while (status := await server_status(gw))["state"] != "running" or status["pid"] == old_pid:
            assert time.monotonic() < deadline, status
            await asyncio.sleep(0.05)
        # The new child was asked again, before anything else was written to it.
        assert json.loads(text_of(await other.call_tool("subscriptions", {}))) == ["raw://thing"]
        # Both sessions still hold it: the upstream subscription ends only when the last lets go.
        await client.unsubscribe_resource("raw://thing")
        assert json.loads(text_of(await other.call_tool("subscriptions", {}))) == ["raw://thing"]
        await other.unsubscribe_resource("raw://thing")
        assert json.loads(text_of(await other.call_tool("subscriptions", {}))) == []
    assert "lost in a restart" not in caplog.text


async def test_crash_fails_every_call_in_flight_not_only_the_crashing_one(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    # A request timeout past the test's own: only the crash can end the call in flight.
    gw = await start_gateway({"test": {**SDK_SERVER, "timeout": 3600}})
    marker = tmp_path / "marker"
    async with mcp_client(gw.url, gw.token) as sleeper, mcp_client(gw.url, gw.token) as crasher:
        arguments = {"seconds": 3600, "path": str(marker)}
        slow = asyncio.create_task(sleeper.call_tool("record_cancel", arguments))
        await wait_for_text(marker, "started")  # in flight at the child
        with pytest.raises(MCPError):
            await crasher.call_tool("crash", {})
        with pytest.raises(MCPError) as info:
            await slow
        assert "exited" in info.value.message
        assert text_of(await sleeper.call_tool("echo", {"text": "back"})) == "back"


async def test_crash_loop_ends_failed_and_callers_get_an_error(
    start_gateway: StartGateway, fast_backoff: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    exits_at_once = {"command": sys.executable, "args": ["-c", "import sys; sys.exit(1)"]}
    gw = await start_gateway({"test": exits_at_once})
    status = await wait_for_state(gw, "failed")
    assert status["restarts"] == backend_module.CRASH_LOOP_COUNT - 1
    assert "exited with code 1" in status["last_error"]
    assert status["pid"] is None
    # Failed means stopped trying: no more restarts. (A negative check: this sleep gives a restart
    # the chance to happen, 25 times the backoff; nothing is waited for.)
    await asyncio.sleep(0.5)
    assert (await server_status(gw))["restarts"] == status["restarts"]

    # Callers wait READY_WAIT for a backend that is not ready: set past the test's own timeout,
    # only the immediate answer for a failed backend can arrive.
    no_ready_wait_fallback(monkeypatch)
    for transport in ("streamable", "sse"):
        error = await _connect_error(gw, transport)
        # Why, too: the client sees what the operator sees in last_error.
        assert error.message == f"backend 'test' is failed: {status['last_error']}"


async def test_failed_backend_answers_sessions_already_open(
    start_gateway: StartGateway, fast_backoff: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backend_module, "CRASH_LOOP_COUNT", 1)
    gw = await start_gateway({"test": SDK_SERVER})
    async with mcp_client(gw.url, gw.token) as client:
        with pytest.raises(MCPError):
            await client.call_tool("crash", {})
        await wait_for_state(gw, "failed")
        no_ready_wait_fallback(monkeypatch)  # only the immediate answer can come in time
        with pytest.raises(MCPError) as info:
            await client.call_tool("echo", {"text": "x"})
        assert "'test' is failed" in info.value.message


def _gated(flag: Path) -> dict[str, Any]:
    """A backend that exits at once until `flag` exists, then is the fault server."""
    script = '[ -f "$0" ] || exit 1; exec "$1" "$2"'
    return {"command": "sh", "args": ["-c", script, str(flag), sys.executable, FAULT_SERVER]}


async def test_reload_gives_a_failed_backend_a_fresh_start_and_leaves_running_ones_alone(
    start_gateway: StartGateway, fast_backoff: None, tmp_path: Path
) -> None:
    flag = tmp_path / "may-start"
    gw = await start_gateway({"flaky": _gated(flag), "steady": fault_server()})
    steady = await wait_for_state(gw, "running", name="steady", timeout=30)
    failed = await wait_for_state(gw, "failed", name="flaky", timeout=30)
    assert failed["restarts"] == backend_module.CRASH_LOOP_COUNT - 1
    async with aiohttp.ClientSession() as http:
        # One session on the aggregate (which leaves the failed backend out), one on the steady backend.
        both = await Streamable(http, gw.url, gw.token).initialize()
        own = await Streamable(http, gw.url, gw.token, "/servers/steady/mcp").initialize()
        listed = await both.request({"jsonrpc": "2.0", "id": "l1", "method": "tools/list"})
        assert listed["result"]["_meta"][UNAVAILABLE_META] == ["flaky"]

        # Still failing: a fresh start means a fresh count, CRASH_LOOP_COUNT more tries, not one.
        assert revive_backends(gw.app) == 1
        again = await wait_for_state(gw, "failed", name="flaky", timeout=30)
        assert again["restarts"] == 2 * backend_module.CRASH_LOOP_COUNT - 1, again
        # Fixed: the next reload brings it back, for the session that was already open.
        flag.touch()
        assert revive_backends(gw.app) == 1
        assert revive_backends(gw.app) == 0  # starting already: not started twice
        revived = await wait_for_state(gw, "running", name="flaky", timeout=30)
        assert revived["restarts"] == 2 * backend_module.CRASH_LOOP_COUNT
        reply = await both.request(call("c1", "flaky__echo", text="back"))
        assert text_result(reply) == "back"
        assert text_result(await own.request(call("c2", "echo", text="same"))) == "same"
        assert revive_backends(gw.app) == 0  # nothing failed: nothing restarted
    after = await server_status(gw, "steady")
    assert (after["pid"], after["restarts"]) == (steady["pid"], 0)
    restarts = [e for e in audit_lines(tmp_path / "audit.log") if e["event"] == "backend.restart"]
    assert [(e["backend"], e["reason"], e["children"]) for e in restarts] == [("flaky", "reload", 1)] * 2


async def test_reload_gives_a_failed_per_session_child_a_fresh_start_for_its_session(
    start_gateway: StartGateway, fast_backoff: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(backend_module, "CRASH_LOOP_COUNT", 1)  # the first crash fails a child
    gw = await start_gateway({"iso": {**fault_server(), "isolation": "per-session"}})
    async with aiohttp.ClientSession() as http:
        crashing = await Streamable(http, gw.url, gw.token).initialize()
        bystander = await Streamable(http, gw.url, gw.token).initialize()
        other_pid = text_result(await bystander.request(call("p0", "pid")))
        assert "error" in await crashing.request(call("c0", "exit", code=3))
        backend = unwrap(gw.app[BACKENDS]["iso"])
        child = backend.children[crashing.session_id][1]  # type: ignore[attr-defined]
        assert await wait_until(lambda: child.state == "failed", 30)
        assert "is failed" in (await crashing.request(call("c1", "echo", text="x")))["error"]["message"]

        assert revive_backends(gw.app) == 1  # the failed child only
        assert await wait_until(lambda: child.state == "running", 30)
        assert text_result(await crashing.request(call("c2", "echo", text="back"))) == "back"
        assert text_result(await bystander.request(call("p1", "pid"))) == other_pid
    restarts = [e for e in audit_lines(tmp_path / "audit.log") if e["event"] == "backend.restart"]
    assert [(e["backend"], e["reason"], e["children"]) for e in restarts] == [("iso", "reload", 1)]


async def test_sighup_revives_a_failed_backend_in_a_real_server(tmp_path: Path) -> None:
    flag = tmp_path / "may-start"
    servers = tmp_path / "servers.json"
    servers.write_text(json.dumps({"mcpServers": {"flaky": _gated(flag)}}))
    (tmp_path / "empty.env").write_text("")
    token = secrets.token_urlsafe(32)
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "AUTH_TOKEN": token,
        "AUDIT_LOG": str(tmp_path / "audit.log"),
        "PYTHONPATH": str(REPO),
        "RATE_LIMIT_MAX_REQUESTS": "100000",  # the polling below is not what is tested
    }
    # The real command line and its signal handlers, with the backoff shortened so five crashes are quick.
    code = (
        "import sys; from mcp_sse.upstream import backend; backend.BACKOFF_BASE = 0.02; "
        "from mcp_sse.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    argv = [sys.executable, "-c", code, "serve", "--host", "127.0.0.1", "--port", "0"]
    server = await launch(
        [*argv, "--config", str(servers), "--env-file", str(tmp_path / "empty.env")], env=env, cwd=tmp_path
    )
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:

            async def flaky() -> dict[str, Any]:
                async with http.get(f"{server.url}/mcp/servers") as response:
                    assert response.status == 200
                    return dict((await response.json())["servers"][0])

            assert (await poll(flaky, lambda s: s["state"] == "failed", 30, 0.1))["state"] == "failed"
            flag.touch()
            server.process.send_signal(signal.SIGHUP)
            status = await poll(flaky, lambda s: s["state"] == "running", 30, 0.1)
            assert status["state"] == "running", status
    finally:
        exit_code = await server.stop()
    assert exit_code == 0, server.stderr
    assert "flaky: failed, started again on reload" in server.stderr
    assert "Traceback" not in server.stderr
    events = [e["event"] for e in audit_lines(tmp_path / "audit.log")]
    assert "keys.reload" in events and "backend.restart" in events


async def test_missing_command_is_failed_with_a_clear_error(
    start_gateway: StartGateway, fast_backoff: None, tmp_path: Path
) -> None:
    missing = str(tmp_path / "no-such-server")
    gw = await start_gateway({"test": {"command": missing}})
    status = await wait_for_state(gw, "failed")
    assert missing in status["last_error"]
    assert "No such file or directory" in status["last_error"]
    message = (await _connect_error(gw, "streamable")).message
    assert message.startswith("backend 'test' is failed: ") and missing in message


# A server that says it has tools, then answers tools/list with an error (a real child process).
_NO_TOOL_LIST = """
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("method") == "initialize":
        r = {"protocolVersion": "2025-11-25", "capabilities": {"tools": {}}, "serverInfo": {"name": "x"}}
        print(json.dumps({"jsonrpc": "2.0", "id": m["id"], "result": r}), flush=True)
    elif "id" in m:
        e = {"code": -32603, "message": "database is locked"}
        print(json.dumps({"jsonrpc": "2.0", "id": m["id"], "error": e}), flush=True)
"""


async def test_a_server_that_cannot_list_its_tools_fails_saying_so(
    start_gateway: StartGateway, fast_backoff: None
) -> None:
    """The handshake lists the tools (their schemas check arguments from the first call): a server
    that offers tools but cannot list them is not running, and its status says why."""
    gw = await start_gateway({"test": {"command": sys.executable, "args": ["-c", _NO_TOOL_LIST]}})
    status = await wait_for_state(gw, "failed")
    assert status["last_error"] == "tools/list failed: database is locked"
    message = (await _connect_error(gw, "streamable")).message
    assert message == "backend 'test' is failed: tools/list failed: database is locked"


async def test_non_json_first_line_is_ignored(
    start_gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "mcp_sse.upstream")
    garbage = {"command": sys.executable, "args": [SDK_PATH, "--garbage-first"]}
    gw = await start_gateway({"test": garbage})
    async with mcp_client(gw.url, gw.token) as client:
        assert text_of(await client.call_tool("add", {"a": 20, "b": 22})) == "42"
    assert any("not JSON" in r.getMessage() for r in caplog.records)
    assert (await server_status(gw))["restarts"] == 0


# -- limits and timeouts -------------------------------------------------------------------------


async def test_answer_over_the_line_limit(start_gateway: StartGateway) -> None:
    limit = 64 * 1024
    gw = await start_gateway({"test": SDK_SERVER}, max_line=limit)
    async with mcp_client(gw.url, gw.token) as client, mcp_client(gw.url, gw.token) as bystander:
        pid = text_of(await client.call_tool("pid", {}))
        # The answer carries the text twice (content and structuredContent): a quarter fits.
        assert len(text_of(await client.call_tool("big", {"size": limit // 4}))) == limit // 4
        for size in (limit + 1, 5 * limit):
            with pytest.raises(MCPError) as info:
                await client.call_tool("big", {"size": size})
            # Refused as it arrived: a timeout would say "did not answer within 60 s" instead.
            assert f"over {limit} bytes" in info.value.message
        # The child was not restarted, and it and the gateway keep serving everyone.
        assert text_of(await client.call_tool("pid", {})) == pid
        assert text_of(await bystander.call_tool("echo", {"text": "fine"})) == "fine"
        assert len(text_of(await client.call_tool("big", {"size": 1000}))) == 1000
    assert (await server_status(gw))["restarts"] == 0


async def test_per_backend_request_timeout(start_gateway: StartGateway) -> None:
    gw = await start_gateway({"test": {**SDK_SERVER, "timeout": 0.5}})
    await wait_for_state(gw, "running")
    async with mcp_client(gw.url, gw.token) as client:
        with pytest.raises(MCPError) as info:
            await client.call_tool("sleep", {"seconds": 3600})  # only a timeout can end it
        assert "did not answer within 0.5 s" in info.value.message  # this backend's, not the default
        assert text_of(await client.call_tool("echo", {"text": "next"})) == "next"
    assert (await server_status(gw))["restarts"] == 0


async def test_short_request_timeout_does_not_refuse_clients_during_startup(
    start_gateway: StartGateway,
) -> None:
    slow_start = {
        "command": "sh",
        "args": ["-c", f"sleep 1.5; exec {shlex.quote(sys.executable)} {shlex.quote(SDK_PATH)}"],
        "timeout": 0.5,
    }
    gw = await start_gateway({"test": slow_start})
    async with mcp_client(gw.url, gw.token) as client:
        assert text_of(await client.call_tool("echo", {"text": "hi"})) == "hi"


# -- shutdown and logs ---------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (an exited child nobody reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _group_members(pgid: int) -> dict[int, str]:
    members = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members[int(entry.name)] = comm
    return members


async def test_shutdown_during_startup_is_clean(
    start_gateway: StartGateway,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A child that says it has started and never answers the handshake (it reads stdin until EOF),
    # with no handshake timeout to end that: it is still starting when the gateway shuts down,
    # however slow the machine.
    monkeypatch.setattr(backend_module, "INIT_TIMEOUT", 3600.0)
    started = tmp_path / "started"
    slow_start = {"command": "sh", "args": ["-c", 'echo started > "$0"; exec cat > /dev/null', str(started)]}
    gw = await start_gateway({"test": slow_start})
    await wait_for_text(started, "started\n")  # spawned, its handshake written
    assert (await server_status(gw))["state"] == "starting"
    await gw.server.close()
    # A negative check: these turns of the loop let a late error surface (a task destroyed while
    # pending, an exception never retrieved); nothing is waited for.
    await asyncio.sleep(0.1)
    gc.collect()
    await asyncio.sleep(0.1)
    problems = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert problems == []


async def test_shutdown_kills_the_whole_process_group(start_gateway: StartGateway) -> None:
    forking = {
        "command": "sh",
        "args": ["-c", f"sleep 300 & exec {shlex.quote(sys.executable)} {shlex.quote(SDK_PATH)}"],
    }
    gw = await start_gateway({"test": forking})
    status = await wait_for_state(gw, "running")
    leader = status["pid"]
    members = _group_members(leader)
    grandchildren = [pid for pid, comm in members.items() if comm == "sleep"]
    assert len(grandchildren) == 1, members
    assert leader in members and os.getpgid(leader) == leader

    await gw.server.close()

    await wait_until(lambda: not _alive(leader) and not _alive(grandchildren[0]), 30)
    assert not _alive(leader)
    assert not _alive(grandchildren[0]), "the grandchild outlived the gateway"
    assert _group_members(leader) == {}


async def test_crash_of_a_forking_child_is_detected_and_its_group_killed(start_gateway: StartGateway) -> None:
    forking = {
        "command": "sh",
        "args": ["-c", f"sleep 300 & exec {shlex.quote(sys.executable)} {shlex.quote(SDK_PATH)}"],
        "timeout": 8,  # only bounds how long this test takes while the bug is there
    }
    gw = await start_gateway({"test": forking})
    leader = (await wait_for_state(gw, "running"))["pid"]
    (grandchild,) = [pid for pid, comm in _group_members(leader).items() if comm == "sleep"]
    async with mcp_client(gw.url, gw.token) as client:
        with pytest.raises(MCPError) as info:
            await client.call_tool("crash", {})
        # The exit was seen although the grandchild holds stdout open: a timeout would say
        # "did not answer within 8 s" instead.
        assert "exited" in info.value.message
        assert int(text_of(await client.call_tool("pid", {}))) != leader
    assert not _alive(grandchild)


async def test_child_stderr_goes_to_the_log_not_to_clients(
    start_gateway: StartGateway, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    script = tmp_path / "noisy_server.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(SERVERS)!r})\n"
        "from sdk_server import server\n"
        "print('stderr-at-startup', file=sys.stderr, flush=True)\n"
        "@server.tool()\n"
        "def shout(text: str) -> str:\n"
        "    print(f'stderr-during-call {text}', file=sys.stderr, flush=True)\n"
        "    return 'shouted'\n"
        "server.run('stdio')\n"
    )
    caplog.set_level(logging.INFO, "mcp_sse.backend.test")
    gw = await start_gateway({"test": {"command": sys.executable, "args": [str(script)]}})
    seen: list[Any] = []

    async def on_log(params: Any) -> None:
        seen.append(params)

    async def on_message(message: Any) -> None:
        seen.append(message)

    async with mcp_client(gw.url, gw.token, logging_callback=on_log, message_handler=on_message) as client:
        await client.set_logging_level("debug")
        result = await client.call_tool("shout", {"text": "marker-42"})
        assert text_of(result) == "shouted"
        assert "stderr" not in str(result.model_dump())
        await wait_until(lambda: "stderr-during-call marker-42" in caplog.text, 30)
    logged = [r.getMessage() for r in caplog.records if r.name == "mcp_sse.backend.test"]
    assert "stderr-at-startup" in logged
    assert "stderr-during-call marker-42" in logged
    assert not any("stderr" in repr(item) for item in seen)


async def _connect_error(gw: Running, transport: str) -> MCPError:
    """The MCPError a client gets when it cannot even initialize (the SDK wraps it in task groups)."""
    try:
        async with mcp_client(gw.url, gw.token, transport=transport) as client:
            await client.list_tools()
    except Exception as exc:
        found = _find_mcp_error(exc)
        assert found is not None, repr(exc)
        return found
    raise AssertionError("the client initialized against a failed backend")


def _find_mcp_error(exc: BaseException) -> MCPError | None:
    if isinstance(exc, MCPError):
        return exc
    inner: list[BaseException] = list(exc.exceptions) if isinstance(exc, BaseExceptionGroup) else []
    inner += [e for e in (exc.__cause__, exc.__context__) if e is not None]
    return next((found for e in inner if (found := _find_mcp_error(e)) is not None), None)
