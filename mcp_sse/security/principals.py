"""Who a session's identity stands for now: the one resolver the policy layer and the reaper use.

A key id resolves to its key (`KeyStore.current`, exactly as before OAuth). An OAuth identity
resolves to the principal the last access token of that identity made, while that token lives;
the authenticator remembers it on every request. A principal of one of our own tokens also
needs its approving key still in force with the secret it approved with: a revoked, expired or
re-issued key ends its sessions at the next reaper pass, and its tokens at once (they are
verified on every request). So does a revoked grant (`ungranted`): its tokens are refused at
once, and the streams they opened end at the reaper's next pass on every instance.

OAuth identities are per (issuer, subject, client, role): two clients of one person, or two
tokens of one subject with different scopes, never share a session or each other's role.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Final, Protocol

from ..principal import Principal
from .keys import ApiKey, KeyStore, Role

__all__ = ["Caller", "Principals", "Resolver", "oauth_identity"]

MAX_PRINCIPALS: Final = 10_000
_RANK: Final[dict[Role, int]] = {"viewer": 0, "operator": 1, "admin": 2}
_FAR: Final = dt.datetime.max.replace(tzinfo=dt.UTC)


class Caller(Protocol):
    """What policy needs of a caller: an ApiKey and a Principal both are one."""

    @property
    def role(self) -> Role: ...

    def may_use_backend(self, backend: str) -> bool: ...

    def may_use_tool(self, tool: str) -> bool: ...


class Resolver(Protocol):
    def current(self, identity: str) -> Caller | None: ...


def oauth_identity(issuer: str, subject: str, client_id: str | None, role: Role) -> str:
    """The session identity of an OAuth caller (an id, never a secret)."""
    digest = hashlib.sha256(json.dumps([issuer, subject, client_id, role]).encode()).hexdigest()[:32]
    return f"oauth-{digest}"


@dataclass(frozen=True)
class _Entry:
    principal: Principal
    key_id: str | None  # our own tokens: the approving key, and the fingerprint it approved with
    key_fp: str | None
    grant_id: str | None  # our own tokens: the grant the last one was minted under


class Principals:
    """Resolves key ids through the KeyStore and OAuth identities through what tokens said."""

    def __init__(
        self,
        keys: KeyStore,
        *,
        approver: Callable[[str, str], ApiKey | None] | None = None,
        grant_live: Callable[[str], Awaitable[bool]] | None = None,
        max_entries: int = MAX_PRINCIPALS,
    ) -> None:
        self.keys = keys
        self.approver = approver
        self.grant_live = grant_live
        self.max_entries = max_entries
        self._entries: dict[str, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def remember(
        self,
        principal: Principal,
        *,
        key_id: str | None = None,
        key_fp: str | None = None,
        grant_id: str | None = None,
    ) -> None:
        """Called by the authenticator for every request an access token authenticated."""
        if principal.source != "oauth":
            raise ValueError("only OAuth principals are remembered; keys resolve through the KeyStore")
        if (key_id is None) != (key_fp is None):
            raise ValueError("key_id and key_fp go together")
        if principal.id not in self._entries and len(self._entries) >= self.max_entries:
            self._prune()
            if len(self._entries) >= self.max_entries:
                # The one that runs out first goes: its session ends at the reaper; its client signs in again.
                soonest = min(self._entries.values(), key=lambda e: e.principal.expires or _FAR)
                del self._entries[soonest.principal.id]
        self._entries[principal.id] = _Entry(principal, key_id, key_fp, grant_id)

    def current(self, identity: str) -> ApiKey | Principal | None:
        entry = self._entries.get(identity)
        if entry is None:
            return self.keys.current(identity)
        principal = entry.principal
        if principal.expired():
            del self._entries[identity]
            return None
        if entry.key_id is None or entry.key_fp is None:
            return principal
        key = self.approver(entry.key_id, entry.key_fp) if self.approver is not None else None
        if key is None:
            del self._entries[identity]
            return None
        # The key's policy as it stands now (a reload may have narrowed it), never above the token's role.
        role = principal.role if _RANK[principal.role] <= _RANK[key.role] else key.role
        return dataclasses.replace(
            principal,
            role=role,
            backends=key.backends,
            tools_allow=key.tools_allow,
            tools_deny=key.tools_deny,
            rate_limit=key.rate_limit,
        )

    def derived_from(self, key_ids: Collection[str]) -> set[str]:
        """The OAuth identities whose tokens these keys approved (to end with the keys)."""
        return {i for i, e in self._entries.items() if e.key_id is not None and e.key_id in key_ids}

    async def ungranted(self, identities: Collection[str]) -> set[str]:
        """Those of these identities whose last token's grant is no longer live, forgotten here.
        One store read per grant: the reaper asks only for identities with open sessions."""
        grants: dict[str, set[str]] = {}
        for identity in identities:
            entry = self._entries.get(identity)
            if entry is not None and entry.grant_id is not None:
                grants.setdefault(entry.grant_id, set()).add(identity)
        gone: set[str] = set()
        if self.grant_live is None:
            return gone
        for grant_id, holders in grants.items():
            try:
                live = await self.grant_live(grant_id)
            except Exception:  # store unreachable (audited there): requests fail closed by themselves,
                live = True  # and a blip must not end every stream
            if not live:
                gone |= holders
        self.forget(gone)
        return gone

    def forget(self, identities: Collection[str]) -> None:
        for identity in identities:
            self._entries.pop(identity, None)

    def _prune(self) -> None:
        for identity in [i for i, e in self._entries.items() if e.principal.expired()]:
            del self._entries[identity]
