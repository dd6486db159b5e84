"""SIGHUP reloads the servers file: a real `python server_secure.py`, real children, SDK clients.

Every wait is for an event (the reload's audit line, a pid gone, a marker file), never for a time.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import unused_port
from cryptography.fernet import Fernet
from mcp import MCPError, types

from mcp_sse.security.keys import generate_key
from mcp_sse.upstream.config import ServerSpec
from mcp_sse.upstream.reload import Plan, plan
from tests.conftest import (
    SDK_SERVER,
    SERVERS,
    TIME_SERVER,
    Launched,
    launch,
    mcp_client,
    next_event,
    text_of,
    wait_for_text,
)
from tests.interop.test_modern import modern_headers, modern_request

REPO = Path(__file__).resolve().parents[2]
SCRIPT = str(REPO / "server_secure.py")
CUSTOM = {"module": "tests.servers.custom_tools:tools"}
RAW_SERVER = {"command": sys.executable, "args": [str(SERVERS / "raw_server.py")]}


def sdk(variant: str = "") -> dict[str, Any]:
    """sdk_server.py; a different `variant` is a changed entry (the server ignores the argument)."""
    entry = dict(SDK_SERVER)
    if variant:
        entry["args"] = [*entry["args"], f"--variant={variant}"]
    return entry


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def gone(pid: int, timeout: float = 60) -> None:
    async with asyncio.timeout(timeout):
        while alive(pid):
            await asyncio.sleep(0.05)


@dataclass
class Gateway:
    server: Launched
    servers_file: Path
    audit: Path
    token: str
    """The admin key: every backend."""
    limited: str
    """A key for the `time` backend only."""
    reloads: int = 0

    @property
    def url(self) -> str:
        return self.server.url

    async def logged(self, text: str) -> None:
        async with asyncio.timeout(60):
            while text not in self.server.stderr:
                await asyncio.sleep(0.05)

    def write(self, servers: dict[str, Any] | str) -> None:
        text = servers if isinstance(servers, str) else json.dumps({"mcpServers": servers})
        self.servers_file.write_text(text)

    def reload_events(self) -> list[dict[str, Any]]:
        # Only whole lines: the file may be read while a line is being written.
        lines = self.audit.read_text().split("\n")[:-1] if self.audit.exists() else []
        return [e for e in map(json.loads, lines) if e["event"] == "servers.reload"]

    async def reload(self, servers: dict[str, Any] | str) -> dict[str, Any]:
        """Write the servers file, SIGHUP, and wait for this reload's audit line."""
        self.write(servers)
        self.reloads += 1
        self.server.process.send_signal(signal.SIGHUP)
        async with asyncio.timeout(90):
            while len(events := self.reload_events()) < self.reloads:
                await asyncio.sleep(0.05)
        return events[-1]

    async def get(self, path: str, token: str | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token or self.token}"}
        async with aiohttp.ClientSession(headers=headers) as http, http.get(self.url + path) as response:
            body = await response.json() if response.content_type == "application/json" else None
            return response.status, body

    async def servers(self) -> dict[str, dict[str, Any]]:
        status, body = await self.get("/mcp/servers")
        assert status == 200
        return {s["name"]: s for s in body["servers"]}

    async def running(self) -> None:
        async with asyncio.timeout(60):
            while any(s["state"] != "running" for s in (await self.servers()).values()):
                await asyncio.sleep(0.05)

    async def initialize(self, prefix: str, token: str | None = None) -> int:
        """The HTTP status of an initialize POSTed to `prefix`/mcp."""
        message = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t"}},
        }
        headers = {
            "Authorization": f"Bearer {token or self.token}",
            "Accept": "application/json, text/event-stream",
        }
        async with (
            aiohttp.ClientSession(headers=headers) as http,
            http.post(f"{self.url}{prefix}/mcp", json=message) as response,
        ):
            return response.status


Start = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Start]:
    started: list[Gateway] = []

    async def start(servers: dict[str, Any], port: int = 0, **settings: str) -> Gateway:
        admin, admin_entry = generate_key("admin", "operator")
        limited, limited_entry = generate_key("timer", "operator")
        keys = tmp_path / "keys.json"
        keys.write_text(json.dumps({"keys": [admin_entry, {**limited_entry, "backends": ["time"]}]}))
        (tmp_path / "empty.env").write_text("")
        servers_file = tmp_path / "servers.json"
        servers_file.write_text(json.dumps({"mcpServers": servers}))
        keep = ("PATH", "LANG", "PYTHONPATH", "VIRTUAL_ENV")
        env = {
            **{k: v for k, v in os.environ.items() if k in keep},
            "HOME": str(tmp_path),
            "KEYS_FILE": str(keys),
            "AUDIT_LOG": str(tmp_path / "audit.log"),
            "RATE_LIMIT_MAX_REQUESTS": "100000",  # the polling is not what is tested
            "KEY_RATE_LIMIT_MAX_REQUESTS": "100000",
            **settings,
        }
        argv = [sys.executable, SCRIPT, "--host", "127.0.0.1", "--port", str(port)]
        argv += ["--config", str(servers_file), "--env-file", str(tmp_path / "empty.env")]
        server = await launch(argv, env=env, cwd=REPO)
        gateway = Gateway(server, servers_file, tmp_path / "audit.log", admin, limited)
        started.append(gateway)
        await gateway.running()
        return gateway

    yield start
    for gateway in started:
        code = await gateway.server.stop()
        assert code == 0, gateway.server.stderr
        assert "Traceback" not in gateway.server.stderr, gateway.server.stderr


def changes(event: dict[str, Any]) -> tuple[str, str, str, str]:
    """A servers.reload audit line's outcome, and the names it added, removed and changed."""
    return event["outcome"], event["added"], event["removed"], event["changed"]


def test_plan_compares_specs_by_value() -> None:
    old = {n: ServerSpec(n, "x", ("1",), {"K": "v"}) for n in ("same", "args", "env", "gone")}
    new = [
        ServerSpec("same", "x", ("1",), {"K": "v"}),  # an equal spec built again: unchanged
        ServerSpec("args", "x", ("2",), {"K": "v"}),
        ServerSpec("env", "x", ("1",), {"K": "w"}),
        ServerSpec("new", "x"),
    ]
    assert plan(old, new) == Plan(
        added=(new[3],), removed=("gone",), changed=(new[1], new[2]), unchanged=("same",)
    )
    assert plan(old, new).to_build == (new[1], new[2], new[3])


def tool_names(result: types.ListToolsResult) -> set[str]:
    return {tool.name for tool in result.tools}


async def test_an_added_backend_is_served_at_once_and_the_aggregate_lists_it(start: Start) -> None:
    gw = await start({"sdk": sdk(), "custom": CUSTOM})
    notified: list[str] = []

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ServerNotification):
            notified.append(message.method)

    assert await gw.initialize("/servers/time") == 404
    async with mcp_client(gw.url, gw.token, message_handler=on_message) as root:
        assert "time__get_current_time" not in tool_names(await root.list_tools())
        event = await gw.reload({"sdk": sdk(), "custom": CUSTOM, "time": TIME_SERVER})
        assert changes(event) == ("ok", "time", "", "")
        async with mcp_client(f"{gw.url}/servers/time", gw.token) as time_client:
            assert "get_current_time" in tool_names(await time_client.list_tools())
            now = await time_client.call_tool("get_current_time", {"timezone": "UTC"})
            assert "UTC" in text_of(now)
        # The session opened before the reload: told to relist, and it lists the new tools.
        async with asyncio.timeout(30):
            while "notifications/tools/list_changed" not in notified:
                await asyncio.sleep(0.05)
        assert {"time__get_current_time", "sdk__echo", "custom__scale"} <= tool_names(await root.list_tools())
        now = await root.call_tool("time__get_current_time", {"timezone": "UTC"})
        assert "UTC" in text_of(now)
    # Per-key backend lists hold for the new routes: a key for `time` may use it, not the aggregate.
    assert await gw.initialize("/servers/time", gw.limited) == 200
    assert await gw.initialize("/servers/sdk", gw.limited) == 403
    assert await gw.initialize("", gw.limited) == 403


async def test_a_removed_backend_404s_its_child_stops_and_other_sessions_go_on(start: Start) -> None:
    gw = await start({"sdk": sdk(), "other": sdk("other"), "custom": CUSTOM})
    pid = (await gw.servers())["sdk"]["pid"]
    async with (
        mcp_client(gw.url, gw.token) as root,
        mcp_client(f"{gw.url}/servers/other", gw.token, transport="sse") as other,
        mcp_client(f"{gw.url}/servers/custom", gw.token) as custom,
    ):
        other_pid = text_of(await other.call_tool("pid", {}))
        assert text_of(await root.call_tool("sdk__echo", {"text": "before"})) == "before"
        event = await gw.reload({"other": sdk("other"), "custom": CUSTOM})
        assert changes(event) == ("ok", "", "sdk", "")
        assert await gw.initialize("/servers/sdk") == 404
        assert (await gw.get("/servers/sdk/sse"))[0] == 404
        assert "sdk" not in await gw.servers()
        await gone(pid)
        # The sessions opened before the reload, the same ones, still work.
        assert text_of(await other.call_tool("pid", {})) == other_pid
        scaled = await custom.call_tool("scale", {"values": [1, 2]})
        assert json.loads(text_of(scaled))["result"] == [2, 4]
        names = tool_names(await root.list_tools())
        assert "other__echo" in names and not any(n.startswith("sdk__") for n in names)
        assert text_of(await root.call_tool("other__pid", {})) == other_pid
    assert "servers reloaded: 0 added, 1 removed, 0 changed, 2 unchanged" in gw.server.stderr
    await gw.logged("backend sdk: stopped after the reload")


async def test_a_changed_backend_restarts_after_its_calls_finish_and_unchanged_ones_keep_theirs(
    start: Start, tmp_path: Path
) -> None:
    gw = await start({"a": sdk(), "b": sdk()})
    before = await gw.servers()
    marker = tmp_path / "in-flight"
    async with (
        mcp_client(gw.url, gw.token) as root,
        mcp_client(f"{gw.url}/servers/a", gw.token) as old_a,
        mcp_client(f"{gw.url}/servers/b", gw.token, transport="sse") as b,
    ):
        assert text_of(await b.call_tool("pid", {})) == str(before["b"]["pid"])
        # A call in flight on the old child when the reload comes: it may finish (drain). The SDK
        # lists the tools before it first calls one: not on a session that is ending.
        await old_a.list_tools()
        call = asyncio.create_task(old_a.call_tool("record_cancel", {"seconds": 2, "path": str(marker)}))
        await wait_for_text(marker, "started")
        event = await gw.reload({"a": sdk("2"), "b": sdk()})
        assert changes(event) == ("ok", "", "", "a")
        after = await gw.servers()
        assert after["a"]["pid"] not in (None, before["a"]["pid"]) and after["a"]["state"] == "running"
        assert after["b"]["pid"] == before["b"]["pid"]
        assert text_of(await call) == "finished"
        assert marker.read_text() == "started"  # never cancelled
        await gone(before["a"]["pid"])
        # The unchanged backend's session, and the aggregate's, are the same ones as before.
        assert text_of(await b.call_tool("pid", {})) == str(before["b"]["pid"])
        assert text_of(await root.call_tool("b__pid", {})) == str(before["b"]["pid"])
        assert text_of(await root.call_tool("a__pid", {})) == str(after["a"]["pid"])
        async with mcp_client(f"{gw.url}/servers/a", gw.token) as new_a:
            assert text_of(await new_a.call_tool("pid", {})) == str(after["a"]["pid"])


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"mcpServers": {"a": {**sdk(), "colour": "red"}}}), "colour"),
        (
            json.dumps({"mcpServers": {"a": sdk("2"), "b": {"module": "tests.servers.nowhere:tools"}}}),
            "nowhere",
        ),
    ],
    ids=["bad-json", "unknown-key", "module-not-found"],
)
async def test_a_file_that_does_not_validate_changes_nothing(start: Start, text: str, why: str) -> None:
    gw = await start({"a": sdk(), "b": sdk()})
    before = await gw.servers()
    async with mcp_client(f"{gw.url}/servers/a", gw.token) as a:
        event = await gw.reload(text)
        assert event["outcome"] == "failed" and why in event["error"]
        after = await gw.servers()
        assert {n: s["pid"] for n, s in after.items()} == {n: s["pid"] for n, s in before.items()}
        assert text_of(await a.call_tool("pid", {})) == str(before["a"]["pid"])
    assert "servers not reloaded, the old ones stay in force" in gw.server.stderr
    assert why in gw.server.stderr
    # And the next good file is taken, from the state the bad one left alone.
    event = await gw.reload({"a": sdk(), "b": sdk(), "time": TIME_SERVER})
    assert (event["outcome"], event["added"], event["changed"]) == ("ok", "time", "")


async def test_the_root_switches_between_one_backend_and_the_aggregate(start: Start) -> None:
    gw = await start({"a": sdk()})
    async with mcp_client(gw.url, gw.token) as root, mcp_client(f"{gw.url}/servers/a", gw.token) as a:
        pid = text_of(await a.call_tool("pid", {}))
        assert "echo" in tool_names(await root.list_tools())
        event = await gw.reload({"a": sdk(), "b": sdk()})
        assert (event["outcome"], event["added"]) == ("ok", "b")
        # The root's tools are named <backend>__<tool> now: its old sessions end, new ones see them.
        with pytest.raises(MCPError, match="Session terminated"):  # the SDK's word for a 404
            await root.call_tool("echo", {"text": "x"})
        assert text_of(await a.call_tool("pid", {})) == pid  # /servers/a is as it was
    async with mcp_client(gw.url, gw.token) as root:
        assert {"a__echo", "b__echo"} <= tool_names(await root.list_tools())
        event = await gw.reload({"b": sdk()})
        assert (event["outcome"], event["removed"]) == ("ok", "a")
        with pytest.raises(MCPError, match="Session terminated"):
            await root.call_tool("b__echo", {"text": "x"})
    async with mcp_client(gw.url, gw.token) as root:
        assert "echo" in tool_names(await root.list_tools())
        assert text_of(await root.call_tool("echo", {"text": "one again"})) == "one again"


async def test_oauth_resources_follow_the_backends(start: Start, tmp_path: Path) -> None:
    port = unused_port()  # PUBLIC_URL names it
    public = f"http://127.0.0.1:{port}"
    oauth = {"OAUTH_SERVER": "true", "PUBLIC_URL": public, "STATE_DIR": str(tmp_path / "state")}
    gw = await start({"custom": CUSTOM}, port, SESSION_SECRET=Fernet.generate_key().decode(), **oauth)
    well_known = "/.well-known/oauth-protected-resource"

    async def anonymous(path: str) -> tuple[int, str, Any]:
        """Status, the challenge's resource_metadata, and the body of a GET without credentials."""
        async with aiohttp.ClientSession() as http, http.get(gw.url + path) as response:
            challenge = response.headers.get("WWW-Authenticate", "")
            metadata = challenge.partition('resource_metadata="')[2].partition('"')[0]
            body = await response.json() if response.content_type == "application/json" else None
            return response.status, metadata.removeprefix(public), body

    assert (await anonymous(f"{well_known}/servers/more/mcp"))[0] == 401  # no such resource yet
    assert await anonymous("/servers/more/mcp") == (401, well_known, {"error": "missing bearer token"})
    await gw.reload({"custom": CUSTOM, "more": CUSTOM})
    status, _, document = await anonymous(f"{well_known}/servers/more/mcp")
    assert status == 200 and document["resource"] == f"{public}/servers/more/mcp"
    assert (await anonymous("/servers/more/mcp"))[:2] == (401, f"{well_known}/servers/more/mcp")
    await gw.reload({"more": CUSTOM})
    assert (await anonymous(f"{well_known}/servers/custom/mcp"))[0] == 401
    assert (await anonymous("/servers/custom/sse"))[:2] == (401, well_known)
    assert (await anonymous(f"{well_known}/servers/more/sse"))[0] == 200


async def test_a_2026_listen_stream_on_the_aggregate_hears_of_the_new_tools(start: Start) -> None:
    gw = await start({"raw": RAW_SERVER, "custom": CUSTOM})
    listen = modern_request("subscriptions/listen", {"notifications": {"toolsListChanged": True}}, 7)
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            gw.url + "/mcp", json=listen, headers=modern_headers(gw.token, "subscriptions/listen")
        ) as s,
    ):
        ack = json.loads((await next_event(s)).data)
        assert ack["params"]["notifications"] == {"toolsListChanged": True}
        await gw.reload({"raw": RAW_SERVER, "custom": CUSTOM, "time": TIME_SERVER})
        changed = json.loads((await next_event(s, timeout=60)).data)
        assert changed["method"] == "notifications/tools/list_changed"
        listed = modern_request("tools/list", {}, 8)
        async with http.post(
            gw.url + "/mcp", json=listed, headers=modern_headers(gw.token, "tools/list")
        ) as r:
            names = {tool["name"] for tool in (await r.json())["result"]["tools"]}
        assert {"time__get_current_time", "raw__touch", "custom__scale"} <= names
