#!/usr/bin/env python3
"""Start mcp-sse with the secure profile: every protection on, fail-closed."""

from mcp_sse.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
