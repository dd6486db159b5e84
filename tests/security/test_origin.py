"""Origin/Host checks: DNS rebinding refused on every method, SSE GETs included."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from multidict import CIMultiDict

from mcp_sse.security.audit import AuditLog
from mcp_sse.security.origin import normalise_origin, origin_middleware

from .helpers import audit_lines, make_app, read_event

ORIGINS = ["https://app.example", "http://localhost:6274"]


@pytest.fixture
def audit(tmp_path: Path) -> AuditLog:
    return AuditLog(tmp_path / "audit.log", stream=None)


def app(audit: AuditLog, hosts: list[str] | None = None) -> web.Application:
    return make_app([origin_middleware(allowed_origins=ORIGINS, allowed_hosts=hosts, audit=audit)])


async def test_no_origin_and_listed_origins_pass(aiohttp_client: Any, audit: AuditLog) -> None:
    client = await aiohttp_client(app(audit))
    for origin in (None, "https://app.example", "HTTPS://App.Example:443", "http://localhost:6274"):
        headers = {} if origin is None else {"Origin": origin}
        async with client.post("/json", headers=headers) as response:
            assert response.status == 200, origin
    async with client.get("/sse", headers={"Origin": "https://app.example"}) as response:
        assert await read_event(response) == '{"hello": "world"}'


@pytest.mark.parametrize(
    "origin",
    [
        "http://evil.example",
        "https://app.example.evil.example",
        "http://app.example",  # scheme differs
        "https://app.example:8443",  # port differs
        "http://localhost:6275",
        "null",  # sandboxed iframes, file:// pages
        "",
        "https://app.example/",  # not what a browser sends
    ],
)
async def test_rebinding_and_other_origins_are_refused_on_every_method(
    aiohttp_client: Any, audit: AuditLog, origin: str
) -> None:
    client = await aiohttp_client(app(audit))
    for method, path in (("GET", "/sse"), ("GET", "/json"), ("POST", "/json"), ("DELETE", "/json")):
        async with client.request(method, path, headers={"Origin": origin}) as response:
            assert response.status == 403, (method, path)
            assert await response.json() == {"error": "Access denied: origin not allowed"}
            assert "text/event-stream" not in response.headers.get("Content-Type", "")
    lines = audit_lines(audit.path or Path())
    assert len(lines) == 4
    assert {line["event"] for line in lines} == {"origin.denied"}
    assert lines[0]["origin"] == origin and lines[0]["msg"] == "Access denied"


async def test_two_origin_headers_are_refused(aiohttp_client: Any, audit: AuditLog) -> None:
    client = await aiohttp_client(app(audit))
    headers = CIMultiDict([("Origin", "https://app.example"), ("Origin", "http://evil.example")])
    async with client.get("/json", headers=headers) as response:
        assert response.status == 403


async def test_host_check(aiohttp_client: Any, audit: AuditLog) -> None:
    client = await aiohttp_client(app(audit, hosts=["localhost", "127.0.0.1", "[::1]:8080"]))
    port = client.server.port
    # The test client's own Host is 127.0.0.1:<port>: a name without a port matches any port.
    async with client.get("/sse") as response:
        assert await read_event(response) == '{"hello": "world"}'
    for host, status in (
        (f"LOCALHOST:{port}", 200),
        ("[::1]:8080", 200),
        ("[::1]:8081", 403),
        (f"evil.example:{port}", 403),  # a rebound name: same-origin GETs carry no Origin, only this
        ("localhost.evil.example", 403),
        ("localhost:notaport", 403),
    ):
        async with client.get("/sse", headers={"Host": host}) as response:
            assert response.status == status, host
    denied = [line for line in audit_lines(audit.path or Path()) if line["event"] == "host.denied"]
    assert len(denied) == 4 and denied[0]["msg"] == "Access denied"


@pytest.mark.parametrize("hosts", [None, []])
async def test_no_host_list_means_no_host_check(aiohttp_client: Any, audit: AuditLog, hosts: Any) -> None:
    client = await aiohttp_client(app(audit, hosts=hosts))
    async with client.get("/json", headers={"Host": "evil.example"}) as response:
        assert response.status == 200


@pytest.mark.parametrize(
    "bad",
    ["*", "null", "https://app.example/mcp", "app.example", "https://*.example", "https://a.example?x=1"],
)
def test_bad_origins_are_refused_at_build(audit: AuditLog, bad: str) -> None:
    with pytest.raises(ValueError) as info:
        origin_middleware(allowed_origins=["https://ok.example", bad], allowed_hosts=None, audit=audit)
    assert bad in str(info.value) or bad.split("//")[-1] in str(info.value)  # names the bad value


@pytest.mark.parametrize("bad", ["*", "a:b:c", "host:99999", "two words"])
def test_bad_hosts_are_refused_at_build(audit: AuditLog, bad: str) -> None:
    with pytest.raises(ValueError):
        origin_middleware(allowed_origins=[], allowed_hosts=["localhost", bad], audit=audit)


def test_normalised_form_is_what_browsers_send() -> None:
    assert normalise_origin("HTTPS://App.Example:443/") == "https://app.example"
    assert normalise_origin("http://[0:0::1]:80") == "http://[::1]"
    assert normalise_origin("http://localhost:6274") == "http://localhost:6274"
