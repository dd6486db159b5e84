"""WORKERS=N: one supervisor process and N full gateways on the same port (SO_REUSEPORT).

Each worker is a fresh `python -m mcp_sse` process (not a fork: its own instance id, its own Redis
pool, its own children), so the kernel spreads connections over them and the cluster (node.py)
forwards each 2025-era session to the worker that owns it. The supervisor restarts a worker that
dies, forwards SIGHUP (reload) and SIGTERM (drain and stop), and speaks to systemd for all of them:
the workers' sd_notify goes to the supervisor's own socket; it says READY=1 once every worker is,
and pings systemd's watchdog itself, killing (so restarting) a worker that stops pinging it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import secrets
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Sequence
from typing import Final

from ..ops import sd_notify
from ..settings import Settings

__all__ = ["WORKER_ENV", "is_worker", "supervise"]

log = logging.getLogger("mcp_sse.workers")

WORKER_ENV: Final = "MCP_SSE_WORKER"
"""Set by the supervisor in each worker's environment (its number): serve, with SO_REUSEPORT."""
RESTART_DELAY: Final = 1.0
_PR_SET_PDEATHSIG: Final = 1


def is_worker() -> bool:
    return bool(os.environ.get(WORKER_ENV))


def _die_with_parent() -> None:
    """In the worker, before exec: SIGTERM when the supervisor dies, however it dies (no orphans)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Supervisor:
    def __init__(self, settings: Settings, argv: Sequence[str], announce: Callable[[str], None]) -> None:
        self.settings = settings
        self.count = settings.workers
        self.argv = list(argv)
        self.announce = announce
        self.processes: dict[int, asyncio.subprocess.Process] = {}
        self.ready: set[int] = set()  # worker numbers
        self.pings: dict[int, float] = {}
        self.url = ""
        self.stop = asyncio.Event()
        self.all_ready = asyncio.Event()
        self.stopping = False
        self.failed = 0
        self._address = f"\0mcp-sse-workers-{secrets.token_hex(8)}"
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._socket.bind(self._address)
        # The sender's pid on each datagram: which worker said READY=1 or WATCHDOG=1.
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._socket.setblocking(False)

    def _environment(self, number: int) -> dict[str, str]:
        env = dict(os.environ)
        env[WORKER_ENV] = str(number)
        env["NOTIFY_SOCKET"] = "@" + self._address[1:]
        env.pop("WATCHDOG_PID", None)  # the workers ping the supervisor, which pings systemd
        # Secrets a loopback start generated are made once, here: every worker must share them
        # (the same AUTH_TOKEN answers on every connection; SESSION_SECRET signs cookies and hops).
        if self.settings.auth_token is not None and self.settings.token_generated:
            env["AUTH_TOKEN"] = self.settings.auth_token.reveal()
        if self.settings.session_secret is not None:
            env["SESSION_SECRET"] = self.settings.session_secret.reveal()
        return env

    def _on_datagram(self) -> None:
        while True:
            try:
                data, ancillary, _, _ = self._socket.recvmsg(4096, socket.CMSG_SPACE(12))
            except (BlockingIOError, InterruptedError):
                return
            pid = next(
                (
                    struct.unpack("iII", payload[:12])[0]
                    for level, kind, payload in ancillary
                    if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
                ),
                None,
            )
            number = next((n for n, p in self.processes.items() if p.pid == pid), None)
            if number is None:
                continue
            for line in data.decode(errors="replace").splitlines():
                if line == "READY=1":
                    if number not in self.ready:
                        log.info("worker %d ready (pid %d)", number, pid)
                    self.ready.add(number)
                    self.pings[number] = time.monotonic()
                    if len(self.ready) == self.count:
                        self.all_ready.set()
                elif line == "WATCHDOG=1":
                    self.pings[number] = time.monotonic()
                elif line.startswith("STATUS=listening on "):
                    self.url = line.removeprefix("STATUS=listening on ")

    async def _keep(self, number: int) -> None:
        """Run worker `number`, and again whenever it dies, until the supervisor stops."""
        command = [sys.executable, "-m", "mcp_sse", *self.argv, "--port", str(self.settings.port)]
        while not self.stopping:
            process = await asyncio.create_subprocess_exec(
                *command, env=self._environment(number), stdin=asyncio.subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )  # fmt: skip
            self.processes[number] = process
            log.info("worker %d started (pid %d)", number, process.pid)
            code = await process.wait()
            self.ready.discard(number)
            if self.stopping:
                return
            if not self.all_ready.is_set():  # failing before ever serving: a setting, not bad luck
                log.error("worker %d exited with %d while starting; stopping", number, code)
                self.failed = code or 1
                self.stop.set()
                return
            log.warning("worker %d (pid %d) exited with %d; starting it again", number, process.pid, code)
            await asyncio.sleep(RESTART_DELAY)

    def _reload(self) -> None:
        sd_notify.notify("RELOADING=1", f"MONOTONIC_USEC={sd_notify.monotonic_usec()}")
        # Only to workers that are serving: one still starting has no handler yet (SIGHUP would end
        # it), and reads the files afresh anyway.
        self._signal_all(signal.SIGHUP, only=self.ready)
        sd_notify.notify("READY=1")

    def _signal_all(self, sig: signal.Signals, only: set[int] | None = None) -> None:
        for number, process in self.processes.items():
            if process.returncode is None and (only is None or number in only):
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(sig)

    async def _watchdog(self, interval: float) -> None:
        """Ping systemd while every worker pings; a worker silent for 4 intervals is stuck: killed
        (and so started again), as systemd would kill a single gateway."""
        while True:
            now = time.monotonic()
            for number in list(self.ready):
                if now - self.pings.get(number, now) > 4 * interval:
                    log.error("worker %d stopped answering its watchdog; killing it", number)
                    with contextlib.suppress(ProcessLookupError):
                        self.processes[number].kill()
            sd_notify.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        loop.add_reader(self._socket.fileno(), self._on_datagram)
        keepers = [asyncio.create_task(self._keep(n)) for n in range(1, self.count + 1)]
        watchdog = None
        ready = asyncio.create_task(self.all_ready.wait())
        stopped = asyncio.create_task(self.stop.wait())
        await asyncio.wait([ready, stopped], return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if self.all_ready.is_set() and not self.stop.is_set():
            log.info("%d workers listening on %s", self.count, self.url)
            self.announce(self.url)
            sd_notify.notify("READY=1", f"STATUS={self.count} workers listening on {self.url}")
            if (interval := sd_notify.watchdog_interval()) is not None:
                watchdog = asyncio.create_task(self._watchdog(interval))
        await stopped
        self.stopping = True
        sd_notify.notify("STOPPING=1")
        if watchdog is not None:
            watchdog.cancel()
        self._signal_all(signal.SIGTERM)  # each drains its own streams and children
        _, late = await asyncio.wait(keepers, timeout=self.settings.shutdown_grace + 5)
        if late:
            self._signal_all(signal.SIGKILL)
            await asyncio.wait(keepers)
        loop.remove_reader(self._socket.fileno())
        self._socket.close()
        return self.failed


def supervise(settings: Settings, argv: Sequence[str], announce: Callable[[str], None]) -> int:
    """Run `settings.workers` workers of this command line until SIGTERM; the exit code."""
    reserved = None
    if settings.port == 0:  # every worker must bind the same port: pick it once, keep it taken
        reserved = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET)
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reserved.bind((settings.host, 0))
        settings = settings.replace(port=reserved.getsockname()[1])
    try:
        return asyncio.run(Supervisor(settings, argv, announce).run())
    finally:
        if reserved is not None:
            reserved.close()
