"""Who is calling, whatever the credential: the one value every authenticator yields.

A bearer key, a cookie login and an OAuth access token each become a `Principal`; the
policy layer reads only this (its role, backends and tool globs), so lists are filtered and
calls refused the same way for every kind of caller. The policy methods mean exactly what
`ApiKey`'s do, so a key carries over unchanged.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal

from .security.keys import ROLES, ApiKey, Role

if TYPE_CHECKING:
    from .oauth.resource import VerifiedToken

__all__ = ["ROLES", "SOURCES", "Principal", "Role", "Source", "oauth_id"]

Source = Literal["key", "oauth", "cookie"]
SOURCES: Final = ("key", "oauth", "cookie")
_NAME_CLAIMS: Final = ("name", "preferred_username", "email")


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. `backends` None means every backend; tool globs are fnmatch patterns
    matched case-sensitively, deny winning over allow."""

    id: str
    name: str
    role: Role
    source: Source
    backends: tuple[str, ...] | None = None
    tools_allow: tuple[str, ...] = ("*",)
    tools_deny: tuple[str, ...] = ()
    expires: dt.datetime | None = None
    rate_limit: int | None = None
    # OAuth only: who issued the token, for whom, with what.
    issuer: str | None = None
    subject: str | None = None
    scopes: frozenset[str] = field(default_factory=frozenset)
    client_id: str | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {self.role!r}")
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, not {self.source!r}")
        if self.source == "oauth" and (not self.issuer or not self.subject):
            raise ValueError("an oauth principal needs its issuer and subject")
        if self.expires is not None and self.expires.tzinfo is None:
            raise ValueError("expires must be timezone-aware")

    def expired(self, now: dt.datetime | None = None) -> bool:
        return self.expires is not None and (now or dt.datetime.now(dt.UTC)) >= self.expires

    def may_use_backend(self, backend: str) -> bool:
        """`*` is the aggregate of all backends: only a principal limited to none may use it."""
        return self.backends is None or (backend != "*" and backend in self.backends)

    def may_use_tool(self, tool: str) -> bool:
        allowed = any(fnmatch.fnmatchcase(tool, pattern) for pattern in self.tools_allow)
        return allowed and not any(fnmatch.fnmatchcase(tool, pattern) for pattern in self.tools_deny)

    @classmethod
    def from_key(cls, key: ApiKey, *, source: Literal["key", "cookie"] = "key") -> Principal:
        """The principal of a bearer key, or of a cookie login made with that key."""
        return cls(
            id=key.id,
            name=key.name,
            role=key.role,
            source=source,
            backends=key.backends,
            tools_allow=key.tools_allow,
            tools_deny=key.tools_deny,
            expires=key.expires,
            rate_limit=key.rate_limit,
        )

    @classmethod
    def from_token(
        cls,
        token: VerifiedToken,
        *,
        role: Role,
        backends: Iterable[str] | None = None,
        tools_allow: Iterable[str] = ("*",),
        tools_deny: Iterable[str] = (),
        rate_limit: int | None = None,
    ) -> Principal:
        """The principal of a verified access token. The role (from its scopes, or from a rule) and any
        narrowing come from the caller: a token grants nothing by itself."""
        subject = token.subject or token.client_id
        if not subject:
            raise ValueError("the token names neither a subject nor a client")
        return cls(
            id=oauth_id(token.issuer, subject),
            name=_display_name(token, subject),
            role=role,
            source="oauth",
            backends=None if backends is None else tuple(backends),
            tools_allow=tuple(tools_allow),
            tools_deny=tuple(tools_deny),
            expires=dt.datetime.fromtimestamp(token.expires_at, dt.UTC),
            rate_limit=rate_limit,
            issuer=token.issuer,
            subject=subject,
            scopes=token.scopes,
            client_id=token.client_id,
        )


def oauth_id(issuer: str, subject: str) -> str:
    """A stable id for (issuer, subject): `sub` is unique only within its issuer, and raw values may be
    long or hold characters that do not belong in an audit line or a rate-limit key."""
    # JSON keeps the pair unambiguous whatever characters either holds.
    digest = hashlib.sha256(json.dumps([issuer, subject]).encode()).hexdigest()[:32]
    return f"oauth-{digest}"


def _display_name(token: VerifiedToken, subject: str) -> str:
    for claim in _NAME_CLAIMS:
        value = token.claims.get(claim)
        if isinstance(value, str) and value.strip():
            return _printable(value)
    return _printable(subject)


def _printable(value: str, limit: int = 100) -> str:
    """Names end up in audit lines and pages: no control characters, bounded length."""
    return "".join(c if c.isprintable() else "?" for c in value)[:limit]
