"""mcp-sse: serve MCP servers over SSE and Streamable HTTP, securely, on aiohttp."""

__version__ = "0.1.0"
__all__ = ["__version__"]
