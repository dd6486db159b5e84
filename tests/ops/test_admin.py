"""The admin API (/api/) through a real server: who may use it, keys, the audit trail, backends
and sessions; and through a real server_secure.py process, SIGHUP keeping what the API changed."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import signal
import stat
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.fernet import Fernet

from mcp_sse.app import create_app
from mcp_sse.security.keys import generate_key, load_keys
from mcp_sse.settings import Secret, Settings
from mcp_sse.state import BACKENDS
from mcp_sse.upstream import backend as backend_module
from tests.conftest import init_message, launch, next_event, until_eof

REPO = Path(__file__).resolve().parents[2]
ORIGIN = "http://console.example"


@dataclass
class Admin:
    url: str
    app: web.Application
    keys_file: Path | None
    audit_log: Path
    secrets: dict[str, str]  # role (or "limited") -> secret
    ids: dict[str, str]

    def auth(self, who: str = "admin") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secrets[who]}"}


StartAdmin = Callable[..., Awaitable[Admin]]


@pytest.fixture
async def start_admin(
    aiohttp_server: Callable[..., Awaitable[TestServer]], token: str, tmp_path: Path
) -> StartAdmin:
    """create_app() with a KEYS_FILE of an admin, an operator, a viewer and an admin limited to one
    backend (or none with keys_file=False), the /api/ routes in, on 127.0.0.1."""

    async def start(
        servers: dict[str, dict[str, Any]] | None = None, *, keys_file: bool = True, **overrides: Any
    ) -> Admin:
        secrets_by_role: dict[str, str] = {"token": token}
        ids: dict[str, str] = {"token": "auth-token"}
        settings: dict[str, Any] = {
            "auth_token": Secret(token),
            "session_secret": Secret(Fernet.generate_key().decode()),
            "audit_log": tmp_path / "audit.log",
            "rate_limit_max_requests": 100_000,
            "allowed_origins": (ORIGIN,),
            **overrides,
        }
        path = None
        if keys_file:
            entries = []
            for who, role in (("admin", "admin"), ("operator", "operator"), ("viewer", "viewer")):
                secret, entry = generate_key(who, role)
                secrets_by_role[who], ids[who] = secret, entry["id"]
                entries.append(entry)
            secret, entry = generate_key("limited", "admin")
            entry["backends"] = ["nothing"]
            secrets_by_role["limited"], ids["limited"] = secret, entry["id"]
            entries.append(entry)
            path = tmp_path / "keys.json"
            path.write_text(json.dumps({"keys": entries}))
            path.chmod(0o600)
            settings["keys_file"] = path
        if servers is not None:
            servers_file = tmp_path / "servers.json"
            servers_file.write_text(json.dumps({"mcpServers": servers}))
            settings["servers_file"] = servers_file
        app = create_app(Settings(**settings))
        server = await aiohttp_server(app, host="127.0.0.1")
        return Admin(
            str(server.make_url("")).rstrip("/"), app, path, tmp_path / "audit.log", secrets_by_role, ids
        )

    return start


def audit_lines(admin: Admin) -> list[dict[str, Any]]:
    return [json.loads(line) for line in admin.audit_log.read_text().splitlines()]


ROUTES = [
    ("GET", "/api/keys", None),
    ("POST", "/api/keys", {"name": "x", "role": "admin"}),
    ("DELETE", "/api/keys/{admin}", None),
    ("POST", "/api/keys/{admin}/rotate", None),
    ("GET", "/api/audit", None),
    ("GET", "/api/audit/export", None),
    ("GET", "/api/backends", None),
    ("POST", "/api/backends/embedded/restart", None),
    ("GET", "/api/sessions", None),
    ("DELETE", "/api/sessions/abcdefghijklmnopqrstuvwxyz", None),
    ("GET", "/api/nothing-here", None),
]


async def test_only_an_unrestricted_admin_key_gets_in(start_admin: StartAdmin) -> None:
    admin = await start_admin()
    async with aiohttp.ClientSession() as http:
        for method, path, body in ROUTES:
            url = admin.url + path.format(**admin.ids)
            for who in ("viewer", "operator", "limited"):
                async with http.request(method, url, headers=admin.auth(who), json=body) as r:
                    assert r.status == 403, (who, method, path)
                    assert "admin API" in (await r.json())["error"]
            async with http.request(method, url, json=body) as r:
                assert r.status == 401, (method, path)
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
            async with http.request(method, url, headers={"Authorization": "Bearer wrong"}, json=body) as r:
                assert r.status == 401
        # Nothing any of them tried changed anything.
        async with http.get(admin.url + "/api/keys", headers=admin.auth()) as r:
            assert r.status == 200
            assert {k["id"] for k in (await r.json())["keys"]} == set(admin.ids.values())
        async with http.get(admin.url + "/api/nothing-here", headers=admin.auth()) as r:
            assert r.status == 404 and "no admin route" in (await r.json())["error"]
    denied = [line for line in audit_lines(admin) if line["event"] == "policy.denied"]
    assert {line["identity"] for line in denied} == {admin.ids[w] for w in ("viewer", "operator", "limited")}


async def test_key_list_shows_policy_and_use_never_a_secret(start_admin: StartAdmin) -> None:
    admin = await start_admin()
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            async with http.get(admin.url + "/health", headers=admin.auth("operator")) as r:
                assert r.status == 200
        async with http.get(admin.url + "/api/keys", headers=admin.auth()) as r:
            assert r.status == 200 and r.headers["Cache-Control"] == "no-store"
            text = await r.text()
    keys = {k["id"]: k for k in json.loads(text)["keys"]}
    operator = keys[admin.ids["operator"]]
    assert operator["role"] == "operator" and operator["name"] == "operator"
    assert operator["uses_7d"] == 3 and operator["last_used"] is not None
    assert len(operator["uses_by_day"]) == 7 and list(operator["uses_by_day"].values())[-1] == 3
    assert operator["backends"] is None and operator["tools"] == {"allow": ["*"], "deny": []}
    assert operator["source"] == "KEYS_FILE" and keys["auth-token"]["source"] == "AUTH_TOKEN"
    assert keys[admin.ids["limited"]]["backends"] == ["nothing"]
    assert keys[admin.ids["viewer"]]["uses_7d"] == 0 and keys[admin.ids["viewer"]]["last_used"] is None
    assert "sha256" not in text
    for secret in admin.secrets.values():
        assert secret not in text
    listed = [line for line in audit_lines(admin) if line["event"] == "admin.keys.list"]
    assert listed[-1]["identity"] == admin.ids["admin"] and listed[-1]["outcome"] == "ok"


async def test_created_key_works_at_once_survives_a_reload_and_its_secret_is_shown_once(
    start_admin: StartAdmin,
) -> None:
    admin = await start_admin({"embedded": {"command": sys.executable, "args": ["-c", "pass"]}})
    assert admin.keys_file is not None
    body = {
        "name": "ci-bot",
        "role": "viewer",
        "backends": ["embedded"],
        "tools": {"allow": ["get_*"], "deny": ["*delete*"]},
        "expires": 30,
        "rate_limit": 500,
    }
    async with aiohttp.ClientSession() as http:
        async with http.post(admin.url + "/api/keys", headers=admin.auth(), json=body) as r:
            assert r.status == 201, await r.text()
            created = await r.json()
        secret, key_id = created["secret"], created["id"]
        assert secret.startswith("mcp_") and key_id.startswith("k-ci-bot-")
        view = created["key"]
        assert view["role"] == "viewer" and view["backends"] == ["embedded"] and view["rate_limit"] == 500
        assert view["tools"] == {"allow": ["get_*"], "deny": ["*delete*"]} and view["expires"] is not None
        assert view["created"] is not None
        async with http.get(admin.url + "/auth/session", headers={"Authorization": f"Bearer {secret}"}) as r:
            assert r.status == 200 and (await r.json())["identity"] == key_id
        async with http.get(admin.url + "/api/keys", headers=admin.auth()) as r:
            listed = {k["id"]: k for k in (await r.json())["keys"]}
        assert secret not in json.dumps(listed) and listed[key_id]["uses_7d"] == 1
        # The export of the whole trail holds no secret of any key.
        async with http.get(admin.url + "/api/audit/export", headers=admin.auth()) as r:
            assert r.status == 200
            exported = await r.text()
        async with http.get(admin.url + "/api/audit/export?format=csv", headers=admin.auth()) as r:
            exported += await r.text()
    assert '"admin.key.create"' in exported and key_id in exported
    mode = stat.S_IMODE(os.stat(admin.keys_file).st_mode)
    assert mode == 0o600, oct(mode)
    stored = admin.keys_file.read_text()
    assert secret not in stored and {k.id for k in load_keys(admin.keys_file)} >= {key_id, admin.ids["admin"]}
    assert not [p for p in admin.keys_file.parent.iterdir() if p.name.endswith(".tmp")]
    for text in (exported, admin.audit_log.read_text()):
        for known in [secret, *admin.secrets.values()]:
            assert known not in text
    created_line = next(line for line in audit_lines(admin) if line["event"] == "admin.key.create")
    assert created_line["identity"] == admin.ids["admin"] and created_line["key_id"] == key_id


async def test_bad_key_bodies_are_refused_naming_the_problem(start_admin: StartAdmin) -> None:
    admin = await start_admin()
    assert admin.keys_file is not None
    before = admin.keys_file.read_bytes()
    cases: list[tuple[Any, int, str]] = [
        ({"role": "viewer"}, 400, "name"),
        ({"name": "x"}, 400, "role"),
        ({"name": "x", "role": "root"}, 400, "role"),
        ({"name": "x", "role": "viewer", "secret": "mine"}, 400, "unknown field 'secret'"),
        ({"name": "x", "role": "viewer", "expires": "2001-01-01T00:00:00Z"}, 400, "future"),
        ({"name": "x", "role": "viewer", "expires": "soon"}, 400, "expires"),
        ({"name": "x", "role": "viewer", "expires": -3}, 400, "expires"),
        ({"name": "x", "role": "viewer", "backends": ["ghost"]}, 400, "backends"),
        ({"name": "x", "role": "viewer", "tools": {"allow": "x"}}, 400, "tools.allow"),
        ({"name": "x", "role": "viewer", "rate_limit": 0}, 400, "rate_limit"),
        ([1, 2], 400, "JSON object"),
    ]
    async with aiohttp.ClientSession() as http:
        for body, status, words in cases:
            async with http.post(admin.url + "/api/keys", headers=admin.auth(), json=body) as r:
                assert r.status == status, body
                assert words in (await r.json())["error"], (body, await r.text())
        headers = {**admin.auth(), "Content-Type": "application/json"}
        async with http.post(admin.url + "/api/keys", headers=headers, data=b"{nope") as r:
            assert r.status == 400 and "not valid JSON" in (await r.json())["error"]
        async with http.post(admin.url + "/api/keys", headers=admin.auth(), data=b"name=x") as r:
            assert r.status == 415
        huge = {"name": "x", "role": "viewer", "tools": {"allow": ["a" * 100] * 300}}
        async with http.post(admin.url + "/api/keys", headers=admin.auth(), json=huge) as r:
            assert r.status == 413 and "bytes" in (await r.json())["error"]
        async with http.delete(admin.url + "/api/keys/k-nobody", headers=admin.auth()) as r:
            assert r.status == 404 and "k-nobody" in (await r.json())["error"]
        async with http.post(admin.url + "/api/keys/k-nobody/rotate", headers=admin.auth()) as r:
            assert r.status == 404
        url = admin.url + f"/api/keys/{admin.ids['operator']}/rotate"
        async with http.post(url, headers=admin.auth(), json={"grace": 60}) as r:
            assert r.status == 400 and "at once" in (await r.json())["error"]
        async with http.delete(admin.url + "/api/keys/auth-token", headers=admin.auth()) as r:
            assert r.status == 409 and "AUTH_TOKEN" in (await r.json())["error"]
    assert admin.keys_file.read_bytes() == before
    refused = [line for line in audit_lines(admin) if line.get("outcome") == "refused"]
    assert refused and all(line["event"].startswith("admin.") for line in refused)


async def test_without_a_keys_file_keys_cannot_be_made(start_admin: StartAdmin) -> None:
    admin = await start_admin(keys_file=False)
    async with aiohttp.ClientSession() as http:
        async with http.post(
            admin.url + "/api/keys", headers=admin.auth("token"), json={"name": "x", "role": "viewer"}
        ) as r:
            assert r.status == 409 and "KEYS_FILE" in (await r.json())["error"]
        async with http.delete(admin.url + "/api/keys/auth-token", headers=admin.auth("token")) as r:
            assert r.status == 409 and "AUTH_TOKEN" in (await r.json())["error"]
        async with http.post(admin.url + "/api/keys/auth-token/rotate", headers=admin.auth("token")) as r:
            assert r.status == 409 and "AUTH_TOKEN" in (await r.json())["error"]
        async with http.get(admin.url + "/api/keys", headers=admin.auth("token")) as r:
            assert [k["id"] for k in (await r.json())["keys"]] == ["auth-token"]


async def test_deleting_a_key_ends_its_open_stream_and_its_next_request(start_admin: StartAdmin) -> None:
    admin = await start_admin()
    async with aiohttp.ClientSession() as http:
        stream = await http.get(admin.url + "/sse", headers=admin.auth("operator"))
        assert (await next_event(stream)).event == "endpoint"
        other = await http.get(admin.url + "/sse", headers=admin.auth("viewer"))
        assert (await next_event(other)).event == "endpoint"
        url = admin.url + f"/api/keys/{admin.ids['operator']}"
        async with http.delete(url, headers=admin.auth()) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["sessions_closed"] == 1
        await until_eof(stream)  # read to its end (keep-alives come first)
        assert not other.content.at_eof()
        async with http.get(admin.url + "/health", headers=admin.auth("operator")) as r:
            assert r.status == 401
        async with http.delete(url, headers=admin.auth()) as r:
            assert r.status == 404
        stream.close()
        other.close()
    assert admin.keys_file is not None
    assert admin.ids["operator"] not in {k.id for k in load_keys(admin.keys_file)}
    deleted = next(line for line in audit_lines(admin) if line["event"] == "admin.key.delete")
    assert deleted["identity"] == admin.ids["admin"] and deleted["key_id"] == admin.ids["operator"]


async def test_the_last_admin_key_is_not_deleted(start_admin: StartAdmin) -> None:
    admin = await start_admin(keys_file=True, auth_token=None)
    url = admin.url + f"/api/keys/{admin.ids['admin']}"
    async with aiohttp.ClientSession() as http, http.delete(url, headers=admin.auth()) as r:
        assert r.status == 409 and "last admin key" in (await r.json())["error"]


async def test_rotation_refuses_the_old_secret_and_takes_the_new(start_admin: StartAdmin) -> None:
    admin = await start_admin()
    old = admin.auth("operator")
    async with aiohttp.ClientSession() as http:
        stream = await http.get(admin.url + "/sse", headers=old)
        assert (await next_event(stream)).event == "endpoint"
        url = admin.url + f"/api/keys/{admin.ids['operator']}/rotate"
        async with http.post(url, headers=admin.auth()) as r:
            assert r.status == 200, await r.text()
            rotated = await r.json()
        assert rotated["id"] == admin.ids["operator"] and rotated["sessions_closed"] == 1
        await until_eof(stream)
        async with http.get(admin.url + "/health", headers=old) as r:
            assert r.status == 401
        new = {"Authorization": f"Bearer {rotated['secret']}"}
        async with http.get(admin.url + "/auth/session", headers=new) as r:
            assert r.status == 200 and (await r.json())["identity"] == admin.ids["operator"]
        stream.close()
    assert admin.keys_file is not None
    keys = {k.id: k for k in load_keys(admin.keys_file)}
    assert keys[admin.ids["operator"]].role == "operator"
    assert rotated["secret"] not in admin.keys_file.read_text() + admin.audit_log.read_text()


async def test_a_cookie_login_of_an_admin_key_needs_an_allowed_origin(start_admin: StartAdmin) -> None:
    admin = await start_admin()
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
        async with browser.post(admin.url + "/auth/login", json={"token": admin.secrets["admin"]}) as r:
            assert r.status == 200
        async with browser.get(admin.url + "/api/keys") as r:  # a read: SameSite=Strict and CORS guard it
            assert r.status == 200
        target = admin.url + f"/api/keys/{admin.ids['viewer']}"
        async with browser.delete(target) as r:
            assert r.status == 403 and "Origin" in (await r.json())["error"]
        async with browser.delete(target, headers={"Origin": "http://evil.example"}) as r:
            assert r.status == 403
        async with browser.post(admin.url + "/api/keys", json={"name": "x", "role": "admin"}) as r:
            assert r.status == 403
        async with browser.delete(target, headers={"Origin": ORIGIN}) as r:
            assert r.status == 200
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
        async with browser.post(admin.url + "/auth/login", json={"token": admin.secrets["operator"]}) as r:
            assert r.status == 200
        async with browser.get(admin.url + "/api/keys", headers={"Origin": ORIGIN}) as r:
            assert r.status == 403


async def test_audit_query_and_export_with_filters(start_admin: StartAdmin) -> None:
    admin = await start_admin()
    async with aiohttp.ClientSession() as http:
        for n in range(3):
            async with http.get(admin.url + "/health", headers={"Authorization": f"Bearer wrong-{n}"}) as r:
                assert r.status == 401
        query = admin.url + "/api/audit?action=auth.failed&limit=100"
        async with http.get(query, headers=admin.auth()) as r:
            assert r.status == 200
            page = await r.json()
        assert len(page["events"]) == 3 and {e["event"] for e in page["events"]} == {"auth.failed"}
        async with http.get(admin.url + "/api/audit?event=auth.failed&limit=2", headers=admin.auth()) as r:
            first = await r.json()
        assert len(first["events"]) == 2 and first["next_cursor"]
        more = admin.url + f"/api/audit?event=auth.failed&limit=2&cursor={first['next_cursor']}"
        async with http.get(more, headers=admin.auth()) as r:
            rest = await r.json()
        assert len(rest["events"]) == 1
        for bad, name in (("limit=0", "limit"), ("from=yesterday", "from"), ("colour=red", "colour")):
            async with http.get(admin.url + f"/api/audit?{bad}", headers=admin.auth()) as r:
                assert r.status == 400 and name in (await r.json())["error"], bad
            async with http.get(admin.url + f"/api/audit/export?{bad}", headers=admin.auth()) as r:
                assert r.status == 400 and name in (await r.json())["error"], bad
        export = admin.url + "/api/audit/export?format=csv&event=auth.failed&from=2000-01-01T00:00:00Z"
        async with http.get(export, headers=admin.auth()) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/csv")
            assert "attachment" in r.headers["Content-Disposition"]
            rows = list(csv.reader(io.StringIO(await r.text())))
        assert rows[0][:2] == ["ts", "event"] and len(rows) == 4
        async with http.get(
            admin.url + "/api/audit/export?event=admin.audit.query", headers=admin.auth()
        ) as r:
            assert r.headers["Content-Type"].startswith("application/x-ndjson")
            lines = [json.loads(line) for line in (await r.text()).splitlines()]
        assert lines and all(line["identity"] == admin.ids["admin"] for line in lines)


async def test_audit_without_a_file_says_so(start_admin: StartAdmin) -> None:
    admin = await start_admin(audit_log=None)
    async with aiohttp.ClientSession() as http, http.get(admin.url + "/api/audit", headers=admin.auth()) as r:
        assert r.status == 409 and "AUDIT_LOG" in (await r.json())["error"]


async def test_backends_restart_and_sessions(
    start_admin: StartAdmin, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backend_module, "BACKOFF_BASE", 0.02)
    exits_at_once = {"command": sys.executable, "args": ["-c", "import sys; sys.exit(1)"]}
    admin = await start_admin({"broken": exits_at_once, "time": {"command": "true"}})
    broken = admin.app[BACKENDS]
    async with aiohttp.ClientSession() as http:
        async with http.get(admin.url + "/api/backends", headers=admin.auth()) as r:
            assert {b["name"] for b in (await r.json())["backends"]} == {"broken", "time"}
        async with http.post(admin.url + "/api/backends/ghost/restart", headers=admin.auth()) as r:
            assert r.status == 404
        async with asyncio.timeout(30):
            while broken["broken"].state != "failed":
                await asyncio.sleep(0.02)
        restarts = broken["broken"].status()["restarts"]
        async with http.post(admin.url + "/api/backends/broken/restart", headers=admin.auth()) as r:
            assert r.status == 200, await r.text()
            answer = await r.json()
        assert answer["restarted"] == 1 and answer["status"]["restarts"] == restarts + 1
    lines = audit_lines(admin)
    restart = next(line for line in lines if line["event"] == "backend.restart")
    assert restart["reason"] == "admin" and restart["backend"] == "broken"
    assert restart["identity"] == admin.ids["admin"]


async def test_sessions_listed_and_ended(start_admin: StartAdmin) -> None:
    admin = await start_admin()
    async with aiohttp.ClientSession() as http:
        headers = {**admin.auth("operator"), "Accept": "application/json, text/event-stream"}
        async with http.post(admin.url + "/mcp", headers=headers, json=init_message()) as r:
            assert r.status == 200
            session_id = r.headers["Mcp-Session-Id"]
        async with http.get(admin.url + "/api/sessions", headers=admin.auth()) as r:
            sessions = {s["id"]: s for s in (await r.json())["sessions"]}
        listed = sessions[session_id]
        assert listed["identity"] == admin.ids["operator"] and listed["transport"] == "streamable"
        assert listed["protocol"] == "2025-11-25" and listed["opened"] and listed["last_seen"]
        async with http.delete(admin.url + f"/api/sessions/{session_id}", headers=admin.auth()) as r:
            assert r.status == 200
        ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
        async with http.post(
            admin.url + "/mcp", headers={**headers, "Mcp-Session-Id": session_id}, json=ping
        ) as r:
            assert r.status == 404
        async with http.delete(admin.url + f"/api/sessions/{session_id}", headers=admin.auth()) as r:
            assert r.status == 404
    ended = next(line for line in audit_lines(admin) if line["event"] == "admin.session.delete")
    assert ended["identity"] == admin.ids["admin"] and ended["identity_ended"] == admin.ids["operator"]


# -- a real server_secure.py process ----------------------------------------------------------------


async def test_a_real_process_keeps_the_api_changes_across_sighup(tmp_path: Path) -> None:
    admin_secret, admin_entry = generate_key("root", "admin")
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [admin_entry]}))
    keys.chmod(0o600)
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "PYTHONPATH", "VIRTUAL_ENV")}
    env = {
        **keep,
        "AUDIT_LOG": str(tmp_path / "audit.log"),
        "KEYS_FILE": str(keys),
        "SESSION_SECRET": Fernet.generate_key().decode(),
    }
    argv = [sys.executable, "server_secure.py", "--host", "127.0.0.1", "--port", "0"]
    launched = await launch(argv, env=env, cwd=REPO)
    me = {"Authorization": f"Bearer {admin_secret}"}
    try:
        url = launched.url
        async with aiohttp.ClientSession() as http:
            async with http.post(
                url + "/api/keys", headers=me, json={"name": "bot", "role": "operator"}
            ) as r:
                assert r.status == 201, await r.text()
                bot = await r.json()
            async with http.post(url + "/api/keys", headers=me, json={"name": "gone", "role": "viewer"}) as r:
                gone = await r.json()
            async with http.delete(url + f"/api/keys/{gone['id']}", headers=me) as r:
                assert r.status == 200
            assert stat.S_IMODE(os.stat(keys).st_mode) == 0o600
            assert {k.id for k in load_keys(keys)} == {admin_entry["id"], bot["id"]}
            reloads = launched.stderr.count('"keys.reload"')
            launched.process.send_signal(signal.SIGHUP)
            async with asyncio.timeout(30):
                while launched.stderr.count('"keys.reload"') == reloads:
                    await asyncio.sleep(0.05)
            reload_line = [line for line in launched.lines if '"keys.reload"' in line][-1]
            assert '"outcome": "ok"' in reload_line
            bot_auth = {"Authorization": f"Bearer {bot['secret']}"}
            async with http.get(url + "/auth/session", headers=bot_auth) as r:
                assert r.status == 200
            async with http.get(url + "/health", headers={"Authorization": f"Bearer {gone['secret']}"}) as r:
                assert r.status == 401
            async with http.get(url + "/api/keys", headers=bot_auth) as r:
                assert r.status == 403
    finally:
        await launched.stop()
    for text in (launched.stderr, (tmp_path / "audit.log").read_text(), keys.read_text()):
        for secret in (admin_secret, bot["secret"], gone["secret"]):
            assert secret not in text


async def test_an_oauth_token_or_no_key_never_reaches_the_admin_api() -> None:
    """Tokens are for a person's client on the MCP routes; METRICS_TOKEN for /metrics: neither is a key."""
    from aiohttp.test_utils import make_mocked_request

    from mcp_sse.principal import Principal
    from mcp_sse.security.auth import authorization
    from mcp_sse.state import PRINCIPAL

    async def handler(request: web.Request) -> web.StreamResponse:
        raise AssertionError("reached the handler")

    middleware = authorization()
    request = make_mocked_request("GET", "/api/keys")
    request[PRINCIPAL] = Principal(
        id="oauth-1", name="x", role="admin", source="oauth", issuer="https://idp.example", subject="s"
    )
    with pytest.raises(web.HTTPForbidden) as info:
        await middleware(request, handler)
    assert "not an OAuth access token" in info.value.text
    with pytest.raises(web.HTTPForbidden):
        await middleware(make_mocked_request("POST", "/api/keys"), handler)
