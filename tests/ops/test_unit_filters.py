"""The server does only what the systemd unit's kernel filters let it do.

The unit runs it with `SystemCallFilter=`, `RestrictAddressFamilies=` and
`MemoryDenyWriteExecute=yes`; a refused system call fails with EPERM, quietly, so a dependency
that needs one more (an event loop, a Rust extension) would break the service in production
only. Here a real server, on each event loop, with a shared and a per-session child, serves
the SDK client over both transports, reloads on SIGHUP and stops on SIGTERM under strace; every
system call it and its children made must be one the unit's filter allows, as systemd itself
expands the groups (`systemd-analyze syscall-filter`).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from mcp.shared.exceptions import MCPError

from tests.conftest import SDK_SERVER, launch, mcp_client, text_of
from tests.ops.test_connections import LOOPS, nofile
from tests.test_systemd_unit import UNIT, directives

STRACE, ANALYZE = shutil.which("strace"), shutil.which("systemd-analyze")
TOKEN = "unit-filter-test-token-0123456789abcdef"


def _can_trace() -> bool:
    if STRACE is None or ANALYZE is None:
        return False
    probe = subprocess.run([STRACE, "-f", "-qq", "-o", os.devnull, "true"], capture_output=True, timeout=30)
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(
    not _can_trace(), reason="needs strace (allowed to trace here) and systemd-analyze"
)


def allowed_syscalls() -> set[str]:
    """The unit's SystemCallFilter= lines, applied in order, with systemd's own group lists."""
    assert ANALYZE is not None
    listing = subprocess.run([ANALYZE, "syscall-filter"], capture_output=True, text=True, timeout=60).stdout
    groups: dict[str, list[str]] = {}
    for line in listing.splitlines():
        if line.startswith("@"):
            members = groups[line.strip()] = []
        elif line.strip() and not line.strip().startswith("#"):
            members.append(line.strip())

    def expand(name: str) -> set[str]:
        return set().union(*(expand(m) for m in groups[name])) if name.startswith("@") else {name}

    allowed: set[str] = set()
    for value in directives(UNIT.read_text())["SystemCallFilter"]:
        names = set().union(*(expand(n) for n in value.removeprefix("~").split()))
        allowed = allowed - names if value.startswith("~") else allowed | names
    assert "read" in allowed and "setuid" not in allowed  # the expansion found the groups
    return allowed


async def serve_a_workload(tmp_path: Path, loop: str, trace: Path) -> None:
    servers = tmp_path / "servers.json"
    per_session = {**SDK_SERVER, "isolation": "per-session"}
    servers.write_text(json.dumps({"mcpServers": {"shared": SDK_SERVER, "iso": per_session}}))
    with socket.socket() as probe:  # PUBLIC_URL names the port, so it is chosen here
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "AUTH_TOKEN": TOKEN,
        "EVENT_LOOP": loop,
        "AUDIT_LOG": str(tmp_path / "audit.log"),
        # The built-in authorization server too: its SQLite store (WAL, fsync, locks) under the filter.
        "OAUTH_SERVER": "true",
        "PUBLIC_URL": f"http://127.0.0.1:{port}",
        "STATE_DIR": str(tmp_path / "state"),
    }
    assert STRACE is not None
    argv = [STRACE, "-f", "-qq", "-o", str(trace), sys.executable, "-m", "mcp_sse", "--port", str(port)]
    # A soft limit below what the settings need, as under systemd: the raise is traced too.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    limits = nofile(1024, hard) if hard == resource.RLIM_INFINITY or hard >= 8192 else None
    traced = await launch([*argv, "--config", str(servers)], env=env, cwd=tmp_path, preexec_fn=limits)
    try:
        children = Path(f"/proc/{traced.process.pid}/task/{traced.process.pid}/children").read_text()
        server_pid = int(children.split()[0])
        for transport in ("streamable", "sse"):
            async with mcp_client(traced.url, TOKEN, transport=transport) as client:
                assert {"iso__pid", "shared__add"} <= {t.name for t in (await client.list_tools()).tools}
                assert text_of(await client.call_tool("shared__add", {"a": 1, "b": 2})) == "3"
                assert int(text_of(await client.call_tool("iso__pid", {}))) > 0
                with pytest.raises(MCPError, match="is not of type"):  # jsonschema-rs, at work
                    await client.call_tool("shared__add", {"a": "one", "b": 2})
        registration = {
            "redirect_uris": ["http://127.0.0.1:9/callback"],
            "token_endpoint_auth_method": "none",
        }
        async with (
            aiohttp.ClientSession() as http,
            http.post(traced.url + "/oauth/register", json=registration) as response,
        ):
            assert response.status == 201, await response.text()
        os.kill(server_pid, signal.SIGHUP)
        async with asyncio.timeout(60):  # traced, so slow: an event, however long it takes
            while '"keys.reload"' not in traced.stderr:
                await asyncio.sleep(0.1)
        assert limits is None or "open-file limit raised from 1024" in traced.stderr
        os.kill(server_pid, signal.SIGTERM)
        assert await traced.stop(timeout=30) == 0  # strace exits with the server's own code
    finally:
        if traced.process.returncode is None:
            traced.process.kill()
            await traced.process.wait()


@pytest.mark.parametrize("loop", LOOPS)
async def test_every_system_call_is_one_the_unit_allows(tmp_path: Path, loop: str) -> None:
    trace = tmp_path / "trace.txt"
    await serve_a_workload(tmp_path, loop, trace)
    lines = trace.read_text().splitlines()
    called = {m.group(1) for line in lines if (m := re.match(r"\d+ +(?:<\.\.\. )?(\w+)[( ]", line))}
    assert {"execve", "accept4", "epoll_wait", "pipe2"} & called and len(called) > 30, sorted(called)
    # SQLite gives its WAL and journal files the database's owner only when it runs as root, as
    # these tests do; the unit runs as its own user (and the filter would answer EPERM, ignored).
    as_root = {"fchown"} if os.geteuid() == 0 else set()
    assert sorted(called - allowed_syscalls() - as_root) == []

    families = {m.group(1) for line in lines if (m := re.match(r"\d+ +socket(?:pair)?\((AF_\w+)", line))}
    assert families and families <= set(directives(UNIT.read_text())["RestrictAddressFamilies"][0].split())

    # MemoryDenyWriteExecute=yes refuses a writable and executable mapping, and making any executable.
    refused = [
        line
        for line in lines
        if re.match(r"\d+ +(mprotect|pkey_mprotect)\(.*PROT_EXEC", line)
        or (re.match(r"\d+ +mmap\(", line) and "PROT_WRITE" in line and "PROT_EXEC" in line)
    ]
    assert refused == []
