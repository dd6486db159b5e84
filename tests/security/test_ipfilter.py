"""IP allowlist: v4 and v6 addresses and CIDRs; everyone else 403, audited as ip.denied."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from mcp_sse.security.audit import AuditLog
from mcp_sse.security.client_ip import client_ip_middleware
from mcp_sse.security.ipfilter import allows_any, ip_allowlist_middleware

from .helpers import audit_lines, make_app

DENIED = {"error": "Access denied: your address is not allowed"}


def app(allowed: list[str], audit: AuditLog, trusted: list[str] | None = None) -> web.Application:
    return make_app(
        [
            client_ip_middleware(trusted_proxies=trusted or []),
            ip_allowlist_middleware(allowed=allowed, audit=audit),
        ]
    )


@pytest.fixture
def audit(tmp_path: Path) -> AuditLog:
    return AuditLog(tmp_path / "audit.log", stream=None)


async def test_listed_address_passes_and_others_are_refused(aiohttp_client: Any, audit: AuditLog) -> None:
    allowed = await aiohttp_client(app(["10.0.0.0/8", "127.0.0.0/8"], audit))
    async with allowed.get("/json") as response:
        assert response.status == 200
    denied = await aiohttp_client(app(["10.0.0.0/8", "192.0.2.1"], audit))
    for path in ("/json", "/sse", "/nowhere"):
        async with denied.get(path) as response:
            assert response.status == 403
            assert await response.json() == DENIED
    lines = audit_lines(audit.path or Path())
    # One line for the first refusal: a scanner's every request is not worth a line each.
    assert len(lines) == 1
    assert lines[0]["event"] == "ip.denied" and lines[0]["ip"] == "127.0.0.1"
    assert "Access denied" in lines[0]["msg"]


async def test_the_forwarded_client_is_what_is_checked(aiohttp_client: Any, audit: AuditLog) -> None:
    client = await aiohttp_client(app(["203.0.113.0/24"], audit, trusted=["127.0.0.1/32"]))
    async with client.get("/json", headers={"X-Forwarded-For": "203.0.113.7"}) as response:
        assert response.status == 200
    async with client.get("/json", headers={"X-Forwarded-For": "198.51.100.1"}) as response:
        assert response.status == 403
    # A forged left-most entry does not help: the right-most untrusted hop is checked.
    async with client.get("/json", headers={"X-Forwarded-For": "203.0.113.7, 198.51.100.1"}) as response:
        assert response.status == 403


async def test_ipv6_allowlist(aiohttp_server: Any, aiohttp_client: Any, audit: AuditLog) -> None:
    for allowed, status in (
        (["2001:db8::/32", "::1"], 200),
        (["::1/128"], 200),
        (["0:0:0:0:0:0:0:1"], 200),
        (["127.0.0.1", "2001:db8::/32", "fe80::/10"], 403),
    ):
        server = await aiohttp_server(app(allowed, audit), host="::1")
        client = await aiohttp_client(server)
        async with client.get("/json") as response:
            assert response.status == status, allowed


@pytest.mark.parametrize("anyone", ["*", "0.0.0.0", "::", "0.0.0.0/0", "::/0"])
async def test_any_spelling_of_everyone_lets_everyone_in(
    aiohttp_client: Any, audit: AuditLog, anyone: str
) -> None:
    assert allows_any(["10.0.0.1", anyone])
    client = await aiohttp_client(app(["10.0.0.1", anyone], audit))
    async with client.get("/json") as response:
        assert response.status == 200


def test_allows_any_is_false_for_real_lists() -> None:
    assert not allows_any(["127.0.0.1", "::1", "10.0.0.0/8", "0.0.0.0/8"])


@pytest.mark.parametrize("bad", ["10.0.0.256", "localhost", "10.0.0.0/40", "2001:db8::/129"])
def test_bad_entries_are_refused_at_build(audit: AuditLog, bad: str) -> None:
    with pytest.raises(ValueError, match="ALLOWED_IPS") as info:
        ip_allowlist_middleware(allowed=["127.0.0.1", bad], audit=audit)
    assert bad in str(info.value)


def test_an_empty_list_is_refused_at_build(audit: AuditLog) -> None:
    with pytest.raises(ValueError, match="empty"):
        ip_allowlist_middleware(allowed=[" ", ""], audit=audit)


async def test_without_client_ip_it_fails_closed(aiohttp_client: Any, audit: AuditLog) -> None:
    client = await aiohttp_client(make_app([ip_allowlist_middleware(allowed=["127.0.0.1"], audit=audit)]))
    async with client.get("/json") as response:
        assert response.status == 500
