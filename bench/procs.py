"""The processes under test: our gateway, the peers, and how each is found, started and stopped.

Every process is started in a new session (its own process group) and on 127.0.0.1 only;
`Processes.stop_all()` ends each group, and the groups of any descendants that made their own.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from cryptography.fernet import Fernet

HERE: Final = Path(__file__).resolve().parent
PEERS: Final = HERE / ".peers"
SUPERGATEWAY_JS: Final = PEERS / "node_modules" / "supergateway" / "dist" / "index.js"
MCP_PROXY: Final = PEERS / "mcp-proxy-venv" / "bin" / "mcp-proxy"
SUPERGATEWAY_VERSION: Final = "4.0.0"
MCP_PROXY_VERSION: Final = "0.13.0"
HOST: Final = "127.0.0.1"
CHILD: Final = [sys.executable, "-m", "mcp_server_time", "--local-timezone", "UTC"]
"""The MCP server behind every gateway, and the floor when spoken to directly."""

INSTALL_HINTS: Final = {
    "supergateway": f"npm install --prefix {PEERS} supergateway@{SUPERGATEWAY_VERSION}",
    "mcp-proxy": f"python3 -m venv {PEERS / 'mcp-proxy-venv'} && "
    f"{PEERS / 'mcp-proxy-venv' / 'bin' / 'pip'} install mcp-proxy=={MCP_PROXY_VERSION}",
}


@dataclass
class Gateway:
    """One running gateway process and the URLs of its two transports (None: not served)."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    sse_path: str | None
    mcp_path: str | None
    headers: dict[str, str] = field(default_factory=dict)
    note: str = ""

    def url(self, transport: str) -> str:
        path = self.sse_path if transport == "sse" else self.mcp_path
        assert path is not None
        return f"http://{HOST}:{self.port}{path}"

    @property
    def pid(self) -> int:
        return self.process.pid


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def rss_kib(pid: int) -> int:
    """Resident memory of one process (VmRSS), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int | None) -> float:
    """CPU time the threads of one process have run (schedstat: nanoseconds, not 10 ms ticks)."""
    if pid is None:
        return 0.0
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def busy_cpus(seconds: float = 1.0) -> float:
    """How many CPUs' worth of work the whole machine did over `seconds` (other users' load)."""

    def sample() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = values[3] + values[4]
        return sum(values) - idle, sum(values)

    busy0, total0 = sample()
    time.sleep(seconds)
    busy1, total1 = sample()
    return (busy1 - busy0) / max(1, total1 - total0) * (os.cpu_count() or 1)


def raise_fd_limit(wanted: int) -> int:
    """Raise RLIMIT_NOFILE for this process (and so every process it starts); the soft limit reached."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(soft, wanted)
    if hard != resource.RLIM_INFINITY and target > hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            return target
        except (ValueError, OSError):
            target = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def check_child() -> str | None:
    """Why the MCP server under test cannot run, or None."""
    probe = subprocess.run(
        [sys.executable, "-c", "import mcp_server_time"], capture_output=True, check=False, timeout=60
    )
    return None if probe.returncode == 0 else f"pip install mcp-server-time  (into {sys.prefix})"


def missing_peers() -> dict[str, str]:
    """Peers that are not installed, with the command that installs each. Nothing is installed here."""
    missing: dict[str, str] = {}
    if not SUPERGATEWAY_JS.is_file() or not _node():
        missing["supergateway"] = INSTALL_HINTS["supergateway"]
    else:
        version = json.loads((SUPERGATEWAY_JS.parent.parent / "package.json").read_text())["version"]
        if version != SUPERGATEWAY_VERSION:
            print(f"note: supergateway {version} found, the bench is written for {SUPERGATEWAY_VERSION}")
    if not MCP_PROXY.is_file():
        missing["mcp-proxy"] = INSTALL_HINTS["mcp-proxy"]
    return missing


def _node() -> str | None:
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(directory) / "node"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


class Processes:
    """Starts gateways, remembers every process group, and ends them all."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []

    def spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("wb")
        self._logs.append(log)
        process = subprocess.Popen(
            cmd,
            # Not the caller's directory: `python -m` would import ./mcp_sse from it, and the CLI read ./.env.
            cwd=self.log_dir,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.started.append(process)
        return process

    def ours(
        self,
        servers_file: Path,
        name: str = "ours",
        source: Path | None = None,
        wrapper: list[str] | None = None,
        ready_timeout: float = 60.0,
        backend: dict[str, Any] | None = None,
        settings: dict[str, str] | None = None,
    ) -> Gateway:
        """Our gateway; `source` is a directory holding another copy of `mcp_sse` to run instead;
        `wrapper` a command that runs it (valgrind, for `python -m bench.instructions`); `backend`
        its servers-file entry (default: the child); `settings` more environment (METRICS=off)."""
        port, token = free_port(), Fernet.generate_key().decode()
        env = {
            "AUTH_TOKEN": token,
            "SESSION_SECRET": Fernet.generate_key().decode(),
            "AUDIT_LOG": "off",
            "RATE_LIMIT_MAX_REQUESTS": "10000000",
            "MAX_SESSIONS": "20000",
            "MAX_STREAMS_PER_KEY": "20000",
            "LOG_LEVEL": "WARNING",
            **(settings or {}),
        }
        # This checkout's package (or the candidate's), whatever is installed in the environment.
        path = [str(source or HERE.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
        env["PYTHONPATH"] = os.pathsep.join(path)
        servers = {"mcpServers": {"time": backend or {"command": CHILD[0], "args": CHILD[1:]}}}
        servers_file.write_text(json.dumps(servers))
        cmd = [*(wrapper or []), sys.executable, "-m", "mcp_sse", "--host", HOST, "--port", str(port)]
        process = self.spawn(name, [*cmd, "--config", str(servers_file)], env)
        headers = {"Authorization": f"Bearer {token}"}
        return self._ready(Gateway(name, process, port, "/sse", "/mcp", headers), ready_timeout)

    def supergateway(self, transport: str) -> Gateway:
        port = free_port()
        cmd = [_node() or "node", str(SUPERGATEWAY_JS), "--stdio", shlex.join(CHILD), "--port", str(port)]
        cmd += ["--logLevel", "none"]
        if transport == "mcp":
            # Its stateless mode starts a child per request; stateful starts one per session.
            cmd += ["--outputTransport", "streamableHttp", "--stateful"]
            gateway = Gateway("supergateway", self.spawn("supergateway-mcp", cmd), port, None, "/mcp")
            gateway.note = "Streamable HTTP: one child per session (--stateful)"
            return self._ready(gateway)
        return self._ready(Gateway("supergateway", self.spawn("supergateway-sse", cmd), port, "/sse", None))

    def mcp_proxy(self) -> Gateway:
        port = free_port()
        cmd = [str(MCP_PROXY), "--host", HOST, "--port", str(port), "--log-level", "WARNING", "--", *CHILD]
        # Starlette mounts /mcp as a prefix and redirects /mcp to /mcp/.
        return self._ready(Gateway("mcp-proxy", self.spawn("mcp-proxy", cmd), port, "/sse", "/mcp/"))

    def _ready(self, gateway: Gateway, timeout: float = 60.0) -> Gateway:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if gateway.process.poll() is not None:
                break
            with contextlib.suppress(OSError), socket.create_connection((HOST, gateway.port), timeout=1):
                return gateway
            time.sleep(0.1)
        log = (self.log_dir / f"{gateway.name}.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{gateway.name} did not start listening on {gateway.port}:\n{log}")

    def stop_all(self) -> None:
        """SIGTERM every group we started (and their descendants' groups), then SIGKILL what is left."""
        groups: set[int] = set()
        for process in self.started:
            for pid in [process.pid, *_descendants(process.pid)]:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    groups.add(os.getpgid(pid))
        groups.discard(os.getpgrp())
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for group in groups:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(group, sig)
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline and any(p.poll() is None for p in self.started):
                time.sleep(0.05)
        for process in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=1)
        for log in self._logs:
            log.close()
        self.started.clear()


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found
