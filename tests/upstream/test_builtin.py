"""In-process tools: the schema comes from type hints, arguments are checked, and a servers-file
"module" entry serves a ToolSet beside child processes."""

from __future__ import annotations

from typing import Any, Literal

import pytest
from mcp import MCPError

from mcp_sse.upstream.builtin import Tool, ToolSet
from tests.conftest import SDK_SERVER, StartGateway, mcp_client, text_of

CUSTOM = {"module": "tests.servers.custom_tools:tools"}


def test_schema_is_derived_from_type_hints() -> None:
    def f(
        values: list[int], factor: float = 2.0, mode: Literal["up", "down"] = "up", note: str | None = None
    ) -> Any:
        """Do it.

        More text that is not the description."""

    tool = Tool.from_function(f)
    assert tool.description == "Do it."
    assert tool.input_schema == {
        "type": "object",
        "properties": {
            "values": {"type": "array", "items": {"type": "integer"}},
            "factor": {"type": "number", "default": 2.0},
            "mode": {"enum": ["up", "down"], "default": "up"},
            "note": {"type": "string"},
        },
        "required": ["values"],
    }
    assert (
        tool.check({"values": [1, "2"]})
        == 'argument \'values\' does not match its schema {"type": "array", "items": {"type": "integer"}}'
    )
    assert tool.check({}) == "missing required argument 'values'"
    assert tool.check({"values": [], "extra": 1}) == "unknown argument 'extra'"


def test_unsupported_signatures_are_refused_at_registration() -> None:
    tools = ToolSet("t")
    with pytest.raises(TypeError, match="kwargs"):
        tools.tool(lambda **kwargs: None)
    tools.tool(lambda x: x, name="same")
    with pytest.raises(ValueError, match="already registered"):
        tools.tool(lambda x: x, name="same")


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_module_tools_served_beside_a_child(start_gateway: StartGateway, mode: str) -> None:
    gw = await start_gateway({"custom": CUSTOM, "sdk": SDK_SERVER})
    async with mcp_client(gw.url, gw.token, mode=mode) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert tools["custom__scale"].input_schema["properties"]["mode"] == {
            "enum": ["up", "down"],
            "default": "up",
        }
        result = await client.call_tool("custom__scale", {"values": [1, 2], "factor": 3})
        assert result.structured_content == {"result": [3, 6], "note": None}
        assert text_of(await client.call_tool("custom__async_greet", {"name": "Ada"})) == "hello Ada"
        with pytest.raises(MCPError, match="values"):
            await client.call_tool("custom__scale", {"values": "not a list"})
        assert text_of(await client.call_tool("sdk__echo", {"text": "child"})) == "child"
    async with mcp_client(gw.url + "/servers/custom", gw.token) as direct:
        assert text_of(await direct.call_tool("async_greet", {"name": "Bo"})) == "hello Bo"
