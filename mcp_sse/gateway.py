"""The MCP server that clients talk to on one route.

The gateway terminates MCP itself: it answers `initialize`, `ping` and `logging/setLevel`
for each client session, and forwards the rest to its backend. The backend was
initialized once by the gateway, so a client of any protocol era can share a child
with clients of any other.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from . import __version__
from .protocol.jsonrpc import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    Message,
    error_response,
    result_response,
)
from .protocol.session import Session
from .protocol.versions import negotiate
from .upstream.backend import Backend

__all__ = ["Gateway", "Policy"]

log = logging.getLogger("mcp_sse.gateway")

Policy = Callable[[Session, Message], Message | None]
"""Called before a request is forwarded; returns an error response to refuse it, else None."""

_LOG_LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")


class Gateway:
    def __init__(self, backend: Backend, *, name: str) -> None:
        self.backend = backend
        self.name = name
        self.policy: Policy | None = None

    async def handle_request(self, session: Session, message: Message) -> Message:
        method: str = message["method"]
        request_id = message["id"]
        session.touch()
        if method == "initialize":
            return await self._initialize(session, message)
        if method == "ping":
            return result_response(request_id, {})
        if not session.initialized:
            return error_response(request_id, INVALID_REQUEST, "Invalid Request: send initialize first")
        if method == "logging/setLevel":
            level = (message.get("params") or {}).get("level")
            if level not in _LOG_LEVELS:
                return error_response(request_id, INVALID_PARAMS, f"level must be one of {list(_LOG_LEVELS)}")
            session.log_level = level
            return result_response(request_id, {})
        if self.policy is not None and (refusal := self.policy(session, message)) is not None:
            return refusal
        if method == "resources/subscribe":
            return await self.backend.subscribe(session, message)
        if method == "resources/unsubscribe":
            return await self.backend.unsubscribe(session, message)
        if method == "server/discover":
            # The 2026-07-28 stateless era is not served on a session; clients fall back to initialize.
            return error_response(request_id, METHOD_NOT_FOUND, "Method not found: server/discover")
        return await self.backend.request(session, message)

    async def _initialize(self, session: Session, message: Message) -> Message:
        request_id = message["id"]
        if session.initialized:
            return error_response(request_id, INVALID_REQUEST, "Invalid Request: session already initialized")
        params: dict[str, Any] = message.get("params") or {}
        if not await self.backend.wait_ready(min(self.backend.timeout, 30.0)):
            return error_response(
                request_id, INTERNAL_ERROR, f"backend {self.name!r} is {self.backend.state}"
            )
        session.protocol_version = negotiate(params.get("protocolVersion"))
        capabilities = params.get("capabilities")
        session.client_capabilities = capabilities if isinstance(capabilities, dict) else {}
        info = params.get("clientInfo")
        session.client_info = info if isinstance(info, dict) else {}
        session.initialized = True
        self.backend.attach(session)
        session.on_close.append(self.backend.detach)
        result: dict[str, Any] = {
            "protocolVersion": session.protocol_version,
            # Log levels are kept per session here, so logging is always offered.
            "capabilities": {**self.backend.capabilities, "logging": {}},
            "serverInfo": {
                "name": self.backend.server_info.get("name", self.name),
                "version": str(self.backend.server_info.get("version", __version__)),
            },
        }
        if self.backend.instructions:
            result["instructions"] = self.backend.instructions
        return result_response(request_id, result)

    def handle_notification(self, session: Session, message: Message) -> None:
        session.touch()
        if message["method"] == "notifications/initialized":
            return
        self.backend.notify(session, message)

    def handle_response(self, session: Session, message: Message) -> None:
        session.touch()
        if not self.backend.respond(session, message):
            log.debug("session sent a response to an id it was never asked; dropped")
