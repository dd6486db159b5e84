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
from typing import Any, TypeGuard

from ..protocol.jsonrpc import (
    INVALID_REQUEST,
    Message,
    ProtocolError,
    dumps,
    error_response,
    validate_message,
)
from . import guard

__all__ = ["EXCERPT", "MAX_DEPTH", "ChildProcess", "accept", "decode", "excerpt"]

log = logging.getLogger("mcp_sse.upstream")
STDOUT_GRACE = 1.0
STOP_GRACE = 5.0
"""How long `stop()` gives a child to exit on stdin EOF, then on SIGTERM, before SIGKILL."""
_LEADING_ID = re.compile(rb'^\s*\{\s*"jsonrpc"\s*:\s*"2\.0"\s*,\s*"id"\s*:\s*(-?\d{1,18}|"[^"\\]{0,256}")')
EXCERPT = 200
"""How much of a line a log message quotes: a child's line may be as long as MAX_MESSAGE_BYTES."""
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
MAX_DEPTH = 256
"""Nesting a child's message may have. Far more than MCP needs, and far below what would make
encoding it for a client hit the interpreter's recursion limit (near 950 levels, found by test)."""


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN and Infinity: a client's strict parser would choke


_DECODE = json.JSONDecoder(parse_constant=_not_json).decode


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether a decoded JSON value nests deeper than `limit`: level by level, containers only."""
    level = [value]
    for _ in range(limit):
        deeper: list[Any] = []
        for node in level:
            children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
            deeper += [c for c in children if isinstance(c, dict | list)]
        if not deeper:
            return False
        level = deeper
    return True


def excerpt(line: bytes) -> str:
    """The start of a line, fit for one log line: cut short, and no control character left raw
    (a newline in it must not forge a log line of its own)."""
    line = line.rstrip(b"\r\n")
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in line[:EXCERPT].decode("utf-8", "replace"))
    return f"{text}... ({len(line)} bytes)" if len(line) > EXCERPT else text


def decode(line: bytes) -> Any:
    """One line from a child as JSON, or ValueError saying what is wrong with it.

    Stricter than json.loads where forwarding would hurt a client or the gateway: NaN and
    Infinity are not JSON; a lone UTF-16 surrogate (`"\\ud800"`) decodes but can never be
    encoded as UTF-8 again, so its stream would fail mid-write; a message nested deep enough
    decodes here but fails to encode deeper in the stack. The bytes are looked at first, so only
    lines with many brackets or a surrogate escape pay for the full checks.
    """
    try:
        value = _DECODE(line.decode())  # MCP's stdio is UTF-8; anything else is not JSON
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    except RecursionError:  # the C decoder stops at the interpreter's recursion limit
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels") from None
    # Depth can never exceed the number of opening brackets: most lines skip the walk.
    if line.count(b"[") + line.count(b"{") > MAX_DEPTH and _deeper_than(value, MAX_DEPTH):
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    if _SURROGATE_ESCAPE.search(line):
        try:
            dumps(value).encode()
        except UnicodeEncodeError:
            raise ValueError("a string with a lone UTF-16 surrogate") from None
    return value


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
        on_refused: Callable[[str | int, str], None],
    ) -> None:
        self.name = name
        self.command = command
        self.args = list(args)
        self.env = dict(env)
        self.cwd = cwd
        self.max_line = max_line
        self.on_message = on_message
        self.on_refused = on_refused  # (upstream id, why): a line that answered that request was refused
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
                    self.on_refused(json.loads(raw), f"sent a message over {self.max_line} bytes")
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
        message = accept(self.name, line, reply=self.write, on_refused=self.on_refused, what="a line")
        if message is None:
            return
        try:
            self.on_message(message)
        except Exception:  # a bug of ours, not the child's: its traceback is what fixes it
            log.exception("backend %s: failed to route a message: %s", self.name, excerpt(line))

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


def accept(
    name: str,
    raw: bytes,
    *,
    reply: Callable[[Message], None],
    on_refused: Callable[[str | int, str], None],
    what: str,
) -> Message | None:
    """One message a backend sent (a child's line, a remote's body or event), or None: what is not
    a valid JSON-RPC message is dropped with one warning naming the problem (and quoting its start),
    and the backend serves on. A request we can answer learns why; an answer to one of ours fails
    that request now instead of leaving it to time out."""
    if not raw.strip():
        return None
    try:
        value = decode(raw)
    except ValueError as exc:
        log.warning("backend %s sent %s that is not JSON (%s); dropped: %s", name, what, exc, excerpt(raw))
        return None
    try:
        message = validate_message(value)
    except ProtocolError as exc:
        problem = exc.message.removeprefix("Invalid Request: ")
    else:
        if "error" not in message or isinstance(message["error"].get("message"), str):
            return message
        problem = '"error" needs a string "message"'
    log.warning(
        "backend %s sent JSON that is not a JSON-RPC message (%s); dropped: %s", name, problem, excerpt(raw)
    )
    if isinstance(value, dict) and _is_id(request_id := value.get("id")):
        if "method" in value:
            with contextlib.suppress(ConnectionError):
                reply(error_response(request_id, INVALID_REQUEST, f"Invalid Request: {problem}"))
        else:
            on_refused(request_id, f"sent an invalid answer: {problem}")
    return None


def _is_id(value: Any) -> TypeGuard[str | int]:
    return isinstance(value, str | int) and not isinstance(value, bool)
