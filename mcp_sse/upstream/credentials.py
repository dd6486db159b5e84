"""OAuth 2.0 client credentials (RFC 6749 section 4.4) for a remote backend.

This is the gateway's own credential for the upstream, never a caller's token (MCP forbids
passing that on). The secret comes from the servers file's `${VAR}` expansion; the access token
is kept in memory only, refreshed before it expires, fetched once for all concurrent callers,
and a failing token endpoint is retried with exponential backoff instead of on every request.
Neither the secret nor a token is ever logged, put in an error or shown in a status.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hmac
import json
import logging
import math
import random
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import quote_plus, urlsplit

import aiohttp

from ..settings import is_loopback
from .config import OAuth2Spec

__all__ = ["ClientCredentials", "UpstreamAuthError", "backoff_delay", "refresh_after"]

log = logging.getLogger("mcp_sse.upstream")

MAX_BODY: Final = 64 * 1024
"""A token response is a few hundred bytes; anything past this is not one, and is not read on."""
DEFAULT_EXPIRES_IN: Final = 3600.0
"""RFC 6749 5.1 makes expires_in optional; without it the token is refreshed as if it lived an hour."""
BACKOFF_FIRST: Final = 1.0
BACKOFF_MAX: Final = 60.0
# What may follow "Bearer ": visible ASCII, no space and no CR/LF to split a header with. Wider than
# RFC 6750's b64token on purpose: some providers' opaque tokens hold "!" (Salesforce's do).
_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")
# RFC 6749 5.2: error codes are printable ASCII without '"' and '\'; bounded so one cannot fill a log.
_ERROR_CODE = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]{1,64}")
_DESCRIPTION_CHARS = 160


class UpstreamAuthError(Exception):
    """The backend has no usable token. The message is safe to show a client: it names the backend
    and the token endpoint (without any query string), never the secret, a token or the body."""


def backoff_delay(failures: int, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait after the `failures`-th failure in a row: 1 s doubling to 60 s, times a random
    0.5-1 so that gateways restarted together do not come back to the endpoint in step."""
    base = min(BACKOFF_MAX, BACKOFF_FIRST * 2.0 ** min(max(failures, 1) - 1, 16))
    return base * (0.5 + rand() / 2)


def refresh_after(expires_in: float) -> float:
    """Seconds after issue when a token lasting `expires_in` is replaced: at 80 % of its life or
    60 s before it ends, whichever comes first, but never before half of it (a 60 s token would
    otherwise be fetched anew for every request)."""
    return expires_in - min(max(0.2 * expires_in, 60.0), 0.5 * expires_in)


@functools.cache
def _verified() -> ssl.SSLContext:
    """One context for every fetch (aiohttp pools connections by it), verified by the system's CAs."""
    return ssl.create_default_context()


def _shown(url: str) -> str:
    """The URL as messages name it: no query or fragment, which could carry something secret."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _printable(text: str, limit: int) -> str:
    """A server's words, made safe for a log line: printable ASCII only, cut to `limit` characters."""
    clean = "".join(c if " " <= c <= "~" else "?" for c in text.strip())
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


def _lifetime(value: Any) -> float:
    """expires_in as sent: a positive number; some servers send it as a string of digits."""
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        return DEFAULT_EXPIRES_IN
    return float(value)


def _connection_problem(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return "its TLS certificate is not trusted"
    if isinstance(exc, aiohttp.ClientSSLError):
        return "the TLS handshake failed"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect ({exc.os_error.strerror or type(exc.os_error).__name__})"
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    return f"the request failed ({type(exc).__name__})"


@dataclass(frozen=True)
class _Token:
    header: str = field(repr=False)  # "Bearer <access token>"
    refresh_at: float
    expires_at: float
    replaces_rejected: bool
    """Fetched because the upstream refused (401) the token before it: if this one is refused too,
    fetching again at once would only hammer the endpoint."""


class ClientCredentials:
    """The access token of one remote backend, from its token endpoint (RFC 6749 4.4)."""

    def __init__(
        self,
        spec: OAuth2Spec,
        *,
        name: str,
        timeout: float = 10.0,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spec = spec
        self.name = name
        self.timeout = timeout
        self._timer = timer
        self._where = f"backend {name!r}: token endpoint {_shown(spec.token_url)}"
        # RFC 6749 2.3.1: id and secret are form-urlencoded before they are joined and base64-encoded
        # (a ':' or non-ASCII character in either would otherwise be misread).
        pair = f"{quote_plus(spec.client_id, safe='')}:{quote_plus(spec.client_secret, safe='')}"
        self._basic = "Basic " + base64.b64encode(pair.encode()).decode()
        self._token: _Token | None = None
        self._lock = asyncio.Lock()  # the single flight: one fetch at a time, the others wait for it
        self._failures = 0
        self._retry_at: float | None = None  # set while backing off after a failure
        self._last_error: str | None = None
        self._after_rejection = False
        parts = urlsplit(spec.token_url)
        # The secret is sent with every fetch: in clear only where it never leaves the machine.
        self._refusal = (
            f"{self._where} is plain http, which would send the client secret in clear:"
            " use https (http is accepted on loopback only)"
            if parts.scheme != "https" and not is_loopback(parts.hostname)
            else None
        )

    # -- for the remote backend ----------------------------------------------------------------

    async def authorization(self, http: aiohttp.ClientSession) -> str:
        """The Authorization header value for the upstream: the cached token, or a new one."""
        if (header := self._usable(self._token, fresh=True)) is not None:
            return header
        if self._lock.locked() and (header := self._usable(self._token)) is not None:
            return header  # another caller is refreshing; the current token is still good meanwhile
        async with self._lock:
            # Whoever held the lock may just have fetched: then that token is ours too.
            if (header := self._usable(self._token, fresh=True)) is not None:
                return header
            if (retry_in := self._retry_in()) is not None:
                # Backing off: fail fast with the last error rather than ask the endpoint again.
                if (header := self._usable(self._token)) is not None:
                    return header
                raise UpstreamAuthError(f"{self._last_error} (next attempt in {math.ceil(retry_in)} s)")
            try:
                token = await self._fetch(http)
            except UpstreamAuthError as exc:
                delay = self._failed(str(exc))
                if (header := self._usable(self._token)) is not None:
                    return header  # the refresh failed but the token has not expired yet
                raise UpstreamAuthError(f"{exc} (next attempt in {math.ceil(delay)} s)") from None
            self._token = token
            self._after_rejection = False
            self._retry_at = None
            if not token.replaces_rejected:
                self._failures = 0
            return token.header

    def rejected(self, authorization: str) -> None:
        """The upstream answered 401 to `authorization`: forget that token so the next call fetches."""
        token = self._token
        if token is None or not hmac.compare_digest(token.header.encode(), authorization.encode()):
            return  # an older token, already replaced
        self._token = None
        if token.replaces_rejected:
            # Two fresh tokens refused in a row: the upstream wants another audience or scope, and
            # a fetch per request would not change that. Back off like a failing endpoint.
            self._failed(
                f"backend {self.name!r}: the server refused (HTTP 401) a token just issued by"
                f" {_shown(self.spec.token_url)}: check the client's scopes and the token's audience"
            )
        self._after_rejection = True

    def status(self) -> dict[str, object]:
        """For /mcp/servers: the state of the token, never the token or the secret."""
        now = self._timer()
        token = self._usable(self._token)
        retry_in = self._retry_in()
        return {
            "type": "oauth2",
            "token_url": _shown(self.spec.token_url),
            "scopes": list(self.spec.scopes),
            "token": "valid" if token else "failing" if retry_in is not None else "none",
            "expires_in": (
                int(self._token.expires_at - now) if token is not None and self._token is not None else None
            ),
            "last_error": self._last_error,
            "retry_in": None if retry_in is None else math.ceil(retry_in),
        }

    # -- the state -----------------------------------------------------------------------------

    def _usable(self, token: _Token | None, *, fresh: bool = False) -> str | None:
        """The token's header if it has not expired (with `fresh`: if it need not be refreshed yet)."""
        if token is None:
            return None
        return token.header if self._timer() < (token.refresh_at if fresh else token.expires_at) else None

    def _retry_in(self) -> float | None:
        if self._retry_at is None:
            return None
        left = self._retry_at - self._timer()
        return left if left > 0 else None

    def _failed(self, message: str) -> float:
        self._failures += 1
        delay = backoff_delay(self._failures)
        self._retry_at = self._timer() + delay
        self._last_error = message
        log.warning("%s; next attempt in %.1f s", message, delay)
        return delay

    # -- the token endpoint --------------------------------------------------------------------

    async def _fetch(self, http: aiohttp.ClientSession) -> _Token:
        if self._refusal is not None:
            raise UpstreamAuthError(self._refusal)
        form = {"grant_type": "client_credentials"}
        if self.spec.scopes:
            form["scope"] = " ".join(self.spec.scopes)  # minimal scopes: only those configured
        if self.spec.resource:
            form["resource"] = self.spec.resource  # RFC 8707: a token for this upstream only
        if http.closed or http.connector is None:
            raise UpstreamAuthError(f"backend {self.name!r} is stopping")
        started = self._timer()  # the lifetime counts from before the request: never overestimated
        try:
            # A session of its own on the backend's connection pool: the backend's session sends the
            # operator's upstream "headers" (an API key, say) and cookies, which are not the token
            # endpoint's to see. No compression (a small body must not expand past MAX_BODY) and no
            # proxy from the environment.
            async with (
                aiohttp.ClientSession(
                    connector=http.connector,
                    connector_owner=False,
                    cookie_jar=aiohttp.DummyCookieJar(),
                    auto_decompress=False,
                    skip_auto_headers=("Accept-Encoding",),
                    trust_env=False,
                ) as session,
                session.post(
                    self.spec.token_url,
                    data=form,
                    headers={"Authorization": self._basic, "Accept": "application/json"},
                    allow_redirects=False,  # the secret goes to the configured URL and nowhere else
                    # Verified against the system's CAs: the backend's own "tls" (verify false, its CA,
                    # its client certificate) is for the MCP server, not for where the secret goes.
                    ssl=_verified(),
                    timeout=aiohttp.ClientTimeout(total=self.timeout),
                ) as response,
            ):
                status = response.status
                body = await self._read(response)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamAuthError(f"{self._where}: {_connection_problem(exc, self.timeout)}") from None
        if status != 200:
            raise UpstreamAuthError(self._refused(status, body))
        try:
            data = json.loads(body)
        except ValueError:
            raise UpstreamAuthError(f"{self._where}: answered HTTP 200 with a non-JSON body") from None
        access = data.get("access_token") if isinstance(data, dict) else None
        if not isinstance(access, str) or not access:
            raise UpstreamAuthError(f"{self._where}: answered HTTP 200 without an access_token")
        if not _HEADER_SAFE.fullmatch(access):
            raise UpstreamAuthError(f"{self._where}: its access_token cannot be sent as a bearer token")
        token_type = data.get("token_type")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            shown = _printable(token_type, 32) if isinstance(token_type, str) else type(token_type).__name__
            raise UpstreamAuthError(f"{self._where}: token_type {shown!r} is not Bearer")
        lifetime = _lifetime(data.get("expires_in"))
        log.info("%s: access token valid %d s", self._where, lifetime)
        return _Token(
            header=f"Bearer {access}",
            refresh_at=started + refresh_after(lifetime),
            expires_at=started + lifetime,
            replaces_rejected=self._after_rejection,
        )

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        if response.content_length is not None and response.content_length > MAX_BODY:
            raise UpstreamAuthError(self._oversized(response.status))
        body = bytearray()
        async for chunk in response.content.iter_any():
            body += chunk
            if len(body) > MAX_BODY:
                raise UpstreamAuthError(self._oversized(response.status))
        return bytes(body)

    def _oversized(self, status: int) -> str:
        return f"{self._where}: answered HTTP {status} with a body over {MAX_BODY // 1024} KiB"

    def _refused(self, status: int, body: bytes) -> str:
        """Why a non-200 answer refused us: RFC 6749 5.2's error code and a cut description."""
        if 300 <= status < 400:
            return f"{self._where}: answered HTTP {status}, a redirect, which is not followed"
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        error = data.get("error") if isinstance(data, dict) else None
        if not isinstance(error, str) or not _ERROR_CODE.fullmatch(error):
            return f"{self._where}: answered HTTP {status}"
        message = f"{self._where}: refused with HTTP {status}, {error}"
        description = data.get("error_description") if isinstance(data, dict) else None
        if isinstance(description, str) and description.strip():
            # A careless server may quote what it was sent: the secret is struck out before anything.
            if self.spec.client_secret:
                description = description.replace(self.spec.client_secret, "***")
            message += f" ({_printable(description, _DESCRIPTION_CHARS)})"
        return message
