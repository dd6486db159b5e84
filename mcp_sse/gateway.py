"""The MCP server that clients talk to on one route.

The gateway terminates MCP itself: it answers `initialize`, `ping` and `logging/setLevel`
for each client session, and forwards the rest to its backend. The backend was
initialized once by the gateway, so a client of any protocol era can share a child
with clients of any other.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Protocol

import jsonschema_rs

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
from .protocol.session import LOG_LEVELS, Session
from .protocol.versions import ALL_VERSIONS, negotiate
from .security.audit import fingerprint
from .upstream.backend import READY_WAIT, Backend
from .upstream.multiplex import REQUEST_CANCELLED

if TYPE_CHECKING:
    from .ops.tracing import Tracing

__all__ = ["Auditor", "Gateway", "Policy"]

log = logging.getLogger("mcp_sse.gateway")


class Policy(Protocol):
    """Filled in by the security layer: may this session send this request, and what may it see."""

    def check(self, session: Session, message: Message) -> Message | None:
        """An error response to refuse the request, or None to let it through."""

    def filter(self, session: Session, method: str, result: dict[str, Any]) -> dict[str, Any]:
        """The part of a list result this session may see."""


CACHEABLE = frozenset(
    {"tools/list", "prompts/list", "resources/list", "resources/templates/list", "resources/read"}
)
ENVELOPE_KEYS = frozenset(
    {
        "io.modelcontextprotocol/protocolVersion",
        "io.modelcontextprotocol/clientCapabilities",
        "io.modelcontextprotocol/clientInfo",
        "io.modelcontextprotocol/logLevel",
    }
)


def _strip_envelope(message: Message) -> Message:
    """The request as a 2025-era backend expects it: without the 2026 envelope keys and retry fields."""
    params = dict(message.get("params") or {})
    meta = {k: v for k, v in (params.get("_meta") or {}).items() if k not in ENVELOPE_KEYS}
    params.pop("inputResponses", None)
    params.pop("requestState", None)
    if meta:
        params["_meta"] = meta
    else:
        params.pop("_meta", None)
    return {**message, "params": params}


class Auditor(Protocol):
    def event(self, name: str, request: Any = None, **fields: Any) -> None: ...


class Gateway:
    def __init__(
        self,
        backend: Backend,
        *,
        name: str,
        policy: Policy | None = None,
        audit: Auditor | None = None,
        audit_arguments: bool = False,
        tracing: Tracing | None = None,
    ) -> None:
        self.backend = backend
        self.tracing = tracing
        self.name = name
        self.policy = policy
        self.audit = audit
        self.audit_arguments = audit_arguments
        self._schemas: dict[str, dict[str, Any]] = {}
        # None for a tool whose schema cannot be compiled: its calls go to the backend unchecked.
        self._validators: dict[str, jsonschema_rs.Validator | None] = {}

    async def handle_request(self, session: Session, message: Message) -> Message:
        if self.tracing is not None:  # in an MCP server span (ops/tracing.py)
            return await self.tracing.serve(self, session, message)
        return await self.handle_untraced(session, message)

    def _forward(self, session: Session, message: Message) -> Awaitable[Message]:
        if self.tracing is None:
            return self.backend.request(session, message)
        return self.tracing.forward(self, session, message)  # in a client span, its context upstream

    async def handle_untraced(self, session: Session, message: Message) -> Message:
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
            if level not in LOG_LEVELS:
                return error_response(request_id, INVALID_PARAMS, f"level must be one of {list(LOG_LEVELS)}")
            session.log_level = level
            return result_response(request_id, {})
        if self.policy is not None and (refusal := self.policy.check(session, message)) is not None:
            if self.audit is not None:  # a refused call is a security event: the trail must show it
                params = message.get("params")
                self.audit.event(
                    "policy.denied",
                    None,
                    identity=session.identity,
                    session=session.id[:8],
                    backend=self.name,
                    method=method[:100],
                    tool=str(params.get("name", ""))[:200] if isinstance(params, dict) else "",
                    reason=refusal["error"]["message"],
                )
            return refusal
        if method == "resources/subscribe":
            return await self.backend.subscribe(session, message)
        if method == "resources/unsubscribe":
            return await self.backend.unsubscribe(session, message)
        if method == "server/discover":
            # The 2026-07-28 stateless era is not served on a session; clients fall back to initialize.
            return error_response(request_id, METHOD_NOT_FOUND, "Method not found: server/discover")
        if method == "tools/call":
            return await self._call_tool(session, message)
        reply = await self._forward(session, message)
        result = reply.get("result")
        if method == "tools/list" and isinstance(result, dict):
            self._remember_schemas(result)
        if self.policy is not None and isinstance(result, dict) and method.endswith("/list"):
            reply = {**reply, "result": self.policy.filter(session, method, result)}
        return reply

    def _remember_schemas(self, result: dict[str, Any]) -> None:
        for tool in result.get("tools") or []:
            if isinstance(tool, dict) and isinstance(tool.get("inputSchema"), dict):
                name = str(tool.get("name"))
                if self._schemas.get(name) != tool["inputSchema"]:
                    self._schemas[name] = tool["inputSchema"]
                    self._validators.pop(name, None)

    def tool_schema(self, tool: str) -> dict[str, Any] | None:
        """The tool's inputSchema, as last listed or as the backend announced it; None if unknown."""
        return self._schemas.get(tool) or self.backend.tool_schema(tool)

    def _invalid_arguments(self, tool: str, arguments: Any) -> str | None:
        """Why the arguments do not fit the tool's inputSchema, or None (also when no schema is known)."""
        if not isinstance(arguments, dict):
            return "arguments must be an object"
        schema = self.tool_schema(tool)
        if schema is None:
            return None
        if tool not in self._schemas:
            self._schemas[tool] = schema
        if tool not in self._validators:
            try:
                # Draft from $schema (2020-12 without one, as MCP says). Formats stay annotations, as
                # most validators treat them: the backend may accept what a strict check would not.
                # Offline: a $ref to a URL must not make the gateway fetch it.
                self._validators[tool] = jsonschema_rs.validator_for(
                    schema, validate_formats=False, offline=True
                )
            except (jsonschema_rs.ValidationError, jsonschema_rs.ReferencingError, ValueError) as exc:
                log.warning(
                    "backend %s: tool %s has an inputSchema we cannot use (%s); arguments not checked",
                    self.name,
                    tool[:100],
                    str(exc).partition("\n")[0][:200],
                )
                self._validators[tool] = None
        validator = self._validators[tool]
        if validator is None:
            return None
        try:
            error = next(validator.iter_errors(arguments), None)
        except ValueError:  # not a JSON value: cannot come from a parsed body; the backend decides
            return None
        if error is None:
            return None
        where = ".".join(str(p) for p in error.instance_path) or "(arguments)"
        return f"{where}: {error.message[:200]}"

    async def _call_tool(self, session: Session, message: Message) -> Message:
        params: dict[str, Any] = message.get("params") or {}
        tool = str(params.get("name", ""))
        arguments = params.get("arguments", {})
        problem = self._invalid_arguments(tool, arguments)
        started = time.monotonic()
        if problem is not None:
            reply = error_response(
                message["id"], INVALID_PARAMS, f"Invalid params for tool {tool[:100]!r}: {problem}"
            )
        else:
            try:
                reply = await self._forward(session, message)
            except asyncio.CancelledError:
                # A 2026-era client closed the call's stream. The call was made all the same, and is
                # audited as a 2025 client's notifications/cancelled leaves it: with an error outcome.
                if self.audit is not None:
                    cancelled = error_response(
                        message["id"], REQUEST_CANCELLED, "request cancelled by the client"
                    )
                    self._audit_call(session, tool, arguments, cancelled, time.monotonic() - started)
                raise
        if self.audit is not None:
            self._audit_call(session, tool, arguments, reply, time.monotonic() - started)
        return reply

    def _audit_call(
        self, session: Session, tool: str, arguments: Any, reply: Message, seconds: float
    ) -> None:
        assert self.audit is not None
        sha256, size = fingerprint(arguments)
        result = reply.get("result")
        outcome = (
            "error"
            if "error" in reply
            else "tool_error"
            if isinstance(result, dict) and result.get("isError")
            else "ok"
        )
        fields: dict[str, Any] = {
            "identity": session.identity,
            "session": session.id[:8],
            "backend": self.name,
            "tool": tool[:200],
            "duration_ms": round(seconds * 1000, 1),
            "outcome": outcome,
            "arguments_bytes": size,
            "arguments_sha256": sha256,
        }
        if self.audit_arguments:
            fields["arguments"] = arguments  # sanitized by the audit log, as every field is
        self.audit.event("tool.invoked", None, **fields)

    async def _initialize(self, session: Session, message: Message) -> Message:
        request_id = message["id"]
        if session.initialized:
            return error_response(request_id, INVALID_REQUEST, "Invalid Request: session already initialized")
        params: dict[str, Any] = message.get("params") or {}
        if not await self.backend.wait_ready(READY_WAIT):
            return error_response(request_id, INTERNAL_ERROR, self._unavailable())
        if (problem := await self.backend.open_session(session)) is not None:
            return error_response(request_id, INTERNAL_ERROR, problem)
        if session.closed:  # the client left while its backend was being prepared
            self.backend.detach(session)
            return error_response(request_id, INTERNAL_ERROR, "session closed during initialize")
        session.protocol_version = negotiate(params.get("protocolVersion"))
        capabilities = params.get("capabilities")
        session.client_capabilities = capabilities if isinstance(capabilities, dict) else {}
        info = params.get("clientInfo")
        session.client_info = info if isinstance(info, dict) else {}
        session.initialized = True
        session.touch()
        self.backend.attach(session)
        session.on_close.append(self._closed)
        if self.audit is not None:
            self.audit.event(
                "mcp.session.open",
                None,
                identity=session.identity,
                session=session.id[:8],
                backend=self.name,
                transport=session.kind,
                protocol=session.protocol_version,
                client=str(session.client_info.get("name", ""))[:100],
            )
        result: dict[str, Any] = {
            "protocolVersion": session.protocol_version,
            # Log levels are kept per session here, so logging is always offered.
            "capabilities": {**self.backend.capabilities, "logging": {}},
            "serverInfo": self._server_info(),
        }
        if self.backend.instructions:
            result["instructions"] = self.backend.instructions
        return result_response(request_id, result)

    async def handle_modern(self, session: Session, message: Message) -> Message:
        """One 2026-07-28 request: no handshake; the answer says its result type and cacheability."""
        method = message["method"]
        if method == "server/discover":
            if not await self.backend.wait_ready(READY_WAIT):
                return error_response(message["id"], INTERNAL_ERROR, self._unavailable())
            reply = result_response(message["id"], self.discover())
        elif method in ("initialize", "logging/setLevel"):
            return error_response(
                message["id"], METHOD_NOT_FOUND, f"Method not found: {method} (not in 2026-07-28)"
            )
        else:
            reply = await self.handle_request(session, _strip_envelope(message))
        result = reply.get("result")
        if isinstance(result, dict) and "resultType" not in result:
            result = {**result, "resultType": "complete"}
            if method in CACHEABLE:
                # Lists are filtered per key, so nothing here may be shared between callers.
                result = {"ttlMs": 0, "cacheScope": "private", **result}
            reply = {**reply, "result": result}
        return reply

    def discover(self) -> dict[str, Any]:
        capabilities = {k: v for k, v in self.backend.capabilities.items() if k != "logging"}
        result: dict[str, Any] = {
            "supportedVersions": list(ALL_VERSIONS),
            "capabilities": capabilities,
            "_meta": {"io.modelcontextprotocol/serverInfo": self._server_info()},
            "resultType": "complete",
            "ttlMs": 0,
            "cacheScope": "private",
        }
        if self.backend.instructions:
            result["instructions"] = self.backend.instructions
        return result

    def _unavailable(self) -> str:
        why = f": {self.backend.last_error}" if self.backend.last_error else ""
        return f"backend {self.name!r} is {self.backend.state}{why}"

    def _server_info(self) -> dict[str, str]:
        return {
            "name": str(self.backend.server_info.get("name", self.name)),
            "version": str(self.backend.server_info.get("version", __version__)),
        }

    def _closed(self, session: Session) -> None:
        self.backend.detach(session)
        if self.audit is not None:
            self.audit.event(
                "mcp.session.close",
                None,
                identity=session.identity,
                session=session.id[:8],
                backend=self.name,
            )

    def handle_notification(self, session: Session, message: Message) -> None:
        session.touch()
        if message["method"] == "notifications/initialized":
            return
        self.backend.notify(session, message)

    def handle_response(self, session: Session, message: Message) -> None:
        session.touch()
        if not self.backend.respond(session, message):
            log.debug("session sent a response to an id it was never asked; dropped")
