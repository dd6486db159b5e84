"""Several backends at the root: prefixed names, resources by URI, a crashed backend hidden and reported."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from mcp import MCPError, types

from mcp_sse.upstream import backend as backend_module
from tests.conftest import SDK_SERVER, SERVERS, TIME_SERVER, StartGateway, mcp_client, text_of
from tests.reliability.harness import wait_until

RAW_SERVER = {"command": sys.executable, "args": [str(SERVERS / "raw_server.py")]}
BROKEN = {"command": sys.executable, "args": ["-c", "import sys; sys.exit(1)"]}


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend_module, "BACKOFF_BASE", 0.01)


@pytest.mark.parametrize("transport", ["streamable", "sse"])
async def test_three_backends_one_crashed(start_gateway: StartGateway, transport: str) -> None:
    gw = await start_gateway({"a": SDK_SERVER, "time": TIME_SERVER, "broken": BROKEN})
    async with mcp_client(gw.url, gw.token, transport=transport) as client:
        tools = await client.list_tools()
        names = {t.name for t in tools.tools}
        assert {"a__echo", "a__add", "time__get_current_time", "time__convert_time"} <= names
        assert not any(n.startswith("broken__") for n in names)
        assert tools.meta is not None and tools.meta["io.github.mcp-sse/unavailable"] == ["broken"]
        assert text_of(await client.call_tool("a__echo", {"text": "via a"})) == "via a"
        now = await client.call_tool("time__get_current_time", {"timezone": "UTC"})
        assert "UTC" in text_of(now)
        with pytest.raises(MCPError, match="backend 'broken' is failed"):
            await client.call_tool("broken__anything", {})
        with pytest.raises(MCPError, match="unknown tool"):
            await client.call_tool("echo", {"text": "no prefix"})
        resource = await client.read_resource("test://greeting")
        assert resource.contents[0].text == "hello from a resource"
        prompt = await client.get_prompt("a__summarize", {"topic": "gateways"})
        assert "Summarize gateways." in prompt.messages[0].content.text
    async with aiohttp.ClientSession() as http:
        status = await (await http.get(gw.url + "/mcp/servers", headers=gw.headers)).json()
        states = {s["name"]: s["state"] for s in status["servers"]}
        assert states == {"a": "running", "time": "running", "broken": "failed"}


async def test_list_changed_from_any_backend_reaches_the_session(start_gateway: StartGateway) -> None:
    gw = await start_gateway({"raw": RAW_SERVER, "a": SDK_SERVER})
    seen: list[str] = []

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ServerNotification):
            seen.append(message.method)

    async with mcp_client(gw.url, gw.token, message_handler=on_message) as client:
        assert text_of(await client.call_tool("raw__touch", {})) == "touched"
        await wait_until(lambda: "notifications/tools/list_changed" in seen, 30)
    assert "notifications/tools/list_changed" in seen


async def test_separator_is_configurable(start_gateway: StartGateway) -> None:
    gw = await start_gateway({"a": SDK_SERVER, "b": SDK_SERVER}, tool_separator=".")
    async with mcp_client(gw.url, gw.token) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert {"a.echo", "b.echo"} <= names
        assert text_of(await client.call_tool("b.add", {"a": 1, "b": 1})) == "2"


async def test_resource_collisions_are_reported_at_startup(
    start_gateway: StartGateway, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.WARNING, logger="mcp_sse.upstream")
    gw = await start_gateway({"first": SDK_SERVER, "second": SDK_SERVER})
    async with mcp_client(gw.url, gw.token) as client:
        await client.list_tools()
        await wait_until(lambda: "test://greeting is offered by first, second" in caplog.text, 30)
    assert "test://greeting is offered by first, second; first serves it" in caplog.text
    await wait_until(lambda: "backend.resource_collision" in (tmp_path / "audit.log").read_text(), 30)
    assert "test://greeting" in (tmp_path / "audit.log").read_text()
