"""systemd's notify protocol (sd_notify(3)), spoken directly: one datagram per call, no dependency.

Under `Type=notify` the server says READY=1 once it listens, RELOADING=1 / READY=1 around a
SIGHUP reload, STOPPING=1 on shutdown, and WATCHDOG=1 every half `WatchdogSec=` from the event
loop, so a loop that is stuck stops the pings and systemd restarts the service. Outside
systemd ($NOTIFY_SOCKET unset) every call is a cheap no-op.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

__all__ = ["monotonic_usec", "notify", "watchdog_interval", "watchdog_loop"]


def notify(*states: str) -> bool:
    """Send `states` (e.g. "READY=1", "STATUS=...") as one message; False when not sent. Never raises."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not states or not address:
        return False
    if address[0] == "@":
        address = "\0" + address[1:]  # Linux abstract namespace
    elif address[0] != "/":
        return False  # vsock:... addresses (VMs) are not supported here
    try:
        payload = "\n".join(states).encode()
        # Non-blocking: a manager that stops reading (its queue full) must not stop our event loop.
        kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        with socket.socket(socket.AF_UNIX, kind) as sock:
            sock.connect(address)
            return sock.send(payload) == len(payload)
    # OSError: no listener, or its queue is full; ValueError: a NUL in the path, or unencodable text.
    except (OSError, ValueError):
        return False


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec=, as sd_watchdog_enabled(3) advises), or None."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if usec <= 0 or (pid is not None and pid != str(os.getpid())):
        return None  # meant for another process, e.g. the parent that exec'd us without clearing it
    return usec / 2 / 1e6


async def watchdog_loop(interval: float) -> None:
    """Ping the watchdog forever; cancel the task to stop. Runs on the event loop on purpose."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, for "MONOTONIC_USEC=" next to "RELOADING=1" (Type=notify-reload)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
