"""Origin and Host checks: the DNS-rebinding defence of the MCP transport spec.

SECURITY: "Servers MUST validate the Origin header on all incoming connections to prevent
DNS rebinding attacks. If the Origin header is present and invalid, servers MUST respond
with HTTP Response 403 Forbidden" (MCP spec, Transports, Security Warning). A page on
http://evil.example whose name was re-pointed at 127.0.0.1 sends its own Origin, so an
exact match against ALLOWED_ORIGINS refuses it, on every method, SSE GETs included.

A rebound page fetching its *own* origin (same-origin GET) sends no Origin at all, though;
what gives it away is the Host header (`evil.example:8000`). That is what ALLOWED_HOSTS is
for, and why a loopback server should set it to its own names.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
from collections.abc import Collection, Mapping, Sequence
from typing import Final
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ..state import SECURE
from .audit import AuditLog

__all__ = ["SAME_ORIGIN", "normalise_host", "normalise_origin", "origin_middleware"]

SAME_ORIGIN: Final = web.RequestKey("same_origin", bool)
"""The request's Origin is the gateway's own (on `own_origin_paths` only): the console's page."""

DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_SCHEME: Final = re.compile(r"[a-z][a-z0-9+.-]*")
_HOSTNAME: Final = re.compile(r"[a-z0-9._~!$&'()*+,;=%-]+")


def _ipv6(text: str) -> str:
    try:
        return str(ipaddress.IPv6Address(text))
    except ValueError:
        raise ValueError(f"[{text}] is not an IPv6 address") from None


def _host_text(host: str) -> str:
    """A lowercase ASCII host; IPv6 literals in brackets."""
    host = host.lower()
    if not host.isascii():
        raise ValueError(f"host {host!r} is not ASCII; write an internationalised name in punycode (xn--...)")
    if ":" in host:
        return f"[{_ipv6(host)}]"
    if "*" in host or not _HOSTNAME.fullmatch(host):
        raise ValueError(f"{host!r} is not a host name; wildcards are not supported, list each origin")
    return host


def normalise_origin(origin: str, *, header: bool = False) -> str:
    """`scheme://host[:port]` as browsers send it: lowercase, default port dropped.

    ValueError for anything else: "*", "null", a path, a query, a fragment or user info, since
    a browser never sends those and the entry could never match. A configured origin may end
    in "/" (a common paste); a received Origin header (`header=True`) may not.
    """
    text = origin.strip()
    if text in ("*", "null"):
        raise ValueError(
            f"origin {text!r} cannot be allowed: list exact origins such as https://app.example.com"
        )
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError(f"origin {origin!r} is not scheme://host[:port]") from None
    scheme = parts.scheme.lower()
    if not _SCHEME.fullmatch(scheme) or not parts.hostname or "//" not in text:
        raise ValueError(f"origin {origin!r} is not scheme://host[:port], e.g. https://app.example.com")
    path_ok = parts.path == "" or (parts.path == "/" and not header)
    if not path_ok or parts.query or parts.fragment or "?" in text or "#" in text:
        raise ValueError(
            f"origin {origin!r} has a path, query or fragment; an origin is only scheme://host[:port]"
        )
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"origin {origin!r} has user info; an origin is only scheme://host[:port]")
    result = f"{scheme}://{_host_text(parts.hostname)}"
    if port is not None and port != DEFAULT_PORTS.get(scheme):
        result += f":{port}"
    return result


def normalise_host(value: str) -> tuple[str, int | None]:
    """A Host header (or ALLOWED_HOSTS entry) as (lowercase host, port or None)."""
    text = value.strip().lower()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{value!r} is not host[:port]")
        port_text = rest[1:]
        host = f"[{_ipv6(host)}]"
    else:
        host, _, port_text = text.partition(":")
        if ":" in port_text:
            raise ValueError(f"{value!r} is not host[:port]; put an IPv6 address in brackets: [::1]:8080")
    if not host or (not host.startswith("[") and (not host.isascii() or not _HOSTNAME.fullmatch(host))):
        raise ValueError(f"{value!r} is not host[:port]")
    if port_text in ("", "*"):
        return host, None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{value!r} has an invalid port")
    return host, int(port_text)


def _forbidden(reason: str) -> web.HTTPForbidden:
    return web.HTTPForbidden(
        text=json.dumps({"error": f"Access denied: {reason}"}), content_type="application/json"
    )


def origin_middleware(
    *,
    allowed_origins: Sequence[str],
    allowed_hosts: Sequence[str] | None,
    audit: AuditLog,
    path_origins: Mapping[str, Collection[str]] | None = None,
    own_origin_paths: tuple[str, ...] = (),
    public_url: str | None = None,
) -> Middleware:
    """Refuse a present-but-unlisted Origin, and (when `allowed_hosts` is non-empty) an unlisted Host.

    An `allowed_hosts` entry without a port (or with `:*`) matches that name on any port: DNS
    rebinding is about the name, and the port is whatever the server listens on. An empty list
    or None turns the Host check off. `path_origins` allows more origins on some exact paths
    only: the gateway's own origin (PUBLIC_URL) on its OAuth sign-in and consent pages, whose
    forms post back to themselves (those handlers check the Origin and a CSRF token again).

    Under the `own_origin_paths` prefixes the gateway's own origin is allowed too, and marked
    SAME_ORIGIN (the cookie rule in auth.py reads it): PUBLIC_URL's, or scheme://Host when the
    Host check is on and passed. SECURITY: without a Host check the Host is whatever the caller
    says, so only PUBLIC_URL counts then; with it, a DNS-rebound page's Host is refused here.
    """
    if isinstance(allowed_origins, str) or isinstance(allowed_hosts, str):
        raise ValueError("allowed_origins and allowed_hosts must be lists, not one string")
    origins = frozenset(normalise_origin(o) for o in allowed_origins if o.strip())
    hosts: set[tuple[str, int | None]] = set()
    for entry in allowed_hosts or ():
        if entry.strip() == "*":
            raise ValueError(
                "ALLOWED_HOSTS: '*' is not a host; leave ALLOWED_HOSTS empty to skip the Host check"
            )
        if entry.strip():
            hosts.add(normalise_host(entry))

    extra = {
        path: frozenset(normalise_origin(o) for o in more) for path, more in (path_origins or {}).items()
    }
    none: frozenset[str] = frozenset()
    public = normalise_origin(public_url) if public_url else None

    def origin_allowed(values: list[str], path: str) -> bool:
        if len(values) != 1:
            return False  # two Origin headers: which one would the browser have meant? Neither.
        try:
            origin = normalise_origin(values[0], header=True)
        except ValueError:
            return False  # "null" (sandboxed frames, file://, some redirects), garbage
        return origin in origins or origin in extra.get(path, none)

    def host_allowed(values: list[str]) -> bool:
        return len(values) == 1 and host_verdict(values[0])

    @functools.lru_cache(maxsize=256)  # every request asks, with one of a few values: bounded anyway
    def host_verdict(value: str) -> bool:
        try:
            host, port = normalise_host(value)
        except ValueError:
            return False
        return (host, None) in hosts or (host, port) in hosts

    def own_origin(request: web.Request, values: list[str]) -> bool:
        if len(values) != 1 or not request.path.startswith(own_origin_paths):
            return False
        try:
            origin = normalise_origin(values[0], header=True)
            if origin == public:
                return True
            scheme = "https" if request.get(SECURE, False) else "http"
            return (
                bool(hosts)
                and host_allowed(request.headers.getall("Host", []))
                and origin == normalise_origin(f"{scheme}://{request.host}")
            )
        except ValueError:
            return False

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.getall("Origin", [])
        if origin and own_origin_paths and own_origin(request, origin):
            request[SAME_ORIGIN] = True
        elif origin and not origin_allowed(origin, request.path):
            audit.event("origin.denied", request, origin=origin[0])
            raise _forbidden("origin not allowed")
        if hosts and not host_allowed(request.headers.getall("Host", [])):
            audit.event("host.denied", request, host=request.headers.get("Host", ""))
            raise _forbidden("host not allowed")
        return await handler(request)

    return middleware
