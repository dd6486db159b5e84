"""One stdio child process: spawn in its own process group, newline-delimited JSON both ways.

The child runs in a new session (so a new process group) because a server started
through a shell or `npx` forks further; killing only the direct child leaves the rest
running, which is how peer gateways end up with thousands of orphans. The group is also
handed to the guard (guard.py), which kills it should the gateway die without doing so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..protocol.jsonrpc import Message, dumps
from . import guard

__all__ = ["ChildProcess"]

log = logging.getLogger("mcp_sse.upstream")
STDOUT_GRACE = 1.0
STOP_GRACE = 5.0
"""How long `stop()` gives a child to exit on stdin EOF, then on SIGTERM, before SIGKILL."""
_LEADING_ID = re.compile(rb'^\s*\{\s*"jsonrpc"\s*:\s*"2\.0"\s*,\s*"id"\s*:\s*(-?\d{1,18}|"[^"\\]{0,256}")')


class ChildProcess:
    def __init__(
        self,
        name: str,
        command: str,
        args: Sequence[str],
        env: Mapping[str, str],
        cwd: str | None,
        *,
        max_line: int,
        on_message: Callable[[Message], None],
        on_oversize: Callable[[str | int], None],
    ) -> None:
        self.name = name
        self.command = command
        self.args = list(args)
        self.env = dict(env)
        self.cwd = cwd
        self.max_line = max_line
        self.on_message = on_message
        self.on_oversize = on_oversize
        self.process: asyncio.subprocess.Process | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def output_closed(self) -> asyncio.Task[None]:
        """Done when the child's stdout has ended."""
        return self._tasks[0]

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            self.command,
            *self.args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,
            limit=self.max_line,
        )
        guard.watch(self.process.pid)  # its pid is its process group id (start_new_session)
        assert self.process.stdout and self.process.stderr  # set by PIPE above
        self._tasks = [
            asyncio.create_task(self._read_stdout(self.process.stdout)),
            asyncio.create_task(self._read_stderr(self.process.stderr)),
        ]

    async def wait(self) -> str:
        """Wait until the child is of no more use, and say why: its leader exited, or it closed
        its stdout (it can never answer again, even if it keeps running)."""
        leader = asyncio.create_task(self._leader_exit())
        await asyncio.wait({leader, self._tasks[0]}, return_when=asyncio.FIRST_COMPLETED)
        try:
            # A crash closes stdout a moment before the exit is seen: give the exit that moment.
            return f"exited with code {await asyncio.wait_for(leader, STDOUT_GRACE)}"
        except TimeoutError:
            return "closed its stdout"

    async def _leader_exit(self) -> int:
        """The leader's exit code, as soon as it exits.

        Not Process.wait(): on Python 3.11 it also waits for the pipes to close, which never
        happens while a grandchild holds them, so a crash would go unnoticed. A pidfd becomes
        readable the moment the leader exits; `stop()` then kills the rest of the group.
        """
        process = self.process
        assert process is not None
        try:
            pidfd = os.pidfd_open(process.pid)
        except (AttributeError, OSError):  # not Linux 5.3+: the pipes decide, as before
            return await process.wait()
        loop = asyncio.get_running_loop()
        exited = loop.create_future()
        loop.add_reader(pidfd, lambda: None if exited.done() else exited.set_result(None))
        try:
            await exited
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)
        for _ in range(500):  # asyncio's child watcher reaps it a moment later
            if process.returncode is not None:
                return process.returncode
            await asyncio.sleep(0.01)
        return -1

    def write(self, message: Message) -> None:
        process = self.process
        if process is None or process.stdin is None or process.stdin.is_closing():
            raise ConnectionError(f"backend {self.name!r} is not running")
        # A child that stops reading its input must not make the gateway buffer without end.
        if process.stdin.transport.get_write_buffer_size() > self.max_line:
            raise ConnectionError(f"backend {self.name!r} is not reading its input; request refused")
        process.stdin.write(dumps(message).encode() + b"\n")

    async def _read_stdout(self, stream: asyncio.StreamReader) -> None:
        discarding = False
        while True:
            try:
                line = await stream.readuntil(b"\n")
            except asyncio.IncompleteReadError as eof:
                line = eof.partial
                if not line or discarding:
                    return
            except asyncio.LimitOverrunError as over:
                # A line over the limit: drop it whole without buffering it, but try to name the
                # request it answered from its first bytes so that caller gets an error, not a hang.
                head = await stream.readexactly(over.consumed)
                if not discarding and (match := _LEADING_ID.match(head)):
                    raw = match.group(1).decode()
                    self.on_oversize(json.loads(raw))
                log.error("backend %s wrote a line over %d bytes; dropped", self.name, self.max_line)
                discarding = True
                continue
            if discarding:
                discarding = False
                continue
            self._dispatch(line)
            # Let the SSE pumps run between lines: a burst read in one go must not overrun
            # every stream's buffer before any reader had a chance to drain it.
            await asyncio.sleep(0)

    def _dispatch(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            message: Any = json.loads(line.decode())  # MCP's stdio is UTF-8; anything else is not JSON
        except (ValueError, RecursionError):
            log.warning("backend %s wrote a line that is not JSON; ignored", self.name)
            return
        if not isinstance(message, dict):
            log.warning("backend %s wrote JSON that is not a JSON-RPC message; ignored", self.name)
            return
        try:
            self.on_message(message)
        except Exception:
            log.exception("backend %s: failed to route a message", self.name)

    async def _read_stderr(self, stream: asyncio.StreamReader) -> None:
        child_log = logging.getLogger(f"mcp_sse.backend.{self.name}")
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # over the limit: asyncio already dropped it
                continue
            if not line:
                return
            child_log.info("%s", line.decode("utf-8", "replace").rstrip())

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Close stdin (the polite stop for stdio servers), then SIGTERM, then SIGKILL the group."""
        process = self.process
        if process is None:
            return
        if process.stdin and not process.stdin.is_closing():
            process.stdin.close()
        for sig, wait in ((None, grace / 2), (signal.SIGTERM, grace / 2), (signal.SIGKILL, 5.0)):
            if sig is not None:
                self.kill_group(sig)
            try:
                await asyncio.wait_for(asyncio.shield(process.wait()), wait)
                break
            except TimeoutError:
                continue
        # The leader may be gone while its children live on in the group: clean them too.
        self.kill_group(signal.SIGKILL)
        guard.forget(process.pid)
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def kill_group(self, sig: int) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)
