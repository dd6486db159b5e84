"""Streamable HTTP on the wire, as the 2025-11-25 transport page specifies it."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from tests.conftest import (
    SDK_SERVER,
    Running,
    StartGateway,
    init_message,
    next_event,
    next_message,
    wait_for_dropped_stream,
)

ACCEPT = {"Accept": "application/json, text/event-stream"}


class Raw:
    """A hand-driven Streamable HTTP client, to check what the SDK would never send."""

    def __init__(self, http: aiohttp.ClientSession, gw: Running, path: str = "/mcp") -> None:
        self.http, self.gw, self.url = http, gw, gw.url + path
        self.session_id: str | None = None
        self.version = "2025-11-25"

    def headers(self, **extra: str) -> dict[str, str]:
        headers = {**self.gw.headers, **ACCEPT}
        if self.session_id:
            headers["Mcp-Session-Id"] = self.session_id
            headers["MCP-Protocol-Version"] = self.version
        return {**headers, **extra}

    async def initialize(self, version: str = "2025-11-25") -> dict[str, Any]:
        response = await self.http.post(self.url, json=init_message(version), headers=self.headers())
        assert response.status == 200
        assert response.content_type == "application/json"
        self.session_id = response.headers["Mcp-Session-Id"]
        self.version = version
        await self.post({"jsonrpc": "2.0", "method": "notifications/initialized"}, expect=202)
        return dict(await response.json())

    async def post(self, message: Any, *, expect: int = 200, **headers: str) -> aiohttp.ClientResponse:
        response = await self.http.post(
            self.url,
            data=json.dumps(message),
            headers=self.headers(**{"Content-Type": "application/json", **headers}),
        )
        assert response.status == expect, await response.text()
        return response


@pytest.fixture
async def http() -> Any:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_initialize_mints_an_unguessable_session_id(start_gateway: StartGateway, http: Any) -> None:
    gw = await start_gateway()
    raw = Raw(http, gw)
    result = await raw.initialize()
    assert result["result"]["protocolVersion"] == "2025-11-25"
    assert raw.session_id is not None and len(raw.session_id) >= 43  # 256 bits of base64url
    other = Raw(http, gw)
    await other.initialize()
    assert other.session_id != raw.session_id


@pytest.mark.parametrize("path", ["/mcp", "/mcp/", "/servers/mcp-sse/mcp", "/servers/mcp-sse/mcp/"])
async def test_both_spellings_served_without_redirect(
    start_gateway: StartGateway, http: Any, path: str
) -> None:
    gw = await start_gateway()
    raw = Raw(http, gw, path)
    await raw.initialize()
    response = await raw.post({"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
    assert len((await response.json())["result"]["tools"]) == 3
    assert not response.history  # no redirect was followed


async def test_session_errors(start_gateway: StartGateway, http: Any) -> None:
    gw = await start_gateway()
    raw = Raw(http, gw)
    await raw.initialize()
    call = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
    sid = raw.session_id
    raw.session_id = None
    await raw.post(call, expect=400)  # no session id
    await raw.post(call, expect=400, **{"Mcp-Session-Id": "not valid!"})
    await raw.post(call, expect=404, **{"Mcp-Session-Id": "B" * 43})  # unknown
    raw.session_id = sid
    delete = await http.delete(raw.url, headers=raw.headers())
    assert delete.status == 204
    await raw.post(call, expect=404)  # ended
    assert (await http.get(raw.url, headers=raw.headers(Accept="text/event-stream"))).status == 404
    assert (await http.delete(raw.url, headers=raw.headers())).status == 404


async def test_protocol_version_header(start_gateway: StartGateway, http: Any) -> None:
    gw = await start_gateway()
    raw = Raw(http, gw)
    await raw.initialize("2025-06-18")
    call = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
    await raw.post(call)  # matches
    bad = await raw.post(call, expect=400, **{"MCP-Protocol-Version": "1999-01-01"})
    error = (await bad.json())["error"]
    assert error["code"] == -32022 and "2025-11-25" in error["data"]["supported"]
    await raw.post(call, expect=400, **{"MCP-Protocol-Version": "2025-03-26"})  # not this session's
    headers = raw.headers(**{"Content-Type": "application/json"})
    del headers["MCP-Protocol-Version"]  # absent means 2025-03-26 and is accepted
    response = await http.post(raw.url, data=json.dumps(call), headers=headers)
    assert response.status == 200


async def test_discover_is_served_for_the_2026_era(start_gateway: StartGateway, http: Any) -> None:
    gw = await start_gateway()
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    probe = {"jsonrpc": "2.0", "id": 0, "method": "server/discover", "params": {"_meta": meta}}
    headers = {**gw.headers, **ACCEPT, "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "server/discover"}
    response = await http.post(gw.url + "/mcp", json=probe, headers=headers)
    assert response.status == 200 and "Mcp-Session-Id" not in response.headers
    result = (await response.json())["result"]
    assert {"2024-11-05", "2025-11-25", "2026-07-28"} <= set(result["supportedVersions"])
    assert result["resultType"] == "complete" and "tools" in result["capabilities"]


async def test_content_negotiation(start_gateway: StartGateway, http: Any) -> None:
    gw = await start_gateway()
    raw = Raw(http, gw)
    body = json.dumps(init_message())
    only_json = {**gw.headers, "Accept": "application/json", "Content-Type": "application/json"}
    assert (await http.post(raw.url, data=body, headers=only_json)).status == 406
    text = {**gw.headers, **ACCEPT, "Content-Type": "text/plain"}
    assert (await http.post(raw.url, data=body, headers=text)).status == 415
    await raw.initialize()
    assert (await http.get(raw.url, headers=raw.headers(Accept="application/json"))).status == 406
    assert (await http.put(raw.url, headers=raw.headers())).status == 405


async def test_notifications_and_responses_get_202(start_gateway: StartGateway, http: Any) -> None:
    gw = await start_gateway()
    raw = Raw(http, gw)
    await raw.initialize()
    await raw.post(
        {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 9}}, expect=202
    )
    await raw.post({"jsonrpc": "2.0", "id": "unknown", "result": {}}, expect=202)


async def test_bad_input_gets_jsonrpc_errors_and_the_session_survives(
    start_gateway: StartGateway, http: Any
) -> None:
    gw = await start_gateway(max_body=4096)
    raw = Raw(http, gw)
    await raw.initialize()
    for body, status in [
        ("{oops", 400),
        ("[]", 400),
        ('{"jsonrpc":"2.0"}', 400),
        ("x" * 5000, 413),
        ('{"jsonrpc":"2.0","id":{"a":1},"method":"ping"}', 400),
        ('[{"jsonrpc":"2.0","id":1,"method":"ping"}]', 400),
    ]:
        response = await http.post(
            raw.url, data=body, headers=raw.headers(**{"Content-Type": "application/json"})
        )
        assert response.status == status, body[:30]
    response = await raw.post(
        {
            "jsonrpc": "2.0",
            "id": 5,
            "method": "tools/call",
            "params": {"name": "echo", "arguments": {"text": "alive"}},
        }
    )
    assert (await response.json())["result"]["content"][0]["text"] == "alive"


async def test_batches_only_for_2025_03_26(start_gateway: StartGateway, http: Any) -> None:
    gw = await start_gateway()
    old = Raw(http, gw)
    await old.initialize("2025-03-26")
    batch = [
        {"jsonrpc": "2.0", "id": 1, "method": "ping"},
        {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": 1, "progress": 1}},
        {"jsonrpc": "2.0", "id": "two", "method": "tools/list"},
    ]
    replies = await (await old.post(batch)).json()
    assert [r["id"] for r in replies] == [1, "two"]
    assert len(replies[1]["result"]["tools"]) == 3
    new = Raw(http, gw)
    await new.initialize("2025-11-25")
    await new.post(batch, expect=400)


async def test_plain_answers_are_json_and_progress_upgrades_to_sse(
    start_gateway: StartGateway, http: Any
) -> None:
    gw = await start_gateway({"test": SDK_SERVER})
    raw = Raw(http, gw)
    await raw.initialize()
    plain = await raw.post(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": "echo", "arguments": {"text": "json"}},
        }
    )
    assert plain.content_type == "application/json"
    slow = {
        "jsonrpc": "2.0",
        "id": 2,
        "method": "tools/call",
        "params": {"name": "slow", "arguments": {"steps": 3}, "_meta": {"progressToken": "tok"}},
    }
    streamed = await raw.post(slow)
    assert streamed.content_type == "text/event-stream"
    priming = await next_event(streamed)
    assert priming.id is not None and priming.data == ""
    messages = [await next_message(streamed) for _ in range(4)]
    assert [m["params"]["progress"] for m in messages[:3]] == [1, 2, 3]
    assert all(m["params"]["progressToken"] == "tok" for m in messages[:3])
    assert messages[3]["id"] == 2 and messages[3]["result"]["content"][0]["text"] == "done 3"


async def test_resume_a_broken_request_stream_with_last_event_id(
    start_gateway: StartGateway, http: Any
) -> None:
    gw = await start_gateway({"test": SDK_SERVER})
    raw = Raw(http, gw)
    await raw.initialize()
    slow = {
        "jsonrpc": "2.0",
        "id": 3,
        "method": "tools/call",
        "params": {"name": "slow", "arguments": {"steps": 4, "delay": 0.2}, "_meta": {"progressToken": 1}},
    }
    streamed = await raw.post(slow)
    await next_event(streamed)  # priming
    first = await next_event(streamed)
    assert json.loads(first.data)["params"]["progress"] == 1
    streamed.close()  # the connection drops mid-request
    # The gateway let go of the stream and buffered what came since: the resume must replay it.
    assert raw.session_id is not None and first.id is not None
    await wait_for_dropped_stream(gw.app, raw.session_id, first.id)
    resumed = await http.get(
        raw.url, headers=raw.headers(Accept="text/event-stream", **{"Last-Event-ID": first.id})
    )
    assert resumed.status == 200
    rest = []
    while True:
        message = await next_message(resumed)
        rest.append(message)
        if "id" in message:
            break
    assert [m["params"]["progress"] for m in rest[:-1]] == [2, 3, 4]  # nothing lost, nothing repeated
    assert rest[-1]["result"]["content"][0]["text"] == "done 4"
    resumed.close()


async def test_get_stream_carries_server_initiated_messages(start_gateway: StartGateway, http: Any) -> None:
    gw = await start_gateway({"test": SDK_SERVER}, keepalive=0.3)
    raw = Raw(http, gw)
    await raw.initialize()
    stream = await http.get(raw.url, headers=raw.headers(Accept="text/event-stream"))
    assert stream.status == 200 and stream.headers["X-Accel-Buffering"] == "no"
    await next_event(stream)  # priming
    assert (await next_event(stream, timeout=2)).comment is not None  # keep-alive
    crash = await raw.post(
        {"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": "crash", "arguments": {}}}
    )
    assert (await crash.json())["error"]["code"] == -32603  # in flight when the child died
    # The restarted child may serve other tools: every session is told to list again.
    notice = await next_message(stream, timeout=15)
    assert notice["method"] == "notifications/tools/list_changed"
    stream.close()
