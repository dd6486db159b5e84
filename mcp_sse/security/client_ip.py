"""Who is calling: the socket peer, or, behind a trusted proxy, the right-most untrusted X-Forwarded-For hop.

SECURITY: X-Forwarded-For is written by whoever sends the request, so it is believed only
when the socket peer is a configured proxy, and then read from the right: each trusted
proxy appends the address it saw, so the right-most address that is not one of ours is the
one our outermost proxy saw connect. Everything left of it was sent by that client and may
be forged.
(aiohttp-remotes' XForwardedRelaxed trusts any peer's header; that is the bug avoided here.)
The peer comes from the transport, not `request.remote`, which other code may have rewritten.
"""

from __future__ import annotations

import functools
import ipaddress
import json
from collections.abc import Sequence
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ..state import CLIENT_IP, SECURE, IPAddress

__all__ = [
    "IPNetwork",
    "client_ip_middleware",
    "normalise",
    "parse_forwarded_for",
    "parse_network",
    "parse_proxies",
    "peer_address",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_HOPS: Final = 32  # more proxies than this in front of one server is not a deployment, it is an attack
_MAPPED: Final = ipaddress.IPv6Network("::ffff:0:0/96")


def normalise(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (::ffff:1.2.3.4, from a dual-stack socket) as the IPv4 address it is."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.scope_id:
            return ipaddress.IPv6Address(str(address).split("%", 1)[0])
    return address


def parse_network(entry: str, *, setting: str) -> IPNetwork:
    """An IP or CIDR (v4 or v6) as a network; ValueError naming `setting` and the bad entry otherwise."""
    try:
        network = ipaddress.ip_network(entry.strip(), strict=False)
    except ValueError:
        raise ValueError(
            f"{setting}: {entry!r} is not an IP address or CIDR; "
            "use e.g. 10.0.0.1, 10.0.0.0/8, ::1 or fd00::/8"
        ) from None
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96 and network.subnet_of(_MAPPED):
        # Peers are normalised to IPv4, so an IPv4-mapped range is compared as the IPv4 range it is.
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def _parse_hop(entry: str) -> IPAddress | None:
    """One X-Forwarded-For entry: `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1` or `[2001:db8::1]:443`."""
    text = entry.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        return normalise(ipaddress.ip_address(text))
    except ValueError:
        return None  # "unknown", an obfuscated identifier (RFC 7239), or garbage


def parse_forwarded_for(peer: IPAddress, values: Sequence[str], trusted: Sequence[IPNetwork]) -> IPAddress:
    """The client address, given a `peer` already known to be trusted and the X-Forwarded-For values.

    Walks from the right past trusted hops; the first untrusted hop is the client. A malformed
    entry stops the walk at the last good (trusted) hop: nothing to its left can be believed.
    """
    hops = ",".join(values).split(",")
    current = peer
    for entry in reversed(hops[-MAX_HOPS:]):
        hop = _parse_hop(entry)
        if hop is None:
            return current
        if not any(hop in net for net in trusted):
            return hop
        current = hop
    return current


def _peer(request: web.Request) -> IPAddress | None:
    transport = request.transport
    return peer_address(transport.get_extra_info("peername") if transport is not None else None)


@functools.lru_cache(maxsize=4096)
def _parse_peer(host: str) -> IPAddress | None:
    try:
        return normalise(ipaddress.ip_address(host.split("%", 1)[0]))
    except ValueError:
        return None


def peer_address(peername: object) -> IPAddress | None:
    """The address in a transport's `peername`; None for a UNIX socket or a connection gone."""
    if not isinstance(peername, (tuple, list)) or not peername:
        return None
    return _parse_peer(str(peername[0]))


def parse_proxies(trusted_proxies: Sequence[str]) -> tuple[IPNetwork, ...]:
    """TRUSTED_PROXIES as networks; ValueError for an entry that would let anyone forge an address."""
    if isinstance(trusted_proxies, str):
        raise ValueError("trusted_proxies must be a list of IPs/CIDRs, not one string")
    trusted: list[IPNetwork] = []
    for entry in trusted_proxies:
        if not entry.strip():
            continue
        if entry.strip() == "*":
            raise ValueError("TRUSTED_PROXIES: '*' would let any client forge its address; list the proxies")
        network = parse_network(entry, setting="TRUSTED_PROXIES")
        if network.prefixlen == 0:
            raise ValueError(
                f"TRUSTED_PROXIES: {entry!r} trusts every address, so any client could forge its own; "
                "list the proxies' addresses or subnets"
            )
        trusted.append(network)
    return tuple(trusted)


def client_ip_middleware(*, trusted_proxies: Sequence[str]) -> Middleware:
    proxies = parse_proxies(trusted_proxies)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        peer = _peer(request)
        if peer is None:
            raise web.HTTPBadRequest(
                text=json.dumps({"error": "cannot determine the client address"}),
                content_type="application/json",
            )
        transport = request.transport
        tls = transport is not None and transport.get_extra_info("sslcontext") is not None
        if proxies and any(peer in net for net in proxies):
            request[CLIENT_IP] = parse_forwarded_for(
                peer, request.headers.getall("X-Forwarded-For", []), proxies
            )
            # The right-most value is the one our proxy wrote (a proxy that appends puts its own last).
            proto = ",".join(request.headers.getall("X-Forwarded-Proto", [])).split(",")[-1].strip().lower()
            request[SECURE] = tls or proto == "https"
        else:
            request[CLIENT_IP] = peer
            request[SECURE] = tls
        return await handler(request)

    return middleware
