"""The sign-in and consent pages in a real browser: headless Chromium, driven over the DevTools
protocol, signs in with a key, approves, and is sent to a loopback redirect URI the test listens
on; the code it brings is exchanged for tokens.

What only a browser can show: that the form posts carry our Origin (not "null": the pages'
Referrer-Policy), that the SameSite=Strict cookies (the pre-login one and the login) travel
with them, and that the CSP's form-action lets the redirect after the approval through.
Skipped without Chromium.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlencode

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from mcp_sse.oauth.server import OAuthServer
from mcp_sse.oauth.tokens import OwnToken
from tests.browser import CHROMIUM, chromium

from .as_helpers import AS, authorization_params, pkce, register, start_as, token

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)"
)
posted: list[tuple[str, str | None]] = []


def note_posts(app: web.Application, url: str, server: OAuthServer) -> None:
    async def note(request: web.Request, response: web.StreamResponse) -> None:
        if request.method == "POST":
            posted.append((request.path, request.headers.get("Origin")))

    app.on_response_prepare.append(note)


@pytest.fixture
async def as_(tmp_path: Path) -> AsyncIterator[AS]:
    running = await start_as(tmp_path, extra_routes=note_posts)
    yield running
    await running.http.close()


# [::1]: an IPv6 literal has no CSP host-source form, so form-action names the scheme for it.
@pytest.mark.parametrize("callback_host", ["127.0.0.1", "::1"])
async def test_a_real_browser_signs_in_approves_and_brings_the_code_back(
    as_: AS, tmp_path: Path, callback_host: str
) -> None:
    posted.clear()
    arrived: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()

    async def callback(request: web.Request) -> web.Response:
        if not arrived.done():
            arrived.set_result(dict(request.query))
        return web.Response(text="<!doctype html><title>done</title>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/callback", callback)
    client_app = TestServer(app, host=callback_host)
    await client_app.start_server()
    host = f"[{callback_host}]" if ":" in callback_host else callback_host
    redirect_uri = f"http://{host}:{client_app.port}/callback"
    try:
        status, client = await register(as_.url, redirect_uris=[redirect_uri], client_name="Browser Test")
        assert status == 201
        posted.clear()  # from here on, only what the browser sends
        verifier, challenge = pkce()
        params = authorization_params(as_, client["client_id"], challenge, redirect_uri=redirect_uri)
        async with chromium(tmp_path / "profile") as browser:
            await browser.send("Page.navigate", url=f"{as_.url}/oauth/authorize?{urlencode(params)}")
            await browser.event("Page.loadEventFired")
            assert await browser.evaluate("document.title") == f"Sign in · 127.0.0.1:{as_.http.port}"
            # The stylesheet applied under the page's CSP: the card has its computed style.
            radius = await browser.evaluate("getComputedStyle(document.querySelector('.card')).borderRadius")
            assert radius == "14px"
            await browser.evaluate(
                f"document.getElementById('key').value = {json.dumps(as_.keys.operator)};"
                "document.querySelector('form').requestSubmit()"
            )
            await browser.event("Page.loadEventFired")
            assert (
                await browser.evaluate("document.title") == f"Allow Browser Test? · 127.0.0.1:{as_.http.port}"
            )
            await browser.evaluate("document.querySelector('button[value=approve]').click()")
            query = await asyncio.wait_for(arrived, 30)
        assert query["state"] == params["state"] and query["iss"] == as_.url and query["code"]
        # Both posts carried this server's own origin, which is all the handlers accept.
        assert posted == [("/oauth/authorize/login", as_.url), ("/oauth/authorize", as_.url)]
        status, body, _ = await token(
            as_.url,
            {
                "grant_type": "authorization_code",
                "code": query["code"],
                "code_verifier": verifier,
                "client_id": client["client_id"],
                "redirect_uri": redirect_uri,
                "resource": as_.resource,
            },
        )
        assert status == 200, body
        own = await as_.server.verify_own_token(body["access_token"], as_.resource)
        assert isinstance(own, OwnToken) and own.subject == "k-operator" and own.role == "operator"
    finally:
        await client_app.close()
