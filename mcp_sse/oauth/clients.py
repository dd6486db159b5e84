"""OAuth clients: dynamic registration (RFC 7591), client ID metadata documents, redirect URIs.

Two ways a client becomes known:

- Dynamic registration at `/oauth/register`: a random client_id, and for a confidential client
  a secret shown once and stored as a digest. Claude registers afresh on every new connection,
  so a client that has not been used for `unused_ttl` and holds no live grant is deleted, and
  the table has a hard cap (the least recently used go first).
- A client ID metadata document (draft-ietf-oauth-client-id-metadata-document): the client_id is
  an https URL, and the document there describes the client. Fetching it is a request the
  gateway makes on a stranger's say-so, the classic SSRF door, so `MetadataFetcher` connects
  only to public addresses (checked on the socket it connects, after DNS, so a rebinding name
  cannot slip through), https only, no redirects, a few kilobytes, a few seconds, cached.

Every redirect URI a client may use must match one of the operator's patterns
(`RedirectPolicy`), at registration and again at each authorization request.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import re
import secrets
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
from aiohappyeyeballs import AddrInfoType
from aiohttp.abc import AbstractResolver

from ..store import AUTH_METHODS, AuthMethod, ClientRecord, OAuthStore

__all__ = [
    "DEFAULT_REDIRECT_URIS",
    "ClientError",
    "ClientRegistry",
    "MetadataFetcher",
    "RedirectPolicy",
    "RegistrationError",
    "is_public_address",
    "is_url_client_id",
]

DEFAULT_REDIRECT_URIS: Final = (
    "https://claude.ai/api/mcp/auth_callback",
    "https://claude.com/api/mcp/auth_callback",
    "https://chatgpt.com/connector_platform_oauth_redirect",
    # Native apps (Claude Code, mcp-remote, the Inspector) listen on a loopback port of their
    # choosing (RFC 8252 sections 7.3 and 8.3).
    "http://127.0.0.1:*/*",
    "http://localhost:*/*",
    "http://[::1]:*/*",
)
GRANT_TYPES: Final = ("authorization_code", "refresh_token")
MAX_NAME: Final = 100
MAX_REDIRECT_URIS: Final = 10
MAX_URI: Final = 2000
MAX_DOCUMENT: Final = 5 * 1024
FETCH_TIMEOUT: Final = 5.0
CACHE_MIN: Final = 60.0
CACHE_MAX: Final = 86_400.0
CACHE_DEFAULT: Final = 3_600.0
CACHE_FAILURE: Final = 60.0
CACHE_ENTRIES: Final = 1_000
MAX_FETCHES: Final = 4
LOOPBACK_HOSTS: Final = frozenset({"127.0.0.1", "localhost", "[::1]"})
_CONTROL: Final = re.compile(r"[\x00-\x20\x7f-\x9f]")
# Addresses Python's ipaddress calls global that must still never be fetched from.
_NOT_PUBLIC: Final = tuple(
    ipaddress.ip_network(n)
    for n in ("0.0.0.0/8", "100.64.0.0/10", "192.0.0.0/24", "198.18.0.0/15", "240.0.0.0/4", "::/96")
)
_NAT64: Final = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


class RegistrationError(Exception):
    """An RFC 7591 section 3.2.2 error: `error` is the code, the message its description."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description


class ClientError(Exception):
    """The client_id names no usable client; the message says why, fit for the person's page."""


def is_public_address(address: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True only for a globally routable unicast address.

    Refused: loopback, private, link-local (169.254.169.254, the cloud metadata service), CGNAT,
    multicast, reserved, unspecified, documentation ranges, and IPv6 forms that carry a refused
    IPv4 address inside (IPv4-mapped, IPv4-compatible, 6to4, NAT64, Teredo).
    """
    try:
        ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:  # fe80::1%eth0
            return False
        if ip.ipv4_mapped is not None:
            return is_public_address(ip.ipv4_mapped)
        if ip.teredo is not None:
            return False
        if ip.sixtofour is not None and not is_public_address(ip.sixtofour):
            return False
        if any(ip in net for net in _NAT64):
            return is_public_address(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip.is_multicast or ip.is_loopback or ip.is_link_local or ip.is_private or ip.is_reserved:
        return False
    if ip.is_unspecified or any(ip in net for net in _NOT_PUBLIC if net.version == ip.version):
        return False
    return ip.is_global


def _printable(text: str, limit: int) -> str:
    """Names end up on pages and in audit lines: printable, single-line, bounded."""
    cleaned = "".join(c for c in text if c.isprintable())
    return " ".join(cleaned.split())[:limit]


# -- redirect URIs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pattern:
    scheme: str
    host: str
    any_port: bool
    any_path: bool


class RedirectPolicy:
    """The redirect URIs the operator allows (OAUTH_REDIRECT_URIS).

    An entry is an exact URI, or a loopback URI whose port is `*` (any port, RFC 8252 section
    7.3) and whose path is `/*` (any path): `http://127.0.0.1:*/*`. Anything else with a `*`
    is refused when the policy is made.
    """

    def __init__(self, patterns: Sequence[str] = DEFAULT_REDIRECT_URIS) -> None:
        if isinstance(patterns, str):
            raise ValueError("redirect URI patterns must be a list, not one string")
        exact: set[str] = set()
        wildcards: list[_Pattern] = []
        for raw in patterns:
            text = raw.strip()
            if not text:
                continue
            if "*" not in text:
                if (reason := redirect_uri_problem(text)) is not None:
                    raise ValueError(f"OAUTH_REDIRECT_URIS: {text!r}: {reason}")
                exact.add(text)
                continue
            match = re.fullmatch(r"(https?)://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(:\*)?(/\*)?", text)
            if match is None or match.group(2).lower() not in LOOPBACK_HOSTS:
                raise ValueError(
                    f"OAUTH_REDIRECT_URIS: {text!r}: a '*' is allowed only as the port and path of a "
                    "loopback URI, e.g. http://127.0.0.1:*/*; list other URIs exactly"
                )
            scheme, host, port, path = match.groups()
            wildcards.append(_Pattern(scheme, host.lower(), bool(port), bool(path)))
        self.exact: frozenset[str] = frozenset(exact)
        self.wildcards: tuple[_Pattern, ...] = tuple(wildcards)

    def allows(self, uri: str) -> bool:
        if redirect_uri_problem(uri) is not None:
            return False
        if uri in self.exact:
            return True
        parts = urlsplit(uri)
        host = (parts.hostname or "").lower()
        if ":" in host:
            host = f"[{host}]"
        for pattern in self.wildcards:
            if parts.scheme != pattern.scheme or host != pattern.host:
                continue
            if parts.port is not None and not pattern.any_port:
                continue
            if (parts.path not in ("", "/") or parts.query) and not pattern.any_path:
                continue
            return True
        return False


def redirect_uri_problem(uri: str) -> str | None:
    """Why `uri` can never be a redirect URI, or None. RFC 6749 section 3.1.2: absolute, no
    fragment; OAuth 2.1 section 1.5 / MCP: https, or http to a loopback address only."""
    if len(uri) > MAX_URI:
        return "too long"
    if _CONTROL.search(uri):
        return "contains spaces or control characters"
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError:
        return "not a URI"
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return "must be an absolute https URI (or http to a loopback address)"
    if "#" in uri:
        return "must not contain a fragment (RFC 6749 section 3.1.2)"
    if parts.username is not None or parts.password is not None:
        return "must not contain user info"
    host = parts.hostname.lower()
    if parts.scheme == "http" and (f"[{host}]" if ":" in host else host) not in LOOPBACK_HOSTS:
        return "http is allowed only to 127.0.0.1, [::1] or localhost"
    return None


def is_url_client_id(client_id: str) -> bool:
    """A client_id that names a metadata document rather than a registration here."""
    return client_id.startswith(("https://", "http://"))


# -- client ID metadata documents -------------------------------------------------------------


class _MetadataRefused(Exception):
    pass


def _guarded_socket(allow_loopback: bool) -> Callable[[AddrInfoType], socket.socket]:
    """A socket factory that refuses to make a socket for a non-public address.

    aiohttp calls it with each resolved address just before connecting to exactly that address,
    so this checks what is connected to, whatever DNS said a moment earlier (rebinding).
    """

    def factory(addr_info: AddrInfoType) -> socket.socket:
        family, kind, proto, _, sockaddr = addr_info
        address = str(sockaddr[0])
        allowed = is_public_address(address) or (allow_loopback and ipaddress.ip_address(address).is_loopback)
        if not allowed:
            raise OSError(f"refusing to connect to non-public address {address}")
        return socket.socket(family=family, type=kind, proto=proto)

    return factory


def _cache_seconds(cache_control: str | None) -> float:
    """How long to keep a document: its max-age, bounded, else an hour (the draft says SHOULD cache,
    respecting HTTP cache headers; no-store still gets the minimum, or every page view would fetch)."""
    if cache_control:
        for directive in cache_control.lower().split(","):
            name, _, value = directive.strip().partition("=")
            if name == "max-age" and value.strip('"').isdigit():
                return min(max(float(value.strip('"')), CACHE_MIN), CACHE_MAX)
            if name in ("no-store", "no-cache"):
                return CACHE_MIN
    return CACHE_DEFAULT


class MetadataFetcher:
    """Fetches and validates client ID metadata documents, guarded against SSRF, and caches them.

    `allow_loopback=True` is for tests: http and loopback addresses are then allowed (still no
    private, link-local or other addresses, still no redirects).
    """

    def __init__(
        self,
        policy: RedirectPolicy,
        *,
        allow_loopback: bool = False,
        clock: Callable[[], float] = time.time,
        timeout: float = FETCH_TIMEOUT,
        resolver: AbstractResolver | None = None,
    ) -> None:
        self.policy = policy
        self.resolver = resolver  # tests: a name that resolves to whatever the test says
        self.allow_loopback = allow_loopback
        self.clock = clock
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._cache: OrderedDict[str, tuple[float, ClientRecord | str]] = OrderedDict()
        self._slots = asyncio.Semaphore(MAX_FETCHES)

    def url_problem(self, url: str) -> str | None:
        """Why `url` cannot be a metadata document URL (draft section 3), before any connection."""
        if len(url) > MAX_URI or _CONTROL.search(url):
            return "the client_id URL is too long or contains spaces or control characters"
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 (raises ValueError for a bad port)
        except ValueError:
            return "the client_id is not a valid URL"
        if not parts.hostname or not (
            parts.scheme == "https" or (self.allow_loopback and parts.scheme == "http")
        ):
            return "a client_id URL must use https"
        if parts.username is not None or parts.password is not None or "#" in url:
            return "a client_id URL must not contain user info or a fragment"
        if parts.path in ("", "/") or any(seg in (".", "..") for seg in parts.path.split("/")):
            return "a client_id URL must have a path, without . or .. segments"
        host = parts.hostname.lower()
        try:
            literal: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        loopback = host == "localhost" or host.endswith(".localhost") or bool(literal and literal.is_loopback)
        # Literal addresses never reach a resolver, so they are checked here as well as at connect.
        if literal is not None and not is_public_address(literal) and not (self.allow_loopback and loopback):
            return f"the client_id URL points at a non-public address ({literal})"
        if loopback and not self.allow_loopback:
            return "the client_id URL points at this machine (localhost)"
        if parts.scheme == "http" and not loopback:
            return "a client_id URL must use https"
        return None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                socket_factory=_guarded_socket(self.allow_loopback),
                resolver=self.resolver,
                use_dns_cache=False,
                limit=MAX_FETCHES,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.timeout, sock_connect=self.timeout),
                trust_env=False,  # no proxy from the environment: the address check must see the target
                headers={"Accept": "application/json", "User-Agent": "mcp-sse"},
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def get(self, url: str) -> ClientRecord:
        """The client the document at `url` describes. ClientError says why it cannot be used."""
        if (problem := self.url_problem(url)) is not None:
            raise ClientError(problem)
        if (cached := self._cached(url)) is not None:
            return cached
        async with self._slots:  # a few fetches at a time, whoever asks
            if (cached := self._cached(url)) is not None:  # fetched while this one waited
                return cached
            try:
                client, ttl = await self._fetch(url)
            except _MetadataRefused as exc:
                self._remember(url, str(exc), CACHE_FAILURE)  # a bad URL is not fetched again at once
                raise ClientError(str(exc)) from None
        self._remember(url, client, ttl)
        return client

    def _cached(self, url: str) -> ClientRecord | None:
        entry = self._cache.get(url)
        if entry is None or entry[0] <= self.clock():
            return None
        if isinstance(entry[1], str):
            raise ClientError(entry[1])
        return entry[1]

    def _remember(self, url: str, value: ClientRecord | str, ttl: float) -> None:
        self._cache[url] = (self.clock() + ttl, value)
        self._cache.move_to_end(url)
        while len(self._cache) > CACHE_ENTRIES:
            self._cache.popitem(last=False)

    async def _fetch(self, url: str) -> tuple[ClientRecord, float]:
        try:
            async with self._client_session().get(url, allow_redirects=False) as response:
                if response.status != 200:
                    # A 3xx is refused too: following it would fetch a URL nobody checked.
                    raise _MetadataRefused(f"the client metadata document answered HTTP {response.status}")
                length = response.content_length
                if length is not None and length > MAX_DOCUMENT:
                    raise _MetadataRefused("the client metadata document is too large")
                body = await response.content.read(MAX_DOCUMENT + 1)
                if len(body) > MAX_DOCUMENT:
                    raise _MetadataRefused("the client metadata document is too large")
                ttl = _cache_seconds(response.headers.get("Cache-Control"))
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
            # No detail: it would tell a stranger what the gateway's network can and cannot reach.
            raise _MetadataRefused("the client metadata document could not be fetched") from None
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested a thousand deep
            raise _MetadataRefused("the client metadata document is not JSON") from None
        return self._client(url, document), ttl

    def _client(self, url: str, document: Any) -> ClientRecord:
        if not isinstance(document, dict):
            raise _MetadataRefused("the client metadata document is not a JSON object")
        if document.get("client_id") != url:
            # Draft section 4.1: the document names itself; one copied from elsewhere does not.
            raise _MetadataRefused("the client metadata document's client_id is not its own URL")
        if "client_secret" in document or "client_secret_expires_at" in document:
            raise _MetadataRefused("a client metadata document must not contain a client secret")
        method = document.get("token_endpoint_auth_method", "none")
        if method != "none":
            raise _MetadataRefused(
                "only public clients (token_endpoint_auth_method 'none') may use a metadata document here"
            )
        name = document.get("client_name")
        if not isinstance(name, str) or not _printable(name, MAX_NAME):
            raise _MetadataRefused("the client metadata document has no client_name")
        uris = document.get("redirect_uris")
        if not isinstance(uris, list) or not uris or not all(isinstance(u, str) for u in uris):
            raise _MetadataRefused("the client metadata document has no redirect_uris")
        allowed = tuple(u for u in uris[:MAX_REDIRECT_URIS] if self.policy.allows(u))
        if not allowed:
            raise _MetadataRefused("none of the client's redirect URIs is allowed on this gateway")
        _check_types(document, _MetadataRefused)
        now = self.clock()
        return ClientRecord(
            client_id=url,
            client_name=_printable(name, MAX_NAME),
            redirect_uris=allowed,
            auth_method="none",
            secret_sha256=None,
            grant_types=tuple(document.get("grant_types") or ("authorization_code",)),
            created_at=now,
            last_used_at=now,
            from_document=True,
        )


def _check_types(document: dict[str, Any], error: Callable[[str], Exception]) -> None:
    grant_types = document.get("grant_types", ["authorization_code"])
    if (
        not isinstance(grant_types, list)
        or "authorization_code" not in grant_types
        or not set(grant_types) <= set(GRANT_TYPES)
    ):
        raise error("grant_types must include authorization_code and may add only refresh_token")
    response_types = document.get("response_types", ["code"])
    if response_types != ["code"]:
        raise error("response_types must be ['code']")


# -- the registry -------------------------------------------------------------------------------


def secret_digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class ClientRegistry:
    """Registered clients (in the store) and metadata-document clients (fetched, cached)."""

    def __init__(
        self,
        store: OAuthStore,
        policy: RedirectPolicy,
        fetcher: MetadataFetcher,
        *,
        unused_ttl: float,
        max_clients: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if unused_ttl <= 0 or max_clients < 1:
            raise ValueError("client unused_ttl must be positive and max_clients at least 1")
        self.store = store
        self.policy = policy
        self.fetcher = fetcher
        self.unused_ttl = unused_ttl
        self.max_clients = max_clients
        self.clock = clock

    async def register(self, body: Any) -> tuple[ClientRecord, str | None]:
        """A new client from an RFC 7591 registration request, and its secret (None for a public one)."""
        if not isinstance(body, dict):
            raise RegistrationError(
                "invalid_client_metadata", "the registration request must be a JSON object"
            )
        uris = body.get("redirect_uris")
        if not isinstance(uris, list) or not uris or not all(isinstance(u, str) for u in uris):
            raise RegistrationError("invalid_redirect_uri", "redirect_uris must be a non-empty list of URIs")
        if len(uris) > MAX_REDIRECT_URIS:
            raise RegistrationError("invalid_redirect_uri", f"at most {MAX_REDIRECT_URIS} redirect_uris")
        for uri in uris:
            if (problem := redirect_uri_problem(uri)) is not None:
                raise RegistrationError("invalid_redirect_uri", f"redirect URI {uri[:200]!r}: {problem}")
            if not self.policy.allows(uri):
                raise RegistrationError(
                    "invalid_redirect_uri",
                    f"redirect URI {uri[:200]!r} is not allowed on this gateway (OAUTH_REDIRECT_URIS)",
                )
        # RFC 7591 section 2: an omitted method means client_secret_basic.
        method = body.get("token_endpoint_auth_method", "client_secret_basic")
        if method not in AUTH_METHODS:
            raise RegistrationError(
                "invalid_client_metadata",
                f"token_endpoint_auth_method must be one of {', '.join(AUTH_METHODS)}",
            )
        _check_types(body, lambda message: RegistrationError("invalid_client_metadata", message))
        name = body.get("client_name")
        if name is not None and not isinstance(name, str):
            raise RegistrationError("invalid_client_metadata", "client_name must be a string")
        auth_method: AuthMethod = method
        secret = None if auth_method == "none" else secrets.token_urlsafe(32)
        await self._make_room()
        now = self.clock()
        client = ClientRecord(
            client_id="mcp-" + secrets.token_urlsafe(24),
            client_name=_printable(name or "", MAX_NAME),
            redirect_uris=tuple(dict.fromkeys(uris)),
            auth_method=auth_method,
            secret_sha256=None if secret is None else secret_digest(secret),
            grant_types=tuple(body.get("grant_types") or ("authorization_code", "refresh_token")),
            created_at=now,
            last_used_at=now,
        )
        await self.store.add_client(client)
        return client, secret

    async def _make_room(self) -> None:
        """Keep the table under its cap: the least recently used clients without a live grant go."""
        excess = await self.store.count_clients() - self.max_clients + 1
        if excess > 0 and await self.store.evict_clients(excess, self.clock()) < excess:
            raise RegistrationError(
                "temporarily_unavailable", "too many registered clients with live grants; try again later"
            )

    async def resolve(self, client_id: str) -> ClientRecord:
        """The client this id names, with only the redirect URIs the operator still allows."""
        if is_url_client_id(client_id):
            client = await self.fetcher.get(client_id)
        elif len(client_id) > 200 or (stored := await self.store.get_client(client_id)) is None:
            raise ClientError(
                "it is not registered (registrations that go unused expire); "
                "connect again from the app to register it anew"
            )
        else:
            client = stored
        allowed = tuple(u for u in client.redirect_uris if self.policy.allows(u))
        return client if allowed == client.redirect_uris else replace(client, redirect_uris=allowed)
