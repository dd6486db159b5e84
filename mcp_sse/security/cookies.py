"""Cookie sessions, for browsers and EventSource, which cannot send an Authorization header.

The cookie (aiohttp-session's EncryptedCookieStorage, Fernet) carries only a random login
id. The login itself lives here, server-side: that is what lets logout and key
revocation work on a copied cookie, which a cookie store alone cannot do, and what
enforces the absolute lifetime and the idle timeout without rewriting the cookie on
SSE responses (aiohttp-session never saves on a streamed response).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any, Final, Protocol

from aiohttp import web
from aiohttp_session import Session, get_session, new_session
from aiohttp_session.cookie_storage import EncryptedCookieStorage
from cryptography.fernet import Fernet

from ..settings import Secret
from ..state import API_KEY, AUDIT, KEYS, LOGINS, SECURE
from .errors import unauthorized
from .keys import bearer_token

__all__ = ["CookieStorage", "Login", "LoginStore", "Logins", "fernet_key"]

SECURE_NAME: Final = "__Host-mcp-sse"
PLAIN_NAME: Final = "mcp-sse"


def fernet_key(secret: Secret) -> bytes:
    """SESSION_SECRET as a Fernet key: used as is when it is one, else derived from a long passphrase."""
    raw = secret.reveal().encode()
    try:
        Fernet(raw)
        return raw
    except ValueError:
        pass
    if len(raw) < 32:
        raise ValueError(
            "SESSION_SECRET must be a Fernet key or at least 32 characters (setup_secure.py makes one)"
        )
    return base64.urlsafe_b64encode(hashlib.sha256(b"mcp-sse-cookie:" + raw).digest())


def cookie_name(request: web.Request) -> str:
    # The __Host- prefix makes browsers insist on Secure, Path=/ and no Domain: no subdomain can plant it.
    return SECURE_NAME if request.get(SECURE, False) else PLAIN_NAME


class CookieStorage(EncryptedCookieStorage):
    """EncryptedCookieStorage whose name and Secure flag follow the request, with safe defaults.

    The library's defaults leave Secure, SameSite and max-age unset; here they never are.
    """

    def __init__(self, secret: Secret, *, lifetime: float) -> None:
        super().__init__(
            fernet_key(secret).decode(), cookie_name=SECURE_NAME, max_age=int(lifetime), httponly=True
        )
        self._lifetime = int(lifetime)

    def load_cookie(self, request: web.Request) -> str | None:
        return request.cookies.get(cookie_name(request))

    async def save_session(
        self, request: web.Request, response: web.StreamResponse, session: Session
    ) -> None:
        name = cookie_name(request)
        if session.empty:
            response.del_cookie(name, path="/", secure=request.get(SECURE, False), samesite="Strict")
            return
        data = json.dumps(self._get_session_data(session)).encode()
        response.set_cookie(
            name,
            self._fernet.encrypt(data).decode(),
            max_age=self._lifetime,
            path="/",
            secure=request.get(SECURE, False),
            httponly=True,
            samesite="Strict",
        )


@dataclass
class Login:
    sid: str
    key_id: str
    started: float
    last_seen: float


class LoginStore(Protocol):
    """Live cookie logins, server-side: one protocol, two engines. `Logins` (below) keeps them in
    this process's memory; `store.redis_logins.RedisLogins` shares them through REDIS_URL, so a
    login made on one instance works on all and a logout on one ends it everywhere."""

    lifetime: float
    idle: float

    async def start(self, key_id: str) -> Login: ...

    async def check(self, sid: Any) -> Login | None:
        """The live login for this id, touched; None (and forgotten) when ended or expired."""
        ...

    async def end(self, sid: Any) -> bool: ...

    def end_key(self, key_id: str) -> int:
        """End every login of this key (revoked, rotated, expired). Sync, for end_identities: an
        engine that must wait for a store does so in the background; the key's refusal is
        immediate anyway, since a cookie counts only while its key is current."""
        ...

    def expires_at(self, login: Login) -> float:
        return min(login.started + self.lifetime, login.last_seen + self.idle)

    def prune(self) -> None: ...


class Logins(LoginStore):
    """The memory engine: live cookie logins in this process (the default, and the reference)."""

    def __init__(self, *, lifetime: float, idle: float) -> None:
        self.lifetime = lifetime
        self.idle = idle
        self._logins: dict[str, Login] = {}

    async def start(self, key_id: str) -> Login:
        now = time.time()
        login = Login(secrets.token_urlsafe(32), key_id, now, now)
        self._logins[login.sid] = login
        return login

    async def check(self, sid: Any) -> Login | None:
        login = self._logins.get(sid) if isinstance(sid, str) else None
        if login is None:
            return None
        now = time.time()
        if now >= self.expires_at(login):
            del self._logins[login.sid]
            return None
        login.last_seen = now
        return login

    async def end(self, sid: Any) -> bool:
        return isinstance(sid, str) and self._logins.pop(sid, None) is not None

    def end_key(self, key_id: str) -> int:
        ended = [sid for sid, login in self._logins.items() if login.key_id == key_id]
        for sid in ended:
            del self._logins[sid]
        return len(ended)

    def prune(self) -> None:
        now = time.time()
        for sid in [sid for sid, login in self._logins.items() if now >= self.expires_at(login)]:
            del self._logins[sid]


async def login_from_cookie(request: web.Request, logins: LoginStore) -> Login | None:
    session = await get_session(request)
    return await logins.check(session.get("sid"))


async def start_cookie_session(request: web.Request, logins: LoginStore, key_id: str) -> Login:
    # A brand-new session, never the one the request came with: no session fixation.
    session = await new_session(request)
    login = await logins.start(key_id)
    session["sid"] = login.sid
    return login


async def end_cookie_session(request: web.Request, logins: LoginStore) -> bool:
    session = await get_session(request)
    ended = await logins.end(session.get("sid"))
    session.invalidate()
    return ended


# -- routes: /auth/login, /auth/logout, /auth/session ------------------------------------------


async def _login(request: web.Request) -> web.Response:
    token = bearer_token(request.headers.get("Authorization", ""))
    if token is None and request.content_type == "application/json":
        try:
            body = await request.json()
        except ValueError:
            body = None
        token = body.get("token") if isinstance(body, dict) and isinstance(body.get("token"), str) else None
    key = request.app[KEYS].verify(token) if token else None
    logins = request.app[LOGINS]
    if key is None or logins is None:
        request.app[AUDIT].event("auth.failed", request, reason="login")
        raise unauthorized("Invalid token")
    login = await start_cookie_session(request, logins, key.id)
    request.app[AUDIT].event("session.login", request, identity=key.id)
    return web.json_response(
        {"identity": key.id, "name": key.name, "role": key.role, "expires_at": logins.expires_at(login)}
    )


async def _logout(request: web.Request) -> web.Response:
    logins = request.app[LOGINS]
    ended = logins is not None and await end_cookie_session(request, logins)
    request.app[AUDIT].event("session.logout", request, ended=ended)
    return web.json_response({"logged_out": ended})


async def _whoami(request: web.Request) -> web.Response:
    key = request[API_KEY]
    logins = request.app[LOGINS]
    login = await login_from_cookie(request, logins) if logins is not None else None
    return web.json_response(
        {
            "identity": key.id,
            "name": key.name,
            "role": key.role,
            "via": "cookie" if login is not None and login.key_id == key.id else "bearer",
            "expires_at": logins.expires_at(login) if logins is not None and login is not None else None,
        }
    )


def add_auth_routes(app: web.Application) -> None:
    app.router.add_post("/auth/login", _login)
    app.router.add_post("/auth/logout", _logout)
    app.router.add_get("/auth/session", _whoami)
