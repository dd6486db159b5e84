"""Per-session isolation: a backend of its own (a child, or an upstream session of a remote server)
for each client session, for servers that keep per-caller state or must receive per-caller values
(a header mapped into the child's env, or into the remote's request headers).

Children start when a session initializes and are reaped when it ends, or when it has been
idle for the backend's `idle_timeout`. At most `max_sessions` run at once; the next session
is refused with an error that says so, never queued forever.

What the children offer (capabilities, server info, instructions) is learned at start from one
child run for that alone, then kept up to date by every child that starts: a 2026-07-28
`server/discover`, a listen stream and the aggregate root's lists need it before any session
has a child of its own, and none of them should have to start one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from ..protocol.jsonrpc import INTERNAL_ERROR, Message, error_response
from ..protocol.session import Session
from .backend import READY_WAIT, Backend
from .config import ServerSpec

__all__ = ["BACKEND_BUSY", "PerSessionBackend"]

BACKEND_BUSY: Final = -32005
"""JSON-RPC server error (implementation-defined range): every per-session child is taken; retry later."""

log = logging.getLogger("mcp_sse.upstream")
REAP_INTERVAL: Final = 1.0


class PerSessionBackend(Backend):
    def __init__(
        self, spec: ServerSpec, *, make: Callable[[ServerSpec], Backend], base_env: Mapping[str, str]
    ) -> None:
        super().__init__()
        self.spec = spec
        self.name = spec.name
        self.max_children = spec.max_sessions if spec.url is None else 0
        self.timeout = spec.timeout
        self.make = make
        self.base_env = dict(base_env)
        self.children: dict[str, tuple[Session, Backend]] = {}
        self._stopping: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.Task[None] | None = None
        self._probe: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._probe = asyncio.create_task(self._learn(), name=f"backend-{self.name}-probe")
        if self.spec.idle_timeout is not None:
            self._reaper = asyncio.create_task(self._reap_idle(self.spec.idle_timeout))

    async def _learn(self) -> None:
        """Start one child, keep what it offers, stop it; "starting" until then, as a shared backend is."""
        child = self.make(self.spec)
        try:
            await child.start()
            if await child.wait_ready(READY_WAIT):
                self._learn_from(child)
            else:
                # Perhaps it needs a caller's header: the first session's child will tell instead.
                log.warning("backend %s: no child to learn what it offers: %s", self.name, child.last_error)
        finally:
            await child.stop()
            self.state = "running"  # ready to start children; each child has its own state
            self._ready.set()

    def _learn_from(self, child: Backend) -> None:
        self.capabilities = child.capabilities
        self.server_info = child.server_info
        self.instructions = child.instructions
        # SECURITY: a 2026-07-28 call is checked (inputSchema, Mcp-Param-*) before its child exists:
        # without what was learned here its arguments would reach the backend unchecked.
        self.schemas = {**self.schemas, **child.schemas}

    async def _reap_idle(self, idle: float) -> None:
        while True:
            await asyncio.sleep(min(REAP_INTERVAL, idle))
            now = time.monotonic()
            for session, _ in list(self.children.values()):
                # A session still initializing has not been idle: its child is only starting.
                if session.initialized and now - session.last_seen > idle:
                    log.info("backend %s: session idle for %.0f s, its child is reaped", self.name, idle)
                    session.close()

    def _full(self) -> str | None:
        if len(self.children) >= self.spec.max_sessions:
            limit = self.spec.max_sessions
            return f"backend {self.name!r}: all {limit} per-session children are in use; retry later"
        return None

    async def open_session(self, session: Session) -> str | None:
        await self.wait_ready(READY_WAIT)  # the first child is the one learning what all offer
        if (full := self._full()) is not None:
            return full

        # Only here, in a backend of its own, may a caller's header reach the child or the remote.
        def mapped(mapping: Mapping[str, str]) -> dict[str, str]:
            return {name: session.http_headers[h] for h, name in mapping.items() if h in session.http_headers}

        spec = dataclasses.replace(
            self.spec,
            env={**self.spec.env, **mapped(self.spec.env_from_headers)},
            headers={**self.spec.headers, **mapped(self.spec.headers_from_request)},
        )
        child = self.make(spec)
        self.children[session.id] = (session, child)
        try:
            await child.start()
            ready = await child.wait_ready(READY_WAIT)
        except BaseException:
            self._release(session.id)  # cancelled while it started (the client left): free the place
            raise
        if not ready:
            self._release(session.id)
            return f"backend {self.name!r} could not start a child for this session: {child.last_error}"
        self._learn_from(child)
        return None

    def _child(self, session: Session) -> Backend | None:
        entry = self.children.get(session.id)
        return entry[1] if entry else None

    async def request(self, session: Session, message: Message) -> Message:
        child = self._child(session)
        if child is None and session.kind == "modern":
            # A 2026-era request has no session to keep a child for: it gets one for itself.
            if (full := self._full()) is not None:
                # Load, not a failing backend: a code the circuit breaker does not count.
                return error_response(message["id"], BACKEND_BUSY, full)
            try:
                if (problem := await self.open_session(session)) is not None:
                    return error_response(message["id"], INTERNAL_ERROR, problem)
                return await self.request(session, message)
            finally:
                self._release(session.id)
        if child is None:
            return error_response(
                message["id"], INTERNAL_ERROR, f"backend {self.name!r}: no child for this session"
            )
        return await child.request(session, message)

    def abort(self, reason: str) -> None:
        for _, child in self.children.values():
            child.abort(reason)

    def revive(self) -> int:
        # A child fails alone, for its one session: each failed one starts again for the same session.
        return sum(child.revive() for _, child in list(self.children.values()))

    def notify(self, session: Session, message: Message) -> None:
        if child := self._child(session):
            child.notify(session, message)

    def respond(self, session: Session, message: Message) -> bool:
        child = self._child(session)
        return child.respond(session, message) if child else False

    async def subscribe(self, session: Session, message: Message) -> Message:
        child = self._child(session)
        return await child.subscribe(session, message) if child else await super().subscribe(session, message)

    async def unsubscribe(self, session: Session, message: Message) -> Message:
        child = self._child(session)
        return (
            await child.unsubscribe(session, message)
            if child
            else await super().unsubscribe(session, message)
        )

    def attach(self, session: Session) -> None:
        if child := self._child(session):
            child.attach(session)

    def detach(self, session: Session) -> None:
        self._release(session.id)

    def _release(self, session_id: str) -> None:
        entry = self.children.pop(session_id, None)
        if entry is None:
            return
        session, child = entry
        child.detach(session)
        task = asyncio.create_task(child.stop())
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def stop(self) -> None:
        for task in (self._probe, self._reaper):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for session_id in list(self.children):
            self._release(session_id)
        await asyncio.gather(*self._stopping, return_exceptions=True)
        self.state = "stopped"

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state,
            "isolation": "per-session",
            "children": len(self.children),
            "max_sessions": self.spec.max_sessions,
            "pids": [child.status()["pid"] for _, child in self.children.values()],
        }
