"""Several backends behind one endpoint: tools and prompts named `<backend>__<name>`, resources by URI.

A backend that is down is left out of lists (and named in the list's `_meta`), never failing
the whole list; a call to it gets a clear error. list_changed from any backend reaches every
session, because each session is attached to every backend.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Final

from ..protocol.jsonrpc import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    METHOD_NOT_FOUND,
    Message,
    error_response,
    result_response,
)
from ..protocol.session import Session
from .backend import READY_WAIT, Backend

__all__ = ["UNAVAILABLE_META", "AggregateBackend"]

log = logging.getLogger("mcp_sse.upstream")

UNAVAILABLE_META: Final = "io.github.mcp-sse/unavailable"
LIST_PAGES: Final = 50
_LISTS: Final = {
    "tools/list": ("tools", "name"),
    "prompts/list": ("prompts", "name"),
    "resources/list": ("resources", None),
    "resources/templates/list": ("resourceTemplates", None),
}
_NAMED: Final = {"tools/call": "name", "prompts/get": "name"}


class AggregateBackend(Backend):
    def __init__(self, backends: dict[str, Backend], *, separator: str = "__") -> None:
        super().__init__()
        self.name = "aggregate"
        self.backends = backends
        self.separator = separator
        self.resource_owner: dict[str, str] = {}
        self.timeout = max(b.timeout for b in backends.values())
        self.server_info = {"name": "mcp-sse"}
        self.state = "running"
        self._ready.set()

    async def wait_ready(self, timeout: float) -> bool:  # noqa: ASYNC109 - a bound, not a cancel scope
        """Wait for every backend (a failed one does not hold the others up), then merge what they offer."""
        await asyncio.gather(*(b.wait_ready(timeout) for b in self.backends.values()))
        self._merge_capabilities()
        return True

    def _merge_capabilities(self) -> None:
        merged: dict[str, Any] = {}
        for backend in self.backends.values():
            for key, value in backend.capabilities.items():
                if isinstance(value, dict) and isinstance(merged.get(key), dict):
                    merged[key] = {**merged[key], **{k: v for k, v in value.items() if v}}
                else:
                    merged.setdefault(key, value)
        self.capabilities = merged

    async def open_session(self, session: Session) -> str | None:
        """Each backend prepares for the session (a per-session one starts its child). One that
        refuses (all its children in use, or its child failed) is left out for this session, as
        a backend that is down is: the others still serve it."""
        names = list(self.backends)
        try:
            problems = await asyncio.gather(
                *(self.backends[n].open_session(session) for n in names), return_exceptions=True
            )
        except BaseException:  # cancelled (the client left): no child may outlive the attempt
            self.detach(session)
            raise
        for name, problem in zip(names, problems, strict=True):
            if isinstance(problem, BaseException):
                self.backends[name].detach(session)  # whatever it had started for the session
            if problem is not None:
                log.warning("session %s: backend %s left out: %s", session.id[:8], name, problem)
        self._merge_capabilities()  # a per-session backend knows what it offers once a child ran
        return None

    def split(self, name: str) -> tuple[str, str] | None:
        backend, sep, rest = name.partition(self.separator)
        return (backend, rest) if sep and backend in self.backends and rest else None

    async def request(self, session: Session, message: Message) -> Message:
        method = message["method"]
        params: dict[str, Any] = message.get("params") or {}
        if method in _LISTS:
            return await self._list(session, message)
        if method in _NAMED:
            target = self.split(str(params.get(_NAMED[method], "")))
            if target is None:
                return error_response(
                    message["id"],
                    INVALID_PARAMS,
                    f"unknown {method.split('/')[0][:-1]}: names are <backend>{self.separator}<name>",
                )
            owner, name = target
            return await self._forward(owner, session, {**message, "params": {**params, "name": name}})
        if method in ("resources/read", "resources/subscribe", "resources/unsubscribe"):
            holder = await self._resource_owner(session, str(params.get("uri", "")))
            if holder is None:
                return error_response(message["id"], INVALID_PARAMS, "unknown resource URI")
            if method == "resources/read":
                return await self._forward(holder, session, message)
            if method == "resources/subscribe":
                return await self.backends[holder].subscribe(session, message)
            return await self.backends[holder].unsubscribe(session, message)
        if method == "completion/complete":
            return await self._complete(session, message)
        return error_response(message["id"], METHOD_NOT_FOUND, f"Method not found: {method}")

    async def subscribe(self, session: Session, message: Message) -> Message:
        return await self.request(session, {**message, "method": "resources/subscribe"})

    async def unsubscribe(self, session: Session, message: Message) -> Message:
        return await self.request(session, {**message, "method": "resources/unsubscribe"})

    async def _forward(self, name: str, session: Session, message: Message) -> Message:
        backend = self.backends[name]
        if backend.state != "running" and not await backend.wait_ready(READY_WAIT):
            return error_response(message["id"], INTERNAL_ERROR, f"backend {name!r} is {backend.state}")
        return await backend.request(session, message)

    async def _list_one(self, name: str, session: Session, message: Message) -> list[dict[str, Any]] | None:
        """Every page of one backend's list, or None when the backend is down or fails."""
        backend = self.backends[name]
        if backend.state != "running":
            return None
        field = _LISTS[message["method"]][0]
        items: list[dict[str, Any]] = []
        params: dict[str, Any] = {}
        for _ in range(LIST_PAGES):
            reply = await backend.request(session, {**message, "params": params})
            result = reply.get("result")
            if not isinstance(result, dict):
                return None
            items.extend(i for i in result.get(field) or [] if isinstance(i, dict))
            cursor = result.get("nextCursor")
            if not isinstance(cursor, str):
                break
            params = {"cursor": cursor}
        return items

    async def _list(self, session: Session, message: Message) -> Message:
        method = message["method"]
        field, key = _LISTS[method]
        # A backend that is not running is reported whatever it offered; a running one is
        # asked only for what it offers.
        down = [n for n, b in self.backends.items() if b.state != "running"]
        offered = [n for n, b in self.backends.items() if b.state == "running" and _offers(b, field)]
        pages = await asyncio.gather(*(self._list_one(n, session, message) for n in offered))
        merged: list[dict[str, Any]] = []
        for name, items in zip(offered, pages, strict=True):
            if items is None:
                down.append(name)
                continue
            for item in items:
                if key is not None:
                    item = {**item, key: f"{name}{self.separator}{item[key]}"}
                elif field == "resources" and isinstance(item.get("uri"), str):
                    self.resource_owner.setdefault(item["uri"], name)
                merged.append(item)
        result: dict[str, Any] = {field: merged}
        if down:
            result["_meta"] = {UNAVAILABLE_META: down}
        return result_response(message["id"], result)

    async def _resource_owner(self, session: Session, uri: str) -> str | None:
        if uri not in self.resource_owner:
            await self._list(session, {"jsonrpc": "2.0", "id": "owner", "method": "resources/list"})
        return self.resource_owner.get(uri)

    async def _complete(self, session: Session, message: Message) -> Message:
        params: dict[str, Any] = message.get("params") or {}
        ref = params.get("ref") or {}
        if ref.get("type") == "ref/prompt" and (target := self.split(str(ref.get("name", "")))):
            owner, name = target
            forwarded = {**message, "params": {**params, "ref": {**ref, "name": name}}}
            return await self._forward(owner, session, forwarded)
        holder = await self._resource_owner(session, str(ref.get("uri", "")))
        if holder is None:
            return error_response(message["id"], INVALID_PARAMS, "unknown completion reference")
        return await self._forward(holder, session, message)

    async def report_collisions(self) -> list[str]:
        """Resource URIs offered by more than one backend: logged at startup, first backend wins."""
        await self.wait_ready(READY_WAIT)
        probe = Session("startup", "modern", None, None, 16)
        owners: dict[str, list[str]] = {}
        message = {"jsonrpc": "2.0", "id": "collisions", "method": "resources/list"}
        for name, backend in self.backends.items():
            items = await self._list_one(name, probe, message) if _offers(backend, "resources") else None
            for item in items or []:
                owners.setdefault(str(item.get("uri")), []).append(name)
        collisions = [uri for uri, names in owners.items() if len(names) > 1]
        for uri in collisions:
            log.warning(
                "resource %s is offered by %s; %s serves it", uri, ", ".join(owners[uri]), owners[uri][0]
            )
        for uri, names in owners.items():
            self.resource_owner.setdefault(uri, names[0])
        return collisions

    def revive(self) -> int:
        return sum(backend.revive() for backend in self.backends.values())

    def tool_schema(self, name: str) -> dict[str, Any] | None:
        target = self.split(name)
        return self.backends[target[0]].tool_schema(target[1]) if target else None

    def notify(self, session: Session, message: Message) -> None:
        for backend in self.backends.values():
            backend.notify(session, message)

    def respond(self, session: Session, message: Message) -> bool:
        return any(backend.respond(session, message) for backend in self.backends.values())

    def attach(self, session: Session) -> None:
        for backend in self.backends.values():
            backend.attach(session)

    def detach(self, session: Session) -> None:
        for backend in self.backends.values():
            backend.detach(session)

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "backends": list(self.backends)}


def _offers(backend: Backend, field: str) -> bool:
    capability = {
        "tools": "tools",
        "prompts": "prompts",
        "resources": "resources",
        "resourceTemplates": "resources",
    }
    return capability[field] in backend.capabilities
