"""The two places the transports call into the cluster: before a named session is looked up
(forward it when another instance owns it) and before a new session's id is handed out (claim it).
Without REDIS_URL the app has no CLUSTER and both are one dictionary lookup."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, Protocol

from aiohttp import web

if TYPE_CHECKING:
    from ..protocol.session import Session

__all__ = ["CLUSTER", "FORWARDED_BODY", "Cluster", "claim", "forward"]


class Cluster(Protocol):
    async def forward(self, request: web.Request) -> web.StreamResponse | None:
        """The owner's answer when another live instance owns the session `request` names; None
        to serve it here (this instance's session, or none: then the transport's 404)."""

    async def claim(self, session: Session) -> None:
        """Record this instance as the session's owner before its id leaves; 503 when that fails."""


CLUSTER: Final[web.AppKey[Cluster]] = web.AppKey("cluster")
FORWARDED_BODY: Final = web.RequestKey("forwarded_body", bytes)
"""On the internal listener: the body, read once to check its signature (read_message takes it)."""


async def forward(request: web.Request) -> web.StreamResponse | None:
    cluster = request.app.get(CLUSTER)
    return None if cluster is None else await cluster.forward(request)


async def claim(request: web.Request, session: Session) -> None:
    if (cluster := request.app.get(CLUSTER)) is not None:
        await cluster.claim(session)
