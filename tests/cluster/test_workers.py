"""WORKERS=2 (cluster/workers.py): one supervisor, two full gateways on one port (SO_REUSEPORT).
The kernel spreads connections over the workers, so a session's requests land on either; the SDK
client completes every call on both transports and eras; a worker killed with SIGKILL, or stuck
past its watchdog, is started again and takes only its own sessions with it; SIGHUP reloads every
worker; systemd hears from the supervisor only; SIGTERM stops everything cleanly."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import redis.asyncio
from cryptography.fernet import Fernet

from ..conftest import init_message, launch
from ..redis_server import RedisServer
from ..security.helpers import audit_lines
from ..test_cli import GATEWAY_VARIABLES
from .conftest import SCRIPT, free_port, needs_haproxy
from .test_haproxy import ACCEPT, calls

pytestmark = needs_haproxy

WORKER = re.compile(r"worker (\d) started \(pid (\d+)\)")


def echo_message(text: str) -> dict[str, object]:
    return {
        "jsonrpc": "2.0",
        "id": 3,
        "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": text}},
    }


async def fresh_connection_echo(url: str, token: str, session_id: str, text: str) -> int:
    """One call on a new connection: with SO_REUSEPORT, it lands on either worker."""
    headers = {**ACCEPT, "Authorization": f"Bearer {token}", "Mcp-Session-Id": session_id}
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http,
        http.post(f"{url}/mcp", json=echo_message(text), headers=headers) as response,
    ):
        if response.status == 200:
            assert (await response.json())["result"]["content"][0]["text"] == text
        return response.status


async def new_session(url: str, token: str) -> str:
    headers = {**ACCEPT, "Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http,
        http.post(f"{url}/mcp", json=init_message(), headers=headers) as response,
    ):
        assert response.status == 200
        return response.headers["Mcp-Session-Id"]


def pids(lines: str) -> dict[int, list[int]]:
    found: dict[int, list[int]] = {}
    for number, pid in WORKER.findall(lines):
        found.setdefault(int(number), []).append(int(pid))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_two_workers_on_one_port(tmp_path: Path) -> None:
    redis_server = RedisServer(tmp_path)
    await asyncio.to_thread(redis_server.start)
    token = secrets.token_urlsafe(32)
    (tmp_path / "empty.env").write_text("")
    env = {
        **{k: v for k, v in os.environ.items() if k not in GATEWAY_VARIABLES},
        "HOME": str(tmp_path),
        "HOST": "127.0.0.1",
        "PORT": str(free_port()),
        "WORKERS": "2",
        "AUTH_TOKEN": token,
        "SESSION_SECRET": Fernet.generate_key().decode(),
        "REDIS_URL": redis_server.url(0),
        "AUDIT_LOG": str(tmp_path / "audit.log"),
        "RATE_LIMIT_MAX_REQUESTS": "100000",
    }
    # systemd's side of Type=notify: only the supervisor speaks to it, for all the workers.
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.setblocking(False)
    env["NOTIFY_SOCKET"] = str(tmp_path / "notify")
    env["WATCHDOG_USEC"] = "2000000"  # WatchdogSec=2: a ping a second; a worker silent 4 s is stuck
    server = await launch(
        [sys.executable, SCRIPT, "--env-file", str(tmp_path / "empty.env")],
        env=env,
        cwd=tmp_path,
        until="2 workers listening on",
    )
    try:
        url = f"http://127.0.0.1:{env['PORT']}"
        said: list[str] = []

        async def listen() -> None:  # read as systemd does: a full socket would block the sender
            while True:
                said.extend((await asyncio.get_running_loop().sock_recv(notify, 4096)).decode().splitlines())

        listener = asyncio.create_task(listen())
        async with asyncio.timeout(10):
            while not said:
                await asyncio.sleep(0.02)
        assert said[:2] == ["READY=1", f"STATUS=2 workers listening on {url}"]
        workers = pids(server.stderr)
        assert sorted(workers) == [1, 2]
        assert len(set(re.findall(r"cluster instance ([0-9a-f]{8})", server.stderr))) == 2  # an id each
        expected = [f"n{i}" for i in range(12)]
        results = await asyncio.gather(
            calls(url, token, transport="streamable", mode="legacy"),
            calls(url, token, transport="sse", mode="legacy"),
            calls(url, token, transport="streamable", mode="auto"),
        )
        assert results == [("2025-11-25", expected), ("2025-11-25", expected), ("2026-07-28", expected)]
        # One session, many connections: about half land on the worker that does not hold it.
        session = await new_session(url, token)
        statuses = [await fresh_connection_echo(url, token, session, f"c{i}") for i in range(24)]
        assert statuses == [200] * 24
        # One bounded Redis pool per worker: ~100 requests later, a handful of connections each.
        store = redis.asyncio.Redis.from_url(redis_server.url(0))
        try:
            others = len(await store.client_list()) - 1
        finally:
            await store.aclose()
        assert 2 <= others <= 2 * 8, others
        # SIGKILL one worker: the supervisor starts it again; only its sessions are lost.
        sessions = [await new_session(url, token) for _ in range(8)]
        victim = workers[1][0]
        os.kill(victim, signal.SIGKILL)
        async with asyncio.timeout(30):  # started again, and serving (its READY=1 reached the supervisor)
            while server.stderr.count("worker 1 ready") < 2:
                await asyncio.sleep(0.05)
        assert len(pids(server.stderr)[1]) == 2
        answers = [await fresh_connection_echo(url, token, s, "after") for s in sessions]
        assert set(answers) <= {200, 404} and 200 in answers, answers
        # (8 sessions on 2 workers: with SO_REUSEPORT's hash, both outcomes are near-certain.)
        lost = [s for s, status in zip(sessions, answers, strict=True) if status == 404]
        for session_id in lost:  # each stays lost, whichever worker the retry lands on
            assert await fresh_connection_echo(url, token, session_id, "again") == 404
        fresh = await new_session(url, token)
        assert [await fresh_connection_echo(url, token, fresh, f"f{i}") for i in range(8)] == [200] * 8
        # SIGHUP to the supervisor reloads every worker (each audits its keys reload).
        server.process.send_signal(signal.SIGHUP)
        async with asyncio.timeout(30):
            while sum(line["event"] == "keys.reload" for line in audit_lines(tmp_path / "audit.log")) < 2:
                await asyncio.sleep(0.05)
        # A worker that stops answering (SIGSTOP: as stuck as a loop can be) is killed and started again.
        stuck = pids(server.stderr)[2][-1]
        os.kill(stuck, signal.SIGSTOP)
        async with asyncio.timeout(60):
            while server.stderr.count("worker 2 ready") < 2:
                await asyncio.sleep(0.05)
        assert "worker 2 stopped answering its watchdog; killing it" in server.stderr
        assert not alive(stuck)  # killed and reaped before its successor started
    finally:
        code = await server.stop(timeout=30)
        redis_server.stop()
    await asyncio.sleep(0.1)  # the last datagrams
    listener.cancel()
    notify.close()
    # The reload and the stop, from the supervisor; never a worker's own READY=1 or STOPPING=1;
    # and the watchdog pinged all along, stuck worker or not.
    assert [line for line in said[2:] if not line.startswith(("MONOTONIC_USEC=", "WATCHDOG="))] == [
        "RELOADING=1",
        "READY=1",
        "STOPPING=1",
    ], said
    assert said.count("WATCHDOG=1") >= 3, said
    assert code == 0, server.stderr[-3000:]
    assert not any(alive(pid) for started in pids(server.stderr).values() for pid in started), (
        "a worker outlived the supervisor"
    )


async def test_a_worker_that_cannot_start_stops_the_supervisor(tmp_path: Path) -> None:
    """A setting no worker can run with (here: a port another program holds) is an exit, not a loop."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        (tmp_path / "empty.env").write_text("")
        env = {
            **{k: v for k, v in os.environ.items() if k not in GATEWAY_VARIABLES},
            "HOME": str(tmp_path),
            "WORKERS": "2",
            "REDIS_URL": "redis://127.0.0.1:9/0",  # never reached: the workers fail before
            "AUDIT_LOG": str(tmp_path / "audit.log"),
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable, SCRIPT, "--port", str(port), "--env-file", str(tmp_path / "empty.env"),
            env=env, cwd=tmp_path, stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 1, stderr.decode()[-2000:]
    assert "exited with 1 while starting; stopping" in stderr.decode()
