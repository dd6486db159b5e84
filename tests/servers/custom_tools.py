"""In-process tools for tests, served from a servers-file "module" entry."""

from __future__ import annotations

from typing import Literal

from mcp_sse.upstream.builtin import ToolSet

tools = ToolSet("custom", instructions="Python tools served in-process.")


@tools.tool
def scale(
    values: list[int], factor: float = 2.0, mode: Literal["up", "down"] = "up", note: str | None = None
) -> dict:
    """Multiply (or divide) every value by a factor."""
    result = [v * factor if mode == "up" else v / factor for v in values]
    return {"result": result, "note": note}


@tools.tool(name="async_greet")
async def greet(name: str) -> str:
    """Greet someone, asynchronously."""
    return f"hello {name}"
