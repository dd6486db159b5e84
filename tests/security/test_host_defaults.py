"""Host names a loopback bind answers by default (the DNS-rebinding defence for requests without
an Origin), and a public /health that a load balancer may probe without spending the budget."""

from __future__ import annotations

import aiohttp
import pytest

from mcp_sse.settings import Settings
from tests.conftest import StartGateway


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "LOCALHOST", "[::1]"])
async def test_a_loopback_bind_answers_its_loopback_names(start_gateway: StartGateway, host: str) -> None:
    gw = await start_gateway()
    port = gw.url.rsplit(":", 1)[1]
    async with aiohttp.ClientSession() as http:
        response = await http.get(f"{gw.url}/health", headers={**gw.headers, "Host": f"{host}:{port}"})
        assert response.status == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "127.0.0.1.evil.example", "10.0.0.1"])
async def test_a_rebound_host_is_refused_by_default(start_gateway: StartGateway, host: str) -> None:
    gw = await start_gateway()
    async with aiohttp.ClientSession() as http:
        response = await http.get(f"{gw.url}/health", headers={**gw.headers, "Host": host})
        assert response.status == 403, "the right token does not make a rebound page's request good"


async def test_public_url_host_is_answered_and_allowed_hosts_wins(start_gateway: StartGateway) -> None:
    gw = await start_gateway(public_url="https://mcp.example.com")
    async with aiohttp.ClientSession() as http:
        ok = await http.get(f"{gw.url}/health", headers={**gw.headers, "Host": "mcp.example.com"})
        assert ok.status == 200
    assert Settings(allowed_hosts=("gw.internal",)).host_names == ("gw.internal",)
    assert Settings(host="0.0.0.0").host_names == ()  # a network bind's names are not knowable


async def test_a_public_health_probe_does_not_spend_the_address_budget(start_gateway: StartGateway) -> None:
    gw = await start_gateway(health_public=True, rate_limit_max_requests=3)
    async with aiohttp.ClientSession() as http:
        for _ in range(10):  # a load balancer probing: more than the budget, all answered
            probe = await http.get(f"{gw.url}/health")
            assert probe.status == 200
        statuses = [(await http.post(f"{gw.url}/mcp", json={})).status for _ in range(4)]
    assert statuses[:3] == [401, 401, 401] and statuses[3] == 429, "other keyless requests still count"
