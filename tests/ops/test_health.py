"""/health through a real gateway with real children: its status code says whether anything can be served."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mcp_sse import __version__
from mcp_sse.app import revive_backends
from mcp_sse.ops.health import public_health
from mcp_sse.upstream import backend as backend_module
from mcp_sse.upstream.multiplex import REQUEST_TIMEOUT
from tests.conftest import Running, StartGateway
from tests.reliability.harness import FAULT_SERVER, Streamable, call, fault_server, poll

EXITS_AT_ONCE = {"command": sys.executable, "args": ["-c", "import sys; sys.exit(1)"]}


def gated(flag: Path) -> dict[str, Any]:
    """A backend that exits at once until `flag` exists, then is the fault server."""
    script = '[ -f "$0" ] || exit 1; exec "$1" "$2"'
    return {"command": "sh", "args": ["-c", script, str(flag), sys.executable, FAULT_SERVER]}


@pytest.fixture
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend_module, "BACKOFF_BASE", 0.02)


async def get_health(gw: Running, *, key: bool = True) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession(headers=gw.headers if key else {}) as http,
        http.get(f"{gw.url}/health") as response,
    ):
        return response.status, dict(await response.json())


async def states(gw: Running) -> dict[str, str]:
    async with (
        aiohttp.ClientSession(headers=gw.headers) as http,
        http.get(f"{gw.url}/mcp/servers") as response,
    ):
        return {s["name"]: s["state"] for s in (await response.json())["servers"]}


async def reach(gw: Running, wanted: dict[str, str]) -> None:
    """Poll /mcp/servers until the backends are in these states (30 s at most)."""
    seen = await poll(lambda: states(gw), lambda s: s == wanted, 30)
    assert seen == wanted


async def test_only_backend_failed_is_503_down(start_gateway: StartGateway, fast_backoff: None) -> None:
    gw = await start_gateway({"test": EXITS_AT_ONCE})
    await reach(gw, {"test": "failed"})
    assert await get_health(gw) == (503, {"status": "down", "version": __version__, "failed": ["test"]})


async def test_every_backend_failed_is_503_down(start_gateway: StartGateway, fast_backoff: None) -> None:
    gw = await start_gateway({"b": EXITS_AT_ONCE, "a": EXITS_AT_ONCE})
    await reach(gw, {"a": "failed", "b": "failed"})
    status, body = await get_health(gw)
    assert (status, body["status"], body["failed"]) == (503, "down", ["a", "b"])


async def test_some_backends_failed_is_200_degraded_and_names_them(
    start_gateway: StartGateway, fast_backoff: None
) -> None:
    gw = await start_gateway({"bad": EXITS_AT_ONCE, "good": fault_server()})
    await reach(gw, {"bad": "failed", "good": "running"})
    assert await get_health(gw) == (200, {"status": "degraded", "version": __version__, "failed": ["bad"]})


async def test_all_running_is_200_ok(start_gateway: StartGateway) -> None:
    gw = await start_gateway({"a": fault_server(), "b": fault_server()})
    await reach(gw, {"a": "running", "b": "running"})
    assert await get_health(gw) == (200, {"status": "ok", "version": __version__})


async def test_embedded_default_is_200_ok(start_gateway: StartGateway) -> None:
    gw = await start_gateway()
    assert await get_health(gw) == (200, {"status": "ok", "version": __version__})


async def test_a_revived_backend_makes_health_ok_again(
    start_gateway: StartGateway, fast_backoff: None, tmp_path: Path
) -> None:
    flag = tmp_path / "may-start"
    gw = await start_gateway({"test": gated(flag)})
    await reach(gw, {"test": "failed"})
    assert (await get_health(gw))[0] == 503
    flag.touch()
    assert revive_backends(gw.app) == 1
    await reach(gw, {"test": "running"})
    assert await get_health(gw) == (200, {"status": "ok", "version": __version__})


async def test_public_health_has_the_same_code_and_status_without_names(
    start_gateway: StartGateway, fast_backoff: None
) -> None:
    gw = await start_gateway({"bad": EXITS_AT_ONCE, "good": fault_server()})
    await reach(gw, {"bad": "failed", "good": "running"})
    answer = public_health(gw.app)
    assert (answer.status, answer.text) == (200, '{"status": "degraded"}')


async def test_health_public_answer_without_a_key_says_down_when_down(
    start_gateway: StartGateway, fast_backoff: None
) -> None:
    gw = await start_gateway({"test": EXITS_AT_ONCE}, health_public=True)
    await reach(gw, {"test": "failed"})
    assert await get_health(gw, key=False) == (503, {"status": "down"})


# -- an open circuit counts as down ---------------------------------------------------------------

TRIPS_AT_ONCE = {"failureThreshold": 1, "volumeThreshold": 1, "timeout": 600, "successThreshold": 1}


async def open_circuit(gw: Running, name: str) -> None:
    """One call the child answers too late: with TRIPS_AT_ONCE, the circuit of `name` is open."""
    async with aiohttp.ClientSession() as http:
        client = await Streamable(http, gw.url, gw.token, f"/servers/{name}/mcp").initialize()
        assert (await client.request(call(1, "sleep", seconds=30)))["error"]["code"] == REQUEST_TIMEOUT
        fast = await client.request(call(2, "echo", text="x"))
        assert "circuit is open" in fast["error"]["message"]


async def test_an_open_circuit_is_200_degraded_and_named(start_gateway: StartGateway) -> None:
    slow = {**fault_server(timeout=0.3), "circuit_breaker": TRIPS_AT_ONCE}
    gw = await start_gateway({"slow": slow, "good": fault_server()})
    await reach(gw, {"slow": "running", "good": "running"})
    await open_circuit(gw, "slow")
    # Its child still runs: only the circuit says nothing can be served by it now.
    assert await states(gw) == {"slow": "running", "good": "running"}
    expected = {"status": "degraded", "version": __version__, "circuit_open": ["slow"]}
    assert await get_health(gw) == (200, expected)


async def test_every_backend_failed_or_open_is_503_down(
    start_gateway: StartGateway, fast_backoff: None
) -> None:
    slow = {**fault_server(timeout=0.3), "circuit_breaker": TRIPS_AT_ONCE}
    gw = await start_gateway({"slow": slow, "bad": EXITS_AT_ONCE})
    await reach(gw, {"slow": "running", "bad": "failed"})
    await open_circuit(gw, "slow")
    expected = {"status": "down", "version": __version__, "failed": ["bad"], "circuit_open": ["slow"]}
    assert await get_health(gw) == (503, expected)
    assert public_health(gw.app).status == 503
