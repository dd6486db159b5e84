"""Typed keys for application and request state, in one place so every layer agrees on them."""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from aiohttp import web

from .protocol.session import SessionStore

if TYPE_CHECKING:
    from .principal import Principal
    from .security.audit import AuditLog
    from .security.cookies import LoginStore
    from .security.keys import ApiKey, KeyStore
    from .security.principals import Principals
    from .transport.routes import Mounts
    from .upstream.backend import Backend
    from .upstream.config import ServerSpec

__all__ = [
    "API_KEY",
    "AUDIT",
    "BACKENDS",
    "CLIENT_IP",
    "IDENTITY",
    "KEYS",
    "LOGINS",
    "MOUNTS",
    "PRINCIPAL",
    "PRINCIPALS",
    "REQUEST_ID",
    "SECURE",
    "SESSIONS",
    "SPECS",
    "TASKS",
    "TRANSPORT",
    "IPAddress",
    "TransportSettings",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class TransportSettings:
    keepalive: float
    max_body: int
    write_timeout: float
    shutdown_grace: float
    body_timeout: float


SESSIONS: Final = web.AppKey("sessions", SessionStore)
TRANSPORT: Final = web.AppKey("transport", TransportSettings)
TASKS: Final = web.AppKey("tasks", set[asyncio.Task[None]])
BACKENDS: Final = web.AppKey("backends", dict[str, "Backend"])
"""The backends by name, changed in place by a servers reload: whatever holds it sees the change."""
SPECS: Final = web.AppKey("specs", dict[str, "ServerSpec"])
"""The servers-file entry each backend was built from, for the next reload to compare with; empty
when the backends did not come from a servers file (then a reload leaves them alone)."""
MOUNTS: Final[web.AppKey[Mounts]] = web.AppKey("mounts")
"""What serves the root's and each `/servers/<name>/` MCP routes now."""
KEYS: Final[web.AppKey[KeyStore]] = web.AppKey("keys")
AUDIT: Final[web.AppKey[AuditLog]] = web.AppKey("audit")
LOGINS: Final[web.AppKey[LoginStore | None]] = web.AppKey("logins")
PRINCIPALS: Final[web.AppKey[Principals]] = web.AppKey("principals")
"""Resolves a session's identity (a key id, or an OAuth identity) to its caller as it stands now."""

REQUEST_ID: Final = web.RequestKey("request_id", str)
"""A random id per request, echoed in `X-Request-Id` and in every audit line about the request."""
CLIENT_IP: Final[web.RequestKey[IPAddress]] = web.RequestKey("client_ip")
"""The caller: the socket peer, or the right-most untrusted X-Forwarded-For hop behind a trusted proxy."""
SECURE: Final = web.RequestKey("secure", bool)
"""True when the request came over TLS, directly or per a trusted proxy's X-Forwarded-Proto."""
API_KEY: Final[web.RequestKey[ApiKey]] = web.RequestKey("api_key")
"""The key that authenticated the request (its policy travels with it)."""
IDENTITY: Final = web.RequestKey("identity", str)
"""Who sent the request, set by authentication: a key id (or an OAuth identity), never a secret."""
PRINCIPAL: Final[web.RequestKey[Principal]] = web.RequestKey("principal")
"""The caller an OAuth access token authenticated (requests with a key have API_KEY instead)."""
