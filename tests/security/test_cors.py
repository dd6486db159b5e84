"""CORS: exact origins with credentials; preflights answered before auth; Vary: Origin everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.typedefs import Handler

from mcp_sse.security.audit import AuditLog
from mcp_sse.security.cors import is_preflight, setup_cors
from mcp_sse.security.origin import origin_middleware

from .helpers import make_app, read_event

ALLOWED = "https://app.example"
TOKEN = {"Authorization": "Bearer t"}


@web.middleware
async def fake_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Stands in for authentication: everything needs a token, except a preflight."""
    if is_preflight(request):
        return await handler(request)
    if request.headers.get("Authorization") != "Bearer t":
        raise web.HTTPUnauthorized(text="no token")
    return await handler(request)


async def vary_route(request: web.Request) -> web.Response:
    return web.json_response({}, headers={"Vary": "Accept-Encoding"})


def app(*extra: Any) -> web.Application:
    def setup(a: web.Application) -> None:
        a.router.add_get("/vary", vary_route)
        setup_cors(a, allowed_origins=[ALLOWED, "http://localhost:6274/"])

    return make_app([*extra, fake_auth], setup=setup)


def preflight(origin: str, method: str = "POST", headers: str | None = None) -> dict[str, str]:
    out = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers is not None:
        out["Access-Control-Request-Headers"] = headers
    return out


def listed(value: str | None) -> set[str]:
    return {v.strip().lower() for v in (value or "").split(",") if v.strip()}


async def test_preflight_from_an_allowed_origin_is_answered_without_auth(aiohttp_client: Any) -> None:
    client = await aiohttp_client(app())
    asked = "authorization, content-type, mcp-session-id, mcp-protocol-version, last-event-id, mcp-method"
    async with client.options("/json", headers=preflight(ALLOWED, "POST", asked)) as response:
        assert response.status == 200
        assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
        assert response.headers["Access-Control-Allow-Credentials"] == "true"
        assert response.headers["Access-Control-Allow-Methods"] == "POST"
        assert listed(response.headers["Access-Control-Allow-Headers"]) == listed(asked)
        assert response.headers["Access-Control-Max-Age"] == "600"
        assert "origin" in listed(response.headers["Vary"])
    async with client.options("/json", headers=preflight("http://localhost:6274", "DELETE")) as response:
        assert response.status == 200  # configured with a trailing slash, matched as browsers send it
        assert response.headers["Access-Control-Allow-Methods"] == "DELETE"


@pytest.mark.parametrize(
    "headers",
    [
        preflight("http://evil.example"),
        preflight("null"),
        preflight(ALLOWED + ".evil.example"),
        preflight(ALLOWED, "PUT"),  # a method not offered
    ],
)
async def test_preflight_otherwise_is_not_granted(aiohttp_client: Any, headers: dict[str, str]) -> None:
    client = await aiohttp_client(app())
    async with client.options("/json", headers=headers) as response:
        assert response.status == 403
        assert "Access-Control-Allow-Origin" not in response.headers
        assert "Access-Control-Allow-Credentials" not in response.headers


async def test_an_allowed_origin_may_send_the_per_tool_mcp_param_headers(aiohttp_client: Any) -> None:
    # MCP 2026-07-28: one Mcp-Param-<Name> header per x-mcp-header argument, names chosen per tool.
    client = await aiohttp_client(app())
    asked = "authorization, content-type, mcp-method, mcp-name, mcp-param-region, mcp-param-tenant-id"
    async with client.options("/json", headers=preflight(ALLOWED, "POST", asked)) as response:
        assert response.status == 200
        assert listed(response.headers["Access-Control-Allow-Headers"]) == listed(asked)
    async with client.options("/json", headers=preflight("http://evil.example", "POST", asked)) as response:
        assert response.status == 403
        assert "Access-Control-Allow-Headers" not in response.headers


async def test_actual_requests_expose_the_mcp_headers_on_json_and_sse(aiohttp_client: Any) -> None:
    client = await aiohttp_client(app())
    for path in ("/json", "/sse"):
        async with client.get(path, headers={"Origin": ALLOWED, **TOKEN}) as response:
            assert response.status == 200
            assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
            assert response.headers["Access-Control-Allow-Credentials"] == "true"
            exposed = listed(response.headers["Access-Control-Expose-Headers"])
            assert exposed == {
                "mcp-session-id",
                "mcp-protocol-version",
                "ratelimit",
                "ratelimit-policy",
                "retry-after",
                "x-request-id",
            }
            assert "origin" in listed(response.headers["Vary"])
            if path == "/sse":
                assert await read_event(response) == '{"hello": "world"}'


async def test_actual_requests_from_other_origins_get_no_grant(aiohttp_client: Any) -> None:
    client = await aiohttp_client(app())
    async with client.get("/sse", headers={"Origin": "http://evil.example", **TOKEN}) as response:
        assert "Access-Control-Allow-Origin" not in response.headers
        assert "origin" in listed(response.headers["Vary"])  # a cache must still key on Origin
        await response.read()


async def test_vary_is_added_to_an_existing_one_and_set_without_origin(aiohttp_client: Any) -> None:
    client = await aiohttp_client(app())
    async with client.get("/vary", headers=TOKEN) as response:
        assert listed(response.headers["Vary"]) == {"accept-encoding", "origin"}
    async with client.get("/nowhere", headers=TOKEN) as response:
        assert response.status == 404 and "origin" in listed(response.headers["Vary"])


async def test_options_that_is_not_a_preflight_still_needs_auth(aiohttp_client: Any) -> None:
    client = await aiohttp_client(app())
    async with client.options("/json", headers={"Origin": ALLOWED}) as response:
        assert response.status == 401
    async with client.options("/json", headers={"Access-Control-Request-Method": "POST"}) as response:
        assert response.status == 401


async def test_with_the_origin_layer_a_foreign_preflight_is_refused_before_cors(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    audit = AuditLog(tmp_path / "audit.log", stream=None)
    client = await aiohttp_client(
        app(origin_middleware(allowed_origins=[ALLOWED], allowed_hosts=None, audit=audit))
    )
    async with client.options("/json", headers=preflight(ALLOWED)) as response:
        assert response.status == 200
    async with client.options("/json", headers=preflight("http://evil.example")) as response:
        assert response.status == 403 and "Access-Control-Allow-Origin" not in response.headers


@pytest.mark.parametrize("bad", ["*", "https://app.example/mcp", "app.example", "null"])
def test_wildcards_and_malformed_origins_are_refused_at_startup(bad: str) -> None:
    with pytest.raises(ValueError):
        setup_cors(make_app(), allowed_origins=[ALLOWED, bad])


def test_setup_twice_is_refused() -> None:
    application = make_app()
    setup_cors(application, allowed_origins=[ALLOWED])
    with pytest.raises(ValueError, match="already"):
        setup_cors(application, allowed_origins=[ALLOWED])


async def test_no_origins_means_no_grants(aiohttp_client: Any) -> None:
    client = await aiohttp_client(make_app([fake_auth], setup=lambda a: setup_cors(a, allowed_origins=[])))
    async with client.options("/json", headers=preflight(ALLOWED)) as response:
        assert response.status == 403
    async with client.get("/json", headers={"Origin": ALLOWED, **TOKEN}) as response:
        assert response.status == 200 and "Access-Control-Allow-Origin" not in response.headers
