"""`server_secure.py selftest URL --token T`, run for real (a subprocess) against real servers on loopback:
our own gateway (plain http and native TLS), a deliberately misconfigured one, and nothing at all."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import secrets
import socket
import ssl
import sys
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography.fernet import Fernet
from multidict import CIMultiDict, CIMultiDictProxy

from mcp_sse.ops import selftest
from tests.conftest import launch
from tests.tls import certificate_authority

REPO = Path(__file__).resolve().parents[2]
SCRIPT = str(REPO / "server_secure.py")
# Variables the gateway (or the selftest, AUTH_TOKEN) reads: the developer's shell must not change the test.
SETTINGS = {
    "HOST",
    "PORT",
    "AUTH_TOKEN",
    "KEYS_FILE",
    "SESSION_SECRET",
    "MCP_SERVERS_FILE",
    "ALLOWED_IPS",
    "ALLOWED_HOSTS",
    "ALLOWED_ORIGINS",
    "TRUSTED_PROXIES",
    "TLS_CERT",
    "TLS_KEY",
    "HEALTH_PUBLIC",
    "URL_AUTH",
    "RATE_LIMIT_WINDOW_MS",
    "RATE_LIMIT_MAX_REQUESTS",
    "KEY_RATE_LIMIT_MAX_REQUESTS",
    "AUDIT_LOG",
    "LOG_LEVEL",
    "EVENT_LOOP",
    "PUBLIC_URL",
    "OAUTH_SERVER",
    "OAUTH_ISSUERS",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "STATE_DIR",
    "STATE_DIRECTORY",
}


@pytest.fixture
def token() -> str:
    return secrets.token_urlsafe(32)


@pytest.fixture
def clean_env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {**{k: v for k, v in os.environ.items() if k not in SETTINGS}, "HOME": str(home)}


def gateway_env(clean_env: dict[str, str], tmp_path: Path, token: str, **settings: str) -> dict[str, str]:
    return {
        **clean_env,
        "AUTH_TOKEN": token,
        "SESSION_SECRET": Fernet.generate_key().decode(),
        "AUDIT_LOG": str(tmp_path / "audit.log"),
        **settings,
    }


@contextlib.asynccontextmanager
async def our_gateway(env: dict[str, str]) -> AsyncIterator[str]:
    """server_secure.py as an operator starts it, on a free loopback port; its URL."""
    argv = [sys.executable, SCRIPT, "--host", "127.0.0.1", "--port", "0", "--env-file", os.devnull]
    server = await launch(argv, env=env, cwd=REPO)
    try:
        yield server.url
    finally:
        await server.stop()


@dataclass
class Done:
    code: int
    stdout: str
    stderr: str

    @property
    def rows(self) -> dict[str, tuple[str, str]]:
        """--json's checks: name -> (status, detail)."""
        assert self.stdout.strip(), f"selftest printed no results (exit {self.code}): {self.stderr[-2000:]}"
        return {c["name"]: (c["status"], c["detail"]) for c in json.loads(self.stdout)["checks"]}

    def statuses(self) -> dict[str, str]:
        return {name: status for name, (status, _) in self.rows.items()}


async def run_selftest(
    *args: str, env: dict[str, str], secret: str | None, stdin: bytes | None = None
) -> Done:
    """`python server_secure.py selftest ...` as a subprocess (the event loop keeps serving meanwhile).
    Whatever it printed, `secret` (the token) is not in it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        SCRIPT,
        "selftest",
        *args,
        cwd=REPO,
        env=env,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(stdin), 100)  # only bounds a failing test
    done = Done(await process.wait(), out.decode(), err.decode())
    if secret is not None:
        assert secret not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return done


def everything_passed(done: Done) -> None:
    failed = {name: row for name, row in done.rows.items() if row[0] == "FAIL"}
    assert failed == {} and done.code == 0, failed


# -- certificates ---------------------------------------------------------------------------------


def issue(tmp_path: Path, days: float, name: str = "server") -> tuple[Path, Path, Path]:
    """(CA, certificate for 127.0.0.1 and localhost valid `days` more, its key): the default day
    of tests/tls.py is what the expiry check rightly fails."""
    return certificate_authority(tmp_path, name, days=days)


# -- our own gateway ------------------------------------------------------------------------------


@pytest.mark.parametrize("health_public", ["false", "true"])
async def test_our_gateway_passes_every_check_over_http(
    tmp_path: Path, clean_env: dict[str, str], token: str, health_public: str
) -> None:
    env = gateway_env(clean_env, tmp_path, token, ALLOWED_HOSTS="127.0.0.1", HEALTH_PUBLIC=health_public)
    async with our_gateway(env) as url:
        done = await run_selftest(url, "--token", token, "--json", env=clean_env, secret=token)
        everything_passed(done)
        rows = done.rows
        assert rows["TLS"][0] == "SKIP"  # plain http, on loopback
        assert {status for name, (status, _) in rows.items() if name != "TLS"} == {"PASS"}
        assert "tools/list" in rows["right token: MCP initialize, tools/list"][1]
        health = rows["auth required: GET /health"][1]
        assert ("bare status only" in health) == (health_public == "true")
        # The table, for people: one aligned row per check and a count; the token comes from the
        # environment this time (which other local users cannot read, unlike a command line).
        table = await run_selftest(url, env={**clean_env, "AUTH_TOKEN": token}, secret=token)
    assert table.code == 0, table.stdout
    lines = table.stdout.splitlines()
    header = next(line for line in lines if line.startswith("CHECK"))
    column = header.index("RESULT")
    checks = [line for line in lines if line.startswith(tuple(rows))]
    assert len(checks) == len(rows) and all(line[column : column + 4] in ("PASS", "SKIP") for line in checks)
    assert lines[-1] == f"{len(rows) - 1} passed, 0 failed, 1 skipped"
    assert token not in (tmp_path / "audit.log").read_text()


async def test_our_default_settings_pass_every_check(
    tmp_path: Path, clean_env: dict[str, str], token: str
) -> None:
    """With ALLOWED_HOSTS unset a loopback bind accepts only its loopback names (this test's first
    run found it answering Host: evil.example, what a DNS-rebound page sends)."""
    async with our_gateway(gateway_env(clean_env, tmp_path, token)) as url:
        done = await run_selftest(url, "--token", token, "--json", env=clean_env, secret=token)
    failed = {name: detail for name, (status, detail) in done.rows.items() if status == "FAIL"}
    assert failed == {} and done.code == 0
    assert done.rows["Host: evil.example refused"][0] == "PASS"


async def test_repeated_runs_do_not_lock_the_address_out(
    tmp_path: Path, clean_env: dict[str, str], token: str
) -> None:
    """Each run presents two failing credentials (its wrong token, the right one in a URL), the same
    two every time: a lockout of 3 distinct failures is never reached however often CI runs it."""
    env = gateway_env(clean_env, tmp_path, token, ALLOWED_HOSTS="127.0.0.1", AUTH_LOCKOUT_FAILURES="3")
    async with our_gateway(env) as url:
        for _ in range(3):
            done = await run_selftest(url, "--json", "--token", token, env=clean_env, secret=token)
            everything_passed(done)
    assert '"event": "auth.locked"' not in (tmp_path / "audit.log").read_text()


async def test_url_auth_fails_the_url_rows_even_when_documented(
    tmp_path: Path, clean_env: dict[str, str], token: str
) -> None:
    env = gateway_env(clean_env, tmp_path, token, ALLOWED_HOSTS="127.0.0.1", URL_AUTH="true")
    async with our_gateway(env) as url:
        done = await run_selftest(url, "--token", token, "--json", env=clean_env, secret=token)
    failed = {name: detail for name, (status, detail) in done.rows.items() if status == "FAIL"}
    assert list(failed) == ["token in URL refused: ?token=", "token in URL refused: ?access_token="]
    assert all("URL_AUTH" in detail and "proxy logs" in detail for detail in failed.values())
    assert done.code == 1


async def test_rate_limit_flag_spends_the_budget_until_a_429(
    tmp_path: Path, clean_env: dict[str, str], token: str
) -> None:
    env = gateway_env(clean_env, tmp_path, token, ALLOWED_HOSTS="127.0.0.1")  # the default 100 / 15 min
    async with our_gateway(env) as url:
        done = await run_selftest(
            url, "--rate-limit", "--json", "--token", token, env=clean_env, secret=token
        )
        everything_passed(done)
        status, detail = done.rows["rate limit enforced (429)"]
        assert status == "PASS" and "Retry-After" in detail
        assert list(done.rows)[-1] == "rate limit enforced (429)"  # last: what it spends, the others need
        # What it costs: this address's requests without a key are refused for the window, and a check
        # that cannot tell says so (a FAIL, so CI does not pass blind), while keyed requests still work.
        again = await run_selftest(url, "--json", "--token", token, env=clean_env, secret=token)
    assert again.code == 1
    status, detail = again.rows["auth required: GET /sse"]
    assert status == "FAIL" and detail.startswith("429 (Retry-After") and "rate limited" in detail
    assert again.rows["right token: MCP initialize, tools/list"][0] == "PASS"


async def test_our_gateway_over_tls(tmp_path: Path, clean_env: dict[str, str], token: str) -> None:
    ca, cert, key = issue(tmp_path, days=90)
    env = gateway_env(
        clean_env, tmp_path, token, ALLOWED_HOSTS="127.0.0.1", TLS_CERT=str(cert), TLS_KEY=str(key)
    )
    async with our_gateway(env) as url:
        assert url.startswith("https://")
        trusted = await run_selftest(
            url, "--ca-file", str(ca), "--json", "--token", token, env=clean_env, secret=token
        )
        # The system's CAs do not know this one: the certificate row fails and nothing else is sent,
        # the token least of all, unless --insecure says to go on anyway (the row still fails).
        untrusted = await run_selftest(url, "--json", "--token", token, env=clean_env, secret=token)
        insecure = await run_selftest(
            url, "--insecure", "--json", "--token", token, env=clean_env, secret=token
        )
    everything_passed(trusted)
    rows = trusted.rows
    legacy = "PASS" if selftest._legacy_context() is not None else "SKIP"
    assert {name: status for name, (status, _) in rows.items() if name.startswith("TLS")} == {
        "TLS version": "PASS",
        "TLS 1.0/1.1 refused": legacy,
        "TLS certificate expiry": "PASS",
        "TLS certificate trusted": "PASS",
    }
    assert "HSTS" in rows["security headers: SSE stream"][1]
    assert untrusted.code == 1 and list(untrusted.rows) == list(rows)[:4]
    status, detail = untrusted.rows["TLS certificate trusted"]
    assert status == "FAIL" and "--ca-file" in detail and "--insecure" in detail
    assert insecure.code == 1 and list(insecure.rows) == list(rows)
    assert [n for n, s in insecure.statuses().items() if s == "FAIL"] == ["TLS certificate trusted"]


# -- a deliberately misconfigured server ----------------------------------------------------------


def misconfigured_app() -> web.Application:
    """Everything the secure profile forbids: any token or none, no security headers, any Origin
    echoed with credentials, any Host, ?token= welcome, its version and backends on /health, no rate
    limits, and an error message that quotes the caller's Authorization header."""

    @web.middleware
    async def echo_origin(request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        if (origin := request.headers.get("Origin")) is not None:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Credentials"] = "true"
        return response

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"event: endpoint\ndata: /messages?session_id=1\n\n")
        return response

    async def mcp(request: web.Request) -> web.Response:
        message = await request.json()
        if "id" not in message:
            return web.Response(status=202)
        if message["method"] == "initialize":
            info = {"name": "leaky", "version": "1.2.3"}
            result = {"protocolVersion": "2025-06-18", "capabilities": {"tools": {}}, "serverInfo": info}
            return web.json_response(
                {"jsonrpc": "2.0", "id": message["id"], "result": result}, headers={"Mcp-Session-Id": "1"}
            )
        said = request.headers.get("Authorization", "")
        error = {"code": -32603, "message": f"tools unavailable for {said}"}
        return web.json_response({"jsonrpc": "2.0", "id": message["id"], "error": error})

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def accepted(request: web.Request) -> web.Response:
        return web.Response(status=202)

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "version": "1.2.3", "backends": ["db", "search"]})

    async def preflight(request: web.Request) -> web.Response:
        headers = {"Access-Control-Allow-Methods": "GET, POST, DELETE", "Access-Control-Allow-Headers": "*"}
        return web.Response(status=204, headers=headers)

    app = web.Application(middlewares=[echo_origin])
    app.router.add_get("/sse", stream)
    app.router.add_post("/messages", accepted)
    app.router.add_post("/mcp", mcp)
    app.router.add_get("/mcp", stream)
    app.router.add_delete("/mcp", ok)
    app.router.add_get("/mcp/servers", ok)
    app.router.add_get("/health", health)
    app.router.add_route("OPTIONS", "/{tail:.*}", preflight)
    return app


def lenient_tls(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context that still speaks TLS 1.0 and 1.1."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    context.load_cert_chain(cert, key)
    return context


@contextlib.asynccontextmanager
async def misconfigured(tls: ssl.SSLContext) -> AsyncIterator[str]:
    runner = web.AppRunner(misconfigured_app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"https://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_a_misconfigured_server_fails_what_it_gets_wrong(
    tmp_path: Path, clean_env: dict[str, str], token: str
) -> None:
    ca, cert, key = issue(tmp_path, days=10)
    async with misconfigured(lenient_tls(cert, key)) as url:
        done = await run_selftest(
            url, "--ca-file", str(ca), "--rate-limit", "--json", "--token", token, env=clean_env, secret=token
        )
    assert done.code == 1
    expected = {
        "TLS version": "PASS",
        "TLS 1.0/1.1 refused": "FAIL" if selftest._legacy_context() is not None else "SKIP",
        "TLS certificate expiry": "FAIL",
        "TLS certificate trusted": "PASS",
        **{f"auth required: {method} {path}": "FAIL" for method, path in selftest.AUTH_ROUTES},
        "wrong token refused": "FAIL",
        "token in URL refused: ?token=": "FAIL",
        "token in URL refused: ?access_token=": "FAIL",
        "token in URL refused: ?api_key=": "FAIL",
        "right token: MCP initialize, tools/list": "FAIL",
        "security headers: API answer": "FAIL",
        "security headers: SSE stream": "FAIL",
        "security headers: error answer": "SKIP",  # it never answers an error
        "CORS: preflight from foreign Origin": "FAIL",
        "CORS: request from foreign Origin": "FAIL",
        "Host: evil.example refused": "FAIL",
        "/health without a token reveals nothing": "FAIL",
        "rate limit headers": "FAIL",
        "rate limit enforced (429)": "FAIL",
    }
    assert done.statuses() == expected
    rows = done.rows
    assert "accepted TLSv1" in rows["TLS 1.0/1.1 refused"][1] or expected["TLS 1.0/1.1 refused"] == "SKIP"
    expires = (dt.datetime.now(dt.UTC) + dt.timedelta(days=10)).strftime("%Y-%m-%d")
    assert expires in rows["TLS certificate expiry"][1] and "renew" in rows["TLS certificate expiry"][1]
    assert "served without a token" in rows["auth required: GET /sse"][1]
    assert "URL" in rows["token in URL refused: ?token="][1]
    # Its error quoted the Authorization header: shown masked, never as sent.
    assert "Bearer <token>" in rows["right token: MCP initialize, tools/list"][1]
    for which in ("API answer", "SSE stream"):
        lacks = rows[f"security headers: {which}"][1]
        assert all(h in lacks for h in ("nosniff", "X-Frame-Options", "Referrer-Policy", "Cache-Control"))
        assert "Strict-Transport-Security" in lacks  # https, so HSTS is asked for too
    assert rows["CORS: preflight from foreign Origin"][1] == (
        f"Access-Control-Allow-Origin: {selftest.EVIL_ORIGIN} with credentials"
    )
    leaks = rows["/health without a token reveals nothing"][1]
    assert "version" in leaks and "backends" in leaks and "Server: Python" in leaks
    assert "no 429 after" in rows["rate limit enforced (429)"][1]


# -- nothing there ---------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again: a connection is refused


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_an_unreachable_url_is_one_clear_failure(
    clean_env: dict[str, str], token: str, scheme: str
) -> None:
    url = f"{scheme}://127.0.0.1:{closed_port()}"
    done = await run_selftest(url, "--token", token, env=clean_env, secret=token)
    assert done.code == 1 and done.stderr == ""
    connect = [line for line in done.stdout.splitlines() if line.startswith("connect")]
    assert len(connect) == 1 and "FAIL" in connect[0], done.stdout
    assert "cannot connect" in connect[0] or "nothing answers TLS" in connect[0]
    as_json = await run_selftest(url, "--json", "--token", token, env=clean_env, secret=token)
    assert as_json.code == 1 and as_json.statuses()["connect"] == "FAIL"
    assert json.loads(as_json.stdout)["ok"] is False


async def test_a_silent_server_times_out(clean_env: dict[str, str], token: str) -> None:
    with socket.socket() as sock:  # listens, so connections are made, but never answers
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        done = await run_selftest(
            url, "--timeout", "0.5", "--json", "--token", token, env=clean_env, secret=token
        )
    assert done.code == 1
    assert done.rows["connect"] == ("FAIL", "no answer within 0.5 s")


# -- usage --------------------------------------------------------------------------------------------


async def test_usage_errors_and_the_token_from_stdin(clean_env: dict[str, str], token: str) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    missing = await run_selftest(url, env=clean_env, secret=None)
    assert missing.code == 2 and "--token" in missing.stderr
    for bad in ("ftp://example.com", "127.0.0.1:3001", f"http://127.0.0.1/?token={token}"):
        refused = await run_selftest(bad, "--token", token, env=clean_env, secret=token)
        assert refused.code == 2 and refused.stdout == "" and "URL" in refused.stderr, refused.stderr
    typo = await run_selftest(url, "--tokn", token, env=clean_env, secret=token)
    assert typo.code == 2 and "unrecognized" in typo.stderr
    # A key that starts with "-" (token_urlsafe makes one in 64) is the token's value, not an option;
    # another option right after --token is still that option, and the token still missing.
    dashed = "-" + token[1:]
    taken = await run_selftest(url, "--token", dashed, "--json", env=clean_env, secret=dashed)
    assert taken.code == 1 and taken.statuses() == {"TLS": "SKIP", "connect": "FAIL"}, taken.stderr
    for option in ("--json", "--timeout=1"):
        unset = await run_selftest(url, "--token", option, env=clean_env, secret=None)
        assert unset.code == 2 and "--token: expected one argument" in unset.stderr
    piped = await run_selftest(
        url, "--token", "-", "--json", env=clean_env, secret=token, stdin=f"{token}\n".encode()
    )
    assert piped.code == 1 and piped.statuses() == {"TLS": "SKIP", "connect": "FAIL"}


def answer(**headers: str) -> selftest.Answer:
    return selftest.Answer(200, CIMultiDictProxy(CIMultiDict(headers)), b"")


def test_masker_and_header_readers() -> None:
    mask = selftest.Masker("a+b/c=")
    assert mask("x a+b/c= y a%2Bb%2Fc%3D z") == "x <token> y <token> z"
    assert selftest.rate_limit_of(answer(**{"RateLimit-Policy": '"default";q=100;w=900'})) == 100
    assert selftest.rate_limit_of(answer(RateLimit="limit=7, remaining=1, reset=5")) == 7
    assert selftest.rate_limit_of(answer(**{"X-RateLimit-Limit": "60"})) == 60
    assert selftest.rate_limit_of(answer()) is None
    assert len(selftest.header_problems(answer(), https=True)) == 5
    framed = answer(**{"Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'"})
    assert not any("Frame" in p for p in selftest.header_problems(framed, https=False))
