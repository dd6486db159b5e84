"""The embedded default server: served when no servers file is given, so a first run does something real."""

from __future__ import annotations

import datetime as dt
import platform
import time
from collections.abc import Callable
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .. import __version__
from .builtin import ToolSet

__all__ = ["default_toolset"]


def default_toolset(status: Callable[[], dict[str, Any]]) -> ToolSet:
    tools = ToolSet(
        "mcp-sse",
        instructions="The mcp-sse embedded server: echo, server_time and gateway_status.",
    )
    started = time.monotonic()

    @tools.tool
    def echo(text: str) -> str:
        """Return the text unchanged; proves the round trip works."""
        return text

    @tools.tool
    def server_time(timezone: str = "UTC") -> dict[str, Any]:
        """The gateway host's current time in an IANA time zone (for example Europe/Paris)."""
        try:
            zone = ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {timezone[:64]!r}") from None
        now = dt.datetime.now(zone)
        return {
            "timezone": timezone,
            "datetime": now.isoformat(timespec="seconds"),
            "unix": int(now.timestamp()),
        }

    @tools.tool
    def gateway_status() -> dict[str, Any]:
        """Version, uptime and backend states of this gateway."""
        return {
            "version": __version__,
            "python": platform.python_version(),
            "uptime_seconds": round(time.monotonic() - started, 1),
            **status(),
        }

    return tools
