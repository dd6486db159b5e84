"""What sits behind a route: the interface the gateway uses, and the supervised stdio backend."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, Final

from .. import __version__
from ..protocol.jsonrpc import INTERNAL_ERROR, Message, error_response
from ..protocol.session import Session
from ..protocol.versions import LATEST_HANDSHAKE
from .child import STOP_GRACE, ChildProcess
from .config import ServerSpec
from .multiplex import Multiplexer

__all__ = ["READY_WAIT", "Backend", "MultiplexedBackend", "StdioBackend"]

log = logging.getLogger("mcp_sse.upstream")

INIT_TIMEOUT: Final = 30.0
BACKOFF_BASE: Final = 0.5
BACKOFF_MAX: Final = 30.0
CRASH_LOOP_COUNT: Final = 5
"""This many exits in a row, each within STABLE_AFTER of its start, marks a backend failed."""
STABLE_AFTER: Final = 30.0
READY_WAIT: Final = 30.0
"""How long a caller waits for a starting or restarting backend; not the per-request timeout."""
PING_TIMEOUT: Final = 3.0
"""After a request timed out: how long the child has to answer a ping before it counts as wedged."""
WEDGED_GRACE: Final = 1.0
"""A wedged child reads nothing, so closing its stdin is no way to stop it: SIGTERM soon, then SIGKILL."""


class Backend(ABC):
    """An MCP server the gateway is a client of. Every method is safe to call in any state."""

    name: str
    state: str = "starting"
    capabilities: dict[str, Any]
    server_info: dict[str, Any]
    instructions: str | None = None
    timeout: float = 60.0
    max_children: int = 0
    """Child processes it may run at once: each holds pipes, counted in the open-file budget."""
    last_error: str | None = None

    def __init__(self) -> None:
        self._ready = asyncio.Event()
        self.capabilities = {}
        self.server_info = {}
        self.schemas: dict[str, dict[str, Any]] = {}
        """inputSchema per tool, as the backend announced them."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Begin serving; may return before the backend is ready."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Stop serving and release every process and task."""

    def revive(self) -> int:
        """Give what has failed a fresh start (SIGHUP): its crash count forgotten, started again at
        once. Returns at once, with how many children it started; what runs is left alone."""
        return 0

    async def wait_ready(self, timeout: float) -> bool:  # noqa: ASYNC109 - a bound, not a cancel scope
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), timeout)
        return self.state == "running"

    @abstractmethod
    async def request(self, session: Session, message: Message) -> Message:
        """Answer one client request; the answer carries the client's own id."""

    def notify(self, session: Session, message: Message) -> None:  # noqa: B027 - optional hook
        """A client notification (cancellation, progress on a server request)."""

    def respond(self, session: Session, message: Message) -> bool:
        """A client's answer to a request the backend sent; False when it was not ours."""
        return False

    async def subscribe(self, session: Session, message: Message) -> Message:
        return error_response(message["id"], INTERNAL_ERROR, f"backend {self.name!r} has no subscriptions")

    async def unsubscribe(self, session: Session, message: Message) -> Message:
        return {"jsonrpc": "2.0", "id": message["id"], "result": {}}

    async def open_session(self, session: Session) -> str | None:
        """Prepare for a new session before it is answered; a reason to refuse it, or None."""
        return None

    def tool_schema(self, name: str) -> dict[str, Any] | None:
        """The inputSchema the backend announced for a tool, when known."""
        return self.schemas.get(name)

    def abort(self, reason: str) -> None:  # noqa: B027 - optional hook
        """Fail every request in flight now, with `reason` (shutdown)."""

    def attach(self, session: Session) -> None:  # noqa: B027 - optional hook
        """A session initialized against this backend."""

    def detach(self, session: Session) -> None:  # noqa: B027 - optional hook
        """A session ended: drop what it had in flight."""

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state}


class MultiplexedBackend(Backend):
    """A backend reached over one MCP connection that many sessions share through a Multiplexer
    (a stdio child, a remote server): every client-facing call is the Multiplexer's."""

    mux: Multiplexer
    tool_count: int | None = None

    def _unavailable(self) -> str:
        return f"backend {self.name!r} is {self.state}"

    async def _refusal(self, message: Message) -> Message | None:
        """None once the backend is running (waiting READY_WAIT for it), else the error to answer."""
        if self.state == "running" or await self.wait_ready(READY_WAIT):
            return None
        return error_response(message["id"], INTERNAL_ERROR, self._unavailable())

    async def request(self, session: Session, message: Message) -> Message:
        if (refusal := await self._refusal(message)) is not None:
            return refusal
        return await self.mux.call(session, message, self.timeout)

    def notify(self, session: Session, message: Message) -> None:
        self.mux.client_notification(session, message)

    def respond(self, session: Session, message: Message) -> bool:
        return self.mux.client_response(session, message)

    async def subscribe(self, session: Session, message: Message) -> Message:
        if (refusal := await self._refusal(message)) is not None:
            return refusal
        return await self.mux.subscribe(session, message, self.timeout)

    async def unsubscribe(self, session: Session, message: Message) -> Message:
        self.mux.unsubscribe(session, str((message.get("params") or {}).get("uri")))
        return {"jsonrpc": "2.0", "id": message["id"], "result": {}}

    def abort(self, reason: str) -> None:
        self.mux.fail_all(reason)

    def attach(self, session: Session) -> None:
        self.mux.attach(session)

    def detach(self, session: Session) -> None:
        self.mux.detach(session)

    # -- the gateway's own requests while connecting --------------------------------------------

    @abstractmethod
    def _write(self, message: Message) -> None:
        """Send one message to the server (the Multiplexer's writer)."""

    def _setup_failed(self, why: str) -> Exception:
        """What a failed handshake request raises (the remote's says so in its own error)."""
        return RuntimeError(why)

    async def _setup_call(self, message: Message) -> dict[str, Any]:
        reply = await self.mux.call(None, message, INIT_TIMEOUT)
        result = reply.get("result")
        if not isinstance(result, dict):
            error = reply.get("error") or {}
            why = str(error.get("message", "no result") if isinstance(error, dict) else "no result")
            raise self._setup_failed(f"{message['method']} failed: {why[:200]}")
        return result

    def learn(self, result: dict[str, Any]) -> None:
        """What an initialize (or a 2026-07-28 server/discover) result says the server offers."""
        self.capabilities = dict(result.get("capabilities") or {})
        meta = result.get("_meta") or {}
        self.server_info = dict(
            result.get("serverInfo") or meta.get("io.modelcontextprotocol/serverInfo") or {}
        )
        self.instructions = (
            result.get("instructions") if isinstance(result.get("instructions"), str) else None
        )

    async def _initialize(self, version: str) -> dict[str, Any]:
        """The MCP handshake at `version`: initialize, what the server offers learnt, initialized."""
        params = {
            "protocolVersion": version,
            "capabilities": {"sampling": {}, "elicitation": {}, "roots": {"listChanged": True}},
            "clientInfo": {"name": "mcp-sse", "version": __version__},
        }
        message = {"jsonrpc": "2.0", "id": "init", "method": "initialize", "params": params}
        result = await self._setup_call(message)
        self.learn(result)
        self._write({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return result

    async def _list_tools(self) -> None:
        """The tools and their schemas, known from the start: arguments are checked before any
        client listed the tools."""
        if "tools" not in self.capabilities:
            return
        message = {"jsonrpc": "2.0", "id": "tools", "method": "tools/list", "params": {}}
        result = await self._setup_call(message)
        listed = result.get("tools")
        listed = listed if isinstance(listed, list) else []  # a server's answer, not a promise
        self.tool_count = len(listed)
        self.schemas = {
            str(t.get("name")): t["inputSchema"]
            for t in listed
            if isinstance(t, dict) and isinstance(t.get("inputSchema"), dict)
        }


class StdioBackend(MultiplexedBackend):
    """A supervised child: initialized by the gateway itself, restarted with backoff, never a zombie."""

    def __init__(self, spec: ServerSpec, *, max_line: int, base_env: Mapping[str, str]) -> None:
        super().__init__()
        self.spec = spec
        self.env = {**base_env, **spec.env}
        self.name = spec.name
        self.max_children = 1
        self.timeout = spec.timeout
        self.max_line = max_line
        self.restarts = 0
        self._timed_out = asyncio.Event()
        self.mux = Multiplexer(spec.name, self._write, on_timeout=self._timed_out.set)
        self._child: ChildProcess | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False

    def _write(self, message: Message) -> None:
        if self._child is None or self.state not in ("running", "starting"):
            raise ConnectionError(f"backend {self.name!r} is {self.state}")
        self._child.write(message)

    async def start(self) -> None:
        self._supervisor = asyncio.create_task(self._supervise(), name=f"backend-{self.name}")

    def revive(self) -> int:
        # Failed is final for the supervisor: it has returned, so a new one starts from a clean count.
        if self.state != "failed" or self._stopping:
            return 0
        self.state = "starting"
        self._ready.clear()  # callers now wait for this start, as for any other
        self.restarts += 1
        log.warning("backend %s: failed, started again on reload", self.name)
        self._supervisor = asyncio.create_task(self._supervise(), name=f"backend-{self.name}")
        return 1

    async def _supervise(self) -> None:
        failures = 0
        while not self._stopping:
            started = time.monotonic()
            self.state = "starting"
            try:
                await self._run_once()
            except Exception as exc:  # any start or handshake failure is a crash of this run
                self.last_error = str(exc) or type(exc).__name__
                log.error("backend %s: %s", self.name, self.last_error)
            if self._stopping:
                break
            failures = failures + 1 if time.monotonic() - started < STABLE_AFTER else 1
            if failures >= CRASH_LOOP_COUNT:
                self.state = "failed"
                self._ready.set()
                log.error("backend %s: crashed %d times in a row; marked failed", self.name, failures)
                return
            self.state = "restarting"
            self._ready.clear()
            delay = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (failures - 1)) * random.uniform(0.8, 1.2)  # noqa: S311
            log.warning("backend %s: restarting in %.1f s", self.name, delay)
            await asyncio.sleep(delay)
            self.restarts += 1

    async def _run_once(self) -> None:
        child = ChildProcess(
            self.name,
            self.spec.command,
            self.spec.args,
            self.env,
            self.spec.cwd,
            max_line=self.max_line,
            on_message=self.mux.on_message,
            on_refused=lambda upstream_id, why: self.mux.fail_one(
                upstream_id, f"backend {self.name!r} {why}"
            ),
        )
        try:
            await child.start()
        except OSError as exc:
            raise RuntimeError(f"cannot start {self.spec.command!r}: {exc.strerror or exc}") from None
        self._child = child
        log.info("backend %s: started pid %s", self.name, child.pid)
        exited = asyncio.create_task(child.wait())
        handshake = asyncio.create_task(self._handshake())
        wedged: asyncio.Task[str] | None = None
        grace = STOP_GRACE
        try:
            done, _ = await asyncio.wait({handshake, exited}, return_when=asyncio.FIRST_COMPLETED)
            if handshake not in done:
                raise RuntimeError(f"{exited.result()} during initialize")
            handshake.result()
            self.state = "running"
            self._ready.set()
            self.mux.resubscribe(self.timeout)
            for session in list(self.mux.sessions.values()):
                # A restarted child may serve different tools; clients should list again.
                if "tools" in self.capabilities:
                    session.send({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})
            self._timed_out.clear()
            wedged = asyncio.create_task(self._watch_for_wedge())
            # The moment its output ends the child can answer nothing more: new requests wait for
            # the restart instead of being written into a pipe nobody reads. A child that is alive
            # but answers nothing at all is no better, and is restarted the same way.
            await asyncio.wait({exited, child.output_closed, wedged}, return_when=asyncio.FIRST_COMPLETED)
            self.state = "restarting"
            self._ready.clear()
            if wedged.done() and not exited.done():
                self.last_error = wedged.result()
                grace = WEDGED_GRACE
            else:
                self.last_error = await exited
            log.warning("backend %s: %s", self.name, self.last_error)
        finally:
            self.state = "stopped" if self._stopping else "restarting"
            self._ready.clear()
            self.mux.fail_all(
                f"backend {self.name!r} stopped ({self.last_error}); the request was not completed"
            )
            tasks = [t for t in (handshake, exited, wedged) if t is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await child.stop(grace)
            self._child = None

    async def _watch_for_wedge(self) -> str:
        """Return (why) once the child looks wedged: a request timed out, and then a ping did too.

        A timeout alone proves nothing (one slow tool call, one lost answer): a child that still
        answers a ping keeps running. One that answers nothing, or no longer reads its input, is
        alive but useless, and only a restart brings the backend back.
        """
        while True:
            await self._timed_out.wait()
            self._timed_out.clear()
            if not await self.mux.ping(PING_TIMEOUT):
                return f"wedged: a request timed out and a ping got no answer within {PING_TIMEOUT:g} s"

    async def _handshake(self) -> None:
        await self._initialize(LATEST_HANDSHAKE)
        await self._list_tools()

    async def stop(self) -> None:
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        if self._child is not None:
            await self._child.stop()
        self.state = "stopped"

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state,
            "pid": self._child.pid if self._child and self.state == "running" else None,
            "restarts": self.restarts,
            "tools": self.tool_count,
            "sessions": len(self.mux.sessions),
            "last_error": self.last_error,
        }
