"""A remote MCP server as a backend (work in progress: being written in this session)."""

from __future__ import annotations

from ..protocol.jsonrpc import INTERNAL_ERROR, Message, error_response
from ..protocol.session import Session
from .backend import Backend
from .config import ServerSpec

__all__ = ["RemoteBackend"]


class RemoteBackend(Backend):
    def __init__(self, spec: ServerSpec, *, max_message: int) -> None:
        super().__init__()
        self.spec = spec
        self.name = spec.name
        self.timeout = spec.timeout
        self.max_message = max_message

    async def request(self, session: Session, message: Message) -> Message:
        return error_response(message["id"], INTERNAL_ERROR, f"backend {self.name!r}: not yet connected")
