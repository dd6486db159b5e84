"""The signed hop between instances: which headers carry what, how they are signed and checked.

SECURITY: the internal listener believes the identity a hop names, so a hop must be unforgeable
(HMAC-SHA256 under the cluster secret, over the method, path, identity, request id, the headers the
owner acts on and the body's digest), fresh (a timestamp within MAX_SKEW seconds) and used once
(its nonce is remembered until it would be stale anyway), and meant for this instance (its id is
signed too, so a hop cannot be replayed to another owner).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from ..settings import Secret

__all__ = [
    "HEADER_HOP",
    "HEADER_IDENTITY",
    "HEADER_REQUEST",
    "HEADER_SIGNATURE",
    "RELAYED_HEADERS",
    "TRACE_HEADERS",
    "HopError",
    "Misdirected",
    "Signer",
    "cluster_secret",
]

HEADER_HOP: Final = "X-Mcp-Cluster-Hop"
"""<unix seconds>.<nonce>.<target instance id>"""
HEADER_IDENTITY: Final = "X-Mcp-Cluster-Identity"
HEADER_REQUEST: Final = "X-Mcp-Cluster-Request"
HEADER_SIGNATURE: Final = "X-Mcp-Cluster-Signature"
MAX_SKEW: Final = 30.0
RELAYED_HEADERS: Final = (
    "Accept",
    "Content-Type",
    "Mcp-Session-Id",
    "MCP-Protocol-Version",
    "Last-Event-ID",
)
"""The client headers the owner acts on: these go across (signed), nothing else of the client's."""
TRACE_HEADERS: Final = ("traceparent", "tracestate")
"""The relaying instance's own span context (not the client's: that is its ancestor), signed too."""


class HopError(Exception):
    """A hop the internal listener refuses; the message says why (for the audit line, not the caller)."""


class Misdirected(HopError):
    """A genuine hop for an instance that is not this one: this process took over the address of an
    owner that died (a restart on the same CLUSTER_LISTEN). Its sessions died with it: 404."""


def cluster_secret(explicit: Secret | None, session_secret: Secret | None) -> bytes:
    """CLUSTER_SECRET, else one derived from SESSION_SECRET: that is the same on every instance already
    (cookie logins need it so), and the derivation keeps the two uses apart."""
    if explicit is not None:
        return explicit.reveal().encode()
    if session_secret is None:
        raise ValueError("REDIS_URL needs SESSION_SECRET or CLUSTER_SECRET to sign hops between instances")
    return hmac.new(session_secret.reveal().encode(), b"mcp-sse cluster hop v1", hashlib.sha256).digest()


class Signer:
    def __init__(self, secret: bytes, instance_id: str) -> None:
        self._secret = secret
        self.instance_id = instance_id
        self._seen: set[str] = set()
        self._expiry: deque[tuple[float, str]] = deque()  # oldest first: pruning is O(expired)

    def _mac(self, method: str, path: str, hop: str, fields: Mapping[str, str], body: bytes) -> str:
        parts = [method.upper(), path, hop, fields.get(HEADER_IDENTITY, ""), fields.get(HEADER_REQUEST, "")]
        parts += [f"{name.lower()}:{fields.get(name, '')}" for name in (*RELAYED_HEADERS, *TRACE_HEADERS)]
        parts.append(hashlib.sha256(body).hexdigest())
        return hmac.new(self._secret, "\n".join(parts).encode(), hashlib.sha256).hexdigest()

    def sign(
        self,
        method: str,
        path: str,
        target: str,
        *,
        identity: str,
        request_id: str,
        client_headers: Mapping[str, str],
        body: bytes,
        trace: Mapping[str, str] | None = None,
    ) -> dict[str, str]:
        """The headers of a hop to instance `target`: the relayed client headers, the relaying span's
        `trace` context, and the signed ones."""
        headers = {name: client_headers[name] for name in RELAYED_HEADERS if name in client_headers}
        if trace:
            headers.update((name, trace[name]) for name in TRACE_HEADERS if name in trace)
        headers[HEADER_IDENTITY] = identity
        headers[HEADER_REQUEST] = request_id
        hop = f"{int(time.time())}.{secrets.token_urlsafe(16)}.{target}"
        headers[HEADER_HOP] = hop
        headers[HEADER_SIGNATURE] = self._mac(method, path, hop, headers, body)
        return headers

    def check(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> None:
        """Raise HopError unless these headers are a valid, fresh, unused hop to this instance."""
        hop, signature = headers.get(HEADER_HOP), headers.get(HEADER_SIGNATURE)
        if not hop or not signature:
            raise HopError("unsigned")
        stamp, _, rest = hop.partition(".")
        nonce, _, target = rest.partition(".")
        if not hmac.compare_digest(self._mac(method, path, hop, headers, body), signature):
            raise HopError("bad signature")
        now = time.time()
        if not stamp.isdigit() or abs(now - int(stamp)) > MAX_SKEW:
            raise HopError("expired")
        if target != self.instance_id:
            raise Misdirected("meant for another instance")
        while self._expiry and self._expiry[0][0] < now:
            self._seen.discard(self._expiry.popleft()[1])
        if nonce in self._seen:
            raise HopError("replayed")
        self._seen.add(nonce)
        self._expiry.append((now + 2 * MAX_SKEW, nonce))
