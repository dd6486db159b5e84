"""Client address: the socket peer; X-Forwarded-For only from a trusted proxy, right-most untrusted hop."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict

from mcp_sse.security.client_ip import client_ip_middleware, normalise, parse_network

from .helpers import make_app

# The test client connects from 127.0.0.1: trusting 127.0.0.1/32 makes it "the proxy".
AS_PROXY = ["127.0.0.1/32", "10.0.0.0/8"]
AS_ATTACKER = ["10.0.0.0/8", "fd00::/8"]


async def seen(client: Any, headers: Any = None) -> dict[str, Any]:
    async with client.get("/json", headers=headers) as response:
        assert response.status == 200
        body: dict[str, Any] = await response.json()
        return body


async def test_spoofed_forwarded_for_from_an_untrusted_peer_is_ignored(aiohttp_client: Any) -> None:
    client = await aiohttp_client(make_app([client_ip_middleware(trusted_proxies=AS_ATTACKER)]))
    body = await seen(client, {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"})
    assert body == {"ip": "127.0.0.1", "secure": False, "request_id": None}


async def test_forwarded_for_is_honoured_from_a_trusted_proxy(aiohttp_client: Any) -> None:
    client = await aiohttp_client(make_app([client_ip_middleware(trusted_proxies=AS_PROXY)]))
    # The client forged the left entry; our proxy chain appended 203.0.113.7 and then 10.0.0.2.
    body = await seen(client, {"X-Forwarded-For": "198.51.100.9, 203.0.113.7, 10.0.0.2"})
    assert body["ip"] == "203.0.113.7"
    # Several header lines are one list, in order.
    headers = CIMultiDict([("X-Forwarded-For", "198.51.100.9"), ("X-Forwarded-For", "203.0.113.8")])
    assert (await seen(client, headers))["ip"] == "203.0.113.8"
    # No header from the proxy: the proxy itself is the client.
    assert (await seen(client))["ip"] == "127.0.0.1"
    # Every hop trusted: the left-most one is as far as we can see.
    assert (await seen(client, {"X-Forwarded-For": "10.1.1.1, 10.0.0.2"}))["ip"] == "10.1.1.1"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("garbage", "127.0.0.1"),
        ("198.51.100.9, garbage, 10.0.0.2", "10.0.0.2"),  # stop at the last good trusted hop
        ("198.51.100.9, unknown", "127.0.0.1"),
        (",", "127.0.0.1"),
        ("203.0.113.7:5555", "203.0.113.7"),
        ("[2001:db8::5]:443", "2001:db8::5"),
        ("2001:db8::6", "2001:db8::6"),
        ("::ffff:203.0.113.9", "203.0.113.9"),
        ("1.2.3.4, " + "10.0.0.1, " * 40 + "10.0.0.2", "10.0.0.1"),  # a long chain is cut short
    ],
)
async def test_malformed_or_unusual_entries_never_crash(
    aiohttp_client: Any, header: str, expected: str
) -> None:
    client = await aiohttp_client(make_app([client_ip_middleware(trusted_proxies=AS_PROXY)]))
    assert (await seen(client, {"X-Forwarded-For": header}))["ip"] == expected


async def test_forwarded_proto_https_is_believed_only_from_a_trusted_proxy(aiohttp_client: Any) -> None:
    proxied = await aiohttp_client(make_app([client_ip_middleware(trusted_proxies=AS_PROXY)]))
    assert (await seen(proxied, {"X-Forwarded-Proto": "https"}))["secure"] is True
    assert (await seen(proxied, {"X-Forwarded-Proto": "https, http"}))["secure"] is False  # ours said http
    assert (await seen(proxied))["secure"] is False
    direct = await aiohttp_client(make_app([client_ip_middleware(trusted_proxies=[])]))
    assert (await seen(direct, {"X-Forwarded-Proto": "https"}))["secure"] is False


async def test_the_transport_peer_is_used_even_if_request_remote_was_rewritten(aiohttp_client: Any) -> None:
    @web.middleware
    async def rewrite_remote(request: web.Request, handler: Handler) -> web.StreamResponse:
        # What aiohttp-remotes and similar code do: request.remote now says something else.
        return await handler(request.clone(remote="198.51.100.66"))

    client = await aiohttp_client(make_app([rewrite_remote, client_ip_middleware(trusted_proxies=[])]))
    assert (await seen(client))["ip"] == "127.0.0.1"


async def test_ipv6_peer(aiohttp_server: Any, aiohttp_client: Any) -> None:
    server = await aiohttp_server(make_app([client_ip_middleware(trusted_proxies=AS_ATTACKER)]), host="::1")
    client = await aiohttp_client(server)
    assert (await seen(client, {"X-Forwarded-For": "203.0.113.7"}))["ip"] == "::1"


def test_ipv4_mapped_addresses_and_ranges_are_ipv4() -> None:
    assert normalise(ipaddress.ip_address("::ffff:192.0.2.1")) == ipaddress.ip_address("192.0.2.1")
    assert normalise(ipaddress.ip_address("2001:db8::1")) == ipaddress.ip_address("2001:db8::1")
    assert parse_network("::ffff:10.0.0.0/104", setting="X") == ipaddress.ip_network("10.0.0.0/8")
    assert parse_network("2001:db8::/32", setting="X") == ipaddress.ip_network("2001:db8::/32")


@pytest.mark.parametrize("bad", ["*", "0.0.0.0/0", "::/0", "10.0.0.300", "proxy.example", "10.0.0.0/33"])
def test_bad_trusted_proxies_are_refused_at_build(bad: str) -> None:
    with pytest.raises(ValueError, match="TRUSTED_PROXIES") as info:
        client_ip_middleware(trusted_proxies=["10.0.0.1", bad])
    assert bad in str(info.value)


def test_a_single_string_is_refused() -> None:
    with pytest.raises(ValueError, match="list"):
        client_ip_middleware(trusted_proxies="10.0.0.1")
