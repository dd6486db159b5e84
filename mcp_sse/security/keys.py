"""API keys: AUTH_TOKEN and a keys file of named keys with roles and policies.

Only SHA-256 digests of secrets are stored. A presented token is hashed and looked up
by digest, then compared with `hmac.compare_digest`, so the time taken does not depend
on how much of a real secret the caller guessed.

Keys file (JSON):

    {"keys": [{"id": "k-alice", "name": "alice", "sha256": "<hex>", "role": "operator",
               "backends": ["time"], "tools": {"allow": ["get_*"], "deny": ["*delete*"]},
               "expires": "2027-01-01T00:00:00Z", "rate_limit": 1000,
               "created": "2026-12-03T14:00:00Z"}]}

The admin API (ops/admin.py) edits the file through `KeyStore.edit`: read again from disk (so a
hand edit is kept, not overwritten), changed, checked whole, written atomically (a temporary file
in the same directory, 0600, fsync, os.replace), then put in force at once, as a SIGHUP would.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fnmatch
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from ..settings import Secret

__all__ = [
    "AUTH_TOKEN_ID",
    "ROLES",
    "ApiKey",
    "KeyStore",
    "KeysFileError",
    "KeysFileMissing",
    "UseCounter",
    "bearer_token",
    "digest",
    "generate_key",
    "write_keys_file",
]

ROLES: Final = ("admin", "operator", "viewer")
Role = Literal["admin", "operator", "viewer"]
KEY_FIELDS: Final = frozenset(
    {"id", "name", "sha256", "role", "backends", "tools", "expires", "rate_limit", "created"}
)
AUTH_TOKEN_ID: Final = "auth-token"  # noqa: S105 - an id, not a secret
USE_DAYS: Final = 7
"""Days of use counts kept per key (in memory): what a rotation review asks, "is it still used?"."""
_DAY: Final = 86_400
_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def bearer_token(authorization: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` value; None for another scheme or no token."""
    scheme, _, value = authorization.partition(" ")
    return (value.strip() or None) if scheme.lower() == "bearer" else None


class KeysFileError(ValueError):
    """The keys file cannot be used; the message names the entry and the field."""


class KeysFileMissing(KeysFileError):
    """A change to the keys was asked for, but there is no KEYS_FILE to hold it."""


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
    created: dt.datetime | None = None

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


def _instant(value: Any, where: str, field: str) -> dt.datetime | None:
    if value is None:
        return None
    try:
        when = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise KeysFileError(f"{where}: {field} must be an ISO 8601 date-time") from None
    return when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when


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
    when = _instant(entry.get("expires"), where, "expires")
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
        created=_instant(entry.get("created"), where, "created"),
    )


def _read_document(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise KeysFileError(f"{path}: cannot read the keys file ({exc.strerror})") from None
    except ValueError as exc:
        raise KeysFileError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise KeysFileError(f'{path}: expected {{"keys": [...]}}')
    return document


def _parse_document(path: Path, document: dict[str, Any]) -> list[ApiKey]:
    keys = [_parse_key(entry, f"{path}: keys[{i}]") for i, entry in enumerate(document["keys"])]
    ids = [k.id for k in keys]
    if len(set(ids)) != len(ids):
        raise KeysFileError(f"{path}: key ids must be unique")
    return keys


def load_keys(path: Path) -> list[ApiKey]:
    return _parse_document(path, _read_document(path))


def write_keys_file(path: Path, document: dict[str, Any]) -> None:
    """Replace the keys file atomically: a reader (a SIGHUP, a restart) sees the old file or the
    new one, whole, never a part. A temporary file in the same directory (so os.replace is a
    rename within one file system), created 0600, fsynced, renamed over the file, then the
    directory fsynced so the rename itself survives a crash. A symlinked KEYS_FILE has its target
    replaced, not the link."""
    target = Path(os.path.realpath(path))
    text = json.dumps(document, indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")  # 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # not every file system lets a directory be fsynced
        dirfd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)


class UseCounter:
    """Successful authentications per key and UTC day, the last USE_DAYS days, in memory (a restart
    starts from zero). One dict update per authentication: cheap enough for every request."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._days: dict[str, dict[int, int]] = {}
        self._last: dict[str, float] = {}

    def record(self, key_id: str) -> None:
        now = self.clock()
        day = int(now // _DAY)
        days = self._days.get(key_id)
        if days is None:
            days = self._days[key_id] = {}
        if day not in days:
            for old in [d for d in days if d <= day - USE_DAYS]:
                del days[old]
        days[day] = days.get(day, 0) + 1
        self._last[key_id] = now

    def forget(self, key_id: str) -> None:
        self._days.pop(key_id, None)
        self._last.pop(key_id, None)

    def last_used(self, key_id: str) -> float | None:
        return self._last.get(key_id)

    def by_day(self, key_id: str) -> dict[str, int]:
        """Uses on each of the last USE_DAYS UTC days, oldest first, by ISO date (today last)."""
        today = int(self.clock() // _DAY)
        days = self._days.get(key_id, {})
        return {
            dt.datetime.fromtimestamp(day * _DAY, dt.UTC).date().isoformat(): days.get(day, 0)
            for day in range(today - USE_DAYS + 1, today + 1)
        }


class KeyStore:
    """The keys in force; `reload()` swaps them atomically (SIGHUP)."""

    def __init__(self, token: Secret | None, keys_file: Path | None) -> None:
        self.token = token
        self.keys_file = keys_file
        self._by_digest: dict[bytes, ApiKey] = {}
        self.by_id: dict[str, ApiKey] = {}
        self.uses = UseCounter()
        self.refuses: Callable[[ApiKey], bool] | None = None
        """Set with REDIS_URL (store/redis_keys.py): is this key revoked on another instance? Then it
        counts for nothing here either, whatever this instance's keys file still says."""
        self.reload()

    def reload(self) -> set[str]:
        """Load the keys again; return the ids that are gone (their sessions must end)."""
        return self._install(load_keys(self.keys_file) if self.keys_file is not None else [])

    def _install(self, file_keys: list[ApiKey]) -> set[str]:
        keys = []
        if self.token is not None and self.token.reveal():
            keys.append(
                ApiKey(id=AUTH_TOKEN_ID, name="AUTH_TOKEN", sha256=digest(self.token.reveal()), role="admin")
            )
        keys.extend(file_keys)
        if not keys:
            raise KeysFileError("no keys: set AUTH_TOKEN or KEYS_FILE")
        old = set(self.by_id)
        self._by_digest = {k.sha256: k for k in keys}
        self.by_id = {k.id: k for k in keys}
        gone = old - set(self.by_id)
        for key_id in gone:
            self.uses.forget(key_id)
        return gone

    def edit(self, change: Callable[[list[dict[str, Any]]], None]) -> set[str]:
        """Change the keys file's entries and put the result in force at once; the ids that are gone.

        The file is read again first, so an edit by hand since the last reload is kept (and comes
        into force with this change, as a SIGHUP would bring it); a file that does not load is not
        overwritten. `change` edits the list of entries in place; the result is checked whole
        before anything is written. Raises KeysFileMissing without a KEYS_FILE, KeysFileError for
        a file or a result that does not load, OSError when the file cannot be written."""
        if self.keys_file is None:
            raise KeysFileMissing("no KEYS_FILE: keys can only be added or changed in a keys file")
        document = _read_document(self.keys_file)
        _parse_document(self.keys_file, document)  # the file as it is must load: never overwrite junk
        entries = document["keys"]
        change(entries)
        keys = _parse_document(self.keys_file, document)
        if self.token is not None and any(k.id == AUTH_TOKEN_ID for k in keys):
            raise KeysFileError(f"{AUTH_TOKEN_ID!r} is the id of AUTH_TOKEN")
        write_keys_file(self.keys_file, document)
        return self._install(keys)

    def verify(self, presented: str) -> ApiKey | None:
        """The live key whose secret this is, or None. A success counts as a use of the key."""
        candidate = digest(presented)
        key = self._by_digest.get(candidate)
        if key is None or not hmac.compare_digest(key.sha256, candidate) or not self._in_force(key):
            return None
        self.uses.record(key.id)
        return key

    def current(self, key_id: str) -> ApiKey | None:
        """The key as it stands now (after reloads and expiry), or None when it no longer counts."""
        key = self.by_id.get(key_id)
        return key if key is not None and self._in_force(key) else None

    def _in_force(self, key: ApiKey) -> bool:
        return not key.expired() and (self.refuses is None or not self.refuses(key))


def generate_key(name: str, role: str) -> tuple[str, dict[str, Any]]:
    """A new secret (shown once) and the keys-file entry that stores only its digest."""
    if role not in ROLES:
        raise KeysFileError(f"role must be one of {', '.join(ROLES)}")
    secret = "mcp_" + secrets.token_urlsafe(32)
    key_id = "k-" + re.sub(r"[^A-Za-z0-9_.-]", "-", name)[:40] + "-" + secrets.token_hex(3)
    entry = {"id": key_id, "name": name, "sha256": digest(secret).hex(), "role": role}
    return secret, entry
