"""The MCP routes, and what serves each of them now.

aiohttp freezes its router at startup, but a reload (SIGHUP) adds, replaces and removes
backends. So the routes are fixed: `/sse`, `/messages`, `/mcp` and `/mcp/` at the root and
under `/servers/{name}`, and each request finds the endpoint behind its route in `Mounts`,
which a reload changes. A name nothing is mounted at gets the router's own 404, as any
unknown path does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler

from ..cluster.hooks import forward
from ..gateway import Gateway
from .legacy_sse import LegacySSE
from .streamable import StreamableHTTP

__all__ = ["MCP_PATHS", "SERVER_PREFIX", "Endpoint", "Mounts", "add_mcp_routes"]

MCP_PATHS: Final = ("/sse", "/messages", "/mcp", "/mcp/")
"""Both /mcp spellings are served: a redirect from /mcp to /mcp/ breaks POSTing clients."""
SERVER_PREFIX: Final = "/servers/{name}"
_CANONICAL: Final = frozenset(prefix + path for prefix in ("", SERVER_PREFIX) for path in MCP_PATHS)


class Endpoint:
    """One gateway's handlers. Each holds per-gateway state (a 2026 call waiting for its input)."""

    def __init__(self, gateway: Gateway, prefix: str) -> None:
        self.gateway = gateway
        self.legacy = LegacySSE(gateway, f"{prefix}/messages")
        self.streamable = StreamableHTTP(gateway)


class Mounts:
    """The endpoint at the root and the one under each `/servers/<name>`."""

    def __init__(self, root: Gateway) -> None:
        self.root = Endpoint(root, "")
        self.servers: dict[str, Endpoint] = {}

    def mount(self, name: str, gateway: Gateway) -> Endpoint | None:
        """Serve `gateway` under /servers/<name>; the endpoint it replaces, if any."""
        old = self.servers.get(name)
        self.servers[name] = Endpoint(gateway, SERVER_PREFIX.format(name=name))
        return old

    def unmount(self, name: str) -> Endpoint | None:
        return self.servers.pop(name, None)

    def replace_root(self, gateway: Gateway) -> Endpoint:
        """Serve `gateway` at the root; the endpoint it replaces."""
        old, self.root = self.root, Endpoint(gateway, "")
        return old

    def match(self, request: web.Request) -> tuple[str, Endpoint] | None:
        """The MCP route this request is on (its path, the name filled in) and what serves it;
        None off the MCP routes or under a name nothing is mounted at. Authorization asks this
        as the handlers do, so the backend a key is checked against is the one that answers."""
        info = request.match_info
        resource = info.route.resource
        if resource is None or resource.canonical not in _CANONICAL:
            return None
        name = info.get("name")
        if name is None:
            return resource.canonical, self.root
        endpoint = self.servers.get(name)
        return None if endpoint is None else (resource.canonical.replace("{name}", name), endpoint)

    def backend_of(self, request: web.Request) -> str | None:
        """The backend (or `*`, the aggregate) this request's MCP route serves; None off them."""
        found = self.match(request)
        return None if found is None else found[1].gateway.name

    def route_path(self, request: web.Request) -> str | None:
        found = self.match(request)
        return None if found is None else found[0]


def add_mcp_routes(app: web.Application, mounts: Mounts) -> None:
    def serve(pick: Callable[[Endpoint], Handler]) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            found = mounts.match(request)
            if found is None:
                raise web.HTTPNotFound()
            # With REDIS_URL, a session another instance owns is answered by its owner (cluster/).
            if (relayed := await forward(request)) is not None:
                return relayed
            return await pick(found[1])(request)

        return handler

    for prefix in ("", SERVER_PREFIX):
        sse, messages, *streamable = (prefix + path for path in MCP_PATHS)
        app.router.add_get(sse, serve(lambda e: e.legacy.stream))
        app.router.add_post(messages, serve(lambda e: e.legacy.post))
        for path in streamable:
            app.router.add_post(path, serve(lambda e: e.streamable.post))
            app.router.add_get(path, serve(lambda e: e.streamable.get), allow_head=False)
            app.router.add_delete(path, serve(lambda e: e.streamable.delete))
