"""Reloading the servers file (SIGHUP): what changed, and how backends come and go while serving.

The file's entries are compared with the specs the running backends were built from: an entry
equal to its running one is unchanged, and its backend and sessions are left alone. Added and
changed entries get new backends, started and waited for (READY_WAIT at most) before anything is
swapped, so a changed backend's replacement serves before the old one stops. From the swap on no
new request reaches a removed or replaced backend; `retire` then gives the calls in flight
SHUTDOWN_GRACE to finish, fails what has not, ends the backend's sessions (their clients get a
404 and initialize again) and stops it. The wiring (routes, the root, the audit) is app.py's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from ..protocol.session import Session
from .backend import READY_WAIT, Backend
from .config import ServerSpec

__all__ = ["Plan", "announce", "join", "plan", "retire", "start"]

log = logging.getLogger("mcp_sse.upstream")

DELIVERY: Final = 0.5
"""How long the calls failed past the grace get to put their errors on their streams before the
sessions end (a session's streams deliver what they hold as it ends, and take nothing more)."""
LIST_KINDS: Final = ("tools", "prompts", "resources")


@dataclass(frozen=True)
class Plan:
    added: tuple[ServerSpec, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[ServerSpec, ...] = ()
    """The new specs of the backends whose entry differs: each is replaced by a new backend."""
    unchanged: tuple[str, ...] = ()

    @property
    def to_build(self) -> tuple[ServerSpec, ...]:
        return (*self.changed, *self.added)


def plan(old: Mapping[str, ServerSpec], new: Sequence[ServerSpec]) -> Plan:
    """From the running specs to the file's: specs are frozen, so equal means unchanged."""
    names = {spec.name for spec in new}
    return Plan(
        added=tuple(s for s in new if s.name not in old),
        removed=tuple(name for name in old if name not in names),
        changed=tuple(s for s in new if s.name in old and old[s.name] != s),
        unchanged=tuple(s.name for s in new if old.get(s.name) == s),
    )


async def start(backends: Collection[Backend]) -> None:
    """Start them and wait until each is ready, or failed, or READY_WAIT has passed."""
    for backend in backends:
        await backend.start()
    await asyncio.gather(*(backend.wait_ready(READY_WAIT) for backend in backends))


async def join(sessions: Iterable[Session], backends: Sequence[Backend]) -> None:
    """The aggregate's open sessions get the new backends, as they would have at their initialize:
    a per-session backend starts their child; one that refuses is left out of that session."""

    async def one(session: Session, backend: Backend) -> None:
        try:
            # A 2026-era session (a listen stream, a call waiting for input) is only attached.
            problem = None if session.kind == "modern" else await backend.open_session(session)
        except Exception as exc:
            problem = str(exc) or type(exc).__name__
        if problem is not None or session.closed:
            backend.detach(session)  # whatever it had started for the session
            if problem is not None:
                log.warning("session %s: backend %s left out: %s", session.id[:8], backend.name, problem)
            return
        backend.attach(session)

    await asyncio.gather(*(one(s, b) for s in sessions for b in backends))


def announce(sessions: Iterable[Session], backends: Iterable[Backend]) -> None:
    """Tell each session to list again what these backends offer, or offered before they went."""
    offered = [backend.capabilities for backend in backends]
    kinds = [kind for kind in LIST_KINDS if any(kind in capabilities for capabilities in offered)]
    for session in sessions:
        for kind in kinds:
            session.send({"jsonrpc": "2.0", "method": f"notifications/{kind}/list_changed"})


async def retire(
    backends: Collection[Backend],
    sessions: Callable[[], Iterable[Session]],
    in_flight: Collection[asyncio.Task[None]],
    grace: float,
) -> None:
    """Drain, then stop. `in_flight` are the request tasks running at the swap (no later request
    reaches these backends): all of them, for which backend a task calls is not known here, so a
    long call elsewhere can hold the drain up, never past `grace`. `sessions` gives the sessions
    to end once the calls are done."""
    pending = set(in_flight)
    try:
        if pending:
            _, pending = await asyncio.wait(pending, timeout=grace)
        for backend in backends:
            backend.abort(f"backend {backend.name!r} was reloaded; the request was not completed")
        if pending:
            await asyncio.wait(pending, timeout=DELIVERY)
        for session in list(sessions()):
            session.close()
    finally:  # at shutdown too: they are in BACKENDS no longer, so its cleanup would not stop them
        await asyncio.gather(*(backend.stop() for backend in backends), return_exceptions=True)
    for backend in backends:
        log.info("backend %s: stopped after the reload", backend.name)
