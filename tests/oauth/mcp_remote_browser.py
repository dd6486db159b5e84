"""The BROWSER test_mcp_remote.py gives mcp-remote: a person's browser, in a script.

mcp-remote opens the authorization URL with the `open` npm package, whose bundled xdg-open (no
desktop here) runs `$BROWSER <url>`. This script is that command: it opens the URL on the gateway,
signs in with the key in MCP_SSE_SIGN_IN_KEY, approves on the consent page (tests.oauth.as_helpers'
Browser: the forms' CSRF tokens, an Origin of the gateway's PUBLIC_URL) and then follows the
redirect to mcp-remote's loopback callback, as a browser would. What it did, or the traceback of
what went wrong, goes as one JSON line to MCP_SSE_BROWSER_LOG: xdg-open runs it with its output
thrown away, so the test reads that file. Exit status 0 only when the callback answered 200.

Usage: python mcp_remote_browser.py <authorization URL>
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import traceback
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.oauth.as_helpers import Browser


async def sign_in_and_approve(url: str, public_url: str, key: str) -> dict[str, object]:
    if not url.startswith(public_url + "/oauth/authorize?"):
        raise AssertionError(f"asked to open {url!r}, not the gateway's authorization endpoint")
    params = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    browser = Browser(public_url)
    try:
        callback = await browser.redirect(params, key)
    finally:
        await browser.close()
    async with (
        aiohttp.ClientSession() as session,
        session.get(callback, allow_redirects=False) as response,
    ):
        page = await response.text()
    return {
        "params": sorted(params),
        "client_id": params.get("client_id"),
        "scope": params.get("scope"),
        "resource": params.get("resource"),
        "redirect_uri": params.get("redirect_uri"),
        "callback_status": response.status,
        "callback_page": page[:500],
    }


def main() -> int:
    log = Path(os.environ["MCP_SSE_BROWSER_LOG"])
    try:
        (url,) = sys.argv[1:]
        record = asyncio.run(
            asyncio.wait_for(  # xdg-open detaches it from mcp-remote's process group: bound it here
                sign_in_and_approve(url, os.environ["MCP_SSE_PUBLIC_URL"], os.environ["MCP_SSE_SIGN_IN_KEY"]),
                60,
            )
        )
    except BaseException:
        record = {"error": traceback.format_exc()}
    with log.open("a") as out:
        out.write(json.dumps(record) + "\n")
    return 0 if record.get("callback_status") == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
