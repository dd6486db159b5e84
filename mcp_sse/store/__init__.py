"""State that must outlive a request, behind small protocols; one module per engine.

`OAuthStore` holds what the built-in authorization server must remember across requests,
restarts and (later) processes: registered clients, authorization codes, grants (one per
approval: a refresh-token family) and refresh tokens. Secrets are never stored: clients'
secrets, codes and refresh tokens are kept as SHA-256 digests, looked up by digest.

Every operation that decides something (a code's first use, a refresh token's rotation) is
one atomic step of the engine, so two requests racing with one code or one refresh token
cannot both win, whichever process they reach.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, NamedTuple, Protocol

__all__ = [
    "AUTH_METHODS",
    "AuthMethod",
    "ClientRecord",
    "CodeRecord",
    "GrantRecord",
    "OAuthStore",
    "Pruned",
    "RefreshRecord",
    "Rotation",
]

AuthMethod = Literal["none", "client_secret_basic", "client_secret_post"]
AUTH_METHODS: Final[tuple[AuthMethod, ...]] = ("none", "client_secret_basic", "client_secret_post")


@dataclass(frozen=True)
class ClientRecord:
    """An OAuth client: registered here (RFC 7591), or described by its metadata document."""

    client_id: str
    client_name: str
    redirect_uris: tuple[str, ...]
    auth_method: AuthMethod
    secret_sha256: bytes | None  # confidential clients only
    grant_types: tuple[str, ...]
    created_at: float
    last_used_at: float  # registration, then every token issued to it
    from_document: bool = False  # client_id is the URL of its metadata document (never stored)


@dataclass(frozen=True)
class CodeRecord:
    """An authorization code, by digest. `grant_id` is chosen when the code is made, so a reuse
    can revoke what the code issued even while its first redemption is still under way."""

    code_sha256: bytes
    client_id: str
    redirect_uri: str
    code_challenge: str
    resource: str
    scope: str
    key_id: str
    key_fp: str
    grant_id: str
    expires_at: float


@dataclass(frozen=True)
class GrantRecord:
    """One approval: a client, the key that approved it, the resource and scope. Its refresh tokens
    form one family; revoking the grant ends them and every access token that names it."""

    grant_id: str
    client_id: str
    key_id: str
    key_fp: str  # fingerprint of the approving key's digest: a key re-issued under its id does not inherit
    resource: str
    scope: str
    created_at: float
    expires_at: float  # the newest refresh token's expiry; nothing of the grant outlives it


@dataclass(frozen=True)
class RefreshRecord:
    token_sha256: bytes
    grant_id: str
    expires_at: float


class Rotation(NamedTuple):
    """What happened to a refresh token presented for rotation.

    rotated: it was live and is now spent, `new` replaced it; `grant` is its (live) grant.
    reused: it was already spent, so someone holds a copy (RFC 9700 4.14.2): the whole family
    was revoked; `grant` is what it was. gone: unknown, expired, or its grant is no longer live.
    """

    outcome: Literal["rotated", "reused", "gone"]
    grant: GrantRecord | None


class Pruned(NamedTuple):
    clients: int
    codes: int
    grants: int


class OAuthStore(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    # -- clients --
    async def add_client(self, client: ClientRecord) -> None: ...

    async def get_client(self, client_id: str) -> ClientRecord | None: ...

    async def touch_client(self, client_id: str, now: float) -> None: ...

    async def count_clients(self) -> int: ...

    async def list_clients(self, limit: int) -> list[ClientRecord]:
        """Up to `limit` clients, most recently used first (for the admin API)."""
        ...

    async def evict_clients(self, count: int, now: float) -> int:
        """Delete up to `count` clients, least recently used first, that have no live grant."""
        ...

    # -- authorization codes --
    async def add_code(self, code: CodeRecord) -> None: ...

    async def take_code(self, code_sha256: bytes) -> tuple[CodeRecord, bool] | None:
        """Spend a code: (record, True) the first time, (record, False) ever after; None if unknown."""
        ...

    # -- grants and refresh tokens --
    async def create_grant(self, grant: GrantRecord, refresh: RefreshRecord) -> bool:
        """Store a grant and its first refresh token; False (nothing stored) if the grant id was revoked."""
        ...

    async def get_grant(self, grant_id: str, now: float) -> GrantRecord | None:
        """The grant if it is live (not revoked, not expired)."""
        ...

    async def list_grants(self, now: float, limit: int) -> list[GrantRecord]:
        """Up to `limit` live grants, newest first (for the admin API)."""
        ...

    async def revoke_grant(self, grant_id: str, now: float, *, remember_until: float) -> bool:
        """End a grant and its refresh tokens; True if it was live. The id stays refused until
        `remember_until` even if the grant does not exist yet (a code still being redeemed)."""
        ...

    async def find_refresh(self, token_sha256: bytes, now: float) -> GrantRecord | None:
        """The live grant of a refresh token that is known and unexpired (spent or not)."""
        ...

    async def rotate_refresh(self, old_sha256: bytes, new: RefreshRecord, now: float) -> Rotation: ...

    async def prune(self, now: float, *, unused_clients_before: float, codes_before: float) -> Pruned:
        """Forget what can no longer be used: codes that expired before `codes_before`, expired
        grants, and clients last used before `unused_clients_before` that have no live grant."""
        ...
