"""A real third-party client against the built-in authorization server: mcp-remote (npm, pinned in
tests/oauth/clients) given the gateway's /mcp URL and no --header. It finds the authorization
server itself (the 401's RFC 9728 challenge, the metadata documents), registers dynamically, opens
the authorization URL in BROWSER -- tests/oauth/mcp_remote_browser.py, which signs in with the
key and approves on the consent page over HTTP as a person's browser would, then follows the
redirect to mcp-remote's loopback callback -- exchanges the code, and then proxies MCP over its
stdio. Then a second real client, the MCP Inspector's CLI, lists the tools with the access token
mcp-remote obtained in --header. A real gateway process (server_secure.py configured by
environment); everything on 127.0.0.1; the clients' state in tmp_path, never in ~/.mcp-auth or
~/.mcp-inspector. (The Inspector 2.12.0 declares node >= 22.19; it runs on node 20 here.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import unused_port

from tests.conftest import Launched, launch

from .as_helpers import oauth_process
from .helpers import ensure_installed, node_or_skip

REPO = Path(__file__).resolve().parents[2]
CLIENTS_DIR = Path(__file__).parent / "clients"
MCP_REMOTE_VERSION = "0.15.1"  # the pins in clients/package.json
INSPECTOR_VERSION = "2.12.0"
BROWSER_SCRIPT = Path(__file__).parent / "mcp_remote_browser.py"
WAIT = 90  # seconds: the whole flow, npx's start included, on a slow CI machine


@pytest.fixture
async def npx() -> str:
    node_or_skip(f"mcp-remote {MCP_REMOTE_VERSION} (tests/oauth/clients)")
    await asyncio.to_thread(ensure_installed, CLIENTS_DIR, "mcp-remote", MCP_REMOTE_VERSION)
    await asyncio.to_thread(
        ensure_installed, CLIENTS_DIR, "@modelcontextprotocol/inspector", INSPECTOR_VERSION
    )
    found = shutil.which("npx")
    if found is None:
        raise AssertionError("node is here but npx is not: cannot run mcp-remote")
    return found


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[tuple[Launched, str]]:
    """server_secure.py with the built-in authorization server, configured by environment only."""
    process = oauth_process(tmp_path)
    admin, env, argv = process.admin, process.env, process.argv
    running = await launch(argv, env=env, cwd=tmp_path)
    try:
        yield running, admin
    finally:
        code = await running.stop()
        assert code == 0, running.stderr


@dataclass
class Stdio:
    """mcp-remote's stdio: newline-delimited JSON-RPC in and out; its stderr kept for failures."""

    process: asyncio.subprocess.Process
    stderr: list[str] = field(default_factory=list)
    notes: list[dict[str, Any]] = field(default_factory=list)

    async def send(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message).encode() + b"\n")
        await self.process.stdin.drain()

    async def request(self, request_id: int, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """Send a request; the response with its id (notifications and requests in between kept)."""
        await self.send({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
        assert self.process.stdout is not None
        while True:
            raw = await self.process.stdout.readline()
            if not raw:
                raise AssertionError(
                    f"mcp-remote closed its stdout (exit {self.process.returncode}) before answering "
                    f"{method}:\n" + "\n".join(self.stderr)
                )
            message: dict[str, Any] = json.loads(raw)
            if message.get("id") == request_id and "method" not in message:
                return message
            self.notes.append(message)


@asynccontextmanager
async def mcp_remote(npx: str, argv: list[str], env: dict[str, str]) -> AsyncIterator[Stdio]:
    process = await asyncio.create_subprocess_exec(
        npx,
        "--no",  # never fetch: run the mcp-remote that clients/package-lock.json pins
        "mcp-remote",
        *argv,
        cwd=CLIENTS_DIR,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # its own process group: npx, node, xdg-open and our browser
    )
    stdio = Stdio(process)

    async def drain() -> None:
        assert process.stderr is not None
        while raw := await process.stderr.readline():
            stdio.stderr.append(raw.decode(errors="replace").rstrip("\n"))

    reader = asyncio.create_task(drain())
    try:
        yield stdio
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(15):
                await process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # anything of the group still left
        async with asyncio.timeout(15):
            await reader


async def test_mcp_remote_signs_in_through_the_built_in_server_and_proxies_mcp(
    npx: str, gateway: tuple[Launched, str], tmp_path: Path
) -> None:
    server, admin = gateway
    url = server.url
    assert url.startswith("http://127.0.0.1:")
    callback_port = unused_port()
    config_dir = tmp_path / "mcp-auth"
    browser_log = tmp_path / "browser.jsonl"
    browser = tmp_path / "browser"  # xdg-open runs `$BROWSER <url>`: one word, so a wrapper
    browser.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{BROWSER_SCRIPT}" "$@"\n')
    browser.chmod(0o700)
    home = tmp_path / "home"
    home.mkdir()
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),  # and no DISPLAY, no XDG_CURRENT_DESKTOP: xdg-open's generic path, $BROWSER
        "BROWSER": str(browser),
        "MCP_REMOTE_CONFIG_DIR": str(config_dir),
        "MCP_SSE_SIGN_IN_KEY": admin,
        "MCP_SSE_PUBLIC_URL": url,
        "MCP_SSE_BROWSER_LOG": str(browser_log),
    }
    argv = [f"{url}/mcp", str(callback_port), "--allow-http", "--host", "127.0.0.1", "--debug"]

    def story(stdio: Stdio) -> str:
        debug = "\n".join(p.read_text() for p in config_dir.rglob("*_debug.log"))
        opened = browser_log.read_text() if browser_log.exists() else "(the browser never ran)"
        return (
            "mcp-remote stderr:\n"
            + "\n".join(stdio.stderr)
            + "\n\nbrowser:\n"
            + opened
            + "\n\ndebug log:\n"
            + debug[-6000:]
            + "\n\ngateway stderr:\n"
            + server.stderr[-4000:]
        )

    async with mcp_remote(npx, argv, env) as stdio:
        try:
            async with asyncio.timeout(WAIT):
                init = await stdio.request(
                    1,
                    "initialize",
                    {
                        "protocolVersion": "2025-11-25",
                        "capabilities": {},
                        "clientInfo": {"name": "mcp-remote test", "version": "0"},
                    },
                )
                assert "result" in init, init
                await stdio.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
                listed = await stdio.request(2, "tools/list", {})
                names = [tool["name"] for tool in listed["result"]["tools"]]
                assert "echo" in names, listed
                called = await stdio.request(
                    3, "tools/call", {"name": "echo", "arguments": {"text": "hello"}}
                )
                assert called["result"]["content"][0]["text"] == "hello", called
        except BaseException as error:
            raise AssertionError(f"{error!r}\n\n{story(stdio)}") from error

    # The browser was opened once, on our authorization endpoint, and mcp-remote's callback took it.
    opened = [json.loads(line) for line in browser_log.read_text().splitlines()]
    assert len(opened) == 1, opened
    assert opened[0]["callback_status"] == 200, opened
    assert opened[0]["redirect_uri"] == f"http://127.0.0.1:{callback_port}/oauth/callback"
    assert opened[0]["resource"] == f"{url}/mcp"

    # Its state stayed in tmp_path; the tokens it holds are the gateway's.
    (tokens_file,) = config_dir.rglob("*_tokens.json")
    tokens = json.loads(tokens_file.read_text())
    assert tokens["token_type"].lower() == "bearer"
    assert not (home / ".mcp-auth").exists()
    audit = Audit(tmp_path / "audit.log")
    assert {"oauth.register", "oauth.authorize", "oauth.token"} <= audit.events(), audit.events()
    # ... and the call was made as the OAuth identity the token carries, not with the key.
    (invoked,) = audit.lines("tool.invoked")
    assert invoked["identity"].startswith("oauth-"), invoked
    identity = invoked["identity"]

    # Another real client with the token mcp-remote obtained: the MCP Inspector's CLI.
    listed_again = await inspector_tools_list(npx, f"{url}/mcp", tokens["access_token"], home, tmp_path)
    assert "echo" in [tool["name"] for tool in listed_again["result"]["tools"]], listed_again
    audit = Audit(tmp_path / "audit.log")
    sessions = {line["client"]: line["identity"] for line in audit.lines("mcp.session.open")}
    assert sessions.get("inspector-cli") == identity, sessions  # its session: the same grant's identity
    assert len(audit.lines("oauth.register")) == len(audit.lines("oauth.token")) == 1  # no flow of its own

    # No token and no key in the audit log.
    for secret in (tokens["access_token"], tokens.get("refresh_token"), admin):
        if secret:
            assert secret not in audit.text


class Audit:
    def __init__(self, path: Path) -> None:
        self.text = path.read_text()
        self.all = [json.loads(line) for line in self.text.splitlines() if line.strip()]

    def events(self) -> set[str]:
        return {line["event"] for line in self.all}

    def lines(self, event: str) -> list[dict[str, Any]]:
        return [line for line in self.all if line["event"] == event]


async def inspector_tools_list(npx: str, url: str, token: str, home: Path, tmp_path: Path) -> dict[str, Any]:
    """`mcp-inspector --cli <url> --method tools/list` with the token in --header and its own
    OAuth kept off (--stored-auth-only); its catalog, config and secrets under tmp_path."""
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "MCP_CATALOG_PATH": str(tmp_path / "inspector" / "mcp.json"),
        "MCP_CLIENT_CONFIG_PATH": str(tmp_path / "inspector" / "client.json"),
    }
    argv = [url, "--transport", "http", "--header", f"Authorization: Bearer {token}", "--stored-auth-only"]
    process = await asyncio.create_subprocess_exec(
        npx,
        "--no",
        "--",  # else npx takes --cli and --help as its own
        "mcp-inspector",
        "--cli",
        *argv,
        "--method",
        "tools/list",
        "--format",
        "json",
        cwd=CLIENTS_DIR,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        async with asyncio.timeout(WAIT):
            out, err = await process.communicate()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
    if process.returncode != 0:
        raise AssertionError(f"the Inspector exited {process.returncode}:\n{out.decode()}\n{err.decode()}")
    result: dict[str, Any] = json.loads(out)
    return result
