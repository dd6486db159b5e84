"""upstream layer of mcp-sse (see ARCHITECTURE in the README)."""
