"""The gateway process as production runs it: `python -m mcp_sse` with a servers file, then signals.

SIGTERM must drain: in-flight calls finish or fail explicitly within SHUTDOWN_GRACE_SECONDS,
streams close, every child's process group is killed and the exit code is 0. SIGKILL cannot
be handled: the children notice on their own (stdin EOF), and the gateway's guard process
kills what they forked (mcp_sse/upstream/guard.py), so no orphan is left. A restart comes back
with exactly the configuration it had.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mcp_sse.security.keys import generate_key
from tests.conftest import SDK_SERVER, next_event, wait_for_text
from tests.reliability.harness import (
    FAULT_SERVER,
    GatewayProcess,
    Legacy,
    Streamable,
    alive,
    call,
    fault_server,
    gateway_process,
    group_members,
    kill_groups,
    text_result,
    wait_until,
)

GRACE = 3.0


def forking_fault_server(record: Path) -> dict[str, Any]:
    """A child that leaves a grandchild in its process group, as `npx` and shell wrappers do."""
    fault = f"{shlex.quote(sys.executable)} {shlex.quote(FAULT_SERVER)} --record {shlex.quote(str(record))}"
    return {"command": "sh", "args": ["-c", f"sleep 300 & exec {fault}"]}


def received(record: Path, tool: str) -> int:
    """How many calls of `tool` the fault server has read (see its --record)."""
    return record.read_text().count(f'"name":"{tool}"') if record.exists() else 0


async def process_tree(gw: GatewayProcess, http: aiohttp.ClientSession) -> dict[str, set[int]]:
    """Each backend's process group (its leader and whatever it forked)."""
    servers = await gw.wait_running(http)
    return {s["name"]: group_members(s["pid"]) for s in servers}


async def test_sigterm_closes_streams_kills_every_group_and_exits_0(tmp_path: Path) -> None:
    record, marker = tmp_path / "received.jsonl", tmp_path / "marker"
    # No request timeout (an hour) that could end the calls below and so let the drain finish early.
    servers = {"f": {**forking_fault_server(record), "timeout": 3600}, "sdk": {**SDK_SERVER, "timeout": 3600}}
    env = {"SHUTDOWN_GRACE_SECONDS": str(GRACE), "SSE_KEEPALIVE_SECONDS": "1"}
    async with gateway_process(tmp_path, servers, env=env) as gw, aiohttp.ClientSession() as http:
        tree = await process_tree(gw, http)
        assert len(tree["f"]) == 2, tree  # the leader and its `sleep` grandchild
        legacy = await Legacy(http, gw.url, gw.token, "/servers/sdk").open()
        streamable = await Streamable(http, gw.url, gw.token, "/servers/f/mcp").initialize()
        get_stream = await http.get(streamable.url, headers=streamable.headers(Accept="text/event-stream"))
        await next_event(get_stream)  # priming
        # Two calls that would outlast the test itself, each in flight at its child.
        in_flight = [
            asyncio.create_task(streamable.post(call("long", "sleep", seconds=3600))),
            asyncio.create_task(
                legacy.post(call("long-sse", "record_cancel", seconds=3600, path=str(marker)))
            ),
        ]
        assert await wait_until(lambda: received(record, "sleep") == 1, 30)
        await wait_for_text(marker, "started")

        started = time.monotonic()
        gw.process.send_signal(signal.SIGTERM)
        # Exited, although its calls were not done: the grace ended them (they could not finish).
        code = await gw.wait_exit(60)
        elapsed = time.monotonic() - started
        print(
            f"[measure] SIGTERM with two calls in flight: exit {code} after {elapsed:.2f} s (grace {GRACE} s)"
        )
        assert code == 0, gw.stderr
        # Every exchange with a client ended: none is left hanging on a dead server.
        await asyncio.wait_for(asyncio.gather(*in_flight, return_exceptions=True), 30)
        assert await wait_until(legacy.ended.is_set, 30), "the legacy stream was not closed"
        with pytest.raises((EOFError, aiohttp.ClientError)):
            while True:
                await next_event(get_stream, timeout=30)
        get_stream.close()
        await legacy.close()
    everyone = set().union(*tree.values())
    assert await wait_until(lambda: not any(alive(pid) for pid in everyone), 30), {
        p for p in everyone if alive(p)
    }
    assert "shutting down" in gw.stderr
    assert "Traceback" not in gw.stderr


async def test_sigterm_lets_in_flight_calls_finish_or_fail_explicitly(tmp_path: Path) -> None:
    record, gate = tmp_path / "received.jsonl", tmp_path / "gate"
    env = {"SHUTDOWN_GRACE_SECONDS": str(GRACE)}
    async with (
        gateway_process(tmp_path, {"f": fault_server(record=record, timeout=3600)}, env=env) as gw,
        aiohttp.ClientSession() as http,
    ):
        await gw.wait_running(http)
        streamable = await Streamable(http, gw.url, gw.token).initialize()
        legacy = await Legacy(http, gw.url, gw.token).open()
        # Short calls answer once the test opens the gate; long ones would outlast the test itself.
        short = asyncio.create_task(streamable.post(call("short", "gate", path=str(gate))))
        long = asyncio.create_task(streamable.post(call("long", "sleep", seconds=3600)))
        assert await legacy.post(call("short-sse", "gate", path=str(gate))) == 202
        assert await legacy.post(call("long-sse", "sleep", seconds=3600)) == 202
        assert await wait_until(lambda: received(record, "gate") == received(record, "sleep") == 2, 30)
        gw.process.send_signal(signal.SIGTERM)
        # Draining now: the short calls' answers come during the grace.
        assert await wait_until(lambda: "shutting down" in gw.stderr, 30), gw.stderr
        gate.touch()
        (short_status, short_messages), (long_status, long_messages) = await asyncio.wait_for(
            asyncio.gather(short, long), 60
        )
        answers = {"short": short_messages, "long": long_messages}
        assert short_messages and long_messages, (
            f"calls in flight got no answer: {short_status}, {long_status}"
        )
        # The call answered within the grace finished; the other was told it will not.
        assert text_result(answers["short"][-1]) == "opened", answers
        assert "error" in answers["long"][-1], answers
        assert text_result(await legacy.answer("short-sse", timeout=30)) == "opened"
        assert "error" in await legacy.answer("long-sse", timeout=30)
        await legacy.close()
        assert await gw.wait_exit(60) == 0


async def sigkill_and_watch(
    tmp_path: Path, servers: dict[str, Any], record: Path
) -> tuple[dict[str, set[int]], set[int]]:
    """SIGKILL the gateway mid-call (`f` records what it reads in `record`); the processes of
    each backend, and those still alive 30 s later."""
    async with gateway_process(tmp_path, servers) as gw, aiohttp.ClientSession() as http:
        tree = await process_tree(gw, http)
        client = await Streamable(http, gw.url, gw.token, "/servers/f/mcp").initialize()
        pending = asyncio.create_task(client.post(call("x", "sleep", seconds=60)))
        assert await wait_until(lambda: received(record, "sleep") == 1, 30)  # in flight at the child
        gw.process.kill()
        assert await gw.wait_exit(30) == -signal.SIGKILL
        await asyncio.gather(pending, return_exceptions=True)
        everyone = set().union(*tree.values())
        started = time.monotonic()
        await wait_until(lambda: not any(alive(pid) for pid in everyone), 30)
        survivors = {pid for pid in everyone if alive(pid)}
        print(
            f"[measure] SIGKILL: {len(everyone)} processes; alive after "
            f"{time.monotonic() - started:.2f} s: {sorted(survivors)}"
        )
        return tree, survivors


async def test_sigkill_of_the_gateway_leaves_no_orphan_child(tmp_path: Path) -> None:
    record = tmp_path / "received.jsonl"
    servers = {"f": fault_server(record=record), "sdk": SDK_SERVER}
    tree, survivors = await sigkill_and_watch(tmp_path, servers, record)
    try:
        assert all(len(group) == 1 for group in tree.values()), tree
        assert survivors == set(), "children outlived a SIGKILLed gateway"
    finally:
        kill_groups(survivors)


async def test_sigkill_of_the_gateway_leaves_no_orphan_grandchild(tmp_path: Path) -> None:
    record = tmp_path / "received.jsonl"
    tree, survivors = await sigkill_and_watch(tmp_path, {"f": forking_fault_server(record)}, record)
    try:
        assert len(tree["f"]) == 2, tree
        assert survivors == set(), f"{len(survivors)} processes outlived a SIGKILLed gateway"
    finally:
        kill_groups(tree["f"])


# -- a full restart -------------------------------------------------------------------------------


async def observe(gw: GatewayProcess, http: aiohttp.ClientSession, keys: dict[str, str]) -> dict[str, Any]:
    """Everything configuration decides, as a client sees it."""
    servers = await gw.wait_running(http)
    seen: dict[str, Any] = {"servers": sorted((s["name"], s["state"], s["tools"]) for s in servers)}
    admin = await Streamable(http, gw.url, gw.token, "/servers/sdk/mcp").initialize()
    seen["env"] = text_result(await admin.request(call(1, "env", name="GREETING")))
    fault = await Streamable(http, gw.url, gw.token, "/servers/f/mcp").initialize()
    seen["timeout"] = (await fault.request(call(2, "hang")))["error"]["message"]
    seen["too big"] = (await admin.post(b'{"pad": "' + b"x" * 3000 + b'"}'))[0]
    viewer = await Streamable(http, gw.url, keys["viewer"], "/servers/sdk/mcp").initialize()
    listed = await viewer.request({"jsonrpc": "2.0", "id": 3, "method": "tools/list"})
    seen["viewer lists"] = sorted(t["name"] for t in listed["result"]["tools"])
    seen["viewer calls"] = "error" in await viewer.request(call(4, "echo", text="x"))
    async with http.post(
        f"{gw.url}/servers/f/mcp", json={}, headers={"Authorization": f"Bearer {keys['operator']}"}
    ) as response:
        seen["operator on f"] = response.status
    operator = await Streamable(http, gw.url, keys["operator"], "/servers/sdk/mcp").initialize()
    seen["operator calls"] = text_result(await operator.request(call(5, "echo", text="op")))
    for client in (admin, fault, viewer, operator):
        await client.delete()
    return seen


async def test_full_restart_loses_no_configuration(tmp_path: Path) -> None:
    viewer_secret, viewer = generate_key("viewer", "viewer")
    operator_secret, operator = generate_key("operator", "operator")
    operator["backends"] = ["sdk"]
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps({"keys": [viewer, operator]}))
    env_file = tmp_path / "settings.env"
    env_file.write_text(
        f"KEYS_FILE={keys_file}\nMAX_BODY_BYTES=2000\nEVENT_BUFFER=64\nTEST_GREETING=from-the-env-file\n"
    )
    servers = {
        "sdk": {**SDK_SERVER, "env": {"GREETING": "${TEST_GREETING:-unset}"}},
        "f": fault_server(timeout=1),
    }
    keys = {"viewer": viewer_secret, "operator": operator_secret}
    args = ("--env-file", str(env_file))
    token = "restart-" + "t" * 40
    session_id = None
    async with aiohttp.ClientSession() as http:
        async with gateway_process(tmp_path, servers, token=token, extra_args=args) as first:
            before = await observe(first, http, keys)
            kept = await Streamable(http, first.url, token, "/servers/sdk/mcp").initialize()
            session_id = kept.session_id
            first.process.send_signal(signal.SIGTERM)
            assert await first.wait_exit(GRACE + 12) == 0
        audit_lines = len((tmp_path / "audit.log").read_text().splitlines())
        async with gateway_process(tmp_path, servers, token=token, extra_args=args) as second:
            after = await observe(second, http, keys)
            # Sessions are not configuration: an old one is unknown, so its client initializes again.
            stale = Streamable(http, second.url, token, "/servers/sdk/mcp")
            stale.session_id = session_id
            assert (await stale.post(call(6, "echo", text="x")))[0] == 404
            second.process.send_signal(signal.SIGTERM)
            assert await second.wait_exit(GRACE + 12) == 0
    print(f"[measure] restart: configuration seen before and after: {before}")
    assert before == after
    assert before["env"] == "from-the-env-file" and "within 1 s" in before["timeout"]
    assert before["too big"] == 413 and before["operator on f"] == 403 and before["viewer calls"]
    # The audit log was appended to, not replaced.
    assert len((tmp_path / "audit.log").read_text().splitlines()) > audit_lines > 0
