"""A circuit breaker in front of one backend: a backend that keeps failing is answered for at once,
instead of every caller waiting out its timeout, and is given time to recover.

Closed: requests go through and their outcomes are kept, the last `volume_threshold` of them.
When `failure_threshold` of those failed, it opens. Open: every request (and subscription) gets an
error at once, naming the backend, why, and when it retries. After `open_seconds` it half-opens:
up to `success_threshold` requests go through as trials (the rest still fail fast); that many
successes in a row close it, any failure opens it again for another `open_seconds`. A reload
(SIGHUP) closes it too. Time is read when a request comes (or the status is asked), so no task runs.

A failure is a reply the backend could not give: INTERNAL_ERROR (it was down, it stopped, it could
not be reached), REQUEST_TIMEOUT, or an exception. A client's cancellation says nothing about the
backend and is not counted. Every other reply, a tool's isError result or an -32602 from the server
included, shows the backend answering, and is a success.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar, overload

from ..protocol.jsonrpc import INTERNAL_ERROR, Message, error_response
from ..protocol.session import Session
from .backend import Backend
from .config import BreakerSpec
from .multiplex import REQUEST_CANCELLED, REQUEST_TIMEOUT

if TYPE_CHECKING:
    from ..security.audit import AuditLog

__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "CircuitBreaker", "observe", "unwrap"]

log = logging.getLogger("mcp_sse.upstream")

CLOSED: Final = "closed"
OPEN: Final = "open"
HALF_OPEN: Final = "half-open"
FAILURE_CODES: Final = frozenset({INTERNAL_ERROR, REQUEST_TIMEOUT})

T = TypeVar("T")
OnChange = Callable[["CircuitBreaker", str, str, str], None]
"""(breaker, previous state, new state, reason)."""


class _Inner(Generic[T]):
    """An attribute read from and written to the wrapped backend: always the inner's live value
    (its state changes as its child restarts; a per-session one learns its capabilities late)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.attr = name

    @overload
    def __get__(self, obj: None, owner: type) -> _Inner[T]: ...
    @overload
    def __get__(self, obj: CircuitBreaker, owner: type) -> T: ...
    def __get__(self, obj: CircuitBreaker | None, owner: type) -> T | _Inner[T]:
        if obj is None:
            return self
        value: T = getattr(obj.inner, self.attr)
        return value

    def __set__(self, obj: CircuitBreaker, value: T) -> None:
        setattr(obj.inner, self.attr, value)


class CircuitBreaker(Backend):
    name = _Inner[str]()
    state = _Inner[str]()
    capabilities = _Inner[dict[str, Any]]()
    server_info = _Inner[dict[str, Any]]()
    instructions = _Inner[str | None]()
    timeout = _Inner[float]()
    max_children = _Inner[int]()
    schemas = _Inner[dict[str, dict[str, Any]]]()
    last_error = _Inner[str | None]()

    def __init__(
        self,
        inner: Backend,
        spec: BreakerSpec,
        *,
        on_change: OnChange | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # No super().__init__(): it would reset the inner's capabilities and schemas through the
        # attributes above, and everything it sets up belongs to the inner.
        self.inner = inner
        self.spec = spec
        self.on_change = on_change
        self.clock = clock
        self.circuit = CLOSED
        self.reason = ""
        self._window: collections.deque[bool] = collections.deque(maxlen=spec.volume_threshold)
        """The last outcomes while closed: True for a failure."""
        self._opened_at = 0.0
        self._epoch = 0
        """Bumped at every change: an outcome counts only in the state its request was let in."""
        self._trials = 0
        self._successes = 0
        self._counting = True

    # -- the state machine ---------------------------------------------------------------------

    def _change(self, state: str, reason: str) -> None:
        previous, self.circuit, self.reason = self.circuit, state, reason
        self._epoch += 1
        self._trials = self._successes = 0
        if state == OPEN:
            self._opened_at = self.clock()
        if state == CLOSED:
            self._window.clear()
        if self.on_change is not None:
            self.on_change(self, previous, state, reason)

    def _tick(self) -> None:
        if self.circuit == OPEN and self.retry_in() <= 0:
            self._change(HALF_OPEN, f"{self.spec.open_seconds:g} s open; trying again")

    def current(self) -> str:
        """The circuit's state now: an open one whose time is up is half-open from here on."""
        self._tick()
        return self.circuit

    def retry_in(self) -> float:
        """Seconds until an open circuit lets trials through; 0 when it is not open."""
        if self.circuit != OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.spec.open_seconds - self.clock())

    def _refusal(self, message: Message) -> Message | None:
        """The fast error for a request the circuit does not let through, or None to let it in."""
        self._tick()
        if self.circuit == CLOSED:
            return None
        if self.circuit == HALF_OPEN and self._trials < self.spec.success_threshold:
            self._trials += 1
            return None
        if self.circuit == OPEN:
            why = f"circuit is open ({self.reason}); retry in {math.ceil(self.retry_in())} s"
        else:
            why = f"circuit is half-open and {self._trials} trial requests are in flight; retry shortly"
        return error_response(message["id"], INTERNAL_ERROR, f"backend {self.name!r}: {why}")

    def _record(self, epoch: int, failed: bool | None, error: str = "") -> None:
        """One outcome: failed None is a cancellation, which says nothing about the backend."""
        if epoch != self._epoch or not self._counting:
            return  # let in before the last change (or during shutdown): stale
        if self.circuit == HALF_OPEN:
            self._trials -= 1
            if failed:
                self._change(OPEN, f"a trial request failed: {error}"[:300])
            elif failed is False:
                self._successes += 1
                if self._successes >= self.spec.success_threshold:
                    self._change(CLOSED, f"{self._successes} trial requests succeeded")
            return
        if failed is None:
            return
        self._window.append(failed)
        if failed and (count := sum(self._window)) >= self.spec.failure_threshold:
            # The last error says what went wrong; the counts say why the circuit opened.
            why = f"{count} of the last {len(self._window)} requests failed; last: {error}"
            self._change(OPEN, why[:300])

    async def _guarded(self, message: Message, call: Callable[[], Awaitable[Message]]) -> Message:
        if (refusal := self._refusal(message)) is not None:
            return refusal  # not counted: it says nothing new about the backend
        epoch = self._epoch
        try:
            reply = await call()
        except asyncio.CancelledError:
            self._record(epoch, None)
            raise
        except Exception as exc:
            self._record(epoch, True, str(exc) or type(exc).__name__)
            raise
        except BaseException:
            self._record(epoch, None)  # the half-open trial slot must not leak
            raise
        error = reply.get("error")
        code = error.get("code") if isinstance(error, dict) else None
        if code == REQUEST_CANCELLED:
            self._record(epoch, None)  # a notifications/cancelled, or the session ended
        elif code in FAILURE_CODES:
            assert isinstance(error, dict)
            self._record(epoch, True, str(error.get("message", ""))[:200])
        else:
            self._record(epoch, False)
        return reply

    # -- Backend: counted -----------------------------------------------------------------------

    async def request(self, session: Session, message: Message) -> Message:
        return await self._guarded(message, lambda: self.inner.request(session, message))

    async def subscribe(self, session: Session, message: Message) -> Message:
        return await self._guarded(message, lambda: self.inner.subscribe(session, message))

    def revive(self) -> int:
        # A reload is the operator saying "try again now": no waiting out the open timer.
        if self.circuit != CLOSED:
            self._change(CLOSED, "reload")
        return self.inner.revive()

    def status(self) -> dict[str, Any]:
        circuit: dict[str, Any] = {
            "state": self.current(),
            "failures": sum(self._window),
            "requests": len(self._window),
        }
        if self.circuit == OPEN:
            circuit["retry_in"] = math.ceil(self.retry_in())
        return {**self.inner.status(), "circuit": circuit}

    # -- Backend: delegated as they are ---------------------------------------------------------

    async def start(self) -> None:
        self._counting = True
        await self.inner.start()

    async def stop(self) -> None:
        self._counting = False  # what fails as it stops is not the backend failing
        await self.inner.stop()

    async def wait_ready(self, timeout: float) -> bool:  # noqa: ASYNC109 - a bound, not a cancel scope
        return await self.inner.wait_ready(timeout)

    def notify(self, session: Session, message: Message) -> None:
        self.inner.notify(session, message)

    def respond(self, session: Session, message: Message) -> bool:
        return self.inner.respond(session, message)

    async def unsubscribe(self, session: Session, message: Message) -> Message:
        return await self.inner.unsubscribe(session, message)

    async def open_session(self, session: Session) -> str | None:
        return await self.inner.open_session(session)

    def tool_schema(self, name: str) -> dict[str, Any] | None:
        return self.inner.tool_schema(name)

    def abort(self, reason: str) -> None:
        self._counting = False  # shutdown: the requests it fails are not the backend's failures
        self.inner.abort(reason)

    def attach(self, session: Session) -> None:
        self.inner.attach(session)

    def detach(self, session: Session) -> None:
        self.inner.detach(session)


def unwrap(backend: Backend) -> Backend:
    """The backend behind a breaker (or the backend itself): for code that needs its kind."""
    return backend.inner if isinstance(backend, CircuitBreaker) else backend


def observe(backend: Backend, audit: AuditLog) -> None:
    """Audit (`backend.circuit`) and log every change of this backend's circuit; no-op without one."""
    if not isinstance(backend, CircuitBreaker):
        return

    def changed(breaker: CircuitBreaker, previous: str, state: str, reason: str) -> None:
        level = logging.WARNING if state == OPEN else logging.INFO
        log.log(level, "backend %s: circuit %s (was %s): %s", breaker.name, state, previous, reason)
        fields = {"backend": breaker.name, "state": state, "previous": previous, "reason": reason}
        audit.event("backend.circuit", None, **fields)

    backend.on_change = changed
