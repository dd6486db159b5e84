"""The secure profile as one pipeline, through create_app() on a real loopback server.

Every rule is driven from both sides: the request that must pass, and the one that must not.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from mcp import MCPError, types

from mcp_sse.app import reload_keys
from mcp_sse.security.keys import generate_key
from mcp_sse.state import SESSIONS
from tests.conftest import (
    SDK_SERVER,
    SERVERS,
    Running,
    StartGateway,
    init_message,
    mcp_client,
    next_event,
    next_message,
    text_of,
    until_eof,
)

from .helpers import audit_lines

ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
INIT = init_message()


def write_keys(path: Path, *entries: dict[str, Any]) -> None:
    path.write_text(json.dumps({"keys": list(entries)}))
    path.chmod(0o600)


def new_key(name: str, role: str = "operator", **extra: Any) -> tuple[str, dict[str, Any]]:
    secret, entry = generate_key(name, role)
    return secret, {**entry, **extra}


@pytest.fixture
async def http() -> Any:
    async with aiohttp.ClientSession() as session:
        yield session


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def initialize(http: aiohttp.ClientSession, url: str, token: str) -> str:
    response = await http.post(url, json=INIT, headers={**ACCEPT, **bearer(token)})
    assert response.status == 200, await response.text()
    return response.headers["Mcp-Session-Id"]


async def call(
    http: aiohttp.ClientSession, url: str, token: str, sid: str, method: str, params: dict[str, Any]
) -> dict[str, Any]:
    headers = {**ACCEPT, **bearer(token), "Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-11-25"}
    message = {"jsonrpc": "2.0", "id": 2, "method": method, "params": params}
    response = await http.post(url, json=message, headers=headers)
    assert response.status == 200, await response.text()
    return dict(await response.json())


# -- authentication ---------------------------------------------------------------------------


async def test_bad_credentials_get_401_with_the_realm(start_gateway: StartGateway, http: Any) -> None:
    gw = await start_gateway()
    for headers in ({}, bearer("wrong"), {"Authorization": "Basic dXNlcjpwYXNz"}):
        response = await http.get(gw.url + "/health", headers=headers)
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="mcp-sse"'
    ok = await http.get(gw.url + "/health", headers=gw.headers)
    assert ok.status == 200 and (await ok.json())["status"] == "ok"


async def test_health_public_exposes_liveness_only(start_gateway: StartGateway, http: Any) -> None:
    gw = await start_gateway(health_public=True)
    bare = await http.get(gw.url + "/health")
    assert bare.status == 200 and await bare.json() == {"status": "ok"}
    assert (await http.get(gw.url + "/mcp/servers")).status == 401  # nothing more is public


async def test_url_tokens_refused_unless_enabled(
    start_gateway: StartGateway, http: Any, tmp_path: Path
) -> None:
    gw = await start_gateway()
    response = await http.get(f"{gw.url}/health?token={gw.token}")
    assert response.status == 401
    assert "URL" in (await response.json())["error"]
    gw2 = await start_gateway(url_auth=True, audit_log=tmp_path / "url.log")
    assert (await http.get(f"{gw2.url}/health?access_token={gw2.token}")).status == 200
    assert gw2.token not in (tmp_path / "url.log").read_text()


async def test_session_is_bound_to_the_key_that_opened_it(
    start_gateway: StartGateway, http: Any, tmp_path: Path
) -> None:
    other_secret, other = new_key("other")
    write_keys(tmp_path / "keys.json", other)
    gw = await start_gateway(keys_file=tmp_path / "keys.json")
    sid = await initialize(http, gw.url + "/mcp", gw.token)
    headers = {**ACCEPT, **bearer(other_secret), "Mcp-Session-Id": sid}
    stolen = await http.post(
        gw.url + "/mcp", json={"jsonrpc": "2.0", "id": 2, "method": "ping"}, headers=headers
    )
    assert stolen.status == 404  # as if it did not exist: no probing other people's sessions
    assert (await http.delete(gw.url + "/mcp", headers=headers)).status == 404
    own = await call(http, gw.url + "/mcp", gw.token, sid, "ping", {})
    assert own["result"] == {}
    async with http.get(gw.url + "/sse", headers=gw.headers) as stream:
        endpoint = (await next_event(stream)).data
        post = await http.post(gw.url + endpoint, json=INIT, headers=bearer(other_secret))
        assert post.status == 404


# -- keys, roles and tool policy --------------------------------------------------------------


async def test_per_key_tool_policy_filters_lists_and_refuses_calls(
    start_gateway: StartGateway, http: Any, tmp_path: Path
) -> None:
    limited_secret, limited = new_key("limited", tools={"allow": ["ec*", "add"], "deny": ["add"]})
    viewer_secret, viewer = new_key("viewer", role="viewer")
    write_keys(tmp_path / "keys.json", limited, viewer)
    gw = await start_gateway({"test": SDK_SERVER}, keys_file=tmp_path / "keys.json")
    async with mcp_client(gw.url, limited_secret) as client:
        assert [t.name for t in (await client.list_tools()).tools] == ["echo"]
        assert text_of(await client.call_tool("echo", {"text": "allowed"})) == "allowed"
        with pytest.raises(MCPError, match="may not call tool 'add'"):
            await client.call_tool("add", {"a": 1, "b": 2})
    async with mcp_client(gw.url, viewer_secret) as client:
        assert len((await client.list_tools()).tools) > 3
        with pytest.raises(MCPError, match="role 'viewer' may not call tools/call"):
            await client.call_tool("echo", {"text": "no"})
        resource = await client.read_resource("test://greeting")
        assert resource.contents[0].text == "hello from a resource"
    # Each refusal is in the audit trail, naming who, what and why.
    denied = [line for line in audit_lines(tmp_path / "audit.log") if line["event"] == "policy.denied"]
    assert [(d["identity"], d["tool"]) for d in denied] == [(limited["id"], "add"), (viewer["id"], "echo")]
    assert "viewer" in denied[1]["reason"]


async def test_backend_allowlist_is_enforced_per_route(
    start_gateway: StartGateway, http: Any, tmp_path: Path
) -> None:
    secret, entry = new_key("only-a", backends=["a"])
    write_keys(tmp_path / "keys.json", entry)
    gw = await start_gateway({"a": SDK_SERVER, "b": SDK_SERVER}, keys_file=tmp_path / "keys.json")
    await initialize(http, gw.url + "/servers/a/mcp", secret)
    refused = await http.post(gw.url + "/servers/b/mcp", json=INIT, headers={**ACCEPT, **bearer(secret)})
    assert refused.status == 403
    assert "backend 'b'" in (await refused.json())["error"]
    assert (await http.get(gw.url + "/servers/b/sse", headers=bearer(secret))).status == 403


async def test_expired_key_is_refused(start_gateway: StartGateway, http: Any, tmp_path: Path) -> None:
    past = (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)).isoformat()
    secret, entry = new_key("old", expires=past)
    write_keys(tmp_path / "keys.json", entry)
    gw = await start_gateway(keys_file=tmp_path / "keys.json")
    assert (await http.get(gw.url + "/health", headers=bearer(secret))).status == 401


async def test_reload_revokes_a_key_and_closes_its_streams_at_once(
    start_gateway: StartGateway, http: Any, tmp_path: Path
) -> None:
    secret, entry = new_key("leaving")
    keys = tmp_path / "keys.json"
    write_keys(keys, entry)
    gw = await start_gateway(keys_file=keys)
    async with http.get(gw.url + "/sse", headers=bearer(secret)) as stream:
        endpoint = (await next_event(stream)).data
        assert (await http.post(gw.url + endpoint, json=INIT, headers=bearer(secret))).status == 202
        write_keys(keys)  # the key is removed from the file
        reload_keys(gw.app)
        await until_eof(stream, timeout=2)  # it ends now, not at the next keep-alive (15 s)
    assert (await http.get(gw.url + "/health", headers=bearer(secret))).status == 401
    assert all(s.identity != entry["id"] for s in gw.app[SESSIONS].all())
    audit = (tmp_path / "audit.log").read_text()
    assert '"event": "keys.reload"' in audit and entry["id"] in audit


async def test_arguments_are_checked_against_the_input_schema(start_gateway: StartGateway) -> None:
    gw = await start_gateway({"test": SDK_SERVER})
    async with mcp_client(gw.url, gw.token) as client:
        await client.list_tools()
        with pytest.raises(
            MCPError, match=r'Invalid params for tool \'add\': a: "one" is not of type "integer"'
        ):
            await client.call_tool("add", {"a": "one", "b": 2})
        with pytest.raises(MCPError, match='"b" is a required property'):
            await client.call_tool("add", {"a": 1})
        assert text_of(await client.call_tool("add", {"a": 1, "b": 2})) == "3"


def schema_server(tools: list[dict[str, Any]]) -> dict[str, Any]:
    """A backend (tests/servers/schema_server.py) listing `tools`; every call is answered "reached <tool>"."""
    return {"command": sys.executable, "args": [str(SERVERS / "schema_server.py"), json.dumps(tools)]}


async def test_a_schema_ref_to_a_url_is_never_fetched_and_unusable_schemas_pass_calls_through(
    start_gateway: StartGateway,
    aiohttp_server: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Attacker's side: a backend (or whoever feeds its tool list) points a schema at an internal
    # URL, hoping the gateway will fetch it (SSRF). A listener on loopback counts any attempt.
    hits: list[str] = []

    async def schema(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({"not": {}})  # had it been used, every call would be refused

    app = web.Application()
    app.router.add_get("/schema.json", schema)
    listener = await aiohttp_server(app, host="127.0.0.1")
    tools = [
        {"name": "remote", "inputSchema": {"type": "object", "$ref": str(listener.make_url("/schema.json"))}},
        {"name": "broken", "inputSchema": {"type": "object", "minProperties": "none"}},
    ]
    gw = await start_gateway({"unusable": schema_server(tools)})
    async with mcp_client(gw.url, gw.token) as client:
        await client.list_tools()
        for _ in range(3):
            assert text_of(await client.call_tool("remote", {"any": 1})) == "reached remote"
            assert text_of(await client.call_tool("broken", {})) == "reached broken"
    assert hits == []
    warnings = [r.getMessage() for r in caplog.records if "arguments not checked" in r.getMessage()]
    assert len(warnings) == 2, warnings  # once per tool, not once per call


async def test_a_backtracking_pattern_cannot_stall_the_gateway(start_gateway: StartGateway) -> None:
    # Attacker's side: a schema with a catastrophic pattern, and an argument made to trip it. A
    # backtracking engine (Python's re) would take 2^40 steps here and block the event loop; the
    # validator's engine answers at once, so the call is refused and the next one goes through.
    tools = [
        {
            "name": "search",
            "inputSchema": {"type": "object", "properties": {"q": {"type": "string", "pattern": "^(a+)+$"}}},
        }
    ]
    gw = await start_gateway({"schemas": schema_server(tools)})
    async with mcp_client(gw.url, gw.token) as client:
        await client.list_tools()
        with pytest.raises(MCPError, match=r"Invalid params for tool 'search': q: .* does not match"):
            await client.call_tool("search", {"q": "a" * 40 + "!"})
        assert text_of(await client.call_tool("search", {"q": "aaaa"})) == "reached search"


# -- network filters, headers, CORS -----------------------------------------------------------


async def test_ip_allowlist_and_spoofed_forwarded_for(start_gateway: StartGateway, http: Any) -> None:
    gw = await start_gateway(allowed_ips=("10.9.8.7",))
    spoofed = {**gw.headers, "X-Forwarded-For": "10.9.8.7"}
    response = await http.get(gw.url + "/health", headers=spoofed)
    assert response.status == 403  # 127.0.0.1 is no trusted proxy: the header is ignored
    assert "Access denied" in (await response.json())["error"]
    behind = await start_gateway(allowed_ips=("10.9.8.7",), trusted_proxies=("127.0.0.1",))
    assert (
        await http.get(behind.url + "/health", headers={**behind.headers, "X-Forwarded-For": "10.9.8.7"})
    ).status == 200


async def test_origin_rebinding_refused_on_post_and_sse(start_gateway: StartGateway, http: Any) -> None:
    gw = await start_gateway(allowed_origins=("https://app.example.com",))
    evil = {**gw.headers, "Origin": "http://evil.example"}
    assert (await http.get(gw.url + "/sse", headers=evil)).status == 403
    assert (await http.post(gw.url + "/mcp", json=INIT, headers={**ACCEPT, **evil})).status == 403
    good = {**gw.headers, **ACCEPT, "Origin": "https://app.example.com"}
    ok = await http.post(gw.url + "/mcp", json=INIT, headers=good)
    assert ok.status == 200
    assert ok.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "Mcp-Session-Id" in ok.headers["Access-Control-Expose-Headers"]
    assert "Origin" in ok.headers["Vary"]


async def test_preflight_is_answered_before_authentication(start_gateway: StartGateway, http: Any) -> None:
    gw = await start_gateway(allowed_origins=("https://app.example.com",))
    preflight = {
        "Origin": "https://app.example.com",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, mcp-session-id",
    }
    response = await http.options(gw.url + "/mcp", headers=preflight)
    assert response.status == 200
    allowed = response.headers["Access-Control-Allow-Headers"].lower()
    assert "authorization" in allowed and "mcp-session-id" in allowed
    bad = await http.options(gw.url + "/mcp", headers={**preflight, "Origin": "https://evil.example"})
    assert bad.status == 403 or "Access-Control-Allow-Origin" not in bad.headers


async def test_security_headers_on_json_and_sse(start_gateway: StartGateway, http: Any) -> None:
    gw = await start_gateway()
    plain = await http.get(gw.url + "/health", headers=gw.headers)
    async with http.get(gw.url + "/sse", headers=gw.headers) as sse:
        await next_event(sse)
        for response in (plain, sse):
            headers = response.headers
            assert "default-src 'none'" in headers["Content-Security-Policy"]
            assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
            assert headers["X-Content-Type-Options"] == "nosniff"
            assert headers["X-Frame-Options"] == "DENY"
            assert headers["Referrer-Policy"] == "no-referrer"
            assert headers["Server"] == "mcp-sse"
            assert "X-Request-Id" in headers
            assert "Strict-Transport-Security" not in headers  # plain HTTP here
        assert sse.headers["X-Accel-Buffering"] == "no"
        assert "RateLimit" in sse.headers


# -- rate limits and lockout ------------------------------------------------------------------


async def test_a_key_has_its_own_budget_apart_from_the_address_limit(
    start_gateway: StartGateway, http: Any, tmp_path: Path
) -> None:
    own_secret, own = new_key("own-limit", rate_limit=2)
    write_keys(tmp_path / "keys.json", own)
    gw = await start_gateway(
        rate_limit_max_requests=3,
        key_rate_limit_max_requests=5,
        rate_limit_window_ms=60_000,
        keys_file=tmp_path / "keys.json",
    )
    # An unauthenticated flood from 127.0.0.1 uses up the address's budget...
    assert [(await http.get(gw.url + "/health")).status for _ in range(3)] == [401] * 3
    flooded = await http.get(gw.url + "/health")
    assert flooded.status == 429 and int(flooded.headers["Retry-After"]) >= 1
    assert flooded.headers["RateLimit-Policy"] == '"default";q=3;w=60'
    # ...and nothing of the key's, counted apart: exactly its 5, then the 6th is 429 on its own quota.
    statuses = [(await http.get(gw.url + "/health", headers=gw.headers)).status for _ in range(5)]
    assert statuses == [200] * 5
    refused = await http.get(gw.url + "/health", headers=gw.headers)
    assert refused.status == 429
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.headers["RateLimit-Policy"] == '"key";q=5;w=60'
    # The limit names the policy it is counted against, as the IETF draft has clients match them.
    assert refused.headers["RateLimit"].startswith('"key";r=0;t=')
    assert (await refused.json())["error"].startswith("Too many requests")
    # A key's own rate_limit in KEYS_FILE wins over KEY_RATE_LIMIT_MAX_REQUESTS.
    mine = [(await http.get(gw.url + "/health", headers=bearer(own_secret))).status for _ in range(3)]
    assert mine == [200, 200, 429]


def key_spent(response: aiohttp.ClientResponse, limit: int) -> int:
    """Requests counted against the key so far, this one included, from its RateLimit header."""
    assert response.headers["RateLimit-Policy"] == f'"key";q={limit};w=900'
    remaining = int(response.headers["RateLimit"].split(";")[1].removeprefix("r="))
    return limit - remaining


@pytest.mark.parametrize("transport", ["sse", "streamable"])
async def test_a_default_key_serves_an_agent_far_past_the_per_address_limit(
    start_gateway: StartGateway, http: Any, transport: str
) -> None:
    # The guide's settings (100 requests per 15 minutes per address) and the keys' own default.
    gw = await start_gateway({"test": SDK_SERVER}, rate_limit_max_requests=100)

    async def sampler(context: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        return types.CreateMessageResult(
            role="assistant", content=types.TextContent(type="text", text="yes"), model="m"
        )

    calls = 60  # each asks the client's model: the call and the client's answer are a POST each
    async with mcp_client(gw.url, gw.token, transport=transport, sampling_callback=sampler) as client:
        for _ in range(calls):
            assert text_of(await client.call_tool("ask_llm", {"question": "ok?"})) == "yes"
    spent = key_spent(await http.get(gw.url + "/health", headers=gw.headers), 9000)
    # Two requests per call (the client's answers to the server count too) and a few for the session.
    assert 2 * calls < spent <= 2 * calls + 8


async def test_a_stale_token_retried_never_locks_the_owner_out(
    start_gateway: StartGateway, http: Any, tmp_path: Path
) -> None:
    # An mcp-remote started with the token of an earlier run retries it, again and again.
    gw = await start_gateway(lockout_failures=3)
    for _ in range(3):
        for _ in range(4):
            assert (await http.get(gw.url + "/health", headers=bearer("token-of-the-last-run"))).status == 401
        assert (await http.get(gw.url + "/health", headers=gw.headers)).status == 200
    assert "auth.locked" not in (tmp_path / "audit.log").read_text()


async def test_a_lockout_refuses_every_guess_and_keeps_the_owners_sessions(
    start_gateway: StartGateway, http: Any, tmp_path: Path
) -> None:
    other_secret, other = new_key("other")
    write_keys(tmp_path / "keys.json", other)
    gw = await start_gateway(lockout_failures=3, keys_file=tmp_path / "keys.json")
    # The owner is at work: a Streamable HTTP session and a legacy SSE stream, from 127.0.0.1.
    sid = await initialize(http, gw.url + "/mcp", gw.token)
    async with http.get(gw.url + "/sse", headers=gw.headers) as stream:
        endpoint = (await next_event(stream)).data
        assert (await http.post(gw.url + endpoint, json=INIT, headers=gw.headers)).status == 202
        assert (await next_message(stream))["id"] == 1
        # A guesser on the same address: three different wrong tokens lock it out.
        for guess in ("guess-1", "guess-2", "guess-3"):
            assert (await http.get(gw.url + "/health", headers=bearer(guess))).status == 401

        async def refused(path: str, headers: dict[str, str], method: str = "GET") -> str:
            response = await http.request(method, gw.url + path, headers=headers, json=INIT)
            assert response.status == 429, await response.text()
            assert 0 < int(response.headers["Retry-After"]) <= 900
            # Not a word about the key: no quota headers, no session, the same body for all.
            assert not {"RateLimit", "RateLimit-Policy", "Mcp-Session-Id"} & set(response.headers)
            return await response.text()

        answers = {
            await refused("/health", bearer("guess-4")),  # a new guess
            await refused("/health", bearer("guess-1")),  # an old one
            await refused("/health", {}),  # no credential
            await refused("/mcp", {**ACCEPT, "Mcp-Session-Id": sid}),
            # The right token alone: the owner, or a guesser who has just hit it? Refused, unseen.
            await refused("/health", gw.headers),
            await refused("/mcp", {**ACCEPT, **gw.headers}, "POST"),  # a new session
            await refused("/mcp", {**ACCEPT, **gw.headers, "Mcp-Session-Id": "x" * 43}, "POST"),
            await refused("/mcp", {**ACCEPT, **bearer(other_secret), "Mcp-Session-Id": sid}, "POST"),
            await refused("/auth/login", gw.headers, "POST"),  # a login is a guess
        }
        assert len(answers) == 1  # right or wrong, every guess gets one and the same answer
        # The owner's sessions go on: 256-bit session ids of its own key, which no guess comes with.
        assert (await call(http, gw.url + "/mcp", gw.token, sid, "ping", {}))["result"] == {}
        ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
        assert (await http.post(gw.url + endpoint, json=ping, headers=gw.headers)).status == 202
        assert (await next_message(stream)) == {"jsonrpc": "2.0", "id": 2, "result": {}}
    lines = audit_lines(tmp_path / "audit.log")
    locked = [line for line in lines if line["event"] == "auth.locked"]
    assert "failures" in locked[0] and "retry_after" in locked[1]  # when it locked, then its refusals
    assert sum(line["event"] == "auth.failed" for line in lines) == 3  # the three guesses before it


async def test_the_generated_token_of_a_loopback_run_is_never_locked_out(
    start_gateway: StartGateway, http: Any
) -> None:
    # As `python server_secure.py` on loopback without AUTH_TOKEN: 256 random bits, made at start.
    gw = await start_gateway(lockout_failures=3, token_generated=True)
    for guess in ("guess-1", "guess-2", "guess-3"):
        assert (await http.get(gw.url + "/health", headers=bearer(guess))).status == 401
    assert (await http.get(gw.url + "/health", headers=bearer("guess-4"))).status == 429
    # A client started after the lockout (a new session included) works: no guess finds this one.
    assert (await http.get(gw.url + "/health", headers=gw.headers)).status == 200
    await initialize(http, gw.url + "/mcp", gw.token)
    assert (await http.get(gw.url + "/health", headers=bearer("guess-5"))).status == 429


async def test_a_cookie_login_keeps_working_through_a_lockout(start_gateway: StartGateway) -> None:
    gw = await start_gateway(lockout_failures=3)
    async with browser_session() as browser, aiohttp.ClientSession() as guesser:
        await login(browser, gw)
        for guess in ("guess-1", "guess-2", "guess-3"):
            assert (await guesser.get(gw.url + "/health", headers=bearer(guess))).status == 401
        assert (await guesser.get(gw.url + "/health", headers=bearer("guess-4"))).status == 429
        # The cookie holds a random login id under Fernet: nothing a guess produces.
        assert (await browser.get(gw.url + "/auth/session")).status == 200
        # No new login from a locked address, though, the right token included.
        relogin = await browser.post(gw.url + "/auth/login", json={"token": gw.token})
        assert relogin.status == 429


# -- cookie sessions --------------------------------------------------------------------------


def browser_session(cookies: dict[str, str] | None = None) -> aiohttp.ClientSession:
    # Like a browser on http://127.0.0.1: aiohttp's default jar ignores cookies from IP hosts.
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True), cookies=cookies)


async def login(http: aiohttp.ClientSession, gw: Running, **headers: str) -> aiohttp.ClientResponse:
    response = await http.post(gw.url + "/auth/login", json={"token": gw.token}, headers=headers)
    assert response.status == 200, await response.text()
    return response


async def test_cookie_flags_over_plain_http_and_behind_a_tls_proxy(start_gateway: StartGateway) -> None:
    gw = await start_gateway(trusted_proxies=("127.0.0.1",))
    async with aiohttp.ClientSession() as http:
        cookie = (await login(http, gw)).headers["Set-Cookie"]
        assert cookie.startswith("mcp-sse=") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert "Secure" not in cookie and "Max-Age=86400" in cookie
    async with aiohttp.ClientSession() as http:
        cookie = (await login(http, gw, **{"X-Forwarded-Proto": "https"})).headers["Set-Cookie"]
        assert cookie.startswith("__Host-mcp-sse=") and "Secure" in cookie and "Path=/" in cookie
        assert "Domain" not in cookie


async def test_cookie_login_logout_and_server_side_revocation(start_gateway: StartGateway) -> None:
    gw = await start_gateway(allowed_origins=("https://app.example.com",))
    async with browser_session() as browser:
        await login(browser, gw)
        me = await browser.get(gw.url + "/auth/session")
        assert me.status == 200 and (await me.json())["via"] == "cookie"
        stolen = {c.key: c.value for c in browser.cookie_jar}
        assert (
            await browser.post(gw.url + "/auth/logout", headers={"Origin": "https://app.example.com"})
        ).status == 200
    async with browser_session(stolen) as attacker:
        assert (await attacker.get(gw.url + "/auth/session")).status == 401  # a copied cookie is dead


async def test_login_mints_a_fresh_session_no_fixation(start_gateway: StartGateway) -> None:
    gw = await start_gateway()
    async with browser_session() as http:
        await login(http, gw)
        first = {c.key: c.value for c in http.cookie_jar}
        await login(http, gw)
        second = {c.key: c.value for c in http.cookie_jar}
        assert first["mcp-sse"] != second["mcp-sse"]
    async with browser_session(first) as old:
        assert (await old.get(gw.url + "/auth/session")).status == 200  # each login is its own


async def test_cookie_needs_an_allowed_origin_for_unsafe_methods(start_gateway: StartGateway) -> None:
    gw = await start_gateway(allowed_origins=("https://app.example.com",))
    async with browser_session() as browser:
        await login(browser, gw)
        forged = await browser.post(gw.url + "/mcp", json=INIT, headers=ACCEPT)
        assert forged.status == 403  # no Origin: a cross-site form or script cannot ride the cookie
        ok = await browser.post(
            gw.url + "/mcp", json=INIT, headers={**ACCEPT, "Origin": "https://app.example.com"}
        )
        assert ok.status == 200
        async with browser.get(gw.url + "/sse") as stream:  # EventSource: GET with the cookie only
            assert stream.status == 200
            assert (await next_event(stream)).event == "endpoint"


async def test_bad_login_is_401_and_audited(start_gateway: StartGateway, tmp_path: Path) -> None:
    gw = await start_gateway()
    async with aiohttp.ClientSession() as http:
        response = await http.post(gw.url + "/auth/login", json={"token": "nope"})
        assert response.status == 401
    assert "Invalid token" in (tmp_path / "audit.log").read_text()  # written before the answer


# -- audit ------------------------------------------------------------------------------------


async def test_audit_log_holds_the_events_and_not_one_secret(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    gw = await start_gateway({"test": SDK_SERVER}, audit_arguments=True)
    async with mcp_client(gw.url, gw.token) as client:
        await client.call_tool("echo", {"text": "hello"})
        with contextlib.suppress(
            MCPError
        ):  # a secret-looking argument is redacted even when values are logged
            await client.call_tool("echo", {"text": "hi", "api_key": "sk-live-0123456789"})
    async with aiohttp.ClientSession() as http:
        await http.get(gw.url + "/health", headers=bearer("definitely-wrong-token"))
    log_file = tmp_path / "audit.log"
    assert log_file.stat().st_mode & 0o777 == 0o600
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    events = {line["event"] for line in lines}
    assert {"mcp.session.open", "tool.invoked", "mcp.session.close", "auth.failed"} <= events
    invoked = next(line for line in lines if line["event"] == "tool.invoked")
    assert invoked["tool"] == "echo" and invoked["outcome"] == "ok" and invoked["identity"] == "auth-token"
    text = log_file.read_text()
    assert gw.token not in text and "definitely-wrong-token" not in text
    assert "sk-live-0123456789" not in text and "[REDACTED]" in text


async def test_open_streams_are_capped_per_key(start_gateway: StartGateway, http: Any) -> None:
    gw = await start_gateway(max_streams_per_key=2)
    first = await http.get(gw.url + "/sse", headers=gw.headers)
    second = await http.get(gw.url + "/sse", headers=gw.headers)
    assert first.status == second.status == 200
    third = await http.get(gw.url + "/sse", headers=gw.headers)
    assert third.status == 429 and "open streams" in (await third.json())["error"]
    first.close()
    async with asyncio.timeout(30):  # the slot frees as soon as the gateway sees the stream end
        while (again := await http.get(gw.url + "/sse", headers=gw.headers)).status != 200:
            again.close()
            await asyncio.sleep(0.05)
    again.close()
    second.close()


async def test_cookie_login_expires_when_idle(start_gateway: StartGateway) -> None:
    gw = await start_gateway(cookie_idle=0.5)
    async with browser_session() as browser:
        await login(browser, gw)
        assert (await browser.get(gw.url + "/auth/session")).status == 200
        await asyncio.sleep(0.8)
        assert (await browser.get(gw.url + "/auth/session")).status == 401


async def test_successful_authentication_is_audited_once_not_per_request(
    start_gateway: StartGateway, http: Any, tmp_path: Path
) -> None:
    gw = await start_gateway()
    for _ in range(5):
        assert (await http.get(gw.url + "/health", headers=gw.headers)).status == 200
    lines = (tmp_path / "audit.log").read_text().splitlines()
    assert sum('"event": "auth.success"' in line for line in lines) == 1
