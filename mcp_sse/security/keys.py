"""API keys: AUTH_TOKEN and a keys file of named keys with roles and policies.

Only SHA-256 digests of secrets are stored. A presented token is hashed and looked up
by digest, then compared with `hmac.compare_digest`, so the time taken does not depend
on how much of a real secret the caller guessed.

Keys file (JSON):

    {"keys": [{"id": "k-alice", "name": "alice", "sha256": "<hex>", "role": "operator",
               "backends": ["time"], "tools": {"allow": ["get_*"], "deny": ["*delete*"]},
               "expires": "2027-01-01T00:00:00Z", "rate_limit": 1000}]}
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from ..settings import Secret

__all__ = ["ROLES", "ApiKey", "KeyStore", "KeysFileError", "bearer_token", "digest", "generate_key"]

ROLES: Final = ("admin", "operator", "viewer")
Role = Literal["admin", "operator", "viewer"]
KEY_FIELDS: Final = frozenset({"id", "name", "sha256", "role", "backends", "tools", "expires", "rate_limit"})
_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def bearer_token(authorization: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` value; None for another scheme or no token."""
    scheme, _, value = authorization.partition(" ")
    return (value.strip() or None) if scheme.lower() == "bearer" else None


class KeysFileError(ValueError):
    """The keys file cannot be used; the message names the entry and the field."""


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    sha256: bytes
    role: Role = "operator"
    backends: tuple[str, ...] | None = None  # None: every backend
    tools_allow: tuple[str, ...] = ("*",)
    tools_deny: tuple[str, ...] = ()
    expires: dt.datetime | None = None
    rate_limit: int | None = None

    def expired(self, now: dt.datetime | None = None) -> bool:
        return self.expires is not None and (now or dt.datetime.now(dt.UTC)) >= self.expires

    def may_use_backend(self, backend: str) -> bool:
        """`*` is the aggregate of all backends: only a key limited to none may use it."""
        return self.backends is None or (backend != "*" and backend in self.backends)

    def may_use_tool(self, tool: str) -> bool:
        allowed = any(fnmatch.fnmatchcase(tool, pattern) for pattern in self.tools_allow)
        return allowed and not any(fnmatch.fnmatchcase(tool, pattern) for pattern in self.tools_deny)


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise KeysFileError(f"{where} must be a list of strings")
    return tuple(value)


def _parse_key(entry: Any, where: str) -> ApiKey:
    if not isinstance(entry, dict):
        raise KeysFileError(f"{where} must be an object")
    unknown = set(entry) - KEY_FIELDS
    if unknown:
        raise KeysFileError(
            f"{where}: unknown field {sorted(unknown)[0]!r} (allowed: {', '.join(sorted(KEY_FIELDS))})"
        )
    key_id = entry.get("id")
    if not isinstance(key_id, str) or not _ID.fullmatch(key_id):
        raise KeysFileError(f"{where}: id must be 1-64 letters, digits, '_', '-' or '.'")
    sha = entry.get("sha256")
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise KeysFileError(f"{where}: sha256 must be 64 lowercase hex digits (the digest, never the secret)")
    role = entry.get("role", "operator")
    if role not in ROLES:
        raise KeysFileError(f"{where}: role must be one of {', '.join(ROLES)}")
    tools = entry.get("tools", {})
    if not isinstance(tools, dict) or set(tools) - {"allow", "deny"}:
        raise KeysFileError(f'{where}: tools must be {{"allow": [...], "deny": [...]}}')
    expires = entry.get("expires")
    when = None
    if expires is not None:
        try:
            when = dt.datetime.fromisoformat(str(expires).replace("Z", "+00:00"))
        except ValueError:
            raise KeysFileError(f"{where}: expires must be an ISO 8601 date-time") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
    rate_limit = entry.get("rate_limit")
    if rate_limit is not None and (
        not isinstance(rate_limit, int) or isinstance(rate_limit, bool) or rate_limit < 1
    ):
        raise KeysFileError(f"{where}: rate_limit must be a positive integer (requests per window)")
    return ApiKey(
        id=key_id,
        name=str(entry.get("name", key_id)),
        sha256=bytes.fromhex(sha),
        role=role,
        backends=None if "backends" not in entry else _strings(entry["backends"], f"{where}.backends"),
        tools_allow=_strings(tools.get("allow", ["*"]), f"{where}.tools.allow"),
        tools_deny=_strings(tools.get("deny", []), f"{where}.tools.deny"),
        expires=when,
        rate_limit=rate_limit,
    )


def load_keys(path: Path) -> list[ApiKey]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise KeysFileError(f"{path}: cannot read the keys file ({exc.strerror})") from None
    except ValueError as exc:
        raise KeysFileError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise KeysFileError(f'{path}: expected {{"keys": [...]}}')
    keys = [_parse_key(entry, f"{path}: keys[{i}]") for i, entry in enumerate(document["keys"])]
    ids = [k.id for k in keys]
    if len(set(ids)) != len(ids):
        raise KeysFileError(f"{path}: key ids must be unique")
    return keys


class KeyStore:
    """The keys in force; `reload()` swaps them atomically (SIGHUP)."""

    def __init__(self, token: Secret | None, keys_file: Path | None) -> None:
        self.token = token
        self.keys_file = keys_file
        self._by_digest: dict[bytes, ApiKey] = {}
        self.by_id: dict[str, ApiKey] = {}
        self.reload()

    def reload(self) -> set[str]:
        """Load the keys again; return the ids that are gone (their sessions must end)."""
        keys = []
        if self.token is not None and self.token.reveal():
            keys.append(
                ApiKey(id="auth-token", name="AUTH_TOKEN", sha256=digest(self.token.reveal()), role="admin")
            )
        if self.keys_file is not None:
            keys.extend(load_keys(self.keys_file))
        if not keys:
            raise KeysFileError("no keys: set AUTH_TOKEN or KEYS_FILE")
        old = set(self.by_id)
        self._by_digest = {k.sha256: k for k in keys}
        self.by_id = {k.id: k for k in keys}
        return old - set(self.by_id)

    def verify(self, presented: str) -> ApiKey | None:
        """The live key whose secret this is, or None."""
        candidate = digest(presented)
        key = self._by_digest.get(candidate)
        if key is None or not hmac.compare_digest(key.sha256, candidate) or key.expired():
            return None
        return key

    def current(self, key_id: str) -> ApiKey | None:
        """The key as it stands now (after reloads and expiry), or None when it no longer counts."""
        key = self.by_id.get(key_id)
        return None if key is None or key.expired() else key


def generate_key(name: str, role: str) -> tuple[str, dict[str, Any]]:
    """A new secret (shown once) and the keys-file entry that stores only its digest."""
    if role not in ROLES:
        raise KeysFileError(f"role must be one of {', '.join(ROLES)}")
    secret = "mcp_" + secrets.token_urlsafe(32)
    key_id = "k-" + re.sub(r"[^A-Za-z0-9_.-]", "-", name)[:40] + "-" + secrets.token_hex(3)
    entry = {"id": key_id, "name": name, "sha256": digest(secret).hex(), "role": role}
    return secret, entry
