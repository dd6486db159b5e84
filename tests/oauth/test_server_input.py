"""Malformed input to every endpoint of the authorization server gets a 4xx that says what is
wrong: never a 500, never a traceback, never a secret, and nothing logged as an error.

The requests are generated from a fixed seed (reproducible) and sent over real HTTP: broken
percent-encodings, invalid UTF-8, control characters, huge and repeated parameters, wrong
content types, and bodies that are not what the endpoint reads.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.http_exceptions import BadHttpMessage

from .as_helpers import AS, pkce, register, start_as

NASTY = [
    "",
    " ",
    "%",
    "%zz",
    "%ff%fe",
    "\x00",
    "\r\nSet-Cookie: x=1",
    "<script>alert(1)</script>",
    "'\"",
    "a" * 5000,
    "https://",
    "http://[::1",
    "http://127.0.0.1:99999/x",
    "https://claude.ai/api/mcp/auth_callback",
    "javascript:alert(1)",
    "file:///etc/passwd",
    "S256",
    "plain",
    "code",
    "token",
    "\u202eevil",
    "😀",
    "mcp:admin mcp:admin",
    "../../etc",
]
PARAMS = [
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "code_challenge",
    "code_challenge_method",
    "resource",
]
FORM = [
    "grant_type",
    "code",
    "code_verifier",
    "client_id",
    "client_secret",
    "redirect_uri",
    "refresh_token",
    "resource",
    "scope",
    "token",
    "token_type_hint",
]


@pytest.fixture
async def as_(tmp_path: Path) -> AsyncIterator[AS]:
    running = await start_as(tmp_path)
    yield running
    await running.http.close()


def _parser_refusal(record: logging.LogRecord) -> bool:
    """aiohttp's HTTP parser answering 400 to a request line over 8 KB (it logs that itself)."""
    error = record.exc_info[1] if record.exc_info else None
    return record.name == "aiohttp.server" and isinstance(error, BadHttpMessage)


def _pairs(rng: random.Random, names: list[str], real: dict[str, str]) -> list[tuple[str, str]]:
    pairs = []
    for name in names:
        roll = rng.random()
        if roll < 0.2:
            continue  # left out
        value = real.get(name, "") if roll < 0.5 else rng.choice(NASTY)
        pairs.append((name, value))
        if rng.random() < 0.05:
            pairs.append((name, rng.choice(NASTY)))  # repeated
    return pairs


@pytest.mark.parametrize("seed", [20261203, 7])
async def test_malformed_requests_get_a_clear_4xx(
    as_: AS, caplog: pytest.LogCaptureFixture, seed: int
) -> None:
    caplog.set_level(logging.WARNING)
    _, client = await register(as_.url)
    _, challenge = pkce()
    real = {
        "response_type": "code",
        "client_id": client["client_id"],
        "redirect_uri": client["redirect_uris"][0],
        "scope": "mcp:admin",
        "state": "s",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "resource": as_.resource,
        "grant_type": "authorization_code",
    }
    rng = random.Random(seed)
    statuses: dict[int, int] = {}
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        for _ in range(300):
            which = rng.choice(["authorize", "login", "decide", "token", "revoke", "register"])
            headers = {"Origin": as_.url} if rng.random() < 0.7 else {}
            if which == "authorize":
                # Raw query strings: broken encodings reach the server as sent.
                query = "&".join(f"{k}={v}" for k, v in _pairs(rng, PARAMS, real))
                request = session.get(f"{as_.url}/oauth/authorize?{query}", allow_redirects=False)
            elif which in ("login", "decide"):
                fields = _pairs(rng, [*PARAMS, "csrf", "key", "decision"], real)
                path = "/oauth/authorize/login" if which == "login" else "/oauth/authorize"
                request = session.post(as_.url + path, data=fields, headers=headers, allow_redirects=False)
            elif which in ("token", "revoke"):
                if rng.random() < 0.2:
                    body: bytes | list[tuple[str, str]] = bytes(
                        rng.randrange(256) for _ in range(rng.randrange(1, 200))
                    )
                    headers["Content-Type"] = rng.choice(
                        ["application/x-www-form-urlencoded", "application/json", "text/plain"]
                    )
                else:
                    body = _pairs(rng, FORM, real)
                if rng.random() < 0.2:
                    headers["Authorization"] = rng.choice(
                        ["Basic", "Basic !!", "Basic Og==", "Bearer x", "Basic " + "QQ==" * 3]
                    )
                request = session.post(f"{as_.url}/oauth/{which}", data=body, headers=headers)
            else:
                choice = rng.random()
                if choice < 0.3:
                    data: bytes | str = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
                elif choice < 0.6:
                    data = rng.choice(
                        [
                            '{"redirect_uris": "x"}',
                            '{"redirect_uris": [1]}',
                            "null",
                            "[]",
                            json.dumps({"redirect_uris": [rng.choice(NASTY)]}),
                        ]
                    )
                else:
                    name = rng.choice(['"\\u0000x"', "{}", "[]", '"ok"', "1e999"])  # raw JSON values
                    data = '{"redirect_uris": ["http://127.0.0.1:1/cb"], "client_name": ' + name + "}"
                request = session.post(
                    as_.url + "/oauth/register", data=data, headers={"Content-Type": "application/json"}
                )
            async with request as response:
                text = await response.text(errors="replace")
                statuses[response.status] = statuses.get(response.status, 0) + 1
                assert response.status < 500, (which, response.status, text[:500])
                assert "Traceback" not in text and "Error:" not in text[:200], text[:500]
                if response.status in (302, 303):
                    assert response.headers["Location"].startswith(
                        ("http://127.0.0.1:8976/", "/oauth/authorize?")
                    )
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and not _parser_refusal(r)]
    assert not errors, [r.getMessage() for r in errors]
    assert set(statuses) <= {200, 201, 302, 303, 400, 401, 403}, statuses
    assert statuses.get(400, 0) > 100  # the requests really were malformed
