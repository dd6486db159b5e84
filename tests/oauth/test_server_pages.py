"""The sign-in, consent and error pages as a real browser renders them: headless Chromium loads
them from the running server (with their real CSP) and takes a screenshot of each.

Chromium must not report a CSP refusal (the stylesheet is served by the gateway and allowed by
style-src 'self'; nothing else is loaded). The screenshots go to $MCP_SSE_SCREENSHOTS when it
is set (to look at them), else to the test's temporary directory. Skipped without Chromium.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlencode

import pytest
from aiohttp import web

from mcp_sse.oauth.server import OAuthServer
from mcp_sse.security.cookies import start_cookie_session
from tests.browser import CHROMIUM, CHROMIUM_FLAGS

from .as_helpers import AS, authorization_params, pkce, register, start_as

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)"
)
CLAUDE = "https://claude.ai/api/mcp/auth_callback"


SERVED: list[tuple[str, int]] = []


def sign_in_route(app: web.Application, url: str, server: OAuthServer) -> None:
    """Test only: a browser that cannot type gets a cookie login for the operator key, then goes on.
    Every response is noted (path, status), to see what the browser fetched."""

    async def note(request: web.Request, response: web.StreamResponse) -> None:
        SERVED.append((request.path, response.status))

    app.on_response_prepare.append(note)

    async def sign_in(request: web.Request) -> web.Response:
        await start_cookie_session(request, server.logins, "k-operator")
        target = request.query["next"]
        if not target.startswith("/oauth/"):
            raise web.HTTPBadRequest()
        raise web.HTTPSeeOther(location=target)

    app.router.add_get("/test-only/sign-in", sign_in)


@pytest.fixture
async def as_(tmp_path: Path) -> AsyncIterator[AS]:
    running = await start_as(tmp_path, extra_routes=sign_in_route)
    yield running
    await running.http.close()


async def screenshot(url: str, path: Path, profile: Path) -> str:
    assert CHROMIUM is not None
    process = await asyncio.create_subprocess_exec(
        CHROMIUM,
        *CHROMIUM_FLAGS,
        "--hide-scrollbars",
        "--enable-logging=stderr",
        f"--user-data-dir={profile}",
        "--window-size=1100,1000",
        f"--screenshot={path}",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=90)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    log = stderr.decode(errors="replace")
    assert process.returncode == 0, log
    assert path.stat().st_size > 10_000, log  # an actual picture, not an empty page
    return log


async def test_screenshots_of_the_sign_in_consent_and_error_pages(as_: AS, tmp_path: Path) -> None:
    SERVED.clear()
    shots = Path(os.environ.get("MCP_SSE_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    status, body = await register(as_.url, redirect_uris=[CLAUDE], client_name="Claude")
    assert status == 201
    _, challenge = pkce()
    params = authorization_params(
        as_, body["client_id"], challenge, redirect_uri=CLAUDE, scope="mcp:operator"
    )
    authorize = "/oauth/authorize?" + urlencode(params)
    status, body = await register(as_.url, client_name="Claude Code")
    loopback = authorization_params(as_, body["client_id"], challenge)
    pages = {
        "oauth-sign-in.png": as_.url + authorize,
        "oauth-consent.png": as_.url + "/test-only/sign-in?" + urlencode({"next": authorize}),
        "oauth-consent-loopback.png": as_.url
        + "/test-only/sign-in?"
        + urlencode({"next": "/oauth/authorize?" + urlencode(loopback)}),
        "oauth-error.png": as_.url + "/oauth/authorize?" + urlencode({**params, "client_id": "mcp-unknown"}),
    }
    logs = await asyncio.gather(
        *(screenshot(url, shots / name, tmp_path / f"profile-{name}") for name, url in pages.items())
    )
    for log in logs:
        assert "Content Security Policy" not in log and "Refused to" not in log, log
    # Each browser (a fresh profile) fetched the stylesheet the page names, and nothing else failed.
    assert SERVED.count(("/oauth/static/oauth.css", 200)) == len(pages), SERVED
    assert ("/oauth/authorize", 400) in SERVED  # the error page is an error
    assert not [entry for entry in SERVED if entry[1] >= 400 and entry[0] != "/oauth/authorize"], SERVED
