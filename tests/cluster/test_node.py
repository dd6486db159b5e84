"""Two gateways in this process sharing one real redis-server (cluster/node.py, cluster/hop.py):
a 2025-era session made on A is served through B, over both transports, SSE and Last-Event-ID
included; the internal listener refuses every hop that is not signed, fresh, unused and meant for
it; a session is its owner's caller's only, whichever instance the request lands on; an owner
gone is 404; Redis stopped mid-run fails closed (503, audited) and recovers without a restart."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.fernet import Fernet

from mcp_sse.cluster.hooks import CLUSTER
from mcp_sse.cluster.hop import HEADER_HOP, HEADER_IDENTITY, HEADER_SIGNATURE
from mcp_sse.cluster.node import Node
from mcp_sse.security.keys import generate_key
from mcp_sse.settings import Secret
from mcp_sse.state import SESSIONS
from mcp_sse.store.redis import PREFIX

from ..conftest import Running, StartGateway, init_message, next_event, next_message
from ..redis_server import RedisServer, needs_redis
from ..security.helpers import audit_lines

pytestmark = needs_redis

ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@dataclass
class Pair:
    a: Running
    b: Running
    alice: str
    bob: str
    audit_a: Path
    audit_b: Path

    def node(self, running: Running) -> Node:
        node = running.app[CLUSTER]
        assert isinstance(node, Node)
        return node


async def start_pair(
    start_gateway: StartGateway, tmp_path: Path, url: str, tracing: tuple[Any, Any] = (None, None)
) -> Pair:
    alice, alice_entry = generate_key("alice", "operator")
    bob, bob_entry = generate_key("bob", "operator")
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [alice_entry, bob_entry]}))
    keys.chmod(0o600)
    common: dict[str, Any] = {
        "keys_file": keys,
        "redis_url": Secret(url),
        "session_secret": Secret(Fernet.generate_key().decode()),  # the same on both: it signs the hop
    }
    a = await start_gateway(audit_log=tmp_path / "a.log", tracing=tracing[0], **common)
    b = await start_gateway(audit_log=tmp_path / "b.log", tracing=tracing[1], **common)
    return Pair(a, b, alice, bob, tmp_path / "a.log", tmp_path / "b.log")


@pytest.fixture
async def pair(start_gateway: StartGateway, tmp_path: Path, redis_url: str) -> Pair:
    return await start_pair(start_gateway, tmp_path, redis_url)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def bearer(token: str, **extra: str) -> dict[str, str]:
    return {**ACCEPT, "Authorization": f"Bearer {token}", **extra}


async def initialize(http: aiohttp.ClientSession, url: str, token: str) -> str:
    async with http.post(f"{url}/mcp", json=init_message(), headers=bearer(token)) as response:
        assert response.status == 200, await response.text()
        session_id = response.headers["Mcp-Session-Id"]
    notify = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    headers = bearer(token, **{"Mcp-Session-Id": session_id, "MCP-Protocol-Version": "2025-11-25"})
    async with http.post(f"{url}/mcp", json=notify, headers=headers) as response:
        assert response.status == 202
    return session_id


def call(request_id: int, text: str) -> dict[str, Any]:
    params = {"name": "echo", "arguments": {"text": text}}
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}


def session_headers(token: str, session_id: str, **extra: str) -> dict[str, str]:
    return bearer(token, **{"Mcp-Session-Id": session_id, "MCP-Protocol-Version": "2025-11-25", **extra})


async def test_a_session_made_on_a_is_served_through_b(pair: Pair, http: aiohttp.ClientSession) -> None:
    session_id = await initialize(http, pair.a.url, pair.alice)
    assert pair.b.app[SESSIONS].get(session_id) is None  # held by A only
    # Redis knows the owner by the id's digest: the id itself, a capability, is not stored there.
    keys = [k.decode() for k in await pair.node(pair.a).redis.keys(f"{PREFIX}*")]
    assert f"{PREFIX}session:{hashlib.sha256(session_id.encode()).hexdigest()}" in keys
    assert not any(session_id in k for k in keys)
    headers = session_headers(pair.alice, session_id)
    async with http.post(f"{pair.b.url}/mcp", json=call(2, "via b"), headers=headers) as response:
        assert response.status == 200, await response.text()
        answer = await response.json()
    assert answer["result"]["content"][0]["text"] == "via b"
    # B's own response headers (its security pipeline) are on the relayed answer.
    assert "X-Request-Id" in response.headers
    # DELETE through B ends the session at A; after that it is unknown everywhere.
    async with http.delete(f"{pair.b.url}/mcp", headers=headers) as response:
        assert response.status == 204
    assert pair.a.app[SESSIONS].get(session_id) is None
    for url in (pair.a.url, pair.b.url):
        async with http.post(f"{url}/mcp", json=call(3, "x"), headers=headers) as response:
            assert response.status == 404


async def test_a_relayed_call_does_not_ask_redis_for_the_owner_each_time(
    pair: Pair, http: aiohttp.ClientSession
) -> None:
    # A session's owner never changes, so B asks Redis for it once, not once per relayed call.
    session_id = await initialize(http, pair.a.url, pair.alice)
    headers = session_headers(pair.alice, session_id)
    redis = pair.node(pair.b).redis

    async def counts() -> tuple[int, int]:
        # commandstats counts the commands scripts run too: each call's charge (one EVALSHA) reads
        # its address's lockout with one GET, so GETs beyond the scripts' are the hop's own.
        stats = await redis.info("commandstats")
        get, evalsha = (int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("get", "evalsha"))
        return get, evalsha

    async with http.post(f"{pair.b.url}/mcp", json=call(2, "first"), headers=headers) as response:
        assert response.status == 200
    gets, scripts = await counts()
    for n in range(20):
        async with http.post(f"{pair.b.url}/mcp", json=call(10 + n, f"{n}"), headers=headers) as response:
            assert (await response.json())["result"]["content"][0]["text"] == f"{n}"
    more_gets, more_scripts = await counts()
    assert more_scripts - scripts == 20  # B's pipeline: one round trip per call
    # At most the owner's address again (remembered for ADDRESS_CACHE_SECONDS): never one per call.
    assert (more_gets - gets) - (more_scripts - scripts) <= 5


async def test_the_get_stream_and_last_event_id_through_b(pair: Pair, http: aiohttp.ClientSession) -> None:
    session_id = await initialize(http, pair.a.url, pair.alice)
    session = pair.a.app[SESSIONS].get(session_id)
    assert session is not None
    headers = session_headers(pair.alice, session_id)
    async with http.get(f"{pair.b.url}/mcp", headers=headers) as stream:
        assert stream.status == 200
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        session.send({"jsonrpc": "2.0", "method": "notifications/message", "params": {"n": 1}})
        event = await next_event(stream)
        while event.data == "":  # the priming event
            event = await next_event(stream)
        assert json.loads(event.data)["params"] == {"n": 1}
        first = event.id
    assert first is not None
    session.send({"jsonrpc": "2.0", "method": "notifications/message", "params": {"n": 2}})
    # Resumed through B after the first event: the owner replays what followed it.
    async with http.get(f"{pair.b.url}/mcp", headers={**headers, "Last-Event-ID": first}) as stream:
        assert (await next_message(stream))["params"] == {"n": 2}


async def test_legacy_sse_posts_through_b_answer_on_the_stream_at_a(
    pair: Pair, http: aiohttp.ClientSession
) -> None:
    auth = {"Authorization": f"Bearer {pair.alice}"}
    async with http.get(f"{pair.a.url}/sse", headers=auth) as stream:
        endpoint = await next_event(stream)
        assert endpoint.event == "endpoint"
        for message in (init_message("2024-11-05"), call(2, "legacy via b")):
            async with http.post(f"{pair.b.url}{endpoint.data}", json=message, headers=auth) as response:
                assert response.status == 202, await response.text()
            answer = await next_message(stream)
        assert answer["result"]["content"][0]["text"] == "legacy via b"


async def test_another_key_through_b_gets_404(pair: Pair, http: aiohttp.ClientSession) -> None:
    """SECURITY: a session is its caller's only, wherever the request lands."""
    session_id = await initialize(http, pair.a.url, pair.alice)
    headers = session_headers(pair.bob, session_id)
    async with http.post(f"{pair.b.url}/mcp", json=call(2, "x"), headers=headers) as response:
        assert response.status == 404
    # Spoofing the hop's identity header on the public port changes nothing: only B's pipeline speaks.
    spoofed = {**headers, HEADER_IDENTITY: "alice", HEADER_HOP: "1.x.y", HEADER_SIGNATURE: "0" * 64}
    for url in (pair.a.url, pair.b.url):
        async with http.post(f"{url}/mcp", json=call(3, "x"), headers=spoofed) as response:
            assert response.status == 404
    # Alice's own request still works: the refusals ended nothing.
    async with http.post(
        f"{pair.b.url}/mcp", json=call(4, "still"), headers=session_headers(pair.alice, session_id)
    ) as response:
        assert response.status == 200


async def test_the_internal_listener_refuses_unsigned_forged_replayed_and_stale_hops(
    pair: Pair, http: aiohttp.ClientSession
) -> None:
    """SECURITY: the internal listener believes the identity a hop names, so only a valid hop gets in."""
    session_id = await initialize(http, pair.a.url, pair.alice)
    node_a, node_b = pair.node(pair.a), pair.node(pair.b)
    internal = f"http://{node_a.address}/mcp"
    body = json.dumps(call(2, "hop")).encode()
    client = session_headers(pair.alice, session_id)

    def signed(target: str = node_a.instance_id, signer: Node = node_b) -> dict[str, str]:
        alice_id = pair.a.app[SESSIONS].get(session_id).identity  # type: ignore[union-attr]
        return signer.signer.sign(
            "POST", "/mcp", target, identity=alice_id or "", request_id="t", client_headers=client, body=body
        )

    good = signed()
    refused: list[dict[str, str]] = [
        {k: v for k, v in client.items() if k != "Authorization"},  # no hop at all
        {**client, HEADER_IDENTITY: "k-alice"},  # an identity header alone
        {**good, HEADER_SIGNATURE: "0" * 64},  # forged
        {**good, HEADER_IDENTITY: "someone-else"},  # a signed hop with its identity changed
        {**good, "traceparent": f"00-{'1' * 32}-{'2' * 16}-01"},  # or a trace context slipped in
    ]
    stamp, _, rest = good[HEADER_HOP].partition(".")
    stale = {**good, HEADER_HOP: f"{int(stamp) - 120}.{rest}"}
    refused.append(stale)  # (its signature no longer matches either; the age check is tested below)
    for headers in refused:
        async with http.post(internal, data=body, headers=headers) as response:
            assert response.status == 401, headers
            assert await response.json() == {"error": "unauthenticated hop"}
    # A genuine hop meant for another instance (this one took over a dead owner's address): that
    # session is gone, so 404 and the client initializes again; nothing is done with it.
    async with http.post(internal, data=body, headers=signed(target=node_b.instance_id)) as response:
        assert response.status == 404
        assert "initialize" in (await response.json())["error"]
    async with http.post(internal, data=body + b" ", headers=good) as response:
        assert response.status == 401  # the body is signed too
    async with http.post(internal, data=body, headers=good) as response:
        assert response.status == 200
        assert (await response.json())["result"]["content"][0]["text"] == "hop"
    async with http.post(internal, data=body, headers=good) as response:
        assert response.status == 401  # the same hop again: replayed
    reasons = [
        line.get("reason") for line in audit_lines(pair.audit_a) if line["event"] == "cluster.hop_refused"
    ]
    assert {"unsigned", "bad signature", "meant for another instance", "replayed"} <= set(reasons)


async def test_a_relayed_call_is_one_trace_across_both_instances(
    start_gateway: StartGateway, tmp_path: Path, redis_url: str, http: aiohttp.ClientSession
) -> None:
    """The hop carries the relaying request's span context (signed): the owner's spans are its
    children, in the trace the client started, not a new trace."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from mcp_sse.ops.tracing import Tracing

    exporters, providers = [InMemorySpanExporter(), InMemorySpanExporter()], []
    for exporter in exporters:
        providers.append(TracerProvider())
        providers[-1].add_span_processor(SimpleSpanProcessor(exporter))
    try:
        pair = await start_pair(
            start_gateway, tmp_path, redis_url, tracing=(Tracing(providers[0]), Tracing(providers[1]))
        )
        session_id = await initialize(http, pair.a.url, pair.alice)
        trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
        headers = session_headers(pair.alice, session_id, traceparent=f"00-{trace_id}-{parent_id}-01")
        async with http.post(f"{pair.b.url}/mcp", json=call(2, "traced"), headers=headers) as response:
            assert response.status == 200, await response.text()
        at_b = [s for s in exporters[1].get_finished_spans() if s.name == "POST /mcp"]
        at_a = exporters[0].get_finished_spans()
        [relayed] = [s for s in at_b if format(s.context.trace_id, "032x") == trace_id]
        assert relayed.parent is not None and format(relayed.parent.span_id, "016x") == parent_id
        [hop] = [s for s in at_a if s.name == "POST /mcp" and format(s.context.trace_id, "032x") == trace_id]
        assert hop.parent is not None and hop.parent.span_id == relayed.context.span_id
        [mcp] = [s for s in at_a if s.name == "tools/call echo" and s.kind.name == "SERVER"]
        assert mcp.parent is not None and mcp.parent.span_id == hop.context.span_id
        [backend] = [s for s in at_a if s.name == "tools/call echo" and s.kind.name == "CLIENT"]
        assert backend.parent is not None and backend.parent.span_id == mcp.context.span_id
    finally:
        for provider in providers:
            provider.shutdown()


def test_a_stale_hop_is_refused_even_with_a_valid_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    from mcp_sse.cluster import hop

    signer = hop.Signer(b"k" * 32, "owner")
    headers = signer.sign("POST", "/mcp", "owner", identity="i", request_id="r", client_headers={}, body=b"")
    now = time.time()
    monkeypatch.setattr(hop.time, "time", lambda: now + hop.MAX_SKEW + 5)
    with pytest.raises(hop.HopError, match="expired"):
        signer.check("POST", "/mcp", headers, b"")
    other = hop.Signer(b"x" * 32, "owner")  # another cluster's secret
    with pytest.raises(hop.HopError, match="bad signature"):
        other.check("POST", "/mcp", headers, b"")


async def test_the_internal_listener_binds_only_where_configured(pair: Pair) -> None:
    """SECURITY: by default it listens on 127.0.0.1 only, and never on the public port's address."""
    node = pair.node(pair.a)
    host, _, port = node.address.rpartition(":")
    assert host == "127.0.0.1"
    assert int(port) != pair.a.server.port
    # Not reachable on another local address (127.0.0.2 is loopback, but not the one configured).
    with pytest.raises(OSError):
        _, writer = await asyncio.open_connection("127.0.0.2", int(port))
        writer.close()


async def test_an_owner_gone_is_404_and_its_record_is_removed(
    pair: Pair, http: aiohttp.ClientSession
) -> None:
    session_id = await initialize(http, pair.a.url, pair.alice)
    key = f"{PREFIX}session:{hashlib.sha256(session_id.encode()).hexdigest()}"
    node_b = pair.node(pair.b)
    # A dies without a word (its records stay until their TTL): its listener refuses connections.
    await pair.node(pair.a).redis.set(f"{PREFIX}instance:{pair.node(pair.a).instance_id}", "127.0.0.1:9")
    headers = session_headers(pair.alice, session_id)
    async with http.post(f"{pair.b.url}/mcp", json=call(2, "x"), headers=headers) as response:
        assert response.status == 404
        assert "initialize" in (await response.json())["error"]
    assert await node_b.redis.get(key) is None  # cleaned up
    # A session whose owner's liveness key is gone is 404 as well.
    other = await initialize(http, pair.a.url, pair.alice)
    await node_b.redis.delete(f"{PREFIX}instance:{pair.node(pair.a).instance_id}")
    async with http.post(
        f"{pair.b.url}/mcp", json=call(3, "x"), headers=session_headers(pair.alice, other)
    ) as r:
        assert r.status == 404


async def test_redis_stopped_fails_closed_then_recovers(
    start_gateway: StartGateway, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    server = RedisServer(tmp_path)
    server.start()
    try:
        pair = await start_pair(start_gateway, tmp_path, server.url(0))
        session_id = await initialize(http, pair.a.url, pair.alice)
        headers = session_headers(pair.alice, session_id)
        await asyncio.to_thread(server.stop)
        async with http.post(f"{pair.b.url}/mcp", json=call(2, "x"), headers=headers) as response:
            assert response.status == 503
            assert response.headers["Retry-After"]
            assert "shared state" in (await response.json())["error"]
        async with http.post(
            f"{pair.a.url}/mcp", json=init_message(), headers=bearer(pair.alice)
        ) as response:
            assert response.status == 503  # a new session cannot be recorded: refused, not left unowned
        refused = [line for line in audit_lines(pair.audit_b) if line["event"] == "cluster.unavailable"]
        assert len(refused) == 1  # one line for the outage, not one per request
        # The owner serves its own session all along: that needs no shared state.
        async with http.post(f"{pair.a.url}/mcp", json=call(3, "local"), headers=headers) as response:
            assert response.status == 200
        # Redis back, empty (no persistence): the heartbeat writes the records again, no restart.
        await asyncio.to_thread(server.start)
        async with asyncio.timeout(60):
            while True:
                async with http.post(f"{pair.b.url}/mcp", json=call(4, "back"), headers=headers) as response:
                    if response.status == 200:
                        assert (await response.json())["result"]["content"][0]["text"] == "back"
                        break
                await asyncio.sleep(0.2)
        async with asyncio.timeout(30):  # and the recovery is audited once it is seen
            while not any(line["event"] == "cluster.recovered" for line in audit_lines(pair.audit_b)):
                await asyncio.sleep(0.1)
    finally:
        server.stop()


def test_cluster_settings() -> None:
    from mcp_sse.settings import Settings, SettingsError

    loaded = Settings.load(environ={"CLUSTER_LISTEN": "[::1]:3101", "CLUSTER_ADVERTISE": "10.0.0.5:3101"})
    assert (loaded.cluster_listen, loaded.cluster_advertise) == (("::1", 3101), ("10.0.0.5", 3101))
    assert Settings.load(environ={}).cluster_listen == ("127.0.0.1", 0)
    for name, value, says in [
        ("CLUSTER_LISTEN", "3101", "host:port"),
        ("CLUSTER_ADVERTISE", "h:99999", "0-65535"),
        ("CLUSTER_SECRET", "short", "at least 32"),
    ]:
        with pytest.raises(SettingsError, match=says):
            Settings.load(environ={name: value})
    assert "s" * 40 not in repr(Settings.load(environ={"CLUSTER_SECRET": "s" * 40}))  # a Secret: masked


async def test_a_client_leaving_a_relayed_stream_lets_go_of_it_at_the_owner(
    pair: Pair, http: aiohttp.ClientSession
) -> None:
    session_id = await initialize(http, pair.a.url, pair.alice)
    session = pair.a.app[SESSIONS].get(session_id)
    assert session is not None
    async with http.get(f"{pair.b.url}/mcp", headers=session_headers(pair.alice, session_id)) as stream:
        await next_event(stream)  # the priming event: the owner is pumping it
        assert session.standalone.reader is not None
    async with asyncio.timeout(30):  # the hop is closed with it, so the owner's reader goes
        while session.standalone.reader is not None:
            await asyncio.sleep(0.02)
