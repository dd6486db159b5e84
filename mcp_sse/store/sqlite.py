"""The OAuth store in SQLite (stdlib sqlite3): what must survive a restart on one host.

One file, `<state_dir>/oauth.sqlite3`, created 0600 (it holds digests of secrets and who
approved what). WAL journal: readers never wait for the writer, and several processes on the
host may share the file. `synchronous=FULL`: a rotated refresh token is on disk before the
client learns the new one, so a power cut cannot hand out a token the store forgot.

sqlite3 blocks, so every write (and every read the token endpoint makes) runs on one thread of
its own that owns the writing connection; the event loop only waits on a future. One read runs
on the loop itself: `get_grant`, which every request with an access token makes. It is a
primary-key SELECT on a second, query-only connection: in WAL mode a reader never waits for a
writer, so it takes microseconds (about 6 us, against about 100 us for the hop to the thread),
and should SQLite ever answer "busy" it is retried on the thread instead of waiting here.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final, TypeVar

from . import AUTH_METHODS, AuthMethod, ClientRecord, CodeRecord, GrantRecord, Pruned, RefreshRecord, Rotation

__all__ = ["SCHEMA_VERSION", "SQLiteStore", "StoreError"]

SCHEMA_VERSION: Final = 1
T = TypeVar("T")

_SCHEMA: Final = """
CREATE TABLE clients (
    client_id TEXT PRIMARY KEY,
    client_name TEXT NOT NULL,
    redirect_uris TEXT NOT NULL,           -- one per line (a redirect URI holds no newline)
    auth_method TEXT NOT NULL,
    secret_sha256 BLOB,
    grant_types TEXT NOT NULL,             -- space-separated
    created_at REAL NOT NULL,
    last_used_at REAL NOT NULL
);
CREATE INDEX clients_last_used ON clients (last_used_at);
CREATE TABLE codes (
    code_sha256 BLOB PRIMARY KEY,
    client_id TEXT NOT NULL,
    redirect_uri TEXT NOT NULL,
    code_challenge TEXT NOT NULL,
    resource TEXT NOT NULL,
    scope TEXT NOT NULL,
    key_id TEXT NOT NULL,
    key_fp TEXT NOT NULL,
    grant_id TEXT NOT NULL,
    expires_at REAL NOT NULL,
    uses INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX codes_expires ON codes (expires_at);
-- A revoked grant whose row did not exist yet (its code is being redeemed) is a tombstone:
-- revoked_at set, the other columns empty, so create_grant cannot bring it to life.
CREATE TABLE grants (
    grant_id TEXT PRIMARY KEY,
    client_id TEXT NOT NULL DEFAULT '',
    key_id TEXT NOT NULL DEFAULT '',
    key_fp TEXT NOT NULL DEFAULT '',
    resource TEXT NOT NULL DEFAULT '',
    scope TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL DEFAULT 0,
    expires_at REAL NOT NULL,
    revoked_at REAL
);
CREATE INDEX grants_client ON grants (client_id);
CREATE INDEX grants_expires ON grants (expires_at);
CREATE TABLE refresh_tokens (
    token_sha256 BLOB PRIMARY KEY,
    grant_id TEXT NOT NULL REFERENCES grants (grant_id) ON DELETE CASCADE,
    expires_at REAL NOT NULL,
    spent INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX refresh_grant ON refresh_tokens (grant_id);
"""
# Whole statements, no SQL built from strings: every value is a ? parameter.
_LIVE_GRANT: Final = (
    "SELECT grant_id, client_id, key_id, key_fp, resource, scope, created_at, expires_at FROM grants "
    "WHERE grant_id = ? AND revoked_at IS NULL AND expires_at > ?"
)


class StoreError(RuntimeError):
    """The store file cannot be used; the message names the file and what to do."""


def _create_private(path: Path) -> None:
    """Create the file 0600 if it is missing (no moment where it is readable by others); make an
    existing one 0600 too. SQLite gives its -wal and -shm files the database file's mode."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _client(row: tuple[Any, ...]) -> ClientRecord:
    method: AuthMethod = next((m for m in AUTH_METHODS if m == row[3]), "none")
    return ClientRecord(
        client_id=row[0],
        client_name=row[1],
        redirect_uris=tuple(row[2].split("\n")) if row[2] else (),
        auth_method=method,
        secret_sha256=row[4],
        grant_types=tuple(row[5].split()),
        created_at=row[6],
        last_used_at=row[7],
    )


def _grant(row: tuple[Any, ...]) -> GrantRecord:
    return GrantRecord(*row)


class SQLiteStore:
    """`OAuthStore` on one SQLite file. `open()` before use, `close()` after."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None  # the event loop's own, query-only

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise StoreError(f"{self.path}: the OAuth store is not open")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"{self.path}: the OAuth store is not open")
        return self._conn

    # -- lifecycle --

    async def open(self) -> None:
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="oauth-store")
        try:
            await self._run(self._open)
            # timeout=0: never wait on the loop for a lock; a busy answer goes to the thread instead.
            self._reader = sqlite3.connect(self.path, isolation_level=None, timeout=0)
            self._reader.execute("PRAGMA query_only=ON")
        except BaseException:
            await self.close()
            raise

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            _create_private(self.path)
            # isolation_level=None: autocommit; transactions are explicit BEGIN IMMEDIATE, which takes
            # the write lock up front so a read-then-write step is atomic across processes too.
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=5.0)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"{self.path}: cannot open the OAuth store ({exc})") from None
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                conn.execute("BEGIN IMMEDIATE")
                if conn.execute("PRAGMA user_version").fetchone()[0] == 0:  # not made meanwhile
                    # Statement by statement: executescript() would commit the open transaction first.
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                conn.execute("COMMIT")
            elif version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: made by a newer mcp-sse (schema {version}, this one knows "
                    f"{SCHEMA_VERSION}); upgrade, or move the file away to start afresh"
                )
        except sqlite3.Error as exc:
            conn.close()
            raise StoreError(f"{self.path}: not a usable OAuth store ({exc})") from None
        except StoreError:
            conn.close()
            raise
        self._conn = conn

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return

        def close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(executor, close)
        executor.shutdown(wait=False)  # its only thread is idle now
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def _transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            result = fn(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    # -- clients --

    async def add_client(self, client: ClientRecord) -> None:
        await self._run(
            lambda: self._db.execute(
                "INSERT INTO clients VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    client.client_id,
                    client.client_name,
                    "\n".join(client.redirect_uris),
                    client.auth_method,
                    client.secret_sha256,
                    " ".join(client.grant_types),
                    client.created_at,
                    client.last_used_at,
                ),
            )
        )

    async def get_client(self, client_id: str) -> ClientRecord | None:
        def get() -> ClientRecord | None:
            row = self._db.execute("SELECT * FROM clients WHERE client_id = ?", (client_id,)).fetchone()
            return None if row is None else _client(row)

        return await self._run(get)

    async def touch_client(self, client_id: str, now: float) -> None:
        await self._run(
            lambda: self._db.execute(
                "UPDATE clients SET last_used_at = max(last_used_at, ?) WHERE client_id = ?", (now, client_id)
            )
        )

    async def count_clients(self) -> int:
        return await self._run(lambda: int(self._db.execute("SELECT count(*) FROM clients").fetchone()[0]))

    async def list_clients(self, limit: int) -> list[ClientRecord]:
        def get() -> list[ClientRecord]:
            rows = self._db.execute("SELECT * FROM clients ORDER BY last_used_at DESC LIMIT ?", (limit,))
            return [_client(row) for row in rows]

        return await self._run(get)

    async def evict_clients(self, count: int, now: float) -> int:
        def evict(db: sqlite3.Connection) -> int:
            cursor = db.execute(
                "DELETE FROM clients WHERE client_id IN (SELECT client_id FROM clients WHERE NOT EXISTS "
                "(SELECT 1 FROM grants g WHERE g.client_id = clients.client_id "
                "AND g.revoked_at IS NULL AND g.expires_at > ?) ORDER BY last_used_at LIMIT ?)",
                (now, count),
            )
            return cursor.rowcount

        return await self._run(self._transaction, evict)

    # -- codes --

    async def add_code(self, code: CodeRecord) -> None:
        await self._run(
            lambda: self._db.execute(
                "INSERT INTO codes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)",
                (
                    code.code_sha256,
                    code.client_id,
                    code.redirect_uri,
                    code.code_challenge,
                    code.resource,
                    code.scope,
                    code.key_id,
                    code.key_fp,
                    code.grant_id,
                    code.expires_at,
                ),
            )
        )

    async def take_code(self, code_sha256: bytes) -> tuple[CodeRecord, bool] | None:
        def take() -> tuple[CodeRecord, bool] | None:
            # One statement: the count goes up and is read back atomically, so exactly one caller sees 1.
            row = self._db.execute(
                "UPDATE codes SET uses = uses + 1 WHERE code_sha256 = ? RETURNING "
                "code_sha256, client_id, redirect_uri, code_challenge, resource, scope, key_id, key_fp, "
                "grant_id, expires_at, uses",
                (code_sha256,),
            ).fetchone()
            return None if row is None else (CodeRecord(*row[:10]), row[10] == 1)

        return await self._run(take)

    # -- grants and refresh tokens --

    async def create_grant(self, grant: GrantRecord, refresh: RefreshRecord) -> bool:
        def create(db: sqlite3.Connection) -> bool:
            try:
                db.execute(
                    "INSERT INTO grants (grant_id, client_id, key_id, key_fp, resource, scope, "
                    "created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        grant.grant_id,
                        grant.client_id,
                        grant.key_id,
                        grant.key_fp,
                        grant.resource,
                        grant.scope,
                        grant.created_at,
                        grant.expires_at,
                    ),
                )
            except sqlite3.IntegrityError:  # a tombstone: the code was reused before we got here
                return False
            db.execute(
                "INSERT INTO refresh_tokens VALUES (?, ?, ?, 0)",
                (refresh.token_sha256, refresh.grant_id, refresh.expires_at),
            )
            return True

        return await self._run(self._transaction, create)

    async def get_grant(self, grant_id: str, now: float) -> GrantRecord | None:
        if self._reader is not None:
            try:
                row = self._reader.execute(_LIVE_GRANT, (grant_id, now)).fetchone()
            except sqlite3.OperationalError:  # "database is locked": rare in WAL; ask the thread
                pass
            else:
                return None if row is None else _grant(row)

        def get() -> GrantRecord | None:
            row = self._db.execute(_LIVE_GRANT, (grant_id, now)).fetchone()
            return None if row is None else _grant(row)

        return await self._run(get)

    async def list_grants(self, now: float, limit: int) -> list[GrantRecord]:
        def get() -> list[GrantRecord]:
            rows = self._db.execute(
                "SELECT grant_id, client_id, key_id, key_fp, resource, scope, created_at, expires_at "
                "FROM grants WHERE revoked_at IS NULL AND expires_at > ? ORDER BY created_at DESC LIMIT ?",
                (now, limit),
            )
            return [_grant(row) for row in rows]

        return await self._run(get)

    @staticmethod
    def _revoke(db: sqlite3.Connection, grant_id: str, now: float, remember_until: float) -> bool:
        live = db.execute(_LIVE_GRANT, (grant_id, now)).fetchone()
        db.execute("DELETE FROM refresh_tokens WHERE grant_id = ?", (grant_id,))
        db.execute(
            "INSERT INTO grants (grant_id, expires_at, revoked_at) VALUES (?, ?, ?) "
            "ON CONFLICT (grant_id) DO UPDATE SET revoked_at = coalesce(revoked_at, excluded.revoked_at), "
            "expires_at = excluded.expires_at",
            (grant_id, remember_until, now),
        )
        return live is not None

    async def revoke_grant(self, grant_id: str, now: float, *, remember_until: float) -> bool:
        return await self._run(
            self._transaction, lambda db: self._revoke(db, grant_id, now, max(now, remember_until))
        )

    async def find_refresh(self, token_sha256: bytes, now: float) -> GrantRecord | None:
        def find() -> GrantRecord | None:
            row = self._db.execute(
                "SELECT g.grant_id, g.client_id, g.key_id, g.key_fp, g.resource, g.scope, g.created_at, "
                "g.expires_at FROM refresh_tokens r JOIN grants g USING (grant_id) "
                "WHERE r.token_sha256 = ? AND r.expires_at > ? AND g.revoked_at IS NULL AND g.expires_at > ?",
                (token_sha256, now, now),
            ).fetchone()
            return None if row is None else _grant(row)

        return await self._run(find)

    async def rotate_refresh(self, old_sha256: bytes, new: RefreshRecord, now: float) -> Rotation:
        def rotate(db: sqlite3.Connection) -> Rotation:
            row = db.execute(
                "SELECT grant_id, expires_at, spent FROM refresh_tokens WHERE token_sha256 = ?", (old_sha256,)
            ).fetchone()
            if row is None:
                return Rotation("gone", None)
            grant_id, expires_at, spent = row
            grant_row = db.execute(_LIVE_GRANT, (grant_id, now)).fetchone()
            if grant_row is None or expires_at <= now:
                return Rotation("gone", None)
            grant = _grant(grant_row)
            if spent:
                # A spent token presented again: the thief's or the client's, we cannot tell which, so
                # the family ends for both (RFC 9700 section 4.14.2, OAuth 2.1 section 4.3.1).
                self._revoke(db, grant_id, now, now)
                return Rotation("reused", grant)
            db.execute("UPDATE refresh_tokens SET spent = 1 WHERE token_sha256 = ?", (old_sha256,))
            db.execute(
                "INSERT INTO refresh_tokens VALUES (?, ?, ?, 0)", (new.token_sha256, grant_id, new.expires_at)
            )
            db.execute(
                "UPDATE grants SET expires_at = max(expires_at, ?) WHERE grant_id = ?",
                (new.expires_at, grant_id),
            )
            # Spent tokens are kept (for reuse detection) only while they would still be live.
            return Rotation("rotated", grant)

        return await self._run(self._transaction, rotate)

    async def prune(self, now: float, *, unused_clients_before: float, codes_before: float) -> Pruned:
        def prune(db: sqlite3.Connection) -> Pruned:
            codes = db.execute("DELETE FROM codes WHERE expires_at < ?", (codes_before,)).rowcount
            db.execute("DELETE FROM refresh_tokens WHERE expires_at <= ?", (now,))
            grants = db.execute("DELETE FROM grants WHERE expires_at <= ?", (now,)).rowcount
            clients = db.execute(
                "DELETE FROM clients WHERE last_used_at < ? AND NOT EXISTS "
                "(SELECT 1 FROM grants g WHERE g.client_id = clients.client_id "
                "AND g.revoked_at IS NULL AND g.expires_at > ?)",
                (unused_clients_before, now),
            ).rowcount
            return Pruned(clients=clients, codes=codes, grants=grants)

        return await self._run(self._transaction, prune)
