"""`python -m mcp_sse` is the same command line as server_secure.py."""

from .cli import main

raise SystemExit(main())
