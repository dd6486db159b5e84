"""Key revocations and reloads across two gateways on one real redis-server.

A key deleted through the admin API on instance A is refused by B and B's open SSE stream of it
closes; a key made on A works on B. B with its own copy of the keys file (another host) still
refuses a key A revoked, even when B was cut off from Redis as it happened (it catches up when
it reconnects); and with Redis itself stopped and started again, the revocation made meanwhile
reaches B once Redis is back, without restarting either gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mcp_sse.app import reload_keys
from mcp_sse.settings import Secret
from mcp_sse.state import KEYS
from mcp_sse.store.redis_keys import KEY_CHANNEL
from tests.conftest import Running, StartGateway, next_event, until_eof
from tests.redis_server import RedisServer, needs_redis

from .helpers import audit_lines
from .test_pipeline import new_key, write_keys

pytestmark = needs_redis


class Cable:
    """A TCP forwarder to Redis on a loopback port: unplugging it cuts one gateway off alone."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def plug(self) -> None:
        self._server = await asyncio.start_server(self._pipe, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def unplug(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.close()
        if server is not None:
            await server.wait_closed()  # returns once every connection it accepted has ended

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)  # at once: an unplug while this connects closes it too
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)
        if self._server is None:  # unplugged meanwhile
            up_writer.close()
            writer.close()

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        try:
            await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                w.close()
                with contextlib.suppress(OSError):
                    await w.wait_closed()
            self._writers -= {writer, up_writer}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def status_of(http: aiohttp.ClientSession, gw: Running, secret: str) -> int:
    async with http.get(f"{gw.url}/auth/session", headers=bearer(secret)) as response:
        return response.status


async def until_status(http: aiohttp.ClientSession, gw: Running, secret: str, status: int) -> None:
    """Poll until the key gets `status`; the deadline only bounds a failing test."""
    async with asyncio.timeout(30):
        while await status_of(http, gw, secret) != status:
            await asyncio.sleep(0.05)


async def connected(gw: Running) -> None:
    channel = gw.app[KEY_CHANNEL]
    assert channel is not None
    async with asyncio.timeout(30):
        await channel.connected.wait()


async def open_stream(http: aiohttp.ClientSession, gw: Running, secret: str) -> aiohttp.ClientResponse:
    stream = await http.get(f"{gw.url}/sse", headers=bearer(secret))
    assert stream.status == 200
    assert (await next_event(stream)).event == "endpoint"
    return stream


async def delete_key(http: aiohttp.ClientSession, gw: Running, key_id: str) -> None:
    async with http.delete(f"{gw.url}/api/keys/{key_id}", headers=gw.headers) as response:
        assert response.status == 200, await response.text()


async def start_pair(
    start_gateway: StartGateway, tmp_path: Path, url_a: str, url_b: str, *, shared_file: bool
) -> tuple[Running, Running, str, dict[str, Any]]:
    """A and B on one Redis, with one keys file (workers on one host) or a copy each (two hosts)."""
    secret, victim = new_key("victim")
    keys_a = tmp_path / "keys-a.json"
    write_keys(keys_a, victim)
    keys_b = keys_a if shared_file else tmp_path / "keys-b.json"
    if not shared_file:
        shutil.copy(keys_a, keys_b)
    common: dict[str, Any] = {"lockout_failures": 1000}  # refusals from 127.0.0.1 are the point here
    a = await start_gateway(redis_url=Secret(url_a), keys_file=keys_a, audit_log=tmp_path / "a.log", **common)
    b = await start_gateway(redis_url=Secret(url_b), keys_file=keys_b, audit_log=tmp_path / "b.log", **common)
    await connected(a)
    await connected(b)
    return a, b, secret, victim


async def test_a_key_deleted_on_one_instance_is_refused_by_all_and_its_stream_closes(
    start_gateway: StartGateway, tmp_path: Path, http: aiohttp.ClientSession, redis_url: str
) -> None:
    a, b, secret, victim = await start_pair(start_gateway, tmp_path, redis_url, redis_url, shared_file=True)
    # A key made on A works on B: A told B to reload the shared keys file.
    async with http.post(
        f"{a.url}/api/keys", json={"name": "new", "role": "operator"}, headers=a.headers
    ) as r:
        assert r.status == 201
        made, made_id = (await r.json())["secret"], (await r.json())["id"]
    await until_status(http, b, made, 200)
    # Rotated on A: the old secret is refused on B, the new one works there.
    async with http.post(f"{a.url}/api/keys/{made_id}/rotate", headers=a.headers) as r:
        assert r.status == 200
        rotated = (await r.json())["secret"]
    await until_status(http, b, made, 401)
    assert await status_of(http, b, rotated) == 200
    made = rotated

    stream = await open_stream(http, b, secret)
    try:
        await delete_key(http, a, victim["id"])
        assert await status_of(http, a, secret) == 401
        await until_status(http, b, secret, 401)
        await until_eof(stream)
    finally:
        stream.close()
    assert await status_of(http, b, made) == 200  # the other keys are untouched
    assert any(line["event"] == "keys.reload" for line in audit_lines(tmp_path / "b.log"))

    # A SIGHUP after a hand edit of the shared file, on A only: B reloads too.
    keys_file = tmp_path / "keys-a.json"
    write_keys(keys_file, *[k for k in json.loads(keys_file.read_text())["keys"] if k["id"] != made_id])
    reload_keys(a.app)
    await until_status(http, b, made, 401)


async def test_a_copy_of_the_keys_file_elsewhere_still_refuses_a_key_revoked_while_cut_off(
    start_gateway: StartGateway, tmp_path: Path, http: aiohttp.ClientSession, redis_url: str
) -> None:
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    cable = Cable(port)
    await cable.plug()
    b_url = redis_url.replace(f":{port}/", f":{cable.port}/")
    a, b, secret, victim = await start_pair(start_gateway, tmp_path, redis_url, b_url, shared_file=False)
    stream = await open_stream(http, b, secret)
    try:
        await cable.unplug()  # B alone loses Redis: it hears nothing of what follows
        await delete_key(http, a, victim["id"])
        assert await status_of(http, a, secret) == 401
        channel = b.app[KEY_CHANNEL]
        assert channel is not None
        async with asyncio.timeout(30):
            while channel.connected.is_set():
                await asyncio.sleep(0.02)
        await cable.plug()  # the same port: B reconnects by itself and reads the revocations
        # B's own file still lists the key; the recorded revocation (id + fingerprint) refuses it.
        await until_status(http, b, secret, 401)
        await until_eof(stream)
        # ...and so does every other lookup: what its cookie logins and OAuth tokens resolve through.
        assert b.app[KEYS].current(victim["id"]) is None and victim["id"] in b.app[KEYS].by_id
    finally:
        stream.close()
        await cable.unplug()
    assert any(line["event"] == "keys.revoked_elsewhere" for line in audit_lines(tmp_path / "b.log"))
    assert victim["sha256"] not in (tmp_path / "b.log").read_text()


async def test_redis_stopped_and_started_again_a_revocation_made_meanwhile_reaches_the_others(
    start_gateway: StartGateway, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        a, b, secret, victim = await start_pair(
            start_gateway, tmp_path, server.url(), server.url(), shared_file=False
        )
        server.stop()
        # Redis down: bearer keys keep working from the keys files, and A's own revocation holds.
        assert await status_of(http, b, secret) == 200
        await delete_key(http, a, victim["id"])
        assert await status_of(http, a, secret) == 401
        server.start()  # empty (no persistence): A writes what it revoked once it reconnects
        await until_status(http, b, secret, 401)
        await connected(b)
    finally:
        server.stop()
