"""Many client sessions over one MCP connection to a backend.

Request ids, progress tokens and cancellation ids are rewritten on the way in and
restored on the way out, so a reply can only ever reach the session whose request it
answers. Server-to-client traffic that carries no id of ours (sampling, elicitation,
roots, log messages) goes to the one session with a request in flight; when several
have one, the stdio wire cannot say which caused it, so the backend gets an error
rather than a guess that could leak one client's data to another.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from ..protocol.jsonrpc import (
    INTERNAL_ERROR,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    Message,
    error_response,
    id_key,
    result_response,
)
from ..protocol.session import LOG_LEVELS, Session

__all__ = ["REQUEST_CANCELLED", "REQUEST_TIMEOUT", "Multiplexer"]

log = logging.getLogger("mcp_sse.upstream")

REQUEST_TIMEOUT: Final = -32001
REQUEST_CANCELLED: Final = -32800
_CAPABILITY_FOR: Final = {
    "sampling/createMessage": "sampling",
    "elicitation/create": "elicitation",
    "roots/list": "roots",
}


@dataclass(eq=False)
class _Pending:
    session: Session | None  # None: the gateway's own request (initialize, subscribe)
    client_id: str | int
    future: asyncio.Future[Message]
    progress: tuple[str, str | int] | None = None  # (our token, the client's token)


@dataclass(eq=False)
class _Subscribing:
    """An upstream resources/subscribe in flight, and the sessions waiting on its outcome."""

    task: asyncio.Task[Message]
    waiting: set[Session] = field(default_factory=set)


def _time_out(future: asyncio.Future[Message]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


async def _answer(future: asyncio.Future[Message], timeout: float) -> Message:  # noqa: ASYNC109
    """The backend's answer, or TimeoutError after `timeout` seconds. Awaited directly, with a bare
    timer (no wait_for, shield or asyncio.timeout): the answer wakes the caller in one loop turn."""
    timer = asyncio.get_running_loop().call_later(timeout, _time_out, future)
    try:
        return await future
    finally:
        timer.cancel()


class Multiplexer:
    def __init__(
        self, name: str, write: Callable[[Message], None], *, on_timeout: Callable[[], None] = lambda: None
    ) -> None:
        self.name = name
        self._write = write
        self._on_timeout = on_timeout  # a request went unanswered: the backend may check the child
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._by_client: dict[tuple[str, tuple[bool, str | int]], int] = {}
        self._progress: dict[str, _Pending] = {}
        self._server_requests: dict[str, tuple[Session, str | int]] = {}
        self._subscriptions: dict[str, set[Session]] = {}  # accepted upstream, per URI
        self._subscribing: dict[str, _Subscribing] = {}  # upstream subscribe in flight, per URI
        self.sessions: dict[str, Session] = {}

    # -- client to backend -------------------------------------------------------------------

    async def call(self, session: Session | None, message: Message, timeout: float) -> Message:  # noqa: ASYNC109
        """Forward one request and wait for its answer, which comes back with the caller's id."""
        upstream_id = next(self._ids)
        client_id = message["id"]
        pending = _Pending(session, client_id, asyncio.get_running_loop().create_future())
        outbound = {**message, "id": upstream_id}
        params = message.get("params")
        if isinstance(params, dict) and isinstance(meta := params.get("_meta"), dict):
            token = meta.get("progressToken")
            if isinstance(token, (str, int)) and not isinstance(token, bool):
                ours = f"{self.name}-{upstream_id}"
                pending.progress = (ours, token)
                self._progress[ours] = pending
                outbound["params"] = {**params, "_meta": {**meta, "progressToken": ours}}
        self._pending[upstream_id] = pending
        if session is not None:
            self._by_client[(session.id, id_key(client_id))] = upstream_id
        try:
            self._write(outbound)
            return await _answer(pending.future, timeout)
        except asyncio.CancelledError:
            # The caller is gone (a 2026-era client closed its stream): the backend may stop too.
            # Its cancellation cancelled the future too, unless the answer had already come.
            if pending.future.cancelled() or not pending.future.done():
                self._cancel_upstream(upstream_id, "cancelled by the client")
            raise
        except TimeoutError:
            self._cancel_upstream(upstream_id, "timed out in the gateway")
            self._on_timeout()
            return error_response(
                client_id, REQUEST_TIMEOUT, f"backend {self.name!r} did not answer within {timeout:g} s"
            )
        except ConnectionError as exc:
            return error_response(client_id, INTERNAL_ERROR, str(exc))
        finally:
            self._forget(upstream_id)

    async def ping(self, timeout: float) -> bool:  # noqa: ASYNC109 - a bound, not a cancel scope
        """Whether the backend answers a ping within `timeout`. Any answer, even an error, shows
        it still reads and writes; a ping that cannot even be written counts as no answer."""
        upstream_id = next(self._ids)
        pending = _Pending(None, "ping", asyncio.get_running_loop().create_future())
        self._pending[upstream_id] = pending
        try:
            self._write({"jsonrpc": "2.0", "id": upstream_id, "method": "ping"})
            await _answer(pending.future, timeout)
        except (TimeoutError, ConnectionError):
            return False
        finally:
            self._forget(upstream_id)
        return True

    def _forget(self, upstream_id: int) -> None:
        pending = self._pending.pop(upstream_id, None)
        if pending is None:
            return
        if pending.session is not None:
            self._by_client.pop((pending.session.id, id_key(pending.client_id)), None)
        if pending.progress:
            self._progress.pop(pending.progress[0], None)

    def _cancel_upstream(self, upstream_id: int, reason: str) -> None:
        with contextlib.suppress(ConnectionError):
            self._write(
                {
                    "jsonrpc": "2.0",
                    "method": "notifications/cancelled",
                    "params": {"requestId": upstream_id, "reason": reason},
                }
            )

    def client_notification(self, session: Session, message: Message) -> None:
        method = message["method"]
        params = message.get("params") or {}
        if method == "notifications/cancelled":
            request_id = params.get("requestId")
            if not isinstance(request_id, (str, int)):
                return
            upstream_id = self._by_client.get((session.id, id_key(request_id)))
            if upstream_id is None:
                return
            self._cancel_upstream(upstream_id, str(params.get("reason", "cancelled by the client")))
            pending = self._pending.get(upstream_id)
            if pending and not pending.future.done():
                pending.future.set_result(
                    error_response(pending.client_id, REQUEST_CANCELLED, "request cancelled by the client")
                )
        elif method == "notifications/progress":
            # Progress on a server-to-client request we forwarded: the token is the backend's own.
            self._write_quietly(message)
        # Others (initialized, roots/list_changed) are per-client state a shared child cannot hold.

    def client_response(self, session: Session, message: Message) -> bool:
        """Route a client's answer to a backend request; False when the id is not one we sent it."""
        origin = self._server_requests.get(str(message["id"]))
        if origin is None or origin[0] is not session:
            return False
        del self._server_requests[str(message["id"])]
        self._write_quietly({**message, "id": origin[1]})
        return True

    def attach(self, session: Session) -> None:
        self.sessions[session.id] = session

    def detach(self, session: Session) -> None:
        self.sessions.pop(session.id, None)
        for upstream_id, pending in list(self._pending.items()):
            if pending.session is session:
                self._cancel_upstream(upstream_id, "client session ended")
                if not pending.future.done():
                    pending.future.set_result(
                        error_response(pending.client_id, REQUEST_CANCELLED, "client session ended")
                    )
        for key, (owner, child_id) in list(self._server_requests.items()):
            if owner is session:
                del self._server_requests[key]
                self._write_quietly(error_response(child_id, INTERNAL_ERROR, "client session ended"))
        for uri in [u for u, subs in self._subscriptions.items() if session in subs]:
            self.unsubscribe(session, uri)
        for flight in self._subscribing.values():
            flight.waiting.discard(session)

    def fail_all(self, reason: str) -> None:
        """The backend went away: every request in flight gets an error now, not a timeout later."""
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_result(error_response(pending.client_id, INTERNAL_ERROR, reason))
        for session, downstream in self._server_requests.values():
            session.send(
                {
                    "jsonrpc": "2.0",
                    "method": "notifications/cancelled",
                    "params": {"requestId": downstream, "reason": reason},
                }
            )
        self._server_requests.clear()

    def waiting(self, upstream_id: object) -> bool:
        """Whether a request we sent under this id still waits for its answer."""
        pending = self._pending.get(upstream_id) if isinstance(upstream_id, int) else None
        return pending is not None and not pending.future.done()

    def fail_one(self, upstream_id: object, reason: str) -> None:
        pending = self._pending.get(upstream_id) if isinstance(upstream_id, int) else None
        if pending is not None and not pending.future.done():
            pending.future.set_result(error_response(pending.client_id, INTERNAL_ERROR, reason))

    # -- subscriptions: one upstream subscription per URI, however many sessions want it ----

    async def subscribe(self, session: Session, message: Message, timeout: float) -> Message:  # noqa: ASYNC109
        """resources/subscribe for `session`, sharing one upstream subscription per URI.

        A session counts as subscribed only once the backend has accepted: while the first
        request for a URI is in flight, later subscribers wait for its outcome, and a refusal
        reaches each of them and is not remembered, so the next subscribe asks the backend again.
        """
        params = message.get("params") or {}
        uri = str(params.get("uri"))
        if (subscribers := self._subscriptions.get(uri)) is not None:
            subscribers.add(session)
            return result_response(message["id"], {})
        flight = self._subscribing.get(uri)
        if flight is None:
            upstream = {k: v for k, v in params.items() if k != "_meta"}
            flight = self._start_subscribe(uri, upstream, timeout)
        flight.waiting.add(session)
        try:
            reply = await asyncio.shield(flight.task)
        except asyncio.CancelledError:
            flight.waiting.discard(session)  # its client is gone: not subscribed
            raise
        return {**reply, "id": message["id"]}

    def _start_subscribe(self, uri: str, params: dict[str, Any], timeout: float) -> _Subscribing:
        """The upstream subscribe for `uri`, as the gateway's own request, not any one caller's: it
        must not fail for the others if that caller's session ends or cancels while it is in flight."""
        request = {"jsonrpc": "2.0", "id": "subscribe", "method": "resources/subscribe", "params": params}
        flight = self._subscribing[uri] = _Subscribing(
            asyncio.create_task(self._subscribe_upstream(uri, request, timeout))
        )
        return flight

    async def _subscribe_upstream(self, uri: str, request: Message, timeout: float) -> Message:  # noqa: ASYNC109
        try:
            reply = await self.call(None, request, timeout)
        finally:
            flight = self._subscribing.pop(uri)
        if "error" in reply:
            return reply
        if flight.waiting:
            self._subscriptions.setdefault(uri, set()).update(flight.waiting)
        else:  # every session that asked has ended or unsubscribed meanwhile
            self._unsubscribe_upstream(uri)
        return reply

    def resubscribe(self, timeout: float) -> None:
        """A restarted child knows none of the subscriptions its predecessor accepted: ask it
        again for each URI, on behalf of the sessions holding it. Until it accepts they count as
        not subscribed (a subscribe meanwhile joins the request); a refusal ends them, logged."""
        for uri, sessions in list(self._subscriptions.items()):
            del self._subscriptions[uri]
            flight = self._start_subscribe(uri, {"uri": uri}, timeout)
            flight.waiting.update(sessions)
            flight.task.add_done_callback(functools.partial(self._resubscribed, uri))

    def _resubscribed(self, uri: str, task: asyncio.Task[Message]) -> None:
        if not task.cancelled() and "error" in (reply := task.result()):
            message = str(reply["error"].get("message"))[:200]
            log.warning("backend %s: subscription to %s lost in a restart: %s", self.name, uri[:200], message)

    def unsubscribe(self, session: Session, uri: str) -> None:
        if (flight := self._subscribing.get(uri)) is not None:
            flight.waiting.discard(session)
        subscribers = self._subscriptions.get(uri)
        if not subscribers or session not in subscribers:
            return
        subscribers.discard(session)
        if not subscribers:
            del self._subscriptions[uri]
            self._unsubscribe_upstream(uri)

    def _unsubscribe_upstream(self, uri: str) -> None:
        self._write_quietly(
            {
                "jsonrpc": "2.0",
                "id": f"unsubscribe-{next(self._ids)}",
                "method": "resources/unsubscribe",
                "params": {"uri": uri},
            }
        )

    # -- backend to clients ------------------------------------------------------------------

    def on_message(self, message: Message) -> None:
        if "method" in message:
            if "id" in message:
                self._server_request(message)
            else:
                self._server_notification(message)
            return
        upstream_id = message.get("id")
        pending = self._pending.get(upstream_id) if isinstance(upstream_id, int) else None
        if pending is None:
            log.debug("backend %s answered an id we did not send; dropped", self.name)
            return
        if not pending.future.done():
            pending.future.set_result({**message, "id": pending.client_id})

    def _in_flight_owner(self) -> tuple[Session, str | int] | None:
        """The single session with a request in flight, and its newest request id."""
        owners = {p.session for p in self._pending.values() if p.session is not None}
        if len(owners) != 1:
            return None
        session = owners.pop()
        newest = max(k for k, p in self._pending.items() if p.session is session)
        return session, self._pending[newest].client_id

    def _server_request(self, message: Message) -> None:
        child_id = message["id"]
        method = message["method"]
        if method == "ping":
            self._write_quietly(result_response(child_id, {}))
            return
        owner = self._in_flight_owner()
        if owner is None:
            self._write_quietly(
                error_response(
                    child_id,
                    INVALID_REQUEST,
                    f"{method}: no single client session to route to (none or several have requests "
                    "in flight); use per-session isolation for this server",
                )
            )
            return
        session, related = owner
        capability = _CAPABILITY_FOR.get(method)
        if capability and capability not in session.client_capabilities:
            self._write_quietly(
                error_response(child_id, METHOD_NOT_FOUND, f"the client did not declare {capability!r}")
            )
            return
        downstream = f"mcp-sse-{self.name}-{next(self._ids)}"
        self._server_requests[downstream] = (session, child_id)
        session.send({**message, "id": downstream}, related=related)

    def _server_notification(self, message: Message) -> None:
        method = message["method"]
        params: dict[str, Any] = message.get("params") or {}
        if method == "notifications/progress":
            pending = self._progress.get(str(params.get("progressToken")))
            if pending and pending.session and pending.progress:
                restored = {**params, "progressToken": pending.progress[1]}
                pending.session.send({**message, "params": restored}, related=pending.client_id)
        elif method.endswith("/list_changed"):
            for session in list(self.sessions.values()):
                session.send(message)
        elif method == "notifications/resources/updated":
            for session in list(self._subscriptions.get(str(params.get("uri")), ())):
                session.send(message)
        elif method == "notifications/cancelled":
            key = next(
                (k for k, (_, cid) in self._server_requests.items() if cid == params.get("requestId")), None
            )
            if key is not None:
                session, _ = self._server_requests.pop(key)
                session.send({**message, "params": {**params, "requestId": key}})
        elif (owner := self._in_flight_owner()) is not None:
            session, related = owner
            if method == "notifications/message" and not _level_enabled(session, params.get("level")):
                return
            session.send(message, related=related)
        else:
            log.debug("backend %s sent %s with no session to route it to; dropped", self.name, method)

    def _write_quietly(self, message: Message) -> None:
        try:
            self._write(message)
        except ConnectionError:
            log.debug("backend %s is gone; %s not delivered", self.name, message.get("method", "reply"))


def _level_enabled(session: Session, level: object) -> bool:
    if session.log_level is None or level not in LOG_LEVELS:
        return True
    return LOG_LEVELS.index(str(level)) >= LOG_LEVELS.index(session.log_level)
