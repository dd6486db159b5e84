"""GET /metrics (ops/metrics.py) through a real gateway: who may read it, what it holds after real
SDK traffic and failed logins, the loopback listener, and a real Prometheus scraping it."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mcp_sse.ops.metrics import METRICS
from mcp_sse.security.keys import generate_key
from mcp_sse.settings import Secret, Settings, SettingsError
from tests.conftest import SDK_SERVER, StartGateway, mcp_client, text_of
from tests.tls import certificate_authority

RULES = Path(__file__).resolve().parents[2] / "prometheus" / "mcp-sse.rules.yml"
METRICS_TOKEN = "m" * 8 + "-scraper-token-of-forty-characters!"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def write_keys(path: Path, *roles: str) -> dict[str, str]:
    """A keys file with one key per role; the secret of each, by role."""
    secrets, entries = {}, []
    for role in roles:
        secret, entry = generate_key(role, role)  # type: ignore[arg-type]
        secrets[role] = secret
        entries.append(entry)
    path.write_text(json.dumps({"keys": entries}))
    path.chmod(0o600)
    return secrets


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, by (name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


async def scrape(http: aiohttp.ClientSession, url: str, token: str) -> str:
    async with http.get(url + "/metrics", headers=bearer(token)) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/plain")
        return await response.text()


# -- who may read it ---------------------------------------------------------------------------


async def test_admin_keys_read_metrics_and_other_roles_are_refused(
    start_gateway: StartGateway, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    keys = write_keys(tmp_path / "keys.json", "admin", "operator", "viewer")
    gw = await start_gateway(keys_file=tmp_path / "keys.json")
    text = await scrape(http, gw.url, keys["admin"])
    assert "process_resident_memory_bytes" in text
    assert value(text, "mcp_sse_backend_state", backend="mcp-sse", state="running") == 1
    for role in ("operator", "viewer"):
        async with http.get(gw.url + "/metrics", headers=bearer(keys[role])) as response:
            assert response.status == 403
            assert "admin" in (await response.json())["error"]
    async with http.get(gw.url + "/metrics") as response:
        assert response.status == 401
    async with http.get(gw.url + "/metrics", headers=bearer("not-a-key-" * 4)) as response:
        assert response.status == 401
    # The refusals and the successful scrape are all counted, by route template and status.
    text = await scrape(http, gw.url, keys["admin"])
    assert value(text, "mcp_sse_http_requests_total", route="/metrics", method="GET", status="403") == 2
    assert value(text, "mcp_sse_http_requests_total", route="/metrics", method="GET", status="401") == 2
    # admin, operator, viewer: the scrape answering now is counted once it has answered.
    assert value(text, "mcp_sse_auth_total", outcome="success", reason="bearer") == 3


async def test_metrics_token_grants_metrics_only(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(metrics_token=Secret(METRICS_TOKEN))
    text = await scrape(http, gw.url, METRICS_TOKEN)
    assert "mcp_sse_http_requests_total" in text
    for path in ("/health", "/mcp/servers"):
        async with http.get(gw.url + path, headers=bearer(METRICS_TOKEN)) as response:
            assert response.status == 401, path
    async with http.post(gw.url + "/mcp", json={}, headers=bearer(METRICS_TOKEN)) as response:
        assert response.status == 401
    async with http.get(gw.url + "/metrics", headers=bearer(METRICS_TOKEN[:-1] + "?")) as response:
        assert response.status == 401
    text = await scrape(http, gw.url, gw.token)  # AUTH_TOKEN is an admin key
    assert value(text, "mcp_sse_auth_total", outcome="success", reason="metrics_token") == 1
    assert value(text, "mcp_sse_auth_total", outcome="failure", reason="invalid_token") == 4


async def test_metrics_off_serves_nothing(start_gateway: StartGateway, http: aiohttp.ClientSession) -> None:
    gw = await start_gateway(metrics=False)
    assert METRICS not in gw.app
    async with http.get(gw.url + "/metrics", headers=bearer(gw.token)) as response:
        assert response.status == 404


async def test_loopback_listener_needs_no_token_and_answers_loopback_names_only(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(metrics_listen=("127.0.0.1", 0))
    listening = gw.app[METRICS].listening
    assert listening is not None
    local = f"http://127.0.0.1:{listening[1]}"
    async with http.get(local + "/metrics") as response:
        assert response.status == 200
        assert "mcp_sse_backend_up" in await response.text()
    async with http.get(local + "/metrics", headers={"Host": "localhost"}) as response:
        assert response.status == 200
    # DNS rebinding: a page whose name resolves to 127.0.0.1 sends its own name as Host.
    async with http.get(local + "/metrics", headers={"Host": f"evil.example:{listening[1]}"}) as response:
        assert response.status == 421
    for path in ("/health", "/mcp", "/sse"):  # /metrics alone
        async with http.get(local + path) as response:
            assert response.status == 404, path
    async with http.get(gw.url + "/metrics") as response:  # the main port still wants a key
        assert response.status == 401


def test_settings_refuse_a_non_loopback_metrics_listener() -> None:
    for address in ("0.0.0.0:9464", "192.0.2.1:9464", "[2001:db8::1]:9464", "metrics.example:9464"):
        with pytest.raises(SettingsError, match=r"METRICS_LISTEN.*not a loopback address"):
            Settings.load(environ={"METRICS_LISTEN": address})
    with pytest.raises(SettingsError, match="METRICS_LISTEN"):
        Settings.load(environ={"METRICS_LISTEN": "9464"})
    with pytest.raises(SettingsError, match="not a loopback"):
        Settings(metrics_listen=("0.0.0.0", 9464))
    assert Settings.load(environ={"METRICS_LISTEN": "127.0.0.1:9464"}).metrics_listen == ("127.0.0.1", 9464)
    assert Settings.load(environ={"METRICS_LISTEN": "[::1]:9464"}).metrics_listen == ("::1", 9464)


def test_settings_check_the_metrics_token() -> None:
    with pytest.raises(SettingsError, match="at least 32"):
        Settings.load(environ={"METRICS_TOKEN": "short"})
    with pytest.raises(SettingsError, match="differ from AUTH_TOKEN"):
        Settings.load(environ={"METRICS_TOKEN": METRICS_TOKEN, "AUTH_TOKEN": METRICS_TOKEN})
    with pytest.raises(SettingsError, match="need METRICS on"):
        Settings.load(environ={"METRICS_TOKEN": METRICS_TOKEN, "METRICS": "off"})
    settings = Settings.load(environ={"METRICS_TOKEN": METRICS_TOKEN})
    assert METRICS_TOKEN not in repr(settings)


# -- what it holds -------------------------------------------------------------------------------


async def test_tool_calls_after_sdk_traffic(start_gateway: StartGateway, http: aiohttp.ClientSession) -> None:
    gw = await start_gateway({"sdk": SDK_SERVER, "other": SDK_SERVER})
    async with mcp_client(gw.url + "/servers/sdk", gw.token) as client:
        assert text_of(await client.call_tool("echo", {"text": "hi"})) == "hi"
        assert text_of(await client.call_tool("echo", {"text": "again"})) == "again"
        text = await scrape(http, gw.url, gw.token)
        assert value(text, "mcp_sse_sessions_open", transport="streamable", protocol="2025-11-25") == 1
    async with mcp_client(gw.url, gw.token, transport="sse") as client:  # the aggregate, legacy SSE
        await client.call_tool("other__echo", {"text": "x"})
    text = await scrape(http, gw.url, gw.token)
    assert value(text, "mcp_sse_tool_calls_total", backend="sdk", tool="echo", outcome="ok") == 2
    assert value(text, "mcp_sse_tool_calls_total", backend="other", tool="echo", outcome="ok") == 1
    assert value(text, "mcp_sse_tool_call_duration_seconds_count", backend="sdk") == 2
    assert value(text, "mcp_sse_audit_events_total", event="tool.invoked") == 3
    route = "/servers/{name}/mcp"
    assert (value(text, "mcp_sse_http_requests_total", route=route, method="POST", status="200") or 0) >= 3
    for backend in ("sdk", "other"):
        assert value(text, "mcp_sse_backend_up", backend=backend) == 1
        assert value(text, "mcp_sse_backend_restarts_total", backend=backend) == 0
        assert (value(text, "mcp_sse_backend_resident_memory_bytes", backend=backend) or 0) > 1_000_000
        assert value(text, "mcp_sse_backend_children", backend=backend) == 1


async def test_unlisted_tools_and_raw_paths_make_no_series(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway({"sdk": SDK_SERVER})
    async with mcp_client(gw.url, gw.token) as client:
        for n in range(3):
            result = await client.call_tool(f"made-up-{n}", {})
            assert result.is_error
    for n in range(3):
        async with http.get(f"{gw.url}/probe-{n}/{gw.token}", headers=bearer(gw.token)) as response:
            assert response.status == 404
    for method in ("PROPFIND", "PURGE", "MKCOL"):  # WebDAV and the like, which llhttp parses
        async with http.request(method, gw.url + "/health", headers=bearer(gw.token)) as response:
            assert response.status == 405
    text = await scrape(http, gw.url, gw.token)
    assert "made-up" not in text and "probe-" not in text and "PROPFIND" not in text and "PURGE" not in text
    assert value(text, "mcp_sse_http_requests_total", route="unmatched", method="other", status="405") == 3
    calls = [k for k in samples(text) if k[0] == "mcp_sse_tool_calls_total"]
    assert all(dict(labels)["tool"] == "other" for _, labels in calls), calls
    assert value(text, "mcp_sse_http_requests_total", route="unmatched", method="GET", status="404") == 3


async def test_auth_failures_after_failed_logins(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(lockout_failures=3, metrics_token=Secret(METRICS_TOKEN))
    for n in range(3):
        async with http.post(gw.url + "/auth/login", json={"token": f"wrong-{n}" * 5}) as response:
            assert response.status == 401
    async with http.get(gw.url + "/health", headers=bearer("also-wrong" * 4)) as response:
        assert response.status == 429  # the address is locked out now
    async with http.get(gw.url + "/health") as response:
        assert response.status == 429
    # The lockout holds the scraper too (no guess may pass a locked address), so read it directly.
    text = gw.app[METRICS].exposition().decode()
    assert value(text, "mcp_sse_auth_total", outcome="failure", reason="login") == 3
    assert value(text, "mcp_sse_rate_limited_total", scope="lockout") == 2
    assert value(text, "mcp_sse_audit_events_total", event="auth.failed") == 3
    assert (value(text, "mcp_sse_audit_events_total", event="auth.locked") or 0) >= 1


async def test_no_secret_in_the_output(
    start_gateway: StartGateway, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    keys = write_keys(tmp_path / "keys.json", "admin", "operator")
    gw = await start_gateway(
        {"sdk": SDK_SERVER}, keys_file=tmp_path / "keys.json", metrics_token=Secret(METRICS_TOKEN)
    )
    async with mcp_client(gw.url, keys["operator"]) as client:
        await client.call_tool("echo", {"text": "sensitive-argument"})
    for secret in (*keys.values(), gw.token):  # presented in the path, the query and the header
        async with http.get(f"{gw.url}/x/{secret}?token={secret}", headers=bearer(secret)) as response:
            assert response.status in (401, 404)
    text = await scrape(http, gw.url, METRICS_TOKEN)
    text += await scrape(http, gw.url, keys["admin"])
    for secret in (*keys.values(), gw.token, METRICS_TOKEN, "sensitive-argument"):
        assert secret not in text
    assert "operator" not in text and "admin" not in text  # no key ids or names either


async def test_tls_certificate_expiry(start_gateway: StartGateway, tmp_path: Path) -> None:
    from cryptography import x509

    _, cert, key = certificate_authority(tmp_path)
    gw = await start_gateway(tls_cert=cert, tls_key=key)
    expected = x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc.timestamp()
    text = gw.app[METRICS].exposition().decode()
    assert value(text, "mcp_sse_tls_certificate_expiry_timestamp_seconds") == expected
    plain = await start_gateway(audit_log=tmp_path / "plain.log")
    assert "tls_certificate" not in plain.app[METRICS].exposition().decode()  # no 0 to alert on


# -- a real Prometheus ---------------------------------------------------------------------------


def _prometheus() -> tuple[str, str]:
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if prometheus is None or promtool is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus; .ci/run installs it)")
    return prometheus, promtool


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_alert_rules_pass_promtool() -> None:
    _, promtool = _prometheus()
    checked = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    rules = [line.strip() for line in RULES.read_text().splitlines() if line.strip().startswith("- alert:")]
    assert len(rules) >= 5
    assert RULES.read_text().count("summary:") == len(rules)


async def test_real_prometheus_scrapes_the_gateway(
    start_gateway: StartGateway, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    prometheus, _ = _prometheus()
    gw = await start_gateway({"sdk": SDK_SERVER})
    async with mcp_client(gw.url, gw.token) as client:
        await client.call_tool("echo", {"text": "scraped"})
    async with http.post(gw.url + "/auth/login", json={"token": "wrong" * 8}) as response:
        assert response.status == 401
    port = _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        textwrap.dedent(
            f"""\
            global:
              scrape_interval: 1s
              evaluation_interval: 1s
            rule_files: ["{RULES}"]
            scrape_configs:
              - job_name: mcp-sse
                metrics_path: /metrics
                authorization:
                  credentials: "{gw.token}"
                static_configs:
                  - targets: ["{gw.url.removeprefix("http://")}"]
            """
        )
    )
    log = (tmp_path / "prometheus.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        prometheus,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=log,
    )
    api = f"http://127.0.0.1:{port}/api/v1"

    async def query(expr: str) -> list[dict[str, Any]]:
        try:
            async with http.get(f"{api}/query", params={"query": expr}) as response:
                if response.status != 200:
                    return []
                body = await response.json()
        except aiohttp.ClientError:
            return []  # not listening yet
        return list(body["data"]["result"])

    async def until(expr: str) -> list[dict[str, Any]]:
        while not (found := await query(expr)):
            assert process.returncode is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            await asyncio.sleep(0.2)
        return found

    try:
        async with asyncio.timeout(90):  # bounds a failing test only
            up = await until('up{job="mcp-sse"} == 1')
            assert up[0]["metric"]["instance"] == gw.url.removeprefix("http://")
            calls = await until('mcp_sse_tool_calls_total{backend="sdk",tool="echo",outcome="ok"}')
            assert calls[0]["value"][1] == "1"
            failures = await until('mcp_sse_auth_total{outcome="failure",reason="login"}')
            assert failures[0]["value"][1] == "1"
            await until('mcp_sse_backend_state{backend="sdk",state="running"} == 1')
            await until("process_resident_memory_bytes > 0")
            # The rules are loaded and evaluated against these series (none of them fires here).
            while True:
                async with http.get(f"{api}/rules") as response:
                    groups = (await response.json())["data"]["groups"]
                rules = [r for g in groups for r in g["rules"]]
                if rules and all(r.get("health") == "ok" for r in rules):
                    break
                await asyncio.sleep(0.2)
            assert {r["name"] for r in rules} >= {
                "MCPSSEAuthFailures",
                "MCPSSEHighErrorRate",
                "MCPSSETLSCertificateExpiring",
                "MCPSSEBackendDown",
                "MCPSSECircuitOpen",
            }
            assert all(r["state"] == "inactive" for r in rules), rules
    finally:
        process.terminate()
        await process.wait()
        log.close()
