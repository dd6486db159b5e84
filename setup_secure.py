#!/usr/bin/env python3
"""Write the secure profile's .env (mode 0600): interactive, or --non-interactive with flags. See --help."""

from mcp_sse.setup_env import main

if __name__ == "__main__":
    raise SystemExit(main())
