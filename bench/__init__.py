"""Benchmarks of mcp-sse against peer gateways and the direct-stdio floor; run with `python -m bench`."""
