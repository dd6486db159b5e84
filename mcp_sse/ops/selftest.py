"""`server_secure.py selftest URL`: test a running deployment's security from the outside.

Everything here asks the deployment over the network, as any client (or attacker) would, what
the secure profile promises: that every MCP route wants a key and says so (401 with
`WWW-Authenticate: Bearer`), that a wrong key or a key in the URL is refused, that the right key
gets a real MCP exchange, that answers and event streams carry the security headers, that a
foreign Origin gets no CORS grant and a foreign Host is refused, that the rate limits are
announced (and, with `--rate-limit`, enforced), that the TLS is sound, and that `/health` tells a
stranger nothing about versions or backends. The deployment may be ours or anything claiming to
be: nothing is taken on trust, every answer is read, bounded and timed out.

Each check is a small function returning a verdict; `run()` turns each into one row (PASS, FAIL
or SKIP and a one-line detail) and never lets an exception through: a connection that fails is
one clear FAIL row. The token is never printed: every detail goes through `Masker` before it is
shown, whatever a server echoed back.

Order matters in one place: `--rate-limit` spends this address's budget for requests without a
key, so it runs last; after it, requests without a key from this address are refused until the
window has passed (requests with a key are counted against the key on mcp-sse, so they still work).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import ssl
import sys
import warnings
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, Literal, TextIO
from urllib.parse import quote, quote_plus, urlsplit

import aiohttp
from cryptography import x509
from multidict import CIMultiDictProxy
from yarl import URL

from .. import __version__
from ..settings import is_loopback

__all__ = [
    "FAIL",
    "PASS",
    "SKIP",
    "Masker",
    "Options",
    "Result",
    "command",
    "render_json",
    "render_table",
    "run",
]

Status = Literal["PASS", "FAIL", "SKIP"]
PASS: Final = "PASS"  # noqa: S105  (a result, not a password)
FAIL: Final = "FAIL"
SKIP: Final = "SKIP"
Verdict = tuple[Status, str]

EVIL_ORIGIN: Final = "https://evil.example"
EVIL_HOST: Final = "evil.example"
MAX_BODY: Final = 256 * 1024
"""Read no more of any answer than this: the server under test is not trusted."""
WRONG_TOKEN: Final = "mcp-sse-selftest-wrong-token-" + "0" * 24
"""Always the same: a lockout counts distinct failed credentials (mcp-sse: AUTH_LOCKOUT_FAILURES per
15 minutes), so runs from CI every few minutes count as one failure, not one each."""
MIN_CERT_DAYS: Final = 30
MIN_HSTS_SECONDS: Final = 15_768_000  # six months, as Mozilla's Observatory asks
FLOOD_WITHOUT_LIMIT: Final = 500
"""--rate-limit: requests sent when no answer announced its limit."""
FLOOD_MAX: Final = 2000
"""--rate-limit: never more than this, whatever the announced limit (2x it otherwise)."""
PROTOCOL_VERSION: Final = "2025-11-25"
MCP_POST: Final = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
SAFE_REFERRERS: Final = frozenset(
    {"no-referrer", "same-origin", "strict-origin", "strict-origin-when-cross-origin"}
)
RATE_HEADERS: Final = ("RateLimit", "RateLimit-Policy", "RateLimit-Limit", "X-RateLimit-Limit")
# Three dotted numbers not part of a longer dotted run: "aiohttp/3.14.5", not "127.0.0.1".
VERSION: Final = re.compile(r"(?<![\d.])v?\d+\.\d+\.\d+(?![\d.])")
HARMLESS_KEYS: Final = frozenset({"status", "error", "error_description", "message"})


@dataclass(frozen=True)
class Result:
    name: str
    status: Status
    detail: str


@dataclass(frozen=True)
class Options:
    url: str
    """scheme://host[:port][/prefix], no query: the routes are appended to it."""
    token: str
    timeout: float = 10.0
    rate_limit: bool = False
    ca_file: Path | None = None
    insecure: bool = False


class Masker:
    """Replace the token (as sent, URL-encoded either way, JSON-escaped) in anything to be shown."""

    def __init__(self, token: str) -> None:
        query = URL.build(path="/", query={"t": token}).raw_query_string.removeprefix("t=") if token else ""
        forms = {token, quote(token, safe=""), quote_plus(token, safe=""), quote(token), query}
        forms.add(json.dumps(token)[1:-1])
        self._forms = sorted((f for f in forms if f), key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for form in self._forms:
            text = text.replace(form, "<token>")
        return text


_MASK: Final[ContextVar[Masker]] = ContextVar("selftest_mask")
"""The run's masker, which `_clean` applies before it cuts anything short (a cut token is no
longer one the masker would find)."""


def _clean(text: str, limit: int = 100) -> str:
    """One printable line of at most `limit` characters, token masked, from whatever a server sent."""
    mask = _MASK.get(None)
    line = "".join(c if c.isprintable() else " " for c in (mask(text) if mask else text)).strip()
    return line if len(line) <= limit else line[: limit - 1] + "…"


# -- answers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def all(self, name: str) -> list[str]:
        return self.headers.getall(name, [])

    @property
    def content_type(self) -> str:
        return (self.header("Content-Type") or "").split(";")[0].strip().lower()

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def excerpt(self) -> str:
        text = self.body.decode(errors="replace")
        data = self.json()
        if isinstance(data, dict):
            for key in ("error", "message", "detail"):
                value = data.get(key)
                if isinstance(value, dict):
                    value = value.get("message")
                if isinstance(value, str):
                    text = value
                    break
        return _clean(text, 80)


async def _bounded(content: aiohttp.StreamReader) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < MAX_BODY and (chunk := await content.read(MAX_BODY - size)):
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


async def _sse_reply(content: aiohttp.StreamReader, reply_id: int) -> bytes:
    """The data of the first SSE event holding the JSON-RPC answer to `reply_id`, else b""."""
    data: list[bytes] = []
    size = 0
    while line := await content.readline():
        size += len(line)
        if size > MAX_BODY:
            break
        line = line.rstrip(b"\r\n")
        if line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(b" ") else value)
        elif not line and data:
            payload, data = b"\n".join(data), []
            with contextlib.suppress(ValueError):
                message = json.loads(payload)
                answered = isinstance(message, dict) and ("result" in message or "error" in message)
                if answered and message.get("id") == reply_id:
                    return payload
    return b""


class Probe:
    """The client side of every check: one aiohttp session, no cookies kept, no redirects followed."""

    def __init__(self, base: str, token: str, http: aiohttp.ClientSession, timeout: float) -> None:
        self.base = base
        self.token = token
        self.http = http
        self.timeout = timeout
        self.https = base.startswith("https://")
        self.answers: dict[str, Answer] = {}
        """Answers later checks read again: "contact" (GET /health without a key), "api" (tools/list)."""

    async def send(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        reply_id: int | None = None,
    ) -> Answer:
        """One request, within the timeout. An event stream's body is not read (it may never end),
        except to find the answer to `reply_id` in it."""
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        data = None if body is None else json.dumps(body).encode()
        async with (
            asyncio.timeout(self.timeout),
            self.http.request(
                method, self.base + path, headers=sent, data=data, params=params, allow_redirects=False
            ) as response,
        ):
            stream = response.content_type == "text/event-stream"
            if stream and reply_id is not None:
                read = await _sse_reply(response.content, reply_id)
            elif stream:
                read = b""
            else:
                read = await _bounded(response.content)
            if not response.content.at_eof():
                response.close()  # the rest is not wanted: drop the connection, not drain it
            return Answer(response.status, response.headers, read)


def _initialize(request_id: int) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "initialize",
        "params": {
            "protocolVersion": PROTOCOL_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "mcp-sse-selftest", "version": __version__},
        },
    }


def _bearer_challenge(answer: Answer) -> bool:
    return any(re.search(r"(^|,)\s*bearer\b", v, re.IGNORECASE) for v in answer.all("WWW-Authenticate"))


def _limited(answer: Answer) -> Verdict | None:
    """A 429 tells nothing about what the check asked: a FAIL that says so (CI must not pass blind)."""
    if answer.status != 429:
        return None
    wait = answer.header("Retry-After")
    return FAIL, (
        f"429{f' (Retry-After: {_clean(wait, 20)} s)' if wait else ''}, cannot tell: this address is "
        f"rate limited or locked out (an earlier --rate-limit run?): {answer.excerpt()}"
    )


def _bare_status(answer: Answer) -> bool:
    """A public /health answer with nothing but its status: {"status": "ok"}."""
    data = answer.json()
    return isinstance(data, dict) and set(data) == {"status"} and isinstance(data["status"], str)


# -- authentication -----------------------------------------------------------------------------

AUTH_ROUTES: Final[tuple[tuple[str, str], ...]] = (
    ("GET", "/sse"),
    ("POST", "/messages"),
    ("POST", "/mcp"),
    ("GET", "/mcp"),
    ("DELETE", "/mcp"),
    ("GET", "/mcp/servers"),
    ("GET", "/health"),
)


async def _without_key(probe: Probe, method: str, path: str) -> Answer:
    """The request a client would make on this route, minus its key."""
    if path == "/health" and "contact" in probe.answers:
        return probe.answers["contact"]
    stream = {"Accept": "text/event-stream"}
    if (method, path) == ("POST", "/messages"):
        ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        return await probe.send(method, path, params={"session_id": "selftest"}, body=ping)
    if (method, path) == ("POST", "/mcp"):
        return await probe.send(method, path, headers=MCP_POST, body=_initialize(1))
    if method == "DELETE":
        return await probe.send(method, path, headers={"Mcp-Session-Id": "selftest"})
    return await probe.send(method, path, headers=stream if path in ("/sse", "/mcp") else None)


async def check_auth_required(probe: Probe, method: str, path: str) -> Verdict:
    answer = await _without_key(probe, method, path)
    if limited := _limited(answer):
        return limited
    if answer.status == 401:
        if _bearer_challenge(answer):
            return PASS, "401 with WWW-Authenticate: Bearer"
        return FAIL, "401 but no WWW-Authenticate: Bearer challenge (RFC 6750)"
    if path == "/health" and answer.status in (200, 503) and _bare_status(answer):
        return PASS, f"public, bare status only ({answer.status} {_clean(repr(answer.json()['status']), 30)})"
    if 200 <= answer.status < 300:
        return FAIL, f"served without a token ({answer.status})"
    if 300 <= answer.status < 400:
        where = _clean(answer.header("Location") or "?", 60)
        return FAIL, f"redirected ({answer.status} to {where}), not 401: test the URL it redirects to"
    return FAIL, f"answered {answer.status} without a token, not 401: {answer.excerpt()}"


async def check_wrong_token(probe: Probe) -> Verdict:
    wrong = WRONG_TOKEN if probe.token != WRONG_TOKEN else WRONG_TOKEN[::-1]
    answer = await probe.send("POST", "/mcp", token=wrong, headers=MCP_POST, body=_initialize(1))
    if limited := _limited(answer):
        return limited
    if answer.status == 401:
        return PASS, "401"
    if 200 <= answer.status < 300:
        return FAIL, f"a random token was accepted ({answer.status})"
    return FAIL, f"answered {answer.status}, not 401: {answer.excerpt()}"


async def check_url_token(probe: Probe, name: str) -> Verdict:
    query = {name: probe.token}
    answer = await probe.send("POST", "/mcp", headers=MCP_POST, body=_initialize(1), params=query)
    if limited := _limited(answer):
        return limited
    if answer.status in (401, 403):
        return PASS, f"refused ({answer.status})"
    leak = "URLs end up in proxy logs, browser history and Referer headers"
    if 200 <= answer.status < 300:
        if session := answer.header("Mcp-Session-Id"):  # the session it opened is not wanted
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                await probe.send("DELETE", "/mcp", token=probe.token, headers={"Mcp-Session-Id": session})
        return FAIL, f"accepted ({answer.status}), documented (URL_AUTH) or not: {leak}"
    return FAIL, f"answered {answer.status}, not 401: the URL's token got past authentication ({leak})"


async def check_token_works(probe: Probe) -> Verdict:
    """The right key gets a real MCP exchange: initialize, initialized, tools/list (then DELETE)."""
    init = await probe.send(
        "POST", "/mcp", token=probe.token, headers=MCP_POST, body=_initialize(1), reply_id=1
    )
    if init.status != 200:
        return FAIL, f"initialize answered {init.status}: {init.excerpt()}"
    reply = init.json()
    result = reply.get("result") if isinstance(reply, dict) else None
    if not isinstance(result, dict):
        return FAIL, f"initialize got no result: {init.excerpt()}"
    version = result.get("protocolVersion")
    info = result.get("serverInfo")
    server = " ".join(str(info.get(k, "")) for k in ("name", "version")) if isinstance(info, dict) else "?"
    headers = dict(MCP_POST)
    if isinstance(version, str):
        headers["MCP-Protocol-Version"] = version
    if session := init.header("Mcp-Session-Id"):
        headers["Mcp-Session-Id"] = session
    note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    initialized = await probe.send("POST", "/mcp", token=probe.token, headers=headers, body=note)
    if initialized.status not in (200, 202, 204):
        return FAIL, f"notifications/initialized answered {initialized.status}: {initialized.excerpt()}"
    listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}}
    listed = await probe.send("POST", "/mcp", token=probe.token, headers=headers, body=listing, reply_id=2)
    probe.answers["api"] = listed
    if session:  # end the session; how it answers is not this check's business
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            await probe.send("DELETE", "/mcp", token=probe.token, headers=headers)
    answer = listed.json()
    tools = answer.get("result", {}).get("tools") if isinstance(answer, dict) else None
    if listed.status != 200 or not isinstance(tools, list):
        return FAIL, f"tools/list answered {listed.status}: {listed.excerpt()}"
    where = f"session {'kept' if session else 'none (stateless)'}"
    return PASS, _clean(f"initialize ({version}, {server.strip()}), tools/list: {len(tools)} tools, {where}")


# -- security headers ---------------------------------------------------------------------------


def _directives(values: Sequence[str]) -> set[str]:
    return {part.strip().split("=")[0].lower() for value in values for part in value.split(",")}


def header_problems(answer: Answer, *, https: bool) -> list[str]:
    """The security headers this answer lacks (or has too weak), each named as it should be."""
    problems = []
    if (answer.header("X-Content-Type-Options") or "").strip().lower() != "nosniff":
        problems.append("X-Content-Type-Options nosniff")
    frame = (answer.header("X-Frame-Options") or "").strip().upper()
    policy = ";".join(answer.all("Content-Security-Policy"))
    ancestors = re.search(r"frame-ancestors\s+([^;,]*)", policy, re.IGNORECASE)
    if frame not in ("DENY", "SAMEORIGIN") and not (
        ancestors and ancestors.group(1).strip().lower() in ("'none'", "'self'")
    ):
        problems.append("X-Frame-Options DENY (or CSP frame-ancestors)")
    referrer = [v.strip().lower() for v in ",".join(answer.all("Referrer-Policy")).split(",") if v.strip()]
    if not referrer:
        problems.append("Referrer-Policy")
    elif referrer[-1] not in SAFE_REFERRERS:  # the last one a browser knows wins
        problems.append(f"a safe Referrer-Policy (has {_clean(referrer[-1], 40)})")
    cache = _directives(answer.all("Cache-Control"))
    stream = answer.content_type == "text/event-stream"
    if "no-store" not in cache and not (stream and "no-cache" in cache):
        problems.append("Cache-Control no-store" + (" or no-cache" if stream else ""))
    if https:
        hsts = answer.header("Strict-Transport-Security") or ""
        age = re.search(r"max-age\s*=\s*\"?(\d+)", hsts, re.IGNORECASE)
        if age is None:
            problems.append("Strict-Transport-Security")
        elif int(age.group(1)) < MIN_HSTS_SECONDS:
            problems.append(f"Strict-Transport-Security max-age >= {MIN_HSTS_SECONDS} (has {age.group(1)})")
    return problems


def _headers_verdict(answer: Answer, probe: Probe, what: str) -> Verdict:
    if problems := header_problems(answer, https=probe.https):
        return FAIL, f"{what} lacks " + ", ".join(problems)
    return PASS, f"{what}: nosniff, frame, referrer, cache{', HSTS' if probe.https else ''}"


async def check_headers_api(probe: Probe) -> Verdict:
    answer = probe.answers.get("api") or await probe.send("GET", "/health", token=probe.token)
    return _headers_verdict(answer, probe, f"{answer.status} {_clean(answer.content_type, 40) or 'answer'}")


async def check_headers_sse(probe: Probe) -> Verdict:
    answer = await probe.send("GET", "/sse", token=probe.token, headers={"Accept": "text/event-stream"})
    if answer.status != 200 or answer.content_type != "text/event-stream":
        kind = _clean(answer.content_type, 40)
        return FAIL, f"GET /sse with the token answered {answer.status} {kind}, not an event stream"
    return _headers_verdict(answer, probe, "event stream")


async def check_headers_error(probe: Probe) -> Verdict:
    answer = await probe.send("POST", "/mcp", headers=MCP_POST, body=_initialize(1))
    if answer.status < 400:
        return SKIP, f"POST /mcp without a token answered {answer.status}: no error answer to inspect"
    return _headers_verdict(answer, probe, f"{answer.status} error")


# -- CORS and Host ------------------------------------------------------------------------------


def _cors_verdict(answer: Answer) -> Verdict:
    granted = (answer.header("Access-Control-Allow-Origin") or "").strip()
    if granted in (EVIL_ORIGIN, "*"):
        credentials = (answer.header("Access-Control-Allow-Credentials") or "").strip().lower() == "true"
        return FAIL, f"Access-Control-Allow-Origin: {granted}" + (" with credentials" if credentials else "")
    if limited := _limited(answer):
        return limited
    if answer.status >= 400:
        return PASS, f"refused ({answer.status})"
    return PASS, f"{answer.status}, no Access-Control-Allow-Origin for {EVIL_ORIGIN}"


async def check_cors_preflight(probe: Probe) -> Verdict:
    headers = {
        "Origin": EVIL_ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    return _cors_verdict(await probe.send("OPTIONS", "/mcp", headers=headers))


async def check_cors_request(probe: Probe) -> Verdict:
    answer = await probe.send("GET", "/health", token=probe.token, headers={"Origin": EVIL_ORIGIN})
    return _cors_verdict(answer)


async def check_host(probe: Probe) -> Verdict:
    """DNS rebinding: a page on evil.example re-pointed at this server sends Host: evil.example."""
    answer = await probe.send("GET", "/health", token=probe.token, headers={"Host": EVIL_HOST})
    if limited := _limited(answer):
        return limited
    if answer.status < 400:
        return FAIL, f"answered {answer.status} to Host: {EVIL_HOST} (mcp-sse: set ALLOWED_HOSTS)"
    return PASS, f"refused ({answer.status})"


# -- /health and rate limits --------------------------------------------------------------------


async def check_health_exposure(probe: Probe) -> Verdict:
    answer = probe.answers.get("contact") or await probe.send("GET", "/health")
    leaks = []
    for name in ("Server", "X-Powered-By"):
        value = answer.header(name)
        if value is not None and (name == "X-Powered-By" or VERSION.search(value)):
            leaks.append(f"{name}: {_clean(value, 40)}")
    data = answer.json()
    if isinstance(data, dict) and (extra := sorted(set(data) - HARMLESS_KEYS)):
        leaks.append("body has " + ", ".join(_clean(str(k), 20) for k in extra))
    elif VERSION.search(answer.body.decode(errors="replace")):
        leaks.append("a version number in the body")
    if leaks:
        return FAIL, f"{answer.status} without a token reveals " + "; ".join(leaks)
    if limited := _limited(answer):
        return limited
    if answer.status == 401:
        return PASS, "401: nothing without a key"
    return PASS, f"{answer.status}: {_clean(answer.body.decode(errors='replace'), 40)} only"


def rate_limit_of(answer: Answer) -> int | None:
    """The request limit an answer announces, in any of the header styles in use."""
    for name in ("RateLimit-Limit", "X-RateLimit-Limit"):
        value = (answer.header(name) or "").strip()
        if value.isdigit():
            return int(value)
    policy = re.search(r"\bq\s*=\s*(\d+)", answer.header("RateLimit-Policy") or "")
    if policy is not None:
        return int(policy.group(1))
    limit = re.search(r"\blimit\s*=\s*(\d+)", answer.header("RateLimit") or "")  # draft 7
    return int(limit.group(1)) if limit is not None else None


def _rate_headers(answer: Answer) -> list[str]:
    return [name for name in RATE_HEADERS if answer.header(name) is not None]


async def check_rate_limit_headers(probe: Probe) -> Verdict:
    keyed = probe.answers.get("api") or await probe.send("GET", "/health", token=probe.token)
    # Not /health: a public one is a load balancer's probe, which no limit charges.
    anonymous = await probe.send("POST", "/mcp")
    pairs = (("with a key", keyed), ("without one", anonymous))
    missing = [what for what, answer in pairs if not _rate_headers(answer)]
    if missing:
        return FAIL, f"no RateLimit headers on answers {' or '.join(missing)}"
    return PASS, (
        f"{', '.join(_rate_headers(keyed))}; limit {rate_limit_of(keyed)} with the key, "
        f"{rate_limit_of(anonymous)} without"
    )


def _retry_after_ok(value: str | None) -> bool:
    if value is None:
        return False
    if value.strip().isdigit():
        return True
    with contextlib.suppress(TypeError, ValueError):
        from email.utils import parsedate_to_datetime

        parsedate_to_datetime(value)
        return True
    return False


async def check_rate_limit_enforced(probe: Probe) -> Verdict:
    """Spend the budget of requests without a key until a 429 comes (at most 2x the limit)."""
    first = await probe.send("GET", "/health")
    limit = rate_limit_of(first)
    if limit is not None and 2 * limit > FLOOD_MAX:
        return SKIP, f"the announced limit ({limit}) is more than this check spends (at most {FLOOD_MAX})"
    bound = 2 * limit if limit is not None else FLOOD_WITHOUT_LIMIT
    answer, sent = first, 1
    while answer.status != 429 and sent < bound:
        answer = await probe.send("GET", "/health")
        sent += 1
    if answer.status != 429:
        announced = f"limit {limit} announced" if limit is not None else "no limit announced"
        return FAIL, f"no 429 after {sent} requests without a key ({announced})"
    missing = [] if _retry_after_ok(answer.header("Retry-After")) else ["Retry-After"]
    if not _rate_headers(answer):
        missing.append("RateLimit headers")
    if missing:
        return FAIL, f"429 after {sent} requests, without {' and '.join(missing)}"
    wait = _clean(answer.header("Retry-After") or "", 20)
    return PASS, f"429 after {sent} requests without a key, Retry-After: {wait}"


# -- TLS ----------------------------------------------------------------------------------------


@dataclass
class _Handshake:
    version: str | None = None
    certificate: bytes | None = None


async def _handshake(host: str, port: int, context: ssl.SSLContext, seconds: float) -> _Handshake:
    async with asyncio.timeout(seconds):
        _, writer = await asyncio.open_connection(host, port, ssl=context, server_hostname=host)
    try:
        tls = writer.get_extra_info("ssl_object")
        return _Handshake(tls.version() if tls else None, tls.getpeercert(binary_form=True) if tls else None)
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
            async with asyncio.timeout(seconds):
                await writer.wait_closed()


def _unverified() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def verifying_context(ca_file: Path | None) -> ssl.SSLContext:
    """The system's CAs, or only `ca_file`'s: hostname checked, TLS 1.2 or newer."""
    return ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)


def _legacy_context() -> ssl.SSLContext | None:
    """A client that offers only TLS 1.0 and 1.1, or None when this OpenSSL cannot."""
    try:
        context = _unverified()
        with warnings.catch_warnings():  # asking for old versions is itself deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = ssl.TLSVersion.TLSv1
            context.maximum_version = ssl.TLSVersion.TLSv1_1
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # else OpenSSL 3 refuses to offer them at all
    except (ValueError, ssl.SSLError):
        return None
    return context


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return str(exc.verify_message or exc.reason or exc)
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc)
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return str(exc) or type(exc).__name__


async def check_tls_legacy(host: str, port: int, seconds: float) -> Verdict:
    context = _legacy_context()
    if context is None:
        return SKIP, "this machine's OpenSSL cannot offer TLS 1.0/1.1 to try"
    try:
        shook = await _handshake(host, port, context, seconds)
    except ssl.SSLError as exc:
        if exc.reason == "NO_PROTOCOLS_AVAILABLE":
            return SKIP, "this machine's OpenSSL cannot offer TLS 1.0/1.1 to try"
        return PASS, f"TLS 1.0/1.1 refused ({_why(exc)})"
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        return PASS, f"TLS 1.0/1.1 refused (handshake ended: {_why(exc)})"
    return FAIL, f"accepted {shook.version}: only TLS 1.2 and 1.3 should be"


def check_tls_version(shook: _Handshake) -> Verdict:
    if shook.version in ("TLSv1.2", "TLSv1.3"):
        return PASS, f"{shook.version} negotiated"
    return FAIL, f"{shook.version} negotiated: TLS 1.2 or newer expected"


def check_tls_expiry(shook: _Handshake, now: dt.datetime | None = None) -> Verdict:
    if shook.certificate is None:
        return FAIL, "the server sent no certificate"
    expires = x509.load_der_x509_certificate(shook.certificate).not_valid_after_utc
    days = (expires - (now or dt.datetime.now(dt.UTC))).total_seconds() / 86400
    when = expires.strftime("%Y-%m-%d %H:%M UTC")
    if days < 0:
        return FAIL, f"expired on {when}"
    if days < MIN_CERT_DAYS:
        return FAIL, f"expires on {when}, in {days:.0f} days (under {MIN_CERT_DAYS}): renew it"
    return PASS, f"valid until {when} ({days:.0f} days)"


async def check_tls_trust(host: str, port: int, options: Options) -> Verdict:
    by = f"CA file {options.ca_file}" if options.ca_file is not None else "the system's CAs"
    try:
        await _handshake(host, port, verifying_context(options.ca_file), options.timeout)
    except ssl.SSLError as exc:
        hint = "pass --ca-file for a private CA" + ("" if options.insecure else ", or --insecure to go on")
        return FAIL, f"not trusted by {by}: {_why(exc)} ({hint})"
    return PASS, f"verified by {by}, name {host} matches"


async def tls_checks(host: str, port: int, options: Options) -> tuple[list[Result], bool] | None:
    """The TLS rows, and whether the certificate is trusted; None when nothing answers at all."""
    try:
        shook = await _handshake(host, port, _unverified(), options.timeout)
    except ssl.SSLError as exc:
        return [Result("TLS version", FAIL, f"no TLS 1.2+ handshake: {_why(exc)}")], False
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return None
    results = [
        Result("TLS version", *check_tls_version(shook)),
        Result("TLS 1.0/1.1 refused", *await check_tls_legacy(host, port, options.timeout)),
        Result("TLS certificate expiry", *check_tls_expiry(shook)),
        Result("TLS certificate trusted", *await check_tls_trust(host, port, options)),
    ]
    return results, results[-1].status == PASS


def check_plain_http(host: str) -> Verdict:
    if is_loopback(host):
        return SKIP, f"plain http to {host} (loopback): no TLS to check"
    return FAIL, (
        f"plain http to {host}: the token and every answer cross the network in clear text "
        "(serve https: TLS_CERT, or a TLS proxy in front)"
    )


# -- running ------------------------------------------------------------------------------------


def describe(exc: BaseException, timeout: float) -> str:
    """One line for what went wrong, never a traceback."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"certificate not trusted: {_why(exc.certificate_error)}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {exc.host}:{exc.port}: {exc.os_error.strerror or exc.os_error}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection without answering"
    return f"{type(exc).__name__}: {_clean(str(exc))}"


async def _row(name: str, check: Callable[[], Awaitable[Verdict]], seconds: float) -> Result:
    try:
        return Result(name, *await check())
    except Exception as exc:  # one FAIL row per broken check; the next checks still run
        return Result(name, FAIL, describe(exc, seconds))


def _checks(probe: Probe, options: Options) -> list[tuple[str, Callable[[], Awaitable[Verdict]]]]:
    def auth(method: str, path: str) -> Callable[[], Awaitable[Verdict]]:
        return lambda: check_auth_required(probe, method, path)

    def url(name: str) -> Callable[[], Awaitable[Verdict]]:
        return lambda: check_url_token(probe, name)

    checks: list[tuple[str, Callable[[], Awaitable[Verdict]]]] = [
        (f"auth required: {method} {path}", auth(method, path)) for method, path in AUTH_ROUTES
    ]
    checks += [
        ("wrong token refused", lambda: check_wrong_token(probe)),
        *((f"token in URL refused: ?{name}=", url(name)) for name in ("token", "access_token", "api_key")),
        ("right token: MCP initialize, tools/list", lambda: check_token_works(probe)),
        ("security headers: API answer", lambda: check_headers_api(probe)),
        ("security headers: SSE stream", lambda: check_headers_sse(probe)),
        ("security headers: error answer", lambda: check_headers_error(probe)),
        ("CORS: preflight from foreign Origin", lambda: check_cors_preflight(probe)),
        ("CORS: request from foreign Origin", lambda: check_cors_request(probe)),
        (f"Host: {EVIL_HOST} refused", lambda: check_host(probe)),
        ("/health without a token reveals nothing", lambda: check_health_exposure(probe)),
        ("rate limit headers", lambda: check_rate_limit_headers(probe)),
    ]
    if options.rate_limit:  # last: it spends this address's budget of requests without a key
        checks.append(("rate limit enforced (429)", lambda: check_rate_limit_enforced(probe)))
    return checks


async def run(options: Options) -> list[Result]:
    """Every check against `options.url`, in order; one FAIL row "connect" if nothing answers."""
    parts = urlsplit(options.url)
    host = parts.hostname or ""
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    results: list[Result] = []
    client_tls: ssl.SSLContext | bool = False
    if https:
        found = await tls_checks(host, port, options)
        if found is None:
            return [Result("connect", FAIL, f"nothing answers TLS at {host}:{port}")]
        results, trusted = found
        if not trusted and not options.insecure:
            return results  # the other checks would send the token to a server nobody vouched for
        client_tls = verifying_context(options.ca_file) if trusted else False
    else:
        results.append(Result("TLS", *check_plain_http(host)))
    base = options.url.rstrip("/")
    timeout = aiohttp.ClientTimeout(total=options.timeout)
    headers = {"User-Agent": f"mcp-sse-selftest/{__version__}"}
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=client_tls),
        cookie_jar=aiohttp.DummyCookieJar(),  # a cookie from one check must not authenticate the next
        timeout=timeout,
        headers=headers,
    ) as http:
        probe = Probe(base, options.token, http, options.timeout)
        try:
            probe.answers["contact"] = await probe.send("GET", "/health")
        except Exception as exc:
            return [*results, Result("connect", FAIL, describe(exc, options.timeout))]
        for name, check in _checks(probe, options):
            results.append(await _row(name, check, options.timeout))
    return results


# -- output -------------------------------------------------------------------------------------


def _counts(results: Sequence[Result]) -> dict[str, int]:
    return {s.lower(): sum(r.status == s for r in results) for s in (PASS, FAIL, SKIP)}


def render_table(results: Sequence[Result], url: str, mask: Masker) -> str:
    width = max([len(r.name) for r in results] + [5])
    lines = [mask(f"mcp-sse selftest of {url}"), ""]
    lines.append(f"{'CHECK'.ljust(width)}  {'RESULT':6}  DETAIL")
    lines += [f"{r.name.ljust(width)}  {r.status:6}  {_clean(mask(r.detail), 400)}" for r in results]
    counts = _counts(results)
    lines += ["", f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped"]
    return "\n".join(lines)


def render_json(results: Sequence[Result], url: str, mask: Masker) -> str:
    document = {
        "url": url,
        "ok": not any(r.status == FAIL for r in results),
        "counts": _counts(results),
        "checks": [{**asdict(r), "detail": mask(r.detail)} for r in results],
    }
    return mask(json.dumps(document, indent=2, ensure_ascii=False))


class _Refusal(Exception):
    """Bad usage: said on stderr, exit code 2."""


def _options(
    url: str, token: str | None, timeout: float, rate_limit: bool, ca_file: Path | None, insecure: bool
) -> Options:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _Refusal(f"selftest needs a URL such as https://mcp.example.com:3001, not {url!r}")
    if parts.query or parts.fragment or parts.username is not None or parts.password is not None:
        raise _Refusal("selftest: the URL is scheme://host[:port][/path], no user, query or fragment")
    try:
        parts.port  # noqa: B018  (it raises on a bad port)
    except ValueError:
        raise _Refusal(f"selftest: {url!r} has an invalid port") from None
    if not token:
        raise _Refusal("selftest needs --token (or AUTH_TOKEN in the environment, or --token - for stdin)")
    if not timeout > 0:
        raise _Refusal("selftest: --timeout must be positive")
    if ca_file is not None:
        if parts.scheme != "https":
            raise _Refusal("selftest: --ca-file is for https URLs")
        try:
            verifying_context(ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise _Refusal(f"selftest: cannot load --ca-file {ca_file}: {_why(exc)}") from None
    return Options(url, token, timeout, rate_limit, ca_file, insecure)


def command(
    url: str | None,
    *,
    token: str | None,
    timeout: float = 10.0,
    rate_limit: bool = False,
    ca_file: Path | None = None,
    insecure: bool = False,
    as_json: bool = False,
    environ: Mapping[str, str] | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """The `selftest` subcommand: 0 when every check passed (or was skipped), 1 on any FAIL, 2 on bad usage.

    `token` "-" reads it from stdin; None takes AUTH_TOKEN from the environment (which, unlike
    the command line, other local users cannot read in /proc)."""
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    if token == "-":  # noqa: S105  (the stdin marker)
        token = (stdin or sys.stdin).readline().strip()
    elif token is None:
        token = (os.environ if environ is None else environ).get("AUTH_TOKEN")
    mask = Masker(token or "")
    try:
        options = _options(url or "", token, timeout, rate_limit, ca_file, insecure)
    except _Refusal as exc:
        print(mask(f"mcp-sse: {exc}"), file=stderr)
        return 2
    _MASK.set(mask)
    results = asyncio.run(run(options))
    shown = options.url.rstrip("/")
    print(render_json(results, shown, mask) if as_json else render_table(results, shown, mask), file=stdout)
    return 1 if any(r.status == FAIL for r in results) else 0
