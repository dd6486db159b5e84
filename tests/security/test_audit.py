"""The audit log: 0600 file, one JSON object per line, no forged lines, secrets redacted, never raises."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.typedefs import Handler
from yarl import URL

from mcp_sse.security.audit import REDACTED, AuditLog, digest, sanitize
from mcp_sse.security.client_ip import client_ip_middleware
from mcp_sse.security.request_id import request_id_middleware
from mcp_sse.state import IDENTITY

from .helpers import audit_lines, make_app


def test_file_is_created_0600_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    old = os.umask(0)  # a permissive umask must not widen the file
    try:
        audit = AuditLog(path, stream=None)
    finally:
        os.umask(old)
    audit.event("server.started")
    audit.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_appends_one_json_object_per_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    path.write_text('{"event": "earlier"}\n')
    stream = io.StringIO()
    audit = AuditLog(path, stream=stream)
    audit.event("auth.failed", reason="no credentials")
    audit.event("ip.denied")
    audit.event("rate_limited", msg="scope ip")
    audit.event("server.started", port=8080)
    audit.close()
    lines = audit_lines(path)
    assert [line["event"] for line in lines] == [
        "earlier",
        "auth.failed",
        "ip.denied",
        "rate_limited",
        "server.started",
    ]
    # The phrases operators grep for.
    assert lines[1]["msg"] == "Invalid token: no credentials"
    assert lines[2]["msg"] == "Access denied"
    assert lines[3]["msg"] == "Too many requests: scope ip"
    assert lines[4]["port"] == 8080 and lines[4]["msg"] == "server.started"
    assert lines[1]["ts"].endswith("Z") and "T" in lines[1]["ts"]
    assert set(lines[1]) >= {"ts", "event", "request_id", "ip", "identity", "msg"}
    # The stream got the same lines.
    assert [json.loads(x)["event"] for x in stream.getvalue().splitlines()] == [
        "auth.failed",
        "ip.denied",
        "rate_limited",
        "server.started",
    ]


async def test_request_fields_and_an_injection_attempt_through_a_real_server(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    path = tmp_path / "audit.log"
    audit = AuditLog(path, stream=None)
    seen: list[str] = []

    @web.middleware
    async def log_every_request(request: web.Request, handler: Handler) -> web.StreamResponse:
        seen.append(request.path)
        request[IDENTITY] = "key-1"
        audit.event("request.seen", request, agent=request.headers.get("User-Agent", ""))
        return await handler(request)

    app = make_app([request_id_middleware(), client_ip_middleware(trusted_proxies=[]), log_every_request])
    client = await aiohttp_client(app)
    forged = '{"event":"auth.ok","identity":"admin"}'
    # The path decodes to newline, carriage return, U+2028 and an ANSI escape before a forged line.
    url = URL("/json%0A%0D%E2%80%A8%1B%5B31m" + forged.replace('"', "%22"), encoded=True)
    async with client.get(url, headers={"X-Request-Id": "req-1"}) as response:
        assert response.status == 404
    async with client.get("/json", headers={"User-Agent": "x" * 2000}) as response:
        assert response.status == 200
    audit.close()

    assert "\n" in seen[0] and "\r" in seen[0]  # the attack really reached the logger
    raw = path.read_text()
    assert raw.count("\n") == 2  # two requests, two lines: nothing forged one of its own
    first, second = audit_lines(path)
    assert first["event"] == "request.seen" and first["identity"] == "key-1" and first["ip"] == "127.0.0.1"
    assert first["request_id"] == "req-1" and first["method"] == "GET"
    assert first["path"].startswith("/json") and first["path"].endswith(forged)
    assert not any(ch in first["path"] for ch in "\n\r\u2028\x1b")
    assert len(second["agent"]) < 600 and second["agent"].endswith("[truncated]")


def test_control_characters_and_bidi_overrides_are_stripped() -> None:
    audit = AuditLog(None, stream=None)
    line = audit.record("x", value="a\nb\rc\x00d\x7fe\u202ef\u2029g", nested={"k\n": ["\x1b[2Jz"]})
    assert line["value"] == "abcdefg"
    audit.log_values = True
    line = audit.record("x", nested={"k\n": ["\x1b[2Jz"]})
    assert line["nested"] == {"k": ["[2Jz"]}


def test_fields_cannot_rewrite_when_or_what_but_may_say_who() -> None:
    audit = AuditLog(None, stream=None)
    line = audit.record("tool.invoked", identity="key-9", ts="1970", event="auth.ok")
    assert line["event"] == "tool.invoked" and line["ts"] != "1970"
    assert line["field_ts"] == "1970" and line["field_event"] == "auth.ok"
    assert line["identity"] == "key-9"


def test_redact_nested_secrets() -> None:
    value = {
        "Authorization": "Bearer abc",
        "config": {"db": {"Password": "hunter2", "host": "db"}, "API_KEY": "k"},
        "headers": [["X-Trace", "1"], {"Cookie": "sid=1"}],
        "note": "sent Bearer s3cr3t by mistake",
        "token_sha256": "0123456789abcdef",
        "key_id": "k1",
        "count": 3,
    }
    out = sanitize(value)
    assert out["Authorization"] == REDACTED
    assert out["config"]["db"] == {"Password": REDACTED, "host": "db"}
    assert out["config"]["API_KEY"] == REDACTED
    assert out["headers"] == [["X-Trace", "1"], {"Cookie": REDACTED}]
    assert "s3cr3t" not in out["note"]
    # Ids and digests are made safe on purpose; they stay.
    assert out["token_sha256"] == "0123456789abcdef" and out["key_id"] == "k1" and out["count"] == 3
    assert value["Authorization"] == "Bearer abc"  # a copy: the caller's data is untouched


def test_a_credential_is_masked_whatever_whitespace_or_container_carries_it() -> None:
    # Attacker's side: a token after a tab, a no-break space or an ideographic space, in a set, in a
    # scalar field and in msg. Only a printable string without a space may skip the expressions.
    audit = AuditLog(None, stream=None)
    tricks = ["Bearer\tt0k1", "basic\u00a0t0k2", "BEARER\u3000t0k3", "x Bearer t0k4", "Bearer\r\nt0k5"]
    line = audit.record("x", note=tricks[0], other=tricks[1], msg=tricks[3])
    audit.log_values = True
    line |= audit.record("x", bag=set(tricks), nested={"k": tricks})
    text = json.dumps(line)
    assert not any(f"t0k{n}" in text for n in range(1, 6)), text
    assert line["note"] == f"Bearer {REDACTED}"
    # Printable, no space: nothing to mask, nothing to strip; the value is kept as it came.
    assert audit.record("x", tool="Bearer_not_a_header")["tool"] == "Bearer_not_a_header"


def test_event_redacts_top_level_and_payloads_follow_log_values() -> None:
    audit = AuditLog(None, stream=None)
    arguments = {"query": "weather", "api_key": "sk-live"}
    line = audit.record("tool.invoked", secret="s", arguments=arguments, tool="search")
    assert line["secret"] == REDACTED and line["tool"] == "search"
    encoded = json.dumps(arguments, sort_keys=True).encode()
    assert line["arguments"] == {"sha256": digest(encoded), "bytes": len(encoded)}
    audit.log_values = True
    line = audit.record("tool.invoked", arguments=arguments)
    assert line["arguments"] == {"query": "weather", "api_key": REDACTED}


def test_digest_is_a_sha256_prefix() -> None:
    assert digest(b"token") == hashlib.sha256(b"token").hexdigest()[:16]
    assert digest(b"token") != digest(b"token2")


def test_io_errors_never_raise_and_warn_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mcp_sse.audit")
    stream = io.StringIO()
    audit = AuditLog(tmp_path / "missing-dir" / "audit.log", stream=stream)
    audit.event("one")
    audit.event("two")
    assert [r.getMessage() for r in caplog.records if "cannot open" in r.getMessage()] != []
    assert len(stream.getvalue().splitlines()) == 2  # the stream still has the events

    caplog.clear()
    good = AuditLog(tmp_path / "audit.log", stream=None)
    assert good._fd is not None
    os.close(good._fd)  # the file goes away underneath (disk unmounted, fd closed)
    good.event("a")
    good.event("b")
    assert len([r for r in caplog.records if "cannot write audit log" in r.getMessage()]) == 1
    good._fd = None

    caplog.clear()
    closed = io.StringIO()
    closed.close()
    AuditLog(None, stream=closed).event("c")
    assert len(caplog.records) == 1


def test_close_is_idempotent_and_later_events_go_to_the_stream(tmp_path: Path) -> None:
    stream = io.StringIO()
    audit = AuditLog(tmp_path / "audit.log", stream=stream)
    audit.close()
    audit.close()
    audit.event("after")
    assert (tmp_path / "audit.log").read_text() == ""
    assert json.loads(stream.getvalue())["event"] == "after"
