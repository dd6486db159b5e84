"""The sign-in, consent and error pages of the authorization server, and their stylesheet.

Server-rendered from `web/*.html` with `string.Template`. Every value is HTML-escaped unless it
is `Markup` made here from escaped parts: client names, redirect URIs and states come from
strangers. The pages carry their own strict CSP (no script at all, styles only from the
gateway's stylesheet, forms only to this server and to the redirect target the person is
about to be sent to), refuse framing twice (clickjacking), and are never cached.

`Referrer-Policy: same-origin` (not the gateway's default no-referrer) because a form POST made
under no-referrer sends `Origin: null` (Fetch, "append a request Origin header"), and the
handlers check Origin against the issuer's to refuse cross-site posts.
"""

from __future__ import annotations

import functools
import hashlib
import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from string import Template
from typing import Final
from urllib.parse import urlsplit

from aiohttp import web

__all__ = [
    "STYLESHEET_PATH",
    "Assets",
    "ConsentView",
    "Markup",
    "assets",
    "consent_page",
    "error_page",
    "login_page",
    "page_headers",
    "render",
    "stylesheet",
]


class Markup(str):
    """HTML that is already safe: the only kind of value `render` does not escape."""


@dataclass(frozen=True)
class Assets:
    page: Template
    login: Template
    consent: Template
    error: Template
    css: bytes
    css_version: str


@functools.cache
def assets() -> Assets:
    """The templates and stylesheet, read once. Read when the authorization server is made (not
    at import), so a gateway without OAuth never needs them and one with OAuth fails at start,
    not at its first sign-in, should an install have left them out."""
    web_dir = resources.files("mcp_sse.oauth").joinpath("web")
    try:
        texts = {name: web_dir.joinpath(f"{name}.html").read_text(encoding="utf-8") for name in _PAGES}
        css = web_dir.joinpath("oauth.css").read_bytes()
    except OSError as exc:
        raise RuntimeError(
            f"the OAuth pages are missing from this install ({exc}): mcp_sse/oauth/web/ must be "
            "installed with the package (package-data)"
        ) from None
    return Assets(
        page=Template(texts["page"]),
        login=Template(texts["login"]),
        consent=Template(texts["consent"]),
        error=Template(texts["error"]),
        css=css,
        css_version=hashlib.sha256(css).hexdigest()[:12],
    )


_PAGES: Final = ("page", "login", "consent", "error")
STYLESHEET_PATH: Final = "/oauth/static/oauth.css"
_HOST_SOURCE: Final = re.compile(r"[a-z0-9.-]+")


def render(template: Template, **values: str) -> Markup:
    """`template` with every value escaped, except `Markup` values."""
    return Markup(
        template.substitute(
            {
                name: value if isinstance(value, Markup) else html.escape(value, quote=True)
                for name, value in values.items()
            }
        )
    )


def hidden_fields(fields: Mapping[str, str]) -> Markup:
    inputs = (
        f'<input type="hidden" name="{html.escape(name)}" value="{html.escape(value)}">'
        for name, value in fields.items()
    )
    return Markup("\n".join(inputs))


def _form_source(uri: str) -> str:
    """The CSP source for a redirect target. Browsers apply form-action to the redirect that
    follows a form post, so the target's origin must be listed. IPv6 literals have no CSP host
    syntax; they get the scheme (our page holds only our own form, so that admits nothing else)."""
    parts = urlsplit(uri)
    host = (parts.hostname or "").lower()
    if not _HOST_SOURCE.fullmatch(host):
        return f"{parts.scheme}:"
    port = f":{parts.port}" if parts.port is not None else ""
    return f"{parts.scheme}://{host}{port}"


def page_headers(form_targets: Sequence[str] = ()) -> dict[str, str]:
    sources = " ".join(dict.fromkeys(["'self'", *(_form_source(t) for t in form_targets)]))
    return {
        "Content-Security-Policy": (
            f"default-src 'none'; style-src 'self'; form-action {sources}; "
            "frame-ancestors 'none'; base-uri 'none'"
        ),
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "same-origin",
        "Cache-Control": "no-store",
        "Pragma": "no-cache",
        "X-Content-Type-Options": "nosniff",
    }


def _page(title: str, gateway: str, body: Markup, footer: str = "") -> str:
    return render(
        assets().page,
        title=title,
        gateway=gateway,
        stylesheet=f"{STYLESHEET_PATH}?v={assets().css_version}",
        body=body,
        footer=footer or "Protected by mcp-sse · OAuth 2.1",
    )


def error_page(*, gateway: str, heading: str, message: str) -> str:
    return _page(heading, gateway, render(assets().error, heading=heading, message=message))


def login_page(
    *, gateway: str, action: str, client_name: str, fields: Mapping[str, str], error: str = ""
) -> str:
    alert = Markup(f'<p class="alert" role="alert">{html.escape(error)}</p>') if error else Markup("")
    body = render(
        assets().login, client_name=client_name, action=action, hidden=hidden_fields(fields), error=alert
    )
    return _page("Sign in", gateway, body)


@dataclass(frozen=True)
class ConsentView:
    client_name: str
    provenance: str  # where the name comes from, and how far to trust it
    redirect_uri: str
    redirect_host: str
    loopback: bool
    scope: str
    scope_text: str
    backends: str
    tools: str
    key_name: str
    role: str
    resource: str
    lifetime: str


def consent_page(*, gateway: str, action: str, view: ConsentView, fields: Mapping[str, str]) -> str:
    note = (
        Markup(
            '<p class="note">This address is on your own computer. Approve only if you started this '
            "app yourself just now: any program on this machine can claim to be it.</p>"
        )
        if view.loopback
        else Markup("")
    )
    initial = next((c for c in view.client_name if c.isalnum()), "?").upper()
    body = render(
        assets().consent,
        initial=initial,
        client_name=view.client_name,
        provenance=view.provenance,
        redirect_class=" loopback" if view.loopback else "",
        redirect_host=view.redirect_host,
        redirect_uri=view.redirect_uri,
        redirect_note=note,
        scope=view.scope,
        scope_text=view.scope_text,
        backends=view.backends,
        tools=view.tools,
        key_name=view.key_name,
        role=view.role,
        resource=view.resource,
        lifetime=view.lifetime,
        action=action,
        hidden=hidden_fields(fields),
    )
    return _page(f"Allow {view.client_name}?", gateway, body)


async def stylesheet(request: web.Request) -> web.Response:
    # Versioned URL (?v=<digest>): it may be cached for long, a new stylesheet has a new URL.
    return web.Response(
        body=assets().css,
        content_type="text/css",
        charset="utf-8",
        headers={"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"},
    )
