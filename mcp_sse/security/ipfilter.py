"""IP allowlist (ALLOWED_IPS): IPs and CIDRs, v4 and v6; everyone else gets 403 before anything else runs.

It reads `request[CLIENT_IP]`, so `client_ip_middleware` must run before it; without it the
request is refused (fail closed) rather than let through.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ..state import CLIENT_IP, IPAddress
from .audit import AuditLog
from .client_ip import IPNetwork, normalise, parse_network, parse_proxies
from .ratelimit import LogThrottle, address_key

__all__ = ["ANY", "DENIED", "Allowlist", "allows_any", "connection_gate", "ip_allowlist_middleware"]

# What people write to mean "everyone". 0.0.0.0/0 alone would leave out IPv6 clients, which is
# never what is meant, so it is read as "any" too.
ANY: Final = frozenset({"*", "0.0.0.0", "::", "0.0.0.0/0", "::/0"})
DENIED: Final = "Access denied: your address is not allowed"


def allows_any(allowed: Sequence[str]) -> bool:
    """True when the list lets every address in: the CLI warns before binding beyond loopback."""
    return any(entry.strip() in ANY for entry in allowed)


def _parse(allowed: Sequence[str]) -> tuple[IPNetwork, ...]:
    if isinstance(allowed, str):
        raise ValueError("allowed must be a list of IPs/CIDRs, not one string")
    entries = [entry.strip() for entry in allowed if entry.strip()]
    if not entries:
        raise ValueError(
            "ALLOWED_IPS is empty, so no one could connect; list addresses/CIDRs, or '*' for anyone"
        )
    return tuple(parse_network(entry, setting="ALLOWED_IPS") for entry in entries if entry not in ANY)


class Allowlist:
    """Networks an address must be in; `open_to_all` when the list says anyone."""

    def __init__(self, allowed: Sequence[str], *, also: Sequence[IPNetwork] = ()) -> None:
        self.networks = (*_parse(allowed), *also)  # every entry is validated, even beside a "*"
        self.open_to_all = allows_any(allowed)
        # The list is fixed for the process's life and ipaddress' containment test is slow Python:
        # one verdict per address, for the few addresses a deployment sees.
        self.admits = functools.lru_cache(maxsize=4096)(self._admits)

    def _admits(self, ip: IPAddress) -> bool:
        address = normalise(ip)
        return self.open_to_all or any(address in net for net in self.networks)


def connection_gate(allowed: Sequence[str], trusted_proxies: Sequence[str]) -> Allowlist | None:
    """Who may hold a TCP connection at all: an allowed address, or a proxy that forwards for
    one (its clients are checked per request); None when anyone may."""
    gate = Allowlist(allowed, also=parse_proxies(trusted_proxies))
    return None if gate.open_to_all else gate


def ip_allowlist_middleware(*, allowed: Sequence[str], audit: AuditLog) -> Middleware:
    allowlist = Allowlist(allowed)
    open_to_all, admitted = allowlist.open_to_all, allowlist.admits
    throttle = LogThrottle()  # a scanner's every request is not worth a line each

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if open_to_all:
            return await handler(request)
        ip: IPAddress | None = request.get(CLIENT_IP)
        if ip is None:
            raise RuntimeError("ip_allowlist_middleware needs client_ip_middleware before it in the pipeline")
        if not admitted(ip):
            if throttle.allow(address_key(normalise(ip))):
                audit.event("ip.denied", request)
            raise web.HTTPForbidden(text=json.dumps({"error": DENIED}), content_type="application/json")
        return await handler(request)

    return middleware
