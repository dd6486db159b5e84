"""The 2026-07-28 era on the same /mcp endpoint, chosen per request, beside the 2025 era."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from typing import Any

import aiohttp
import pytest
from mcp import types

from tests.conftest import (
    SDK_SERVER,
    SERVERS,
    StartGateway,
    init_message,
    mcp_client,
    next_event,
    next_message,
    text_of,
)

RAW_SERVER = {"command": sys.executable, "args": [str(SERVERS / "raw_server.py")]}
MODERN = "2026-07-28"
META = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}


def modern_request(
    method: str,
    params: dict[str, Any] | None = None,
    request_id: int = 1,
    capabilities: dict[str, Any] | None = None,
) -> dict[str, Any]:
    meta = {**META, "io.modelcontextprotocol/clientCapabilities": capabilities or {}}
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": {**(params or {}), "_meta": meta}}


def modern_headers(token: str, method: str, name: str | None = None) -> dict[str, str]:
    headers = {
        "Authorization": f"Bearer {token}",
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": MODERN,
        "Mcp-Method": method,
    }
    if name is not None:
        headers["Mcp-Name"] = name
    return headers


@pytest.fixture
async def http() -> Any:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_both_eras_at_once_on_one_shared_child(start_gateway: StartGateway) -> None:
    gw = await start_gateway({"test": SDK_SERVER})
    async with (
        mcp_client(gw.url, gw.token, mode="auto") as modern,
        mcp_client(gw.url, gw.token, mode="legacy") as legacy,
        mcp_client(gw.url, gw.token, transport="sse") as old,
    ):
        assert modern.protocol_version == MODERN
        assert legacy.protocol_version == "2025-11-25" and old.protocol_version == "2025-11-25"
        pids = await asyncio.gather(*(c.call_tool("pid", {}) for c in (modern, legacy, old)))
        assert len({text_of(p) for p in pids}) == 1  # one shared child serves both eras
        calls = [
            c.call_tool("echo", {"text": f"{i}-{n}"})
            for i in range(5)
            for n, c in enumerate((modern, legacy, old))
        ]
        answers = [text_of(r) for r in await asyncio.gather(*calls)]
        assert answers == [f"{i}-{n}" for i in range(5) for n in range(3)]
    async with mcp_client(gw.url, gw.token, mode="legacy") as after:
        assert text_of(await after.call_tool("echo", {"text": "still"})) == "still"


async def test_sampling_travels_as_input_required_and_progress_streams(start_gateway: StartGateway) -> None:
    gw = await start_gateway({"test": SDK_SERVER})
    asked: list[str] = []

    async def sampler(context: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        asked.append(params.messages[0].content.text)
        return types.CreateMessageResult(
            role="assistant", content=types.TextContent(type="text", text="42"), model="m"
        )

    progress: list[float] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(value)

    async with mcp_client(gw.url, gw.token, mode="auto", sampling_callback=sampler) as client:
        assert client.protocol_version == MODERN
        assert text_of(await client.call_tool("ask_llm", {"question": "meaning?"})) == "42"
        assert (
            text_of(await client.call_tool("slow", {"steps": 3}, progress_callback=on_progress)) == "done 3"
        )
    assert asked == ["meaning?"]
    assert progress == [1, 2, 3]


async def test_no_session_is_minted_and_discover_says_who_we_are(
    start_gateway: StartGateway, http: Any
) -> None:
    gw = await start_gateway({"test": SDK_SERVER})
    response = await http.post(
        gw.url + "/mcp",
        json=modern_request("server/discover"),
        headers=modern_headers(gw.token, "server/discover"),
    )
    assert response.status == 200 and "Mcp-Session-Id" not in response.headers
    result = (await response.json())["result"]
    assert MODERN in result["supportedVersions"] and "2024-11-05" in result["supportedVersions"]
    assert result["_meta"]["io.modelcontextprotocol/serverInfo"]["name"] == "sdk-test-server"
    listed = await http.post(
        gw.url + "/mcp",
        json=modern_request("tools/list"),
        headers={**modern_headers(gw.token, "tools/list"), "Mcp-Session-Id": "x" * 43},
    )
    body = await listed.json()
    assert listed.status == 200 and body["result"]["resultType"] == "complete"  # a session id is ignored
    assert body["result"]["cacheScope"] == "private" and body["result"]["ttlMs"] == 0


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        ({"meta": {}}, 400, -32602),  # no envelope
        (
            {"headers": {"MCP-Protocol-Version": "2025-11-25"}},
            400,
            -32600,
        ),  # handshake-era POST without session
        ({"headers": {"Mcp-Method": "tools/list"}}, 400, -32020),
        ({"headers": {"Mcp-Name": "add"}}, 400, -32020),
        ({"headers": {"Mcp-Name": None}}, 400, -32020),
        ({"drop_name": True}, 400, -32020),  # Mcp-Name for a call whose body names no tool
        ({"meta_version": "2026-01-01"}, 400, -32020),  # header and body disagree
        ({"headers": {"MCP-Protocol-Version": "2099-01-01"}, "meta_version": "2099-01-01"}, 400, -32022),
        ({"method": "nope/nope"}, 404, -32601),
        ({"method": "initialize"}, 404, -32601),
    ],
)
async def test_envelope_and_routing_header_rules(
    start_gateway: StartGateway, http: Any, change: dict[str, Any], status: int, code: int
) -> None:
    gw = await start_gateway({"test": SDK_SERVER})
    method = change.get("method", "tools/call")
    message = modern_request(method, {"name": "echo", "arguments": {"text": "x"}})
    if "meta" in change:
        message["params"]["_meta"] = change["meta"]
    if change.get("drop_name"):
        del message["params"]["name"]
    if "meta_version" in change:
        message["params"]["_meta"] = {
            **META,
            "io.modelcontextprotocol/protocolVersion": change["meta_version"],
        }
    headers = modern_headers(gw.token, method, "echo")
    for key, value in change.get("headers", {}).items():
        if value is None:
            headers.pop(key)
        else:
            headers[key] = value
    response = await http.post(gw.url + "/mcp", json=message, headers=headers)
    assert response.status == status, await response.text()
    if code != -32600:
        assert (await response.json())["error"]["code"] == code


async def test_name_header_may_be_base64_encoded(start_gateway: StartGateway, http: Any) -> None:
    gw = await start_gateway({"test": SDK_SERVER})
    encoded = "=?base64?" + base64.b64encode(b"echo").decode() + "?="
    message = modern_request("tools/call", {"name": "echo", "arguments": {"text": "b64"}})
    response = await http.post(
        gw.url + "/mcp", json=message, headers=modern_headers(gw.token, "tools/call", encoded)
    )
    assert (await response.json())["result"]["content"][0]["text"] == "b64"


ROUTE_ARGUMENTS = {"region": "eu-west", "count": 42, "dry": False, "target": {"id": "résumé"}, "note": "n"}
ROUTE_HEADERS = {
    "Mcp-Param-Region": "eu-west",
    "mcp-param-count": "42",  # header names are case-insensitive
    "Mcp-Param-Dry": "false",
    "Mcp-Param-Id": "=?base64?" + base64.b64encode("résumé".encode()).decode() + "?=",  # not ASCII: base64
}


@pytest.mark.parametrize(
    ("arguments", "headers", "refusal"),
    [
        ({}, {}, None),
        ({"count": 42.0}, {"Mcp-Param-Count": "42.0"}, None),  # integers compare as numbers
        ({"region": "eu-west"}, {"Mcp-Param-Region": "us-east"}, "Mcp-Param-Region header does not match"),
        ({"count": 43}, {"Mcp-Param-Count": "42"}, "Mcp-Param-Count header does not match"),
        ({"dry": True}, {"Mcp-Param-Dry": "false"}, "Mcp-Param-Dry header does not match"),
        ({"target": {"id": "x"}}, {"Mcp-Param-Id": "y"}, "argument 'target.id'"),
        ({"region": None}, {"Mcp-Param-Region": "eu-west"}, "which the request does not carry"),
        ({}, {"Mcp-Param-Region": None}, "Mcp-Param-Region header is missing"),
        ({}, {"Mcp-Param-Id": "=?base64?not base64!?="}, "not valid base64"),
    ],
)
async def test_param_headers_must_agree_with_the_arguments(
    start_gateway: StartGateway,
    http: Any,
    arguments: dict[str, Any],
    headers: dict[str, str | None],
    refusal: str | None,
) -> None:
    # An edge that routes on Mcp-Param-Region while the tool runs with another region is the
    # confused deputy the rule prevents: the request that disagrees never reaches the backend.
    gw = await start_gateway({"raw": RAW_SERVER})
    sent = {**modern_headers(gw.token, "tools/call", "route"), **ROUTE_HEADERS}
    for name, value in headers.items():
        for existing in [k for k in sent if k.lower() == name.lower()]:
            del sent[existing]
        if value is not None:
            sent[name] = value
    call = modern_request("tools/call", {"name": "route", "arguments": {**ROUTE_ARGUMENTS, **arguments}})
    response = await http.post(gw.url + "/mcp", json=call, headers=sent)
    body = await response.json()
    if refusal is None:
        assert response.status == 200 and body["result"]["content"][0]["text"] == "touched", body
    else:
        assert response.status == 400 and body["error"]["code"] == -32020, body
        assert refusal in body["error"]["message"]


async def test_a_repeated_param_header_is_refused(start_gateway: StartGateway, http: Any) -> None:
    gw = await start_gateway({"raw": RAW_SERVER})
    headers = list({**modern_headers(gw.token, "tools/call", "route"), **ROUTE_HEADERS}.items())
    headers.append(("Mcp-Param-Region", "eu-west"))  # the same value twice: readers may still disagree
    call = modern_request("tools/call", {"name": "route", "arguments": ROUTE_ARGUMENTS})
    response = await http.post(gw.url + "/mcp", json=call, headers=headers)
    body = await response.json()
    assert response.status == 400 and body["error"]["code"] == -32020
    assert "more than once" in body["error"]["message"]


async def test_get_and_delete_without_a_legacy_session_are_405(
    start_gateway: StartGateway, http: Any
) -> None:
    gw = await start_gateway()
    for method in ("GET", "DELETE"):
        response = await http.request(method, gw.url + "/mcp", headers=modern_headers(gw.token, "x"))
        assert response.status == 405
        plain = await http.request(
            method,
            gw.url + "/mcp",
            headers={"Authorization": f"Bearer {gw.token}", "Accept": "text/event-stream"},
        )
        assert plain.status == 405


async def test_subscriptions_listen_forwards_what_was_asked(start_gateway: StartGateway, http: Any) -> None:
    gw = await start_gateway({"raw": RAW_SERVER})
    listen = modern_request(
        "subscriptions/listen",
        {
            "notifications": {
                "toolsListChanged": True,
                "promptsListChanged": True,
                "resourceSubscriptions": ["raw://thing"],
            }
        },
        77,
    )
    async with http.post(
        gw.url + "/mcp", json=listen, headers=modern_headers(gw.token, "subscriptions/listen")
    ) as s:
        assert s.status == 200 and s.content_type == "text/event-stream"
        ack = json.loads((await next_event(s)).data)
        assert ack["method"] == "notifications/subscriptions/acknowledged"
        assert ack["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"] == 77
        assert ack["params"]["notifications"] == {
            "toolsListChanged": True,
            "resourceSubscriptions": ["raw://thing"],
        }
        touch = modern_request("tools/call", {"name": "touch", "arguments": {}}, 2)
        await http.post(gw.url + "/mcp", json=touch, headers=modern_headers(gw.token, "tools/call", "touch"))
        got = [json.loads((await next_event(s)).data) for _ in range(2)]
        assert {m["method"] for m in got} == {
            "notifications/tools/list_changed",
            "notifications/resources/updated",
        }
        assert all(m["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"] == 77 for m in got)


async def test_notifications_are_acknowledged(start_gateway: StartGateway, http: Any) -> None:
    gw = await start_gateway()
    note = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}}
    response = await http.post(
        gw.url + "/mcp", json=note, headers=modern_headers(gw.token, "notifications/cancelled")
    )
    assert response.status == 202


async def test_listen_streams_and_parked_calls_count_toward_max_sessions(
    start_gateway: StartGateway, http: Any
) -> None:
    # Neither is a session, but each holds memory (a parked call also a child's request, with no
    # connection open) for as long as the client likes: MAX_SESSIONS bounds them as it bounds sessions.
    gw = await start_gateway({"test": SDK_SERVER}, max_sessions=1)
    url = gw.url + "/mcp"
    legacy = {**gw.headers, "Accept": "application/json, text/event-stream"}

    async def initialize() -> int:
        response = await http.post(url, json=init_message(), headers=legacy)
        if response.status == 200:  # give the place back
            await http.delete(url, headers={**legacy, "Mcp-Session-Id": response.headers["Mcp-Session-Id"]})
        return response.status

    async def free_again() -> None:
        async with asyncio.timeout(60):
            while await initialize() != 200:
                await asyncio.sleep(0.02)

    listen = modern_request("subscriptions/listen", {"notifications": {"toolsListChanged": True}})
    ask = modern_request(
        "tools/call",
        {"name": "ask_llm", "arguments": {"question": "meaning?"}},
        capabilities={"sampling": {}},
    )
    ask_headers = modern_headers(gw.token, "tools/call", "ask_llm")

    async def refused(response: aiohttp.ClientResponse) -> bool:
        body = await response.json()
        return (
            response.status == 503 and response.headers["Retry-After"] == "5" and "too many" in body["error"]
        )

    async with http.post(url, json=listen, headers=modern_headers(gw.token, "subscriptions/listen")) as held:
        assert (await next_message(held))["method"] == "notifications/subscriptions/acknowledged"
        assert await initialize() == 503
        assert await refused(
            await http.post(url, json=listen, headers=modern_headers(gw.token, "subscriptions/listen"))
        )
        assert await refused(await http.post(url, json=ask, headers=ask_headers))
    await free_again()  # the listen stream ended with its connection

    parked = await (await http.post(url, json=ask, headers=ask_headers)).json()
    assert parked["result"]["resultType"] == "input_required"
    assert await initialize() == 503
    assert await refused(
        await http.post(url, json=listen, headers=modern_headers(gw.token, "subscriptions/listen"))
    )
    [(request_id, _)] = parked["result"]["inputRequests"].items()
    answer = {"role": "assistant", "content": {"type": "text", "text": "42"}, "model": "m"}
    retry = {
        **ask,
        "params": {
            **ask["params"],
            "requestState": parked["result"]["requestState"],
            "inputResponses": {request_id: answer},
        },
    }
    done = await (await http.post(url, json=retry, headers=ask_headers)).json()
    assert done["result"]["content"][0]["text"] == "42"
    await free_again()  # the call is over: its place is free
