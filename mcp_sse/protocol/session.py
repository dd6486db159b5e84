"""The client-facing MCP session: its id, its SSE streams and their replay buffers.

A session owns numbered event streams. Stream 0 carries what is not tied to a request
(the legacy SSE stream, or the Streamable HTTP GET stream); each Streamable HTTP request
answered over SSE gets its own stream. Events are kept in one bounded buffer per stream,
which is both the live queue and the `Last-Event-ID` replay window: a reader that falls
further behind than the buffer holds has lost events, and is told so instead of
silently missing them.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

from .jsonrpc import Message, dumps, id_key

if TYPE_CHECKING:
    from ..gateway import Gateway

__all__ = [
    "LOG_LEVELS",
    "EventStream",
    "Session",
    "SessionStore",
    "StreamOverrun",
    "forwardable_headers",
    "valid_session_id",
]

_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{16,128}")
_EVENT_ID = re.compile(r"(\d{1,9})-(\d{1,18})")
FINISHED_STREAMS_KEPT: Final = 16
LOG_LEVELS: Final = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")
"""MCP log levels (RFC 5424 severities), least severe first."""


def forwardable_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Request headers a per-session backend may be given: never the caller's credentials."""
    return {k.lower(): v for k, v in headers.items() if k.lower() not in ("authorization", "cookie")}


def valid_session_id(value: str | None) -> bool:
    return value is not None and _SESSION_ID.fullmatch(value) is not None


class StreamOverrun(Exception):
    """The reader fell behind the buffer, so events it never saw were dropped."""


class EventStream:
    def __init__(self, number: int, capacity: int) -> None:
        self.number = number
        self._events: deque[tuple[int, str]] = deque(maxlen=capacity)
        self._seq = 0
        self._changed = asyncio.Event()
        self.finished = False
        self.delivered = 0
        self.reader: object | None = None

    def push(self, message: Message) -> None:
        if self.finished:
            return
        self._seq += 1
        self._events.append((self._seq, dumps(message)))
        self._changed.set()

    def finish(self) -> None:
        self.finished = True
        self._changed.set()

    def resume_point(self) -> int:
        """Where a new reader without Last-Event-ID starts: after what was delivered, or after
        what was lost when a previous reader was cut off for falling behind."""
        oldest = self._events[0][0] if self._events else self._seq + 1
        return max(self.delivered, oldest - 1)

    def event_id(self, seq: int) -> str:
        return f"{self.number}-{seq}"

    async def read(self, after: int, owner: object, idle: float) -> AsyncIterator[tuple[int, str] | None]:
        """Yield (seq, data) after `after` until the stream finishes or another reader takes it.

        Yields None after `idle` seconds without an event, so the caller can send a keep-alive.
        """
        self.reader = owner
        self._changed.set()  # wake a previous reader so it notices it was replaced
        loop = asyncio.get_running_loop()
        events = self._events
        while self.reader is owner:
            if events and events[0][0] > after + 1:
                raise StreamOverrun(f"stream {self.number} lost events after {after}")
            # Sequence numbers are consecutive and the newest is last: what is new is the tail, read
            # from the right end (O(new events), not O(buffer) as a scan of the whole deque is).
            new = min(self._seq - after, len(events))
            if new == 1:  # the usual wake: one event (a copy first only when more may come meanwhile)
                seq, data = events[-1]
                yield seq, data
                after = self.delivered = max(self.delivered, seq)
            elif new > 1:
                for seq, data in [events[i] for i in range(-new, 0)]:
                    yield seq, data
                    after = self.delivered = max(self.delivered, seq)
            if self.finished and after >= self._seq:
                return
            if new <= 0:
                self._changed.clear()
                # A bare timer, not asyncio.timeout: this runs for every event, and it only has to wake us.
                timer = loop.call_later(idle, self._changed.set)
                try:
                    await self._changed.wait()
                finally:
                    timer.cancel()
                if self._seq == after and not self.finished and self.reader is owner:
                    yield None  # woken by the timer: nothing for `idle` seconds

    async def wait_first(self) -> None:
        while not self._events and not self.finished:
            self._changed.clear()
            await self._changed.wait()

    def sole_event(self) -> str | None:
        """The data of the only event of a finished stream (a plain answer, fit for JSON)."""
        if self.finished and self._seq == 1 and len(self._events) == 1:
            return self._events[0][1]
        return None

    def release(self, owner: object) -> None:
        if self.reader is owner:
            self.reader = None


@dataclass(eq=False)
class Session:
    id: str
    kind: Literal["sse", "streamable", "modern"]
    gateway: Gateway | None
    identity: str | None
    buffer_size: int
    protocol_version: str = ""
    client_capabilities: dict[str, Any] = field(default_factory=dict)
    client_info: dict[str, Any] = field(default_factory=dict)
    http_headers: dict[str, str] = field(default_factory=dict)
    """Headers of the request that opened the session (lowercase names, credentials removed)."""
    initialized: bool = False
    log_level: str | None = None
    closed: bool = False
    created: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    streams: OrderedDict[int, EventStream] = field(default_factory=OrderedDict)
    request_streams: dict[tuple[bool, str | int], EventStream] = field(default_factory=dict)
    on_close: list[Callable[[Session], None]] = field(default_factory=list)
    _next_stream: int = 1
    _finished: OrderedDict[int, None] = field(
        default_factory=OrderedDict
    )  # finished request streams, oldest first

    def __post_init__(self) -> None:
        self.streams[0] = EventStream(0, self.buffer_size)

    @property
    def standalone(self) -> EventStream:
        return self.streams[0]

    def open_request_stream(self, request_id: str | int) -> EventStream:
        """A stream for one request's related messages and its response (Streamable HTTP, SSE mode)."""
        stream = EventStream(self._next_stream, self.buffer_size)
        self._next_stream += 1
        self.streams[stream.number] = stream
        self.request_streams[id_key(request_id)] = stream
        # Finished streams stay replayable for a while, but their number is bounded: the oldest go.
        finished = self._finished
        while len(finished) > FINISHED_STREAMS_KEPT:
            self.streams.pop(finished.popitem(last=False)[0], None)
        return stream

    def end_request_stream(self, request_id: str | int) -> None:
        stream = self.request_streams.pop(id_key(request_id), None)
        if stream is not None:
            stream.finish()
            if stream.number in self.streams:
                self._finished[stream.number] = None

    def forget_stream(self, number: int) -> None:
        """Drop a request's stream at once (its only event went out as plain JSON): nothing to replay."""
        self.streams.pop(number, None)
        self._finished.pop(number, None)

    def send(self, message: Message, related: str | int | None = None) -> None:
        """Queue a server-to-client message on the stream of the request it relates to, else stream 0."""
        if self.closed:
            return
        stream = self.request_streams.get(id_key(related)) if related is not None else None
        (stream or self.standalone).push(message)

    def resolve_event_id(self, event_id: str) -> tuple[EventStream, int] | None:
        match = _EVENT_ID.fullmatch(event_id)
        if match is None:
            return None
        stream = self.streams.get(int(match.group(1)))
        return None if stream is None else (stream, int(match.group(2)))

    def touch(self) -> None:
        self.last_seen = time.monotonic()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for stream in self.streams.values():
            stream.finish()
        for callback in self.on_close:
            callback(self)


class SessionStore:
    """All live sessions, with a cap and idle expiry so abandoned ones do not pile up.

    What a 2026-07-28 client holds open between requests (a listen stream, a call waiting for its
    input) is held here too, as a session of kind "modern": it counts toward the cap, and it ends
    with its key as any session does. Its id is never handed out, so no request can name it.
    """

    def __init__(self, *, max_sessions: int, idle_timeout: float, buffer_size: int) -> None:
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        self.buffer_size = buffer_size
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def full(self) -> bool:
        return len(self._sessions) >= self.max_sessions

    def create(
        self,
        kind: Literal["sse", "streamable"],
        gateway: Gateway,
        identity: str | None,
        headers: Mapping[str, str] | None = None,
    ) -> Session:
        # 256 random bits, URL-safe: unguessable and valid in a header or a query string.
        session = Session(secrets.token_urlsafe(32), kind, gateway, identity, self.buffer_size)
        session.http_headers = forwardable_headers(headers or {})
        self.add(session)
        return session

    def add(self, session: Session) -> None:
        """Hold a session made elsewhere until it closes; the caller checks `full()` first."""
        self._sessions[session.id] = session
        session.on_close.append(self._forget)

    def _forget(self, session: Session) -> None:
        self._sessions.pop(session.id, None)

    def get(self, session_id: str | None) -> Session | None:
        if session_id is None:
            return None
        return self._sessions.get(session_id)

    def all(self) -> list[Session]:
        return list(self._sessions.values())

    def expire_idle(self, now: float | None = None) -> int:
        """Close Streamable HTTP sessions idle past the timeout; an open SSE stream counts as activity."""
        now = time.monotonic() if now is None else now
        stale = [
            s
            for s in self._sessions.values()
            if s.kind == "streamable"
            and s.standalone.reader is None
            and not s.request_streams
            and now - s.last_seen > self.idle_timeout
        ]
        for session in stale:
            session.close()
        return len(stale)

    def close_all(self) -> None:
        for session in list(self._sessions.values()):
            session.close()
