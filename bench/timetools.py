"""An in-process twin of the bench child's `get_current_time`, for `python -m bench saturation`'s
scale rows: with no child process, the gateway's own CPU is what the worker count divides."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

from mcp_sse.upstream.builtin import ToolSet

tools = ToolSet("time")


@tools.tool
def get_current_time(timezone: str) -> dict[str, str]:
    """The current time in an IANA timezone."""
    now = dt.datetime.now(ZoneInfo(timezone))
    return {"timezone": timezone, "datetime": now.isoformat(timespec="seconds")}
