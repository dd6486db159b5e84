"""sd_notify over real AF_UNIX datagram sockets, and a real server process under a fake systemd."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mcp_sse.ops import sd_notify

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The suite itself may run under systemd; never talk to the real manager.
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)


@contextlib.contextmanager
def listening(address: str) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    try:
        yield sock
    finally:
        sock.close()


def drain(sock: socket.socket) -> list[bytes]:
    messages = []
    sock.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            messages.append(sock.recv(4096))
    return messages


def test_notify_sends_one_datagram_to_a_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "notify")
    with listening(path) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert sd_notify.notify("READY=1", "STATUS=listening on http://127.0.0.1:1")
        assert sock.recv(4096) == b"READY=1\nSTATUS=listening on http://127.0.0.1:1"
        assert drain(sock) == []


def test_a_manager_that_stops_reading_never_blocks_the_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A blocking send would hang here, on the event loop, once the unread queue is full (the
    # suite's timeout would fail the test); each call must return, and say it was not sent.
    path = str(tmp_path / "notify")
    with listening(path) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        sent = [sd_notify.notify("WATCHDOG=1") for _ in range(20_000)]
        assert sent[0] is True
        assert sent.count(False) > 0  # the queue filled (net.unix.max_dgram_qlen) and we went on
        assert sent.index(False) == sent.count(True)  # sent until full, refused from then on
        received = drain(sock)
        assert len(received) == sent.count(True) and set(received) == {b"WATCHDOG=1"}
        assert sd_notify.notify("READY=1")  # read again: sent again


def test_notify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"mcp-sse-test-{secrets.token_hex(8)}"
    with listening("\0" + name) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sd_notify.notify("STOPPING=1")
        assert sock.recv(4096) == b"STOPPING=1"


@pytest.mark.parametrize("address", [None, "", "relative/path", "vsock:2:1234", "/nonexistent/notify"])
def test_notify_without_a_listener_is_false_and_quiet(
    address: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if address is not None:
        monkeypatch.setenv("NOTIFY_SOCKET", address)
    assert sd_notify.notify("READY=1") is False


def test_notify_never_raises_on_bad_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "notify")
    with listening(path) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert sd_notify.notify() is False  # nothing to say
        assert sd_notify.notify("STATUS=\udcff") is False  # not encodable
        assert drain(sock) == []


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 15.0),
        ("200000", "self", 0.1),
        ("30000000", "other", None),  # meant for another process
        (None, None, None),
        ("0", None, None),
        ("soon", None, None),
    ],
)
def test_watchdog_interval(
    usec: str | None, pid: str | None, expected: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() if pid == "self" else os.getpid() + 1))
    assert sd_notify.watchdog_interval() == expected


async def test_watchdog_loop_pings_until_cancelled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "notify")
    with listening(path) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        task = asyncio.create_task(sd_notify.watchdog_loop(0.02))
        pings: list[bytes] = []
        async with asyncio.timeout(30):  # two pings, however long they take to come
            while len(pings) < 2:
                pings += drain(sock)
                await asyncio.sleep(0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        pings += drain(sock)
        assert set(pings) == {b"WATCHDOG=1"}
        # A negative check: ten intervals in which a loop still running would have pinged again.
        await asyncio.sleep(0.2)
        assert drain(sock) == []  # stopped with the task


def test_monotonic_usec_is_clock_monotonic() -> None:
    # Python's monotonic() is CLOCK_MONOTONIC on Linux, the clock systemd compares MONOTONIC_USEC= with.
    before = time.monotonic()
    value = sd_notify.monotonic_usec()
    after = time.monotonic()
    assert before * 1e6 - 1 <= value <= after * 1e6 + 1


try:
    import mcp_sse.cli  # noqa: F401

    CLI_ERROR = ""
except ImportError as exc:
    CLI_ERROR = f"mcp_sse.cli cannot be imported yet: {exc}"


@pytest.mark.skipif(bool(CLI_ERROR), reason=CLI_ERROR)
def test_real_server_speaks_sd_notify(tmp_path: Path) -> None:
    """`python -m mcp_sse serve` as systemd starts it: READY=1, WATCHDOG=1, then STOPPING=1 on SIGTERM."""
    path = str(tmp_path / "notify")
    env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")}
    env.update(
        NOTIFY_SOCKET=path,
        WATCHDOG_USEC="200000",
        AUTH_TOKEN=secrets.token_urlsafe(32),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    with listening(path) as sock, open(tmp_path / "stderr.log", "wb") as stderr:
        sock.settimeout(0.25)  # short, to notice a server that died
        server = subprocess.Popen(
            [sys.executable, "-m", "mcp_sse", "serve", "--host", "127.0.0.1", "--port", "0"],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            seen: list[str] = []
            deadline = time.monotonic() + 20
            while not ({"READY=1", "WATCHDOG=1"} <= set(seen)) and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    seen += sock.recv(4096).decode().split("\n")
                assert server.poll() is None, (tmp_path / "stderr.log").read_text()
            assert "READY=1" in seen, (seen, (tmp_path / "stderr.log").read_text())
            assert "WATCHDOG=1" in seen, seen
            assert any(s.startswith("STATUS=") and "127.0.0.1" in s for s in seen), seen
            assert "listening on http://127.0.0.1:" in (tmp_path / "stderr.log").read_text()

            server.send_signal(signal.SIGTERM)
            assert server.wait(timeout=15) == 0, (tmp_path / "stderr.log").read_text()
            sock.settimeout(0.5)
            after: list[str] = []
            with contextlib.suppress(TimeoutError):
                while True:
                    after += sock.recv(4096).decode().split("\n")
            assert "STOPPING=1" in after
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
