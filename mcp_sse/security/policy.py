"""Per-key policy inside MCP: which tools a key may see and call, and what a viewer may do.

Lists are filtered (a key never learns the names of tools it may not call); calls that
are not allowed get a JSON-RPC error naming the missing permission.
"""

from __future__ import annotations

from typing import Any, Final

from ..protocol.jsonrpc import Message, error_response
from ..protocol.session import Session
from .principals import Resolver

__all__ = ["FORBIDDEN", "KeyPolicy"]

FORBIDDEN: Final = -32003
"""Application error code for a request the caller's key does not permit."""
VIEWER_MAY: Final = frozenset(
    {
        "tools/list",
        "prompts/list",
        "resources/list",
        "resources/templates/list",
        "resources/read",
        "prompts/get",
        "completion/complete",
        "resources/subscribe",
        "resources/unsubscribe",
    }
)


class KeyPolicy:
    """`keys` resolves a session's identity to its caller as it stands now: a KeyStore (keys only),
    or security.principals.Principals (keys, and the callers OAuth tokens made)."""

    def __init__(self, keys: Resolver, backend: str) -> None:
        self.keys = keys
        self.backend = backend

    def check(self, session: Session, message: Message) -> Message | None:
        method = message["method"]
        key = self.keys.current(session.identity or "")
        if key is None:
            return error_response(message["id"], FORBIDDEN, "Forbidden: this key was revoked or has expired")
        if not key.may_use_backend(self.backend):
            return error_response(
                message["id"], FORBIDDEN, f"Forbidden: key may not use backend {self.backend!r}"
            )
        if key.role == "viewer" and method not in VIEWER_MAY:
            return error_response(message["id"], FORBIDDEN, f"Forbidden: role 'viewer' may not call {method}")
        if method == "tools/call":
            tool = str((message.get("params") or {}).get("name", ""))
            if not key.may_use_tool(tool):
                return error_response(
                    message["id"],
                    FORBIDDEN,
                    f"Forbidden: key may not call tool {tool[:100]!r} (tools policy)",
                )
        return None

    def filter(self, session: Session, method: str, result: dict[str, Any]) -> dict[str, Any]:
        if method != "tools/list" or not isinstance(result.get("tools"), list):
            return result
        key = self.keys.current(session.identity or "")
        tools = [t for t in result["tools"] if key is not None and key.may_use_tool(str(t.get("name")))]
        return {**result, "tools": tools}
