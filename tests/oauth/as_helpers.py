"""The built-in authorization server on a real loopback aiohttp server, and a browser to drive it.

`start_as()` builds what the gateway will: a real KeyStore (AUTH_TOKEN plus a keys file with an
operator and a viewer key), real cookie Logins behind aiohttp-session's middleware, the audit
log (captured), the SQLite store and signing key in a state directory, and the gateway's
security headers. `Browser` is an aiohttp client with a cookie jar that reads the forms off the
pages as a person's browser would (hidden fields, the CSRF token) and sends the Origin header a
browser sends on a form post.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote_plus, urlencode, urlsplit

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer, unused_port
from aiohttp_session import session_middleware
from cryptography.fernet import Fernet
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken

from mcp_sse.oauth.server import OAuthServer, add_oauth_server_routes
from mcp_sse.oauth.tokens import SigningKey
from mcp_sse.security.audit import AuditLog
from mcp_sse.security.cookies import CookieStorage, Logins
from mcp_sse.security.headers import install_security_headers
from mcp_sse.security.keys import KeyStore, digest
from mcp_sse.settings import Secret
from mcp_sse.store.sqlite import SQLiteStore

LOOPBACK_CALLBACK = "http://127.0.0.1:8976/callback"


class FakeClock:
    """The server's clock, moved by the test: expiry is tested without waiting. It starts at the
    real time (key expiry and cookie logins keep the real clock) and then moves only when told."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Keys:
    admin: str = field(default_factory=lambda: "mcp_" + secrets.token_urlsafe(32))
    operator: str = field(default_factory=lambda: "mcp_" + secrets.token_urlsafe(32))
    viewer: str = field(default_factory=lambda: "mcp_" + secrets.token_urlsafe(32))

    def entries(self, *, operator: bool = True) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = [
            {"id": "k-viewer", "name": "vera", "sha256": digest(self.viewer).hex(), "role": "viewer"},
        ]
        if operator:
            entries.append(
                {
                    "id": "k-operator",
                    "name": "otto",
                    "sha256": digest(self.operator).hex(),
                    "role": "operator",
                    "backends": ["time"],
                    "tools": {"allow": ["get_*"], "deny": ["*delete*"]},
                }
            )
        return entries


@dataclass
class AS:
    """A running authorization server and what the test needs to poke at it."""

    server: OAuthServer
    http: TestServer
    url: str
    keys: Keys
    keystore: KeyStore
    keys_file: Path
    state_dir: Path
    clock: FakeClock
    audit_stream: io.StringIO

    @property
    def resource(self) -> str:
        return self.url + "/mcp"

    @property
    def audit_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit_stream.getvalue().splitlines() if line.strip()]

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.audit_lines if line["event"] == name]

    def write_keys(self, entries: list[dict[str, Any]]) -> None:
        self.keys_file.write_text(json.dumps({"keys": entries}))


StartAS = Callable[..., Awaitable[AS]]


async def start_as(
    tmp_path: Path,
    *,
    clock: FakeClock | None = None,
    keys: Keys | None = None,
    state_dir: Path | None = None,
    port: int | None = None,
    extra_routes: Callable[[web.Application, str, OAuthServer], None] | None = None,
    **overrides: Any,
) -> AS:
    """An OAuthServer on 127.0.0.1:<port>, started. Close it with `await running.http.close()`."""
    clock = clock or FakeClock()
    keys = keys or Keys()
    state_dir = state_dir or tmp_path / "state"
    keys_file = tmp_path / "keys.json"
    if not keys_file.exists():
        keys_file.write_text(json.dumps({"keys": keys.entries()}))
    keystore = KeyStore(Secret(keys.admin), keys_file)
    logins = Logins(lifetime=3600, idle=1800)
    stream = io.StringIO()
    audit = AuditLog(tmp_path / "audit.log", stream=stream)
    port = port or unused_port()
    url = f"http://127.0.0.1:{port}"
    settings: dict[str, Any] = {
        "issuer": url,
        "resource_urls": [url + "/mcp", url + "/servers/time/mcp"],
        "keys": keystore,
        "logins": logins,
        "store": SQLiteStore(state_dir / "oauth.sqlite3"),
        "audit": audit,
        "signing_key": SigningKey.load_or_create(state_dir),
        "clock": clock,
        "backends": lambda: ("time", "files"),
        **overrides,
    }
    server = OAuthServer(**settings)
    storage = CookieStorage(Secret(Fernet.generate_key().decode()), lifetime=3600)
    app = web.Application(middlewares=[session_middleware(storage)])
    add_oauth_server_routes(app, server)
    if extra_routes is not None:
        extra_routes(app, url, server)
    install_security_headers(app, hsts=False)
    http = TestServer(app, host="127.0.0.1", port=port)
    await http.start_server()
    return AS(server, http, url, keys, keystore, keys_file, state_dir, clock, stream)


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


class _Forms(HTMLParser):
    """The forms of a page: action, and the named inputs with their values."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, Any]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append({"action": values.get("action", ""), "fields": {}})
        elif tag == "input" and self.forms and "name" in values:
            self.forms[-1]["fields"][values["name"]] = values.get("value", "")


def form_of(page: str) -> tuple[str, dict[str, str]]:
    parser = _Forms()
    parser.feed(page)
    if len(parser.forms) != 1:
        raise AssertionError(f"expected one form on the page, found {len(parser.forms)}")
    return parser.forms[0]["action"], dict(parser.forms[0]["fields"])


def query_of(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


class Browser:
    """A person's browser: cookies kept, redirects shown (not followed), Origin sent on posts."""

    def __init__(self, base: str, origin: str | None = None) -> None:
        self.base = base
        self.origin = origin if origin is not None else base
        # unsafe=True: keep cookies from an IP-address host (127.0.0.1), as a browser does.
        self.session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))

    async def close(self) -> None:
        await self.session.close()

    async def get(self, path: str) -> aiohttp.ClientResponse:
        async with self.session.get(self.base + path, allow_redirects=False) as response:
            await response.read()
            return response

    async def post(
        self, action: str, fields: dict[str, str], *, origin: str | None = ""
    ) -> aiohttp.ClientResponse:
        headers = {} if origin is None else {"Origin": origin or self.origin}
        async with self.session.post(
            self.base + action, data=fields, headers=headers, allow_redirects=False
        ) as response:
            await response.read()
            return response

    async def authorize(self, params: dict[str, str]) -> aiohttp.ClientResponse:
        return await self.get("/oauth/authorize?" + urlencode(params))

    async def sign_in(self, params: dict[str, str], key: str) -> aiohttp.ClientResponse:
        """Open the authorization URL, sign in on its page; the answer is the consent page."""
        page = await self.authorize(params)
        if page.status != 200:
            raise AssertionError(f"authorize answered {page.status}: {await page.text()}")
        action, fields = form_of(await page.text())
        fields["key"] = key
        signed = await self.post(action, fields)
        if signed.status != 303:
            raise AssertionError(f"sign-in answered {signed.status}: {await signed.text()}")
        return await self.get(signed.headers["Location"])

    async def approve(self, params: dict[str, str], key: str, decision: str = "approve") -> dict[str, str]:
        """The whole browser part: sign in (if needed), approve; the redirect's query parameters."""
        return query_of(await self.redirect(params, key, decision))

    async def redirect(self, params: dict[str, str], key: str, decision: str = "approve") -> str:
        """Sign in (if needed) and decide on the consent page; where it sends the browser (the
        client's redirect_uri with the code or the error), not followed."""
        consent = await self.authorize(params)
        if 'name="key"' in await consent.text():
            consent = await self.sign_in(params, key)
        if consent.status != 200:
            raise AssertionError(f"consent page answered {consent.status}: {await consent.text()}")
        action, fields = form_of(await consent.text())
        fields["decision"] = decision
        answer = await self.post(action, fields)
        if answer.status != 303:
            raise AssertionError(f"consent answered {answer.status}: {await answer.text()}")
        location = answer.headers["Location"]
        target = params.get("redirect_uri", "")
        if target and not location.startswith(target):
            raise AssertionError(f"redirected to {location}, not to {target}")
        return location


async def register(
    url: str, redirect_uris: list[str] | None = None, **metadata: Any
) -> tuple[int, dict[str, Any]]:
    body = {
        "redirect_uris": redirect_uris or [LOOPBACK_CALLBACK],
        "client_name": "Test Client",
        "token_endpoint_auth_method": "none",
        **metadata,
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(url + "/oauth/register", json=body) as response,
    ):
        return response.status, await response.json()


def basic(client_id: str, secret: str) -> dict[str, str]:
    """RFC 6749 section 2.3.1: each half form-urlencoded, then base64 of "id:secret"."""
    pair = f"{quote_plus(client_id)}:{quote_plus(secret)}".encode()
    return {"Authorization": "Basic " + base64.b64encode(pair).decode()}


async def token(
    url: str, form: dict[str, str], *, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url + "/oauth/token", data=form, headers=headers) as response,
    ):
        body = await response.json() if response.content_type == "application/json" else {}
        return response.status, body, response


def authorization_params(as_: AS, client_id: str, challenge: str, **overrides: str) -> dict[str, str]:
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": LOOPBACK_CALLBACK,
        "scope": "mcp:admin mcp:operator mcp:viewer",
        "state": secrets.token_urlsafe(16),
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "resource": as_.resource,
    }
    params.update(overrides)
    return {k: v for k, v in params.items() if v != ""}


class MemoryStorage:
    """The SDK OAuth client's token storage, in memory (tests read what it holds)."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client = client_info


@dataclass
class OAuthProcess:
    """How to start server_secure.py with the built-in authorization server, by environment only."""

    port: int
    admin: str
    env: dict[str, str]
    argv: list[str]


def oauth_process(tmp_path: Path) -> OAuthProcess:
    port = unused_port()  # PUBLIC_URL names the port, so it is chosen here
    admin = "mcp_" + secrets.token_urlsafe(32)
    keep = ("PATH", "HOME", "LANG", "PYTHONPATH", "VIRTUAL_ENV")
    env = {
        **{k: v for k, v in os.environ.items() if k in keep},
        "AUTH_TOKEN": admin,
        "SESSION_SECRET": Fernet.generate_key().decode(),
        "AUDIT_LOG": str(tmp_path / "audit.log"),
        "OAUTH_SERVER": "true",
        "PUBLIC_URL": f"http://127.0.0.1:{port}",
        "STATE_DIR": str(tmp_path / "state"),
    }
    script = Path(__file__).resolve().parents[2] / "server_secure.py"
    return OAuthProcess(
        port, admin, env, [sys.executable, str(script), "--port", str(port), "--env-file", os.devnull]
    )
