"""The web console at /console: the admin API (/api/) as pages, for an admin signed in with a cookie.

    GET  /console                     the console (an unrestricted admin's cookie login), else the
                                      sign-in page (no login) or a 403 page naming why (other keys)
    POST /console/login               the sign-in form: a gateway key; an unrestricted admin's only
    POST /console/logout              ends the cookie login
    GET  /console/static/<file>       console.css and console.js, nothing else

The page holds no data: console.js reads and changes everything through the /api/ routes with
fetch (same-origin, the cookie), where authorization() applies the admin rule to every call and
each one is an `admin.*` audit line. The page is served with its own strict CSP (scripts, styles,
images and fetches from this origin only; no inline script or style anywhere), refuses framing,
and is never cached. `Referrer-Policy: same-origin` (not the gateway's no-referrer): under
no-referrer a form post sends `Origin: null`, and the sign-in and sign-out forms are refused
unless their Origin is the gateway's own (origin.py's SAME_ORIGIN).

The cookie login is the one `POST /auth/login` makes (security/cookies.py), SameSite=Strict, so
logout, key revocation, the lifetime and the idle timeout apply alike; a failed sign-in is a 401
that the failed-login lockout counts (app.py lists LOGIN_PATH among its login paths).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from importlib import resources
from string import Template
from typing import Final

from aiohttp import web

from ..oauth.pages import Markup, render
from ..security.cookies import end_cookie_session, login_from_cookie, start_cookie_session
from ..security.keys import ApiKey
from ..security.origin import SAME_ORIGIN
from ..state import AUDIT, KEYS, LOGINS
from .admin import unrestricted_admin

__all__ = [
    "CONSOLE_PATH",
    "CSP",
    "LOGIN_PATH",
    "LOGOUT_PATH",
    "STATIC_PREFIX",
    "add_console_routes",
    "assets",
]

CONSOLE_PATH: Final = "/console"
LOGIN_PATH: Final = "/console/login"
LOGOUT_PATH: Final = "/console/logout"
STATIC_PREFIX: Final = "/console/static/"
CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "X-Content-Type-Options": "nosniff",
}
# The only files served: a fixed table, so no request path ever reaches the file system.
STATIC: Final = {"console.css": "text/css", "console.js": "text/javascript", "icon.svg": "image/svg+xml"}
_PAGES: Final = ("console", "card", "signin", "denied")
MAX_KEY: Final = 512
"""A key is far shorter; a longer one is not looked at."""

_OAUTH: Final = web.AppKey("console_oauth", bool)


@dataclass(frozen=True)
class Assets:
    pages: dict[str, Template]
    files: dict[str, bytes]
    versions: dict[str, str]


@functools.cache
def assets() -> Assets:
    """Templates, stylesheet and script, read once, when the routes are added: an install that
    left them out fails at start, not at the first visit."""
    web_dir = resources.files("mcp_sse.ops").joinpath("web")
    try:
        pages = {name: Template(web_dir.joinpath(f"{name}.html").read_text("utf-8")) for name in _PAGES}
        files = {name: web_dir.joinpath(name).read_bytes() for name in STATIC}
    except OSError as exc:
        raise RuntimeError(
            f"the console's pages are missing from this install ({exc}): mcp_sse/ops/web/ must be "
            "installed with the package (package-data)"
        ) from None
    versions = {name: hashlib.sha256(data).hexdigest()[:12] for name, data in files.items()}
    return Assets(pages, files, versions)


def _asset(name: str) -> str:
    return f"{STATIC_PREFIX}{name}?v={assets().versions[name]}"


def _card(request: web.Request, title: str, body: Markup) -> str:
    return render(
        assets().pages["card"],
        title=title,
        gateway=request.host,
        stylesheet=_asset("console.css"),
        icon=_asset("icon.svg"),
        body=body,
    )


def _signin(request: web.Request, error: str = "") -> str:
    alert = Markup(render(Template('<p class="alert" role="alert">$e</p>'), e=error)) if error else Markup("")
    body = render(assets().pages["signin"], action=LOGIN_PATH, error=alert)
    return _card(request, "Sign in", body)


def _denied(request: web.Request, key: ApiKey, *, signed_in: bool) -> str:
    body = render(
        assets().pages["denied"],
        name=key.name,
        role=key.role,
        limits="" if key.role != "admin" else " and limited to some backends or tools",
        signout=(
            Markup(
                f'<form method="post" action="{LOGOUT_PATH}"><button type="submit" '
                'class="button secondary wide">Sign out</button></form>'
            )
            if signed_in
            else Markup(f'<a class="button secondary wide" href="{CONSOLE_PATH}">Back to sign-in</a>')
        ),
    )
    return _card(request, "Not allowed", body)


def _html(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", headers=HEADERS)


def _refusal(cls: type[web.HTTPException], text: str) -> web.HTTPException:
    # Raised, not returned: the lockout counts the 401s it sees raised.
    return cls(text=text, content_type="text/html", headers=HEADERS)


async def _signed_in(request: web.Request) -> ApiKey | None:
    logins = request.app[LOGINS]
    login = await login_from_cookie(request, logins) if logins is not None else None
    return request.app[KEYS].current(login.key_id) if login is not None else None


async def _console(request: web.Request) -> web.Response:
    key = await _signed_in(request)
    if key is None:
        return _html(_signin(request))
    if not unrestricted_admin(key):  # the /api/ rule: this page would only show refusals
        request.app[AUDIT].event(
            "policy.denied", request, identity=key.id, reason="console needs an admin key"
        )
        return _html(_denied(request, key, signed_in=True), 403)
    return _html(
        render(
            assets().pages["console"],
            gateway=request.host,
            stylesheet=_asset("console.css"),
            icon=_asset("icon.svg"),
            script=_asset("console.js"),
            name=key.name,
            identity=key.id,
            oauth="on" if request.app[_OAUTH] else "off",
            logout=LOGOUT_PATH,
        )
    )


def _same_origin(request: web.Request, what: str) -> None:
    """SECURITY: a form post from the console's own page, never from another site (login CSRF):
    browsers always send Origin on a POST; a missing one is refused, a foreign one already was."""
    if not request.get(SAME_ORIGIN, False):
        request.app[AUDIT].event("origin.denied", request, reason=f"console {what} without this origin")
        raise _refusal(web.HTTPForbidden, _signin(request, "That request did not come from this page."))


async def _login(request: web.Request) -> web.Response:
    _same_origin(request, "sign-in")
    if request.content_type != "application/x-www-form-urlencoded":
        raise _refusal(web.HTTPBadRequest, _signin(request, "Sign in with the form on this page."))
    form = await request.post()
    presented = form.get("key")
    key = (
        request.app[KEYS].verify(presented.strip())
        if isinstance(presented, str) and 0 < len(presented) <= MAX_KEY
        else None
    )
    logins = request.app[LOGINS]
    if key is None or logins is None:
        request.app[AUDIT].event("auth.failed", request, reason="login")
        raise _refusal(web.HTTPUnauthorized, _signin(request, "That key is not valid."))
    if not unrestricted_admin(key):
        # No login is made for a key that could not use the console: its cookie would only be a
        # credential lying in this browser for the MCP routes.
        request.app[AUDIT].event(
            "policy.denied", request, identity=key.id, reason="console needs an admin key"
        )
        raise _refusal(web.HTTPForbidden, _denied(request, key, signed_in=False))
    await start_cookie_session(request, logins, key.id)
    request.app[AUDIT].event("session.login", request, identity=key.id, via="console")
    raise web.HTTPSeeOther(location=CONSOLE_PATH, headers=HEADERS)


async def _logout(request: web.Request) -> web.Response:
    _same_origin(request, "sign-out")
    logins = request.app[LOGINS]
    ended = logins is not None and await end_cookie_session(request, logins)
    request.app[AUDIT].event("session.logout", request, ended=ended, via="console")
    raise web.HTTPSeeOther(location=CONSOLE_PATH, headers=HEADERS)


async def _static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in STATIC:
        raise web.HTTPNotFound(text="not found", headers=HEADERS)
    return web.Response(
        body=assets().files[name], content_type=STATIC[name], charset="utf-8", headers=HEADERS
    )


def add_console_routes(app: web.Application, *, oauth: bool) -> None:
    """The console's routes; `oauth`: the built-in authorization server is on (its tab shows)."""
    assets()
    app[_OAUTH] = oauth
    app.router.add_get(CONSOLE_PATH, _console)
    app.router.add_post(LOGIN_PATH, _login)
    app.router.add_post(LOGOUT_PATH, _logout)
    app.router.add_get(STATIC_PREFIX + "{name}", _static)
