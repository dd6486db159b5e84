"""The OAuth state on disk: the SQLite store (atomic decisions, file modes, schema), the signing
key, and a restart: a new OAuthServer on the same state directory keeps clients, grants and
refresh tokens, and the access tokens it signed before."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mcp_sse.oauth.tokens import OwnToken, SigningKey
from mcp_sse.store import ClientRecord, CodeRecord, GrantRecord, OAuthStore, RefreshRecord
from mcp_sse.store.sqlite import SQLiteStore, StoreError

from .as_helpers import (
    LOOPBACK_CALLBACK,
    Browser,
    FakeClock,
    Keys,
    authorization_params,
    pkce,
    register,
    start_as,
    token,
)


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "state" / "oauth.sqlite3")
    await s.open()
    yield s
    await s.close()


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[OAuthStore]:
    """Every engine of OAuthStore against the same tests: SQLite, and Redis on a real redis-server."""
    if request.param == "sqlite":
        s: OAuthStore = SQLiteStore(tmp_path / "state" / "oauth.sqlite3")
        await s.open()
        yield s
        await s.close()
        return
    import redis.asyncio

    from mcp_sse.store.redis_oauth import RedisOAuthStore

    # Database 0 of the session's server: the redis_url fixture hands out 1..63.
    client = redis.asyncio.Redis.from_url(request.getfixturevalue("_redis_server") + "/0")
    await client.flushdb()
    yield RedisOAuthStore(client)
    await client.aclose()


def grant(grant_id: str = "g1", *, client_id: str = "c1", expires_at: float = 2000.0) -> GrantRecord:
    return GrantRecord(
        grant_id, client_id, "k1", "fp", "https://gw.example/mcp", "mcp:admin", 1000.0, expires_at
    )


def code(grant_id: str = "g1") -> CodeRecord:
    return CodeRecord(
        b"c" * 32,
        "c1",
        LOOPBACK_CALLBACK,
        "x" * 43,
        "https://gw.example/mcp",
        "mcp:admin",
        "k1",
        "fp",
        grant_id,
        1060.0,
    )


def client(client_id: str = "c1", last_used_at: float = 1000.0) -> ClientRecord:
    return ClientRecord(
        client_id, "name", (LOOPBACK_CALLBACK,), "none", None, ("authorization_code",), 1000.0, last_used_at
    )


async def test_files_are_private_and_in_wal_mode(sqlite_store: SQLiteStore) -> None:
    store = sqlite_store
    await store.add_client(client())  # a write, so the -wal and -shm files exist
    files = sorted(p.name for p in store.path.parent.iterdir())
    assert files == ["oauth.sqlite3", "oauth.sqlite3-shm", "oauth.sqlite3-wal"]
    for name in files:
        assert stat.S_IMODE((store.path.parent / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE(store.path.parent.stat().st_mode) == 0o700
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_an_existing_file_readable_by_others_is_made_private(tmp_path: Path) -> None:
    path = tmp_path / "oauth.sqlite3"
    path.touch(mode=0o644)
    os.chmod(path, 0o644)
    s = SQLiteStore(path)
    await s.open()
    await s.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_a_store_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "oauth.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="newer mcp-sse"):
        await SQLiteStore(path).open()
    path.write_text("not a database at all, just some text that is long enough to be read")
    with pytest.raises(StoreError, match="not a usable OAuth store"):
        await SQLiteStore(path).open()


async def test_a_code_is_taken_once_even_by_racing_requests(store: OAuthStore) -> None:
    await store.add_code(code())
    results = await asyncio.gather(*(store.take_code(b"c" * 32) for _ in range(20)))
    assert sorted(r[1] for r in results if r is not None) == [False] * 19 + [True]
    assert await store.take_code(b"d" * 32) is None


async def test_a_revoked_grant_id_cannot_be_created_afterwards(store: OAuthStore) -> None:
    # The code's reuse arrived while its first redemption was still under way.
    assert await store.revoke_grant("g1", 1000.0, remember_until=1700.0) is False
    assert await store.create_grant(grant(), RefreshRecord(b"r" * 32, "g1", 2000.0)) is False
    assert await store.get_grant("g1", 1001.0) is None
    assert await store.find_refresh(b"r" * 32, 1001.0) is None


async def test_racing_rotations_of_one_refresh_token_end_the_family(store: OAuthStore) -> None:
    assert await store.create_grant(grant(), RefreshRecord(b"r" * 32, "g1", 2000.0))
    rotations = await asyncio.gather(
        store.rotate_refresh(b"r" * 32, RefreshRecord(b"a" * 32, "g1", 2100.0), 1001.0),
        store.rotate_refresh(b"r" * 32, RefreshRecord(b"b" * 32, "g1", 2100.0), 1001.0),
    )
    assert sorted(r.outcome for r in rotations) == ["reused", "rotated"]
    assert await store.get_grant("g1", 1002.0) is None
    for token_sha256 in (b"a" * 32, b"b" * 32, b"r" * 32):
        assert await store.find_refresh(token_sha256, 1002.0) is None


async def test_rotation_extends_the_grant_and_expired_tokens_are_gone(store: OAuthStore) -> None:
    assert await store.create_grant(grant(), RefreshRecord(b"r" * 32, "g1", 2000.0))
    rotation = await store.rotate_refresh(b"r" * 32, RefreshRecord(b"a" * 32, "g1", 3000.0), 1500.0)
    assert rotation.outcome == "rotated"
    live = await store.get_grant("g1", 2500.0)
    assert live is not None and live.expires_at == 3000.0
    assert (
        await store.rotate_refresh(b"a" * 32, RefreshRecord(b"b" * 32, "g1", 4000.0), 3000.0)
    ).outcome == "gone"
    assert (
        await store.rotate_refresh(b"z" * 32, RefreshRecord(b"b" * 32, "g1", 4000.0), 1500.0)
    ).outcome == "gone"


async def test_prune_forgets_what_can_no_longer_be_used(store: OAuthStore) -> None:
    await store.add_client(client("old", last_used_at=1000.0))
    await store.add_client(client("held", last_used_at=1000.0))
    await store.add_client(client("recent", last_used_at=5000.0))
    assert await store.create_grant(
        grant("g1", client_id="held", expires_at=9000.0), RefreshRecord(b"r" * 32, "g1", 9000.0)
    )
    assert await store.create_grant(
        grant("g2", client_id="old", expires_at=1500.0), RefreshRecord(b"s" * 32, "g2", 1500.0)
    )
    await store.add_code(code())
    pruned = await store.prune(6000.0, unused_clients_before=4000.0, codes_before=5000.0)
    assert pruned == (1, 1, 1)  # "old", the code, g2
    assert await store.get_client("old") is None
    assert await store.get_client("held") is not None and await store.get_client("recent") is not None
    assert await store.evict_clients(5, 6000.0) == 1  # "recent"; "held" has a live grant
    assert await store.count_clients() == 1


async def test_grant_reads_on_the_loop_fall_back_to_the_thread_when_busy(sqlite_store: SQLiteStore) -> None:
    store = sqlite_store
    assert await store.create_grant(grant(), RefreshRecord(b"r" * 32, "g1", 2000.0))

    class Busy:
        def execute(self, *args: object) -> None:
            raise sqlite3.OperationalError("database is locked")

    reader, store._reader = store._reader, Busy()  # type: ignore[assignment]
    try:
        live = await store.get_grant("g1", 1001.0)
    finally:
        store._reader = reader
    assert live is not None and live.grant_id == "g1"
    # The loop's reader sees what the thread commits, at once.
    await store.revoke_grant("g1", 1001.0, remember_until=1001.0)
    assert await store.get_grant("g1", 1000.5) is None


async def test_a_closed_store_says_so(tmp_path: Path) -> None:
    s = SQLiteStore(tmp_path / "x.sqlite3")
    with pytest.raises(StoreError, match="not open"):
        await s.get_client("c1")


def test_the_signing_key_is_made_once_private_and_kept(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = SigningKey.load_or_create(state)
    path = state / "oauth-signing-key.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert SigningKey.load_or_create(state).kid == first.kid
    assert [p.name for p in state.iterdir()] == ["oauth-signing-key.pem"]  # no temporary left behind
    os.chmod(path, 0o640)
    with pytest.raises(ValueError, match="readable by others"):
        SigningKey.load_or_create(state)
    os.chmod(path, 0o600)
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a PEM private key"):
        SigningKey.load_or_create(state)


async def test_a_restart_keeps_clients_grants_and_refresh_tokens(tmp_path: Path) -> None:
    clock = FakeClock()
    keys = Keys()
    first = await start_as(tmp_path, clock=clock, keys=keys)
    browser = Browser(first.url)
    port = first.http.port
    try:
        status, registered = await register(first.url)
        client_id = registered["client_id"]
        verifier, challenge = pkce()
        answer = await browser.approve(authorization_params(first, client_id, challenge), keys.operator)
        status, body, _ = await token(
            first.url,
            {
                "grant_type": "authorization_code",
                "code": answer["code"],
                "code_verifier": verifier,
                "client_id": client_id,
            },
        )
        assert status == 200
    finally:
        await first.http.close()
    assert port is not None

    second = await start_as(tmp_path, clock=clock, keys=keys, port=port)
    try:
        assert second.server.signing_key.kid == first.server.signing_key.kid
        # The access token signed before the restart still counts, with its key's policy.
        own = await second.server.verify_own_token(body["access_token"], second.resource)
        assert isinstance(own, OwnToken) and own.subject == "k-operator"
        status, refreshed, _ = await token(
            second.url,
            {"grant_type": "refresh_token", "refresh_token": body["refresh_token"], "client_id": client_id},
        )
        assert status == 200, refreshed
        # The client is still registered: a new authorization starts (cookie logins did not survive).
        _, challenge = pkce()
        page = await browser.authorize(authorization_params(second, client_id, challenge))
        assert page.status == 200 and 'name="key"' in await page.text()
        # Reuse detection survives too: the pre-restart refresh token is spent.
        status, error, _ = await token(
            second.url,
            {"grant_type": "refresh_token", "refresh_token": body["refresh_token"], "client_id": client_id},
        )
        assert (status, error["error"]) == (400, "invalid_grant")
        assert second.events("oauth.refresh_reuse")
    finally:
        await browser.close()
        await second.http.close()
