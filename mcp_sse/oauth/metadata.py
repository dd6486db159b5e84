"""RFC 9728 protected-resource metadata, and the `WWW-Authenticate` challenges that point at it.

Each MCP route is a protected resource named by its canonical URL (RFC 8707 section 2, the
MCP authorization pages' "canonical server URI"): `https://host/mcp`,
`https://host/servers/<name>/mcp`. Its metadata document is served at the well-known path
with the resource's path appended (RFC 9728 section 3.1):
`/.well-known/oauth-protected-resource/mcp`. A 401 names that document in
`resource_metadata` (RFC 9728 section 5.1); a 403 for a token lacking scope says
`error="insufficient_scope"` with the scopes needed (RFC 6750 section 3.1).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any, Final, Literal
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "BEARER_METHODS",
    "ROLE_SCOPES",
    "SCOPES",
    "WELL_KNOWN",
    "ErrorCode",
    "canonical_resource",
    "metadata_url",
    "protected_resource_metadata",
    "well_known_path",
    "www_authenticate",
]

WELL_KNOWN: Final = "/.well-known/oauth-protected-resource"
ROLE_SCOPES: Final = {"admin": "mcp:admin", "operator": "mcp:operator", "viewer": "mcp:viewer"}
SCOPES: Final = ("mcp:admin", "mcp:operator", "mcp:viewer")
"""`scopes_supported`. No `offline_access`: the MCP pages (2026-07-28, "Refresh Tokens") say a
protected resource SHOULD NOT list it, refresh tokens being no resource requirement."""
BEARER_METHODS: Final = ("header",)
"""Tokens in the query string or a form body are refused (MCP pages, "Token Requirements")."""

ErrorCode = Literal["invalid_request", "invalid_token", "insufficient_scope"]
ERROR_CODES: Final = frozenset({"invalid_request", "invalid_token", "insufficient_scope"})

# RFC 6750 section 3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E ); error_description is
# 1*( %x20-21 / %x23-5B / %x5D-7E ). Neither may hold '"', '\\', CR, LF or any control character,
# so a quoted-string of them never needs escaping and never breaks out of the header.
_SCOPE_TOKEN: Final = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
_NOT_DESCRIPTION: Final = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")
_URI_CHARS: Final = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")  # visible ASCII less '"' and '\\'
DESCRIPTION_LIMIT: Final = 200


def canonical_resource(url: str) -> str:
    """The canonical form of a resource URL: scheme and host lowercased (they are case-insensitive),
    a bare `/` path dropped (the MCP pages prefer `https://host` to `https://host/`), nothing else
    changed. Raises ValueError for what cannot name a resource: no http(s) scheme or host, a query
    or a fragment (RFC 8707 section 2), or characters that would need escaping in a header."""
    if not _URI_CHARS.fullmatch(url):
        raise ValueError(f"resource URL {url!r} must be visible ASCII without quotes or backslashes")
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is no number in range
    except ValueError:
        raise ValueError(f"resource URL {url!r} has an invalid port") from None
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"resource URL {url!r} must be an absolute https:// (or http://) URL")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ValueError(f"resource URL {url!r} must have no query or fragment (RFC 8707 section 2)")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"resource URL {url!r} must not carry credentials")
    netloc = parts.netloc
    host_end = netloc.rfind("]") + 1 if netloc.startswith("[") else len(netloc.partition(":")[0])
    netloc = netloc[:host_end].lower() + netloc[host_end:]
    path = "" if parts.path == "/" else parts.path
    return urlunsplit((scheme, netloc, path, "", ""))


def well_known_path(resource_path: str) -> str:
    """The path of the metadata document for a resource at `resource_path` (RFC 9728 section 3.1):
    `/` or `` -> `/.well-known/oauth-protected-resource`;
    `/mcp` -> `/.well-known/oauth-protected-resource/mcp`;
    `/servers/time/mcp` -> `/.well-known/oauth-protected-resource/servers/time/mcp`."""
    if resource_path in ("", "/"):
        return WELL_KNOWN
    if not resource_path.startswith("/") or "?" in resource_path or "#" in resource_path:
        raise ValueError(f"resource path {resource_path!r} must start with '/' and hold no query or fragment")
    return WELL_KNOWN + resource_path


def metadata_url(resource: str) -> str:
    """The URL of the metadata document of `resource` (the value of `resource_metadata`)."""
    canonical = canonical_resource(resource)
    parts = urlsplit(canonical)
    return urlunsplit((parts.scheme, parts.netloc, well_known_path(parts.path), "", ""))


def protected_resource_metadata(
    resource: str,
    authorization_servers: Sequence[str],
    *,
    scopes_supported: Sequence[str] = SCOPES,
    resource_name: str | None = None,
    resource_documentation: str | None = None,
) -> dict[str, Any]:
    """The RFC 9728 document for `resource`, served as JSON at `metadata_url(resource)`.

    `resource` must equal the identifier clients use as the RFC 8707 `resource` parameter (and that
    the tokens' `aud` then carries): RFC 9728 section 3.3 has clients refuse a document whose
    `resource` differs from the URL they derived it from."""
    if not authorization_servers:
        # MCP pages, "Authorization Server Location": at least one.
        raise ValueError("authorization_servers must name at least one issuer")
    for issuer in authorization_servers:
        _check_issuer(issuer)
    document: dict[str, Any] = {
        "resource": canonical_resource(resource),
        "authorization_servers": list(authorization_servers),
        "scopes_supported": [_scope_token(s) for s in scopes_supported],
        "bearer_methods_supported": list(BEARER_METHODS),
    }
    if resource_name:
        document["resource_name"] = resource_name
    if resource_documentation:
        document["resource_documentation"] = canonical_resource(resource_documentation)
    return document


def www_authenticate(
    resource_metadata: str,
    *,
    scope: Iterable[str] = (),
    error: ErrorCode | None = None,
    error_description: str | None = None,
) -> str:
    """A `WWW-Authenticate: Bearer ...` value.

    401 with no credential: `www_authenticate(url, scope=[...])` (no error code, RFC 6750 section 3.1);
    401 for a bad token: `error="invalid_token"`; 403: `error="insufficient_scope"` with the scopes
    the request needs. `resource_metadata` and the scopes are configuration: a value that cannot be
    quoted safely raises ValueError. `error_description` may carry request-derived text: characters
    RFC 6750 does not allow there (quotes, backslashes, CR, LF, controls, non-ASCII) become `?`."""
    params: list[tuple[str, str]] = []
    if error is not None:
        if error not in ERROR_CODES:
            raise ValueError(f"error must be one of {', '.join(sorted(ERROR_CODES))}")
        params.append(("error", error))
    scopes = [_scope_token(s) for s in scope]
    if scopes:
        params.append(("scope", " ".join(dict.fromkeys(scopes))))
    if not _URI_CHARS.fullmatch(resource_metadata) or not resource_metadata.startswith(
        ("https://", "http://")
    ):
        raise ValueError("resource_metadata must be an absolute URL without quotes, backslashes or spaces")
    params.append(("resource_metadata", resource_metadata))
    if error_description:
        description = _NOT_DESCRIPTION.sub("?", error_description)[:DESCRIPTION_LIMIT]
        params.append(("error_description", description))
    return "Bearer " + ", ".join(f'{name}="{value}"' for name, value in params)


def _scope_token(scope: str) -> str:
    if not _SCOPE_TOKEN.fullmatch(scope):
        raise ValueError(f"scope {scope!r} is not an RFC 6749 scope-token (visible ASCII, no quote, no '\\')")
    return scope


def _check_issuer(issuer: str) -> None:
    parts = urlsplit(issuer)
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(
            f"authorization server {issuer!r} must be an issuer URL: https (or http), a host, "
            "no query or fragment (RFC 8414 section 2)"
        )
