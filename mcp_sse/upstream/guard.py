"""Kill the children's process groups when the gateway dies without doing it itself.

A stdio child notices a dead gateway (stdin EOF) and exits, but whatever it forked (`npx`'s
node, a shell wrapper's commands) never reads that pipe and is reparented to init. On a
normal shutdown or restart the gateway kills each child's whole process group; after a
SIGKILL or an OOM kill nothing does, and outside systemd (whose cgroup would) they leak.

So one small guard process per gateway holds the read end of a pipe from it. The gateway
writes `+<pgid>` when it starts a child and `-<pgid>` once it has killed that group itself.
The pipe reaches EOF only when every write end is closed: when the gateway has exited, however
it died. The guard then kills the groups still listed (SIGTERM, a moment, SIGKILL) and exits.

Why one guard per gateway rather than one wrapped around each child: the child stays exactly
the process the servers file names (its pid, exit code, signals and process group are what
`ChildProcess` sees and `/mcp/servers` shows), nothing stands between the gateway and the
child's pipes, and per-session isolation does not pay an extra interpreter per session.
The one gap: a gateway killed between starting a child and writing `+<pgid>` (the few
milliseconds while asyncio connects the child's pipes) leaves that child's forks as before.

The guard runs this file as a script with `python -I -S`: standard library only, no package
import, an empty environment (it never sees AUTH_TOKEN), in a session of its own so signals
aimed at the gateway's process group (a terminal's Ctrl-C, `kill -- -pgid`) do not take it
with the gateway.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Final

__all__ = ["forget", "watch"]

log = logging.getLogger("mcp_sse.upstream")

KILL_GRACE: Final = 1.0
"""After the gateway died: how long the groups have between SIGTERM and SIGKILL."""


class _Guard:
    """The gateway's end: a guard process started on first use, and the groups it was told about."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._pipe: int | None = None  # the write end; the guard holds the only read end
        self._groups: set[int] = set()

    def watch(self, pgid: int) -> None:
        self._groups.add(pgid)
        self._send(f"+{pgid}\n")

    def forget(self, pgid: int) -> None:
        if pgid in self._groups:
            self._groups.discard(pgid)
            self._send(f"-{pgid}\n")

    def _send(self, line: str) -> None:
        if self._pipe is None and not self._start():
            return
        assert self._pipe is not None and self._process is not None
        try:
            os.write(self._pipe, line.encode())  # a few bytes, under PIPE_BUF: one atomic write
        except BlockingIOError:  # 64 KB of unread lines: the guard is stuck; never block on it
            log.warning(
                "process group guard %s is not reading; %r not recorded", self._process.pid, line.strip()
            )
        except OSError:  # it died (killed by hand?): start another and tell it every group again
            log.warning("process group guard %s is gone; starting another", self._process.pid)
            self.close()
            if self._groups and self._start():
                assert self._pipe is not None
                with contextlib.suppress(OSError):
                    os.write(self._pipe, "".join(f"+{pgid}\n" for pgid in sorted(self._groups)).encode())

    def _start(self) -> bool:
        try:
            process = subprocess.Popen(
                [sys.executable, "-I", "-S", __file__],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                env={},
                cwd="/",
                start_new_session=True,
            )
        except OSError as exc:
            log.warning("cannot start the process group guard (%s): a SIGKILLed gateway may leak", exc)
            return False
        assert process.stdin is not None  # PIPE above
        self._process, self._pipe = process, process.stdin.fileno()
        # Never block the event loop on the guard: a line it does not take is dropped with a warning.
        os.set_blocking(self._pipe, False)
        return True

    def close(self) -> None:
        """Close the pipe (the guard then kills whatever is still listed, and exits) and reap it."""
        process, self._process, self._pipe = self._process, None, None
        if process is None:
            return
        if process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(KILL_GRACE + 1)


_guard = _Guard()
atexit.register(_guard.close)


def watch(pgid: int) -> None:
    """Kill process group `pgid` if this process dies before calling `forget(pgid)`."""
    _guard.watch(pgid)


def forget(pgid: int) -> None:
    """The group is dead (the gateway killed it): the guard must not kill that number later."""
    _guard.forget(pgid)


# -- the guard process ------------------------------------------------------------------------------


def _signal_groups(groups: set[int], sig: int) -> set[int]:
    """Send `sig` to each group; the groups that still had a process to receive it."""
    alive = set()
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
            alive.add(pgid)
    return alive


def _kill_groups(groups: set[int]) -> None:
    groups = _signal_groups(groups, signal.SIGTERM)
    deadline = time.monotonic() + KILL_GRACE
    while groups and time.monotonic() < deadline:
        time.sleep(0.05)
        groups = _signal_groups(groups, 0)  # signal 0: only asks whether anyone is left
    _signal_groups(groups, signal.SIGKILL)


def _main() -> None:
    groups: set[int] = set()
    for line in sys.stdin.buffer:  # until EOF: the gateway has exited
        with contextlib.suppress(ValueError):
            pgid = int(line[1:])
            if line.startswith(b"+") and pgid > 1:
                groups.add(pgid)
            elif line.startswith(b"-"):
                groups.discard(pgid)
    if groups:
        listed = " ".join(map(str, sorted(groups)))
        print(f"mcp-sse guard: the gateway is gone; killing process groups {listed}", file=sys.stderr)
        _kill_groups(groups)


if __name__ == "__main__":
    _main()
