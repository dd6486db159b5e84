"""The official MCP SDK client through a real gateway, over both transports."""

from __future__ import annotations

import pytest

from tests.conftest import SDK_SERVER, TIME_SERVER, StartGateway, mcp_client, text_of

TRANSPORTS = [("streamable", "legacy"), ("streamable", "auto"), ("sse", "legacy")]


@pytest.mark.parametrize(("transport", "mode"), TRANSPORTS)
async def test_embedded_default(start_gateway: StartGateway, transport: str, mode: str) -> None:
    gw = await start_gateway()
    async with mcp_client(gw.url, gw.token, transport=transport, mode=mode) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert set(tools) == {"echo", "server_time", "gateway_status"}
        assert tools["echo"].input_schema["required"] == ["text"]
        assert text_of(await client.call_tool("echo", {"text": "héllo"})) == "héllo"
        status = await client.call_tool("gateway_status", {})
        assert status.structured_content["backends"][0]["state"] == "running"


@pytest.mark.parametrize(("transport", "mode"), TRANSPORTS)
async def test_stdio_child_behind_both_routes(start_gateway: StartGateway, transport: str, mode: str) -> None:
    gw = await start_gateway({"test": SDK_SERVER})
    for url in (gw.url, f"{gw.url}/servers/test"):
        async with mcp_client(url, gw.token, transport=transport, mode=mode) as client:
            assert client.server_info.name == "sdk-test-server"
            assert text_of(await client.call_tool("add", {"a": 2, "b": 40})) == "42"
            resource = await client.read_resource("test://greeting")
            assert resource.contents[0].text == "hello from a resource"
            prompt = await client.get_prompt("summarize", {"topic": "MCP"})
            assert "Summarize MCP." in prompt.messages[0].content.text


async def test_third_party_child_mcp_server_time(start_gateway: StartGateway) -> None:
    gw = await start_gateway({"time": TIME_SERVER})
    async with mcp_client(gw.url, gw.token) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert "get_current_time" in names
        result = await client.call_tool("get_current_time", {"timezone": "Europe/Paris"})
        assert not result.is_error
        assert "Europe/Paris" in text_of(result)
    async with mcp_client(gw.url, gw.token, transport="sse") as client:
        result = await client.call_tool(
            "convert_time", {"source_timezone": "UTC", "time": "12:00", "target_timezone": "Asia/Tokyo"}
        )
        assert "21:00" in text_of(result)


async def test_legacy_and_modern_clients_share_one_child(start_gateway: StartGateway) -> None:
    gw = await start_gateway({"test": SDK_SERVER})
    async with (
        mcp_client(gw.url, gw.token, mode="auto") as modern,
        mcp_client(gw.url, gw.token, transport="sse", mode="legacy") as old,
    ):
        pid_modern = text_of(await modern.call_tool("pid", {}))
        pid_old = text_of(await old.call_tool("pid", {}))
        assert pid_modern == pid_old  # one shared child
        assert text_of(await old.call_tool("echo", {"text": "still works"})) == "still works"
    async with mcp_client(gw.url, gw.token, transport="sse", mode="legacy") as later:
        assert text_of(await later.call_tool("echo", {"text": "after"})) == "after"
