"""The authorization server's state in Redis, shared by two instances (one issuer, one signing
key, one real redis-server): a client registered on one is known to the other, a code is
redeemed once whichever instance it reaches, a refresh token rotates once and its reuse on the
other instance ends the family everywhere. With Redis down the token endpoint answers 503 (never
a token), and answers again once Redis is back. The gateway with REDIS_URL and OAUTH_SERVER keeps
its grants there; and both engines give back exactly what they stored (the admin API's lists)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio
from cryptography.fernet import Fernet

from mcp_sse import app as app_module
from mcp_sse.settings import Secret
from mcp_sse.state import SESSIONS
from mcp_sse.store import ClientRecord, OAuthStore, RefreshRecord
from mcp_sse.store.redis_oauth import RedisOAuthStore
from tests.conftest import text_of, until_eof
from tests.redis_server import RedisServer, needs_redis

from .as_helpers import (
    AS,
    Browser,
    FakeClock,
    Keys,
    authorization_params,
    pkce,
    register,
    start_as,
    token,
)
from .test_server_store import client, grant, store
from .test_wiring import (
    StartOAuth,
    grant_of,
    oauth_client,
    post_initialize,
    revoke,
    session_stream,
    start_oauth,
)

__all__ = ["start_oauth", "store"]  # fixtures from there: the gateway, and both OAuthStore engines

pytestmark = needs_redis


async def pair(tmp_path: Path, url: str) -> tuple[AS, AS, list[redis.asyncio.Redis]]:
    clock, keys = FakeClock(), Keys()
    clients = [redis.asyncio.Redis.from_url(url), redis.asyncio.Redis.from_url(url)]
    a = await start_as(tmp_path, clock=clock, keys=keys, store=RedisOAuthStore(clients[0]))
    # Behind one PUBLIC_URL: the same issuer and resources, the state dir's signing key.
    b = await start_as(
        tmp_path,
        clock=clock,
        keys=keys,
        store=RedisOAuthStore(clients[1]),
        issuer=a.url,
        resource_urls=[a.url + "/mcp", a.url + "/servers/time/mcp"],
    )
    return a, b, clients


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


async def approved(a: AS) -> tuple[str, str, str]:
    """A client registered on A, a code approved on A: (client_id, code, verifier)."""
    status, registered = await register(a.url)
    assert status == 201
    verifier, challenge = pkce()
    browser = Browser(a.url)
    try:
        answer = await browser.approve(
            authorization_params(a, registered["client_id"], challenge), a.keys.operator
        )
    finally:
        await browser.close()
    return registered["client_id"], answer["code"], verifier


async def test_codes_and_refresh_tokens_decide_once_across_instances(tmp_path: Path, redis_url: str) -> None:
    a, b, clients = await pair(tmp_path, redis_url)
    try:
        client_id, code, verifier = await approved(a)
        redeem = {
            "grant_type": "authorization_code",
            "code": code,
            "code_verifier": verifier,
            "client_id": client_id,
        }
        status, first, _ = await token(b.url, redeem)  # the client A registered, the code A made
        assert status == 200, first
        status, error, _ = await token(a.url, redeem)  # the same code again, on the other instance
        assert (status, error["error"]) == (400, "invalid_grant")

        def refresh(value: str) -> dict[str, str]:
            return {"grant_type": "refresh_token", "refresh_token": value, "client_id": client_id}

        # The reuse revoked what the code issued, on B, seen from A (RFC 6749 section 4.1.2).
        status, error, _ = await token(a.url, refresh(first["refresh_token"]))
        assert (status, error["error"]) == (400, "invalid_grant")

        client_id, code, verifier = await approved(a)
        redeem = {
            "grant_type": "authorization_code",
            "code": code,
            "code_verifier": verifier,
            "client_id": client_id,
        }
        status, body, _ = await token(a.url, redeem)
        assert status == 200, body
        status, rotated, _ = await token(b.url, refresh(body["refresh_token"]))
        assert status == 200, rotated
        status, error, _ = await token(a.url, refresh(body["refresh_token"]))  # a copy, replayed on A
        assert (status, error["error"]) == (400, "invalid_grant")
        assert a.events("oauth.refresh_reuse")
        # The family ended everywhere: the newest token is refused on B too.
        status, error, _ = await token(b.url, refresh(rotated["refresh_token"]))
        assert (status, error["error"]) == (400, "invalid_grant")
    finally:
        for running in (a, b):
            await running.http.close()
        for client in clients:
            await client.aclose()


async def test_redis_down_the_token_endpoint_fails_closed_then_recovers(
    tmp_path: Path, server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    a, b, clients = await pair(tmp_path, server.url())
    try:
        client_id, code, verifier = await approved(a)
        redeem = {
            "grant_type": "authorization_code",
            "code": code,
            "code_verifier": verifier,
            "client_id": client_id,
        }
        server.stop()
        status, body, response = await token(b.url, redeem)
        assert status == 503 and "REDIS_URL" in body["error"], body
        assert response.headers["Retry-After"] == "5"
        assert "access_token" not in body
        assert "OAuth: Redis unavailable, refusing (fail closed)" in caplog.text
        server.start()  # empty: no persistence here, so the code is gone; nothing is handed out
        status, body, _ = await token(b.url, redeem)
        assert status in (400, 401) and "access_token" not in body, body
        status, registered = await register(b.url)  # and the store answers again
        assert status == 201, registered
    finally:
        for running in (a, b):
            await running.http.close()
        for client in clients:
            await client.aclose()


async def test_the_gateway_with_redis_url_keeps_its_oauth_state_in_redis(
    start_oauth: StartOAuth, redis_url: str, tmp_path: Path
) -> None:
    gw = await start_oauth(oauth_server=True, redis_url=Secret(redis_url))
    async with oauth_client(gw.url, gw.operator) as client:  # the SDK's whole flow, then a call
        assert text_of(await client.call_tool("echo", {"text": "shared"})) == "shared"
    db = redis.asyncio.Redis.from_url(redis_url)
    try:
        assert [key async for key in db.scan_iter(match="mcp-sse:oauth:grant:*")]
    finally:
        await db.aclose()
    assert not (tmp_path / "state" / "oauth.sqlite3").exists()


async def test_both_engines_give_back_what_they_were_given_and_list_it_newest_first(
    store: OAuthStore,
) -> None:
    confidential = ClientRecord(
        "c2", "Näme", ("https://a.example/cb", "http://127.0.0.1/cb"), "client_secret_basic", b"\x00" * 32,
        ("authorization_code", "refresh_token"), 1000.0, 1500.25,
    )  # fmt: skip
    await store.add_client(client("c1", last_used_at=1200.0))
    await store.add_client(confidential)
    assert await store.get_client("c2") == confidential
    assert await store.get_client("nope") is None
    await store.touch_client("c1", 1100.0)  # never back in time
    await store.touch_client("c1", 1600.0)
    assert [c.client_id for c in await store.list_clients(10)] == ["c1", "c2"]
    assert [c.client_id for c in await store.list_clients(1)] == ["c1"]
    assert await store.count_clients() == 2

    assert await store.create_grant(grant("g1"), RefreshRecord(b"r" * 32, "g1", 2000.0))
    newer = dataclasses.replace(grant("g2"), created_at=1001.0)
    assert await store.create_grant(newer, RefreshRecord(b"s" * 32, "g2", 2000.0))
    assert [g.grant_id for g in await store.list_grants(1500.0, 10)] == ["g2", "g1"]
    assert await store.get_grant("g1", 1500.0) == grant("g1")
    await store.revoke_grant("g2", 1500.0, remember_until=1500.0)
    assert [g.grant_id for g in await store.list_grants(1500.0, 10)] == ["g1"]
    assert await store.list_grants(2000.0, 10) == []  # expired


async def test_a_grant_revoked_on_one_instance_ends_its_streams_on_the_other(
    start_oauth: StartOAuth, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app_module, "REAP_INTERVAL", 0.05)
    shared = {  # one PUBLIC_URL, signing key and hop secret behind a load balancer
        "oauth_server": True,
        "redis_url": Secret(redis_url),
        "session_secret": Secret(Fernet.generate_key().decode()),
    }
    a = await start_oauth(**shared)
    b = await start_oauth(like=a, **shared)
    grant = await grant_of(a)
    async with session_stream(b.url, grant.access) as (session_id, stream):  # A's token, held by B
        await revoke(a.url, grant.access, grant.client_id)  # on A
        await until_eof(stream)  # B's reaper, at its next pass
    [line] = b.audit("session.revoked")
    assert line["sessions_closed"] == 1
    assert b.app[SESSIONS].get(session_id) is None
    assert (await post_initialize(b.url, grant.access)).status == 401


async def test_redis_down_leaves_a_grants_streams_open_and_redis_back_empty_ends_them(
    start_oauth: StartOAuth, server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reaper cannot tell a revoked grant from an outage: a blip must not end every stream
    (the requests themselves fail closed meanwhile). A Redis back without the grant (no
    persistence) is a grant that is gone: its stream ends, as a revoked one would."""
    monkeypatch.setattr(app_module, "REAP_INTERVAL", 0.05)
    gw = await start_oauth(oauth_server=True, redis_url=Secret(server.url()))
    grant = await grant_of(gw)
    async with session_stream(gw.url, grant.access) as (session_id, stream):
        server.stop()
        async with asyncio.timeout(60):  # the reaper asked, and Redis did not answer
            while not [e for e in gw.audit("store.unavailable") if e["store"] == "OAuth"]:
                await asyncio.sleep(0.05)
        session = gw.app[SESSIONS].get(session_id)
        assert session is not None and not session.closed and not stream.content.at_eof()
        assert not gw.audit("session.revoked")
        server.start()
        await until_eof(stream)
    assert [line["sessions_closed"] for line in gw.audit("session.revoked")] == [1]
