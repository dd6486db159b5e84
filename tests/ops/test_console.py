"""The web console (/console) through a real gateway: in headless Chromium (sign in, create and
revoke a key, the audit line, end a real SDK client's session, no CSP violation or script error,
screenshots at desktop and phone sizes), and from the attacker's side (other keys, foreign and
missing Origins, cross-site form posts, DNS rebinding, the static files); the OAuth admin routes."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mcp_sse.ops.console import CSP
from mcp_sse.state import SESSIONS
from mcp_sse.store import ClientRecord, GrantRecord, RefreshRecord
from mcp_sse.store.sqlite import SQLiteStore
from tests.browser import CHROMIUM, DevTools, chromium
from tests.conftest import SDK_SERVER, mcp_client
from tests.ops.test_admin import Admin, StartAdmin, audit_lines, start_admin

__all__ = ["start_admin"]  # the fixture, shared with test_admin.py

REPO = Path(__file__).resolve().parents[2]
EVIL = "http://evil.example"


def artifacts() -> Path:
    path = Path(os.environ["MCP_SSE_ARTIFACTS"]) if os.environ.get("MCP_SSE_ARTIFACTS") else None
    path = path or REPO / "test-artifacts" / "console"
    path.mkdir(parents=True, exist_ok=True)
    return path


def jar() -> aiohttp.CookieJar:
    return aiohttp.CookieJar(unsafe=True)  # cookies for 127.0.0.1, as a browser keeps them


async def console_login(http: aiohttp.ClientSession, admin: Admin, secret: str, **headers: str) -> int:
    async with http.post(
        admin.url + "/console/login",
        data={"key": secret},
        headers={"Origin": admin.url, **headers},
        allow_redirects=False,
    ) as r:
        return r.status


# -- in a real browser ---------------------------------------------------------------------------


class Page:
    """The console in Chromium, with every script error and CSP violation it reports."""

    def __init__(self, browser: DevTools, url: str) -> None:
        self.browser, self.url = browser, url
        self.problems: list[str] = []
        browser.listeners.append(self._note)

    def _note(self, event: dict[str, Any]) -> None:
        method, params = event["method"], event.get("params", {})
        if method == "Runtime.exceptionThrown":
            self.problems.append(f"exception: {params['exceptionDetails']}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.problems.append(f"console.{params['type']}: {params.get('args')}")
        elif method == "Log.entryAdded":
            entry = params["entry"]
            # CSP violations are "security" entries; a failed fetch or load is an "error" one.
            if entry.get("source") == "security" or entry.get("level") == "error":
                self.problems.append(f"log: {entry.get('source')}: {entry.get('text')}")

    async def open(self, path: str) -> None:
        await self.browser.send("Page.navigate", url=self.url + path)
        await self.browser.event("Page.loadEventFired")

    async def size(self, width: int, height: int, *, mobile: bool) -> None:
        await self.browser.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=2 if mobile else 1,
            mobile=mobile,
        )

    async def shot(self, name: str) -> None:
        await self.browser.evaluate("document.fonts.ready.then(() => true)")
        data = await self.browser.send("Page.captureScreenshot", format="png")
        (artifacts() / f"{name}.png").write_bytes(base64.b64decode(data["data"]))

    async def js(self, expression: str) -> Any:
        return await self.browser.evaluate(expression)

    async def until(self, expression: str) -> Any:
        return await self.browser.wait_for(expression)

    async def tab(self, name: str, ready: str) -> None:
        await self.js(f"location.hash = '#{name}'")
        await self.until(f"!document.querySelector('[data-panel={name}]').hidden && ({ready})")

    async def confirm(self) -> None:
        await self.until("document.getElementById('confirm').open")
        await self.js("document.getElementById('confirm-ok').click()")
        await self.until("!document.getElementById('confirm').open")


def rows(table: str) -> str:
    return f"[...document.querySelectorAll('#{table} tbody tr')]"


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
async def test_the_console_in_a_real_browser(start_admin: StartAdmin, tmp_path: Path) -> None:
    admin = await start_admin({"sdk": SDK_SERVER})  # a real stdio child behind
    async with (
        mcp_client(admin.url, admin.secrets["operator"]) as sdk,
        chromium(tmp_path / "profile") as browser,
        aiohttp.ClientSession() as http,
    ):
        await sdk.list_tools()  # a real, initialized session of the operator key
        await browser.send("Log.enable")
        page = Page(browser, admin.url)
        keys = len(admin.ids)  # AUTH_TOKEN's and the keys file's
        await page.size(1280, 800, mobile=False)

        await page.open("/console")
        assert await page.js("document.title") == f"Sign in · 127.0.0.1:{admin.url.rsplit(':', 1)[1]}"
        # The stylesheet applied under the page's CSP.
        assert await page.js("getComputedStyle(document.querySelector('.card')).borderRadius") == "14px"
        await page.shot("signin-desktop")
        await page.js(
            f"document.getElementById('key').value = {json.dumps(admin.secrets['admin'])};"
            "document.querySelector('form').requestSubmit()"
        )
        await browser.event("Page.loadEventFired")
        assert (await page.js("document.title")).startswith("Console · ")
        await page.until(f"{rows('backends-table')}.length === 1")
        assert await page.js(f"{rows('backends-table')}[0].textContent.includes('running')")
        await page.shot("backends-desktop")

        # Create a key: its secret is shown once, and works.
        await page.tab("keys", f"{rows('keys-table')}.length === {keys}")
        await page.js(
            "document.getElementById('key-name').value = 'ci-deploy';"
            "document.getElementById('key-role').value = 'viewer';"
            "document.getElementById('key-form').requestSubmit()"
        )
        secret = await page.until(
            "!document.getElementById('secret').hidden && document.getElementById('secret-value').textContent"
        )
        await page.until(f"{rows('keys-table')}.length === {keys + 1}")
        await page.shot("key-created-desktop")
        async with http.get(admin.url + "/auth/session", headers={"Authorization": f"Bearer {secret}"}) as r:
            assert r.status == 200 and (await r.json())["name"] == "ci-deploy"
        await page.js("document.getElementById('secret-copy').click()")
        await page.until("!document.getElementById('secret-copied').hidden")
        await page.js("document.getElementById('secret-done').click()")
        assert await page.js("document.getElementById('secret-value').textContent") == ""
        assert secret not in await page.js("document.documentElement.outerHTML")

        # Revoke it, after a confirmation; it stops working.
        created = f"{rows('keys-table')}.find(r => r.textContent.includes('ci-deploy'))"
        await page.js(f"{created}.querySelector('.link-danger').click()")
        await page.until("document.getElementById('confirm').open")
        await page.shot("key-revoke-confirm-desktop")
        await page.confirm()
        await page.until(f"!{created} && {rows('keys-table')}.length === {keys}")
        async with http.get(admin.url + "/auth/session", headers={"Authorization": f"Bearer {secret}"}) as r:
            assert r.status == 401

        # The audit view, filtered: both admin.* lines, by this admin.
        await page.tab("audit", f"{rows('audit-table')}.length > 0")
        await page.js(
            "document.getElementById('audit-event').value = 'admin.key.create,admin.key.delete';"
            "document.getElementById('audit-form').requestSubmit()"
        )
        await page.until(f"{rows('audit-table')}.length === 2")
        texts = await page.js(f"{rows('audit-table')}.map(r => r.textContent)")
        assert "admin.key.delete" in texts[0] and "admin.key.create" in texts[1]
        assert all(admin.ids["admin"] in text for text in texts)
        await page.shot("audit-desktop")

        # End the SDK client's session.
        [session] = [s for s in admin.app[SESSIONS].all() if not s.closed]
        assert session.identity == admin.ids["operator"]
        await page.tab("sessions", f"{rows('sessions-table')}.length === 1")
        assert admin.ids["operator"] in await page.js(f"{rows('sessions-table')}[0].textContent")
        await page.shot("sessions-desktop")
        await page.js(f"{rows('sessions-table')}[0].querySelector('.link-danger').click()")
        await page.confirm()
        await page.until("!document.getElementById('sessions-empty').hidden")
        assert session.closed

        # A phone: nothing wider than the screen; tables are cards.
        await page.size(390, 844, mobile=True)
        await page.open("/console")
        await page.tab("keys", f"{rows('keys-table')}.length === {keys}")
        assert await page.js("document.documentElement.scrollWidth") <= 390
        await page.shot("keys-phone")
        await page.tab("audit", f"{rows('audit-table')}.length > 0")
        assert await page.js("document.documentElement.scrollWidth") <= 390
        await page.shot("audit-phone")
        await page.tab("backends", f"{rows('backends-table')}.length === 1")
        await page.shot("backends-phone")

        # Signing out ends the login: the console is the sign-in page again.
        await page.js("document.querySelector('.who form').requestSubmit()")
        await browser.event("Page.loadEventFired")
        assert await page.js("document.getElementById('key') !== null")
        await page.shot("signin-phone")
        assert page.problems == []
    lines = audit_lines(admin)
    assert [line["event"] for line in lines if line["event"] == "session.logout"] == ["session.logout"]
    assert secret not in admin.audit_log.read_text()


# -- from the attacker's side ---------------------------------------------------------------------


async def test_the_console_is_for_unrestricted_admins_only(start_admin: StartAdmin) -> None:
    admin = await start_admin()
    for who in ("viewer", "operator", "limited"):
        async with aiohttp.ClientSession(cookie_jar=jar()) as browser:
            # A login made elsewhere (POST /auth/login) opens nothing here.
            async with browser.post(admin.url + "/auth/login", json={"token": admin.secrets[who]}) as r:
                assert r.status == 200
            async with browser.get(admin.url + "/console") as r:
                page = await r.text()
                assert r.status == 403 and "cannot open the console" in page
                assert r.headers["Content-Security-Policy"] == CSP
            assert admin.ids["admin"] not in page and "/api/" not in page and "console.js" not in page
            async with browser.get(admin.url + "/api/keys") as r:
                assert r.status == 403
        # Signing in through the console's form with such a key makes no login at all.
        async with aiohttp.ClientSession(cookie_jar=jar()) as browser:
            assert await console_login(browser, admin, admin.secrets[who]) == 403
            assert len(browser.cookie_jar) == 0
    async with aiohttp.ClientSession(cookie_jar=jar()) as browser:
        assert await console_login(browser, admin, "mcp_wrong") == 401
        assert len(browser.cookie_jar) == 0
        async with browser.get(admin.url + "/console") as r:
            page = await r.text()
            assert r.status == 200 and 'action="/console/login"' in page and "console.js" not in page
    events = [(line["event"], line.get("reason")) for line in audit_lines(admin)]
    assert ("auth.failed", "login") in events
    assert events.count(("policy.denied", "console needs an admin key")) == 6


async def test_cross_site_requests_are_refused(start_admin: StartAdmin) -> None:
    admin = await start_admin()
    host = admin.url.removeprefix("http://")
    async with aiohttp.ClientSession(cookie_jar=jar()) as browser:
        # Login CSRF: the sign-in form posted from another site, from nowhere, from a sandbox.
        for origin in ({"Origin": EVIL}, {}, {"Origin": "null"}):
            async with browser.post(
                admin.url + "/console/login", data={"key": admin.secrets["admin"]}, headers=origin
            ) as r:
                assert r.status == 403, origin
        assert len(browser.cookie_jar) == 0
        assert await console_login(browser, admin, admin.secrets["admin"]) == 303
        assert len(browser.cookie_jar) == 1
        new_key = {"name": "made-by-csrf", "role": "admin"}
        # The admin's cookie rides along, but the request is not from the console's page.
        async with browser.post(admin.url + "/api/keys", json=new_key, headers={"Origin": EVIL}) as r:
            assert r.status == 403
        async with browser.post(admin.url + "/api/keys", json=new_key) as r:  # no Origin
            assert r.status == 403 and "Origin" in (await r.json())["error"]
        # A cross-site HTML form (no JSON, no preflight) posting to the API.
        async with browser.post(admin.url + "/api/keys", data=new_key, headers={"Origin": EVIL}) as r:
            assert r.status == 403
        # DNS rebinding: evil.example resolved to us sends its own Host and Origin alike.
        rebound = {"Origin": f"http://evil.example:{admin.url.rsplit(':', 1)[1]}", "Host": "evil.example"}
        async with browser.post(admin.url + "/api/keys", json=new_key, headers=rebound) as r:
            assert r.status == 403
        async with browser.post(
            admin.url + "/console/logout", headers={"Origin": EVIL}, allow_redirects=False
        ) as r:
            assert r.status == 403
        async with browser.get(admin.url + "/api/keys") as r:
            assert r.status == 200
            assert "made-by-csrf" not in await r.text()
        # The console's own origin (scheme://Host, the Host checked) is the one that passes.
        async with browser.post(admin.url + "/api/keys", json=new_key, headers={"Origin": admin.url}) as r:
            assert r.status == 201
            made = await r.json()
        async with browser.delete(admin.url + f"/api/keys/{made['id']}", headers={"Origin": admin.url}) as r:
            assert r.status == 200
        # Only on /api/ and the console: the gateway's origin is not an allowed one elsewhere.
        async with browser.post(admin.url + "/auth/logout", headers={"Origin": admin.url}) as r:
            assert r.status == 403
        async with browser.post(
            admin.url + "/console/logout", headers={"Origin": f"http://{host}"}, allow_redirects=False
        ) as r:
            assert r.status == 303
        async with browser.get(admin.url + "/api/keys") as r:
            assert r.status == 401


async def test_public_url_is_the_own_origin_without_a_host_check(start_admin: StartAdmin) -> None:
    # A non-loopback bind without ALLOWED_HOSTS has no Host check: then only PUBLIC_URL counts.
    admin = await start_admin(host="0.0.0.0", public_url="https://gw.example")
    new_key = {"name": "x", "role": "viewer"}
    async with aiohttp.ClientSession(cookie_jar=jar()) as browser:
        assert await console_login(browser, admin, admin.secrets["admin"], Origin=admin.url) == 403
        assert await console_login(browser, admin, admin.secrets["admin"], Origin="https://gw.example") == 303
        async with browser.post(admin.url + "/api/keys", json=new_key, headers={"Origin": admin.url}) as r:
            assert r.status == 403
        async with browser.post(
            admin.url + "/api/keys", json=new_key, headers={"Origin": "https://gw.example"}
        ) as r:
            assert r.status == 201


async def test_console_responses_and_static_files(start_admin: StartAdmin) -> None:
    admin = await start_admin()
    async with aiohttp.ClientSession(cookie_jar=jar()) as browser:
        assert await console_login(browser, admin, admin.secrets["admin"]) == 303
        async with browser.get(admin.url + "/console") as r:
            page = await r.text()
            assert r.status == 200
        for asset, kind in (("console.css", "text/css"), ("console.js", "text/javascript")):
            assert f"/console/static/{asset}?v=" in page
            async with browser.get(admin.url + f"/console/static/{asset}") as r:
                assert r.status == 200 and r.content_type == kind
                assert r.headers["Content-Security-Policy"] == CSP
                assert r.headers["Cache-Control"] == "no-store"
        # No inline script or style anywhere: the CSP would refuse them, and none are needed.
        assert "<script>" not in page and "style=" not in page and "<style" not in page
        assert "admin" in page and admin.ids["admin"] in page
        for path in (
            "/console/static/console.html",
            "/console/static/../console.py",
            "/console/static/..%2fconsole.py",
            "/console/static/%2e%2e%2f%2e%2e%2fapp.py",
            "/console/static/web/console.js",
            "/console/web/console.js",
            "/console/static/",
            "/console/nothing",
        ):
            async with browser.get(admin.url + path) as r:
                body = await r.text()
                assert r.status == 404, path
                assert "Content-Security-Policy" in r.headers, path
                assert "import" not in body and "<html" not in body, path
        for method, path in (("GET", "/console"), ("POST", "/console/login"), ("GET", "/console/static/x")):
            async with (
                aiohttp.ClientSession() as anonymous,
                anonymous.request(method, admin.url + path, headers={"Origin": EVIL}) as r,
            ):
                assert "default-src 'none'" in r.headers["Content-Security-Policy"], (method, path)
                assert r.headers["Cache-Control"] == "no-store"


# -- the OAuth admin routes ------------------------------------------------------------------------


async def test_oauth_clients_and_grants(start_admin: StartAdmin, tmp_path: Path) -> None:
    admin = await start_admin(
        oauth_server=True, public_url="http://127.0.0.1:9", state_dir=tmp_path / "state"
    )
    now = time.time()
    secret_digest = b"\x01" * 32
    refresh_digest = b"\x02" * 32
    store = SQLiteStore(tmp_path / "state" / "oauth.sqlite3")  # the gateway's file, opened beside it
    await store.open()
    try:
        await store.add_client(
            ClientRecord(
                "client-1",
                "Claude",
                ("http://127.0.0.1:8976/callback",),
                "client_secret_basic",
                secret_digest,
                ("authorization_code", "refresh_token"),
                now,
                now,
            )
        )
        grant = GrantRecord(
            "grant-1",
            "client-1",
            admin.ids["operator"],
            "fp",
            "http://127.0.0.1:9/mcp",
            "mcp:operator",
            now,
            now + 3600,
        )
        assert await store.create_grant(grant, RefreshRecord(refresh_digest, "grant-1", now + 3600))
        async with aiohttp.ClientSession(headers=admin.auth()) as http:
            async with http.get(admin.url + "/api/oauth/clients") as r:
                text = await r.text()
                assert r.status == 200
            [client] = json.loads(text)["clients"]
            assert client["client_name"] == "Claude" and client["confidential"] is True
            assert secret_digest.hex() not in text and "sha256" not in text
            async with http.get(admin.url + "/api/oauth/grants") as r:
                text = await r.text()
                [listed] = json.loads(text)["grants"]
            assert listed["id"] == "grant-1" and listed["key_id"] == admin.ids["operator"]
            assert refresh_digest.hex() not in text and "fp" not in listed.values()
            for who in ("viewer", "operator", "limited"):
                async with http.delete(admin.url + "/api/oauth/grants/grant-1", headers=admin.auth(who)) as r:
                    assert r.status == 403
            async with http.delete(admin.url + "/api/oauth/grants/grant-1") as r:
                assert r.status == 200 and (await r.json())["revoked"] == "grant-1"
            assert await store.find_refresh(refresh_digest, time.time()) is None
            async with http.delete(admin.url + "/api/oauth/grants/grant-1") as r:
                assert r.status == 404
            async with http.delete(admin.url + "/api/oauth/grants/" + "x" * 65) as r:
                assert r.status == 404
            async with http.get(admin.url + "/api/oauth/grants") as r:
                assert (await r.json())["grants"] == []
    finally:
        await store.close()
    revoked = [line for line in audit_lines(admin) if line["event"] == "admin.oauth.grant.revoke"]
    assert [(line["outcome"], line["grant_id"]) for line in revoked] == [
        ("ok", "grant-1"),
        ("refused", "grant-1"),
        ("refused", "x" * 64),
    ]
    assert all(line["identity"] == admin.ids["admin"] for line in revoked)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
async def test_the_oauth_tab_in_a_real_browser(start_admin: StartAdmin, tmp_path: Path) -> None:
    admin = await start_admin(oauth_server=True, public_url="http://127.0.0.1:9", state_dir=tmp_path / "s")
    now = time.time()
    store = SQLiteStore(tmp_path / "s" / "oauth.sqlite3")
    await store.open()
    try:
        for n, name in enumerate(("Claude", "VS Code")):
            client = ClientRecord(
                f"client-{n}",
                name,
                ("http://127.0.0.1:8976/callback",),
                "none",
                None,
                ("authorization_code",),
                now,
                now,
            )
            await store.add_client(client)
            grant = GrantRecord(
                f"grant-{n}",
                client.client_id,
                admin.ids["operator"],
                "fp",
                "http://127.0.0.1:9/mcp",
                "mcp:operator",
                now,
                now + 3600,
            )
            assert await store.create_grant(grant, RefreshRecord(bytes([n]) * 32, grant.grant_id, now + 3600))
        async with chromium(tmp_path / "profile") as browser:
            await browser.send("Log.enable")
            page = Page(browser, admin.url)
            await page.size(1280, 800, mobile=False)
            await page.open("/console")
            await page.js(
                f"document.getElementById('key').value = {json.dumps(admin.secrets['admin'])};"
                "document.querySelector('form').requestSubmit()"
            )
            await browser.event("Page.loadEventFired")
            await page.tab(
                "oauth", f"{rows('grants-table')}.length === 2 && {rows('clients-table')}.length === 2"
            )
            await page.shot("oauth-desktop")
            claude = f"{rows('grants-table')}.find(r => r.textContent.includes('Claude'))"
            await page.js(f"{claude}.querySelector('.link-danger').click()")
            await page.confirm()
            await page.until(f"!{claude} && {rows('grants-table')}.length === 1")
            assert page.problems == []
        assert await store.get_grant("grant-0", time.time()) is None
        assert await store.get_grant("grant-1", time.time()) is not None
    finally:
        await store.close()


async def test_oauth_routes_without_oauth(start_admin: StartAdmin) -> None:
    admin = await start_admin()
    async with aiohttp.ClientSession(headers=admin.auth()) as http:
        for method, path in (
            ("GET", "/api/oauth/clients"),
            ("GET", "/api/oauth/grants"),
            ("DELETE", "/api/oauth/grants/g"),
        ):
            async with http.request(method, admin.url + path) as r:
                assert r.status == 409 and "OAUTH_SERVER" in (await r.json())["error"]


async def test_the_sign_in_is_counted_by_the_lockout(start_admin: StartAdmin) -> None:
    admin = await start_admin(lockout_failures=3)
    async with aiohttp.ClientSession(cookie_jar=jar()) as browser:
        statuses = [await console_login(browser, admin, f"mcp_guess{n}") for n in range(4)]
        assert statuses[:3] == [401, 401, 401] and statuses[3] == 429
        # Locked out, the right key is refused the same way (a guess must learn nothing).
        assert await console_login(browser, admin, admin.secrets["admin"]) == 429
        assert len(browser.cookie_jar) == 0
