"""Remote entries of the servers file: the shapes Claude Code, VS Code and Cursor write, and
every refusal naming the key and the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mcp_sse.upstream.config import OAuth2Spec, load_servers
from tests.upstream.test_config import error_of, servers, write


def test_claude_code_remote_entries_accepted(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not parsed at load")
    document = servers(
        docs={
            "type": "http",
            "url": "https://mcp.example.com/mcp",
            "headers": {"Authorization": "Bearer ${T}"},
        },
        legacy={"type": "sse", "url": "https://old.example.com/sse", "timeout": 5},
        live={"url": "wss://ws.example.com/message"},
        plain={"url": "http://127.0.0.1:9/mcp", "tls": {"verify": False, "ca_file": str(ca)}},
        crm={
            "url": "https://crm.example.com/mcp",
            "auth": {
                "type": "oauth2",
                "clientId": "id",
                "clientSecret": "${S}",
                "tokenUrl": "https://a.example/t",
                "scopes": ["r"],
            },
        },
    )
    docs, legacy, live, plain, crm = load_servers(
        write(tmp_path, document), {"T": "t0k3n-value", "S": "s3cr3t-value"}
    )
    assert (docs.kind, docs.transport, dict(docs.headers)) == (
        "remote",
        "http",
        {"Authorization": "Bearer t0k3n-value"},
    )
    assert (legacy.transport, legacy.timeout) == ("sse", 5.0)
    assert live.transport == "ws"  # from the scheme
    assert plain.transport is None and plain.tls.verify is False and plain.tls.ca_file == str(ca)
    assert crm.auth == OAuth2Spec(
        client_id="id", client_secret="s3cr3t-value", token_url="https://a.example/t", scopes=("r",)
    )
    assert "s3cr3t" not in repr(crm) and "t0k3n" not in repr(docs), "secrets are never in a spec's repr"


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"url": "ftp://x/mcp"}, "is not an http(s):// or ws(s):// URL"),
        ({"url": "https://user:pw@x/mcp"}, 'put credentials in "headers" or "auth"'),
        ({"url": "https://x/mcp", "type": "stdio"}, '.type must be one of "http", "sse" or "ws"'),
        ({"url": "https://x/mcp", "type": "ws"}, '"type": "ws" needs a ws:// or wss:// URL'),
        ({"url": "wss://x/m", "type": "http"}, 'a ws(s):// URL needs "type": "ws"'),
        ({"url": "https://x/mcp", "command": "y"}, "give exactly one of"),
        ({"url": "https://x/mcp", "env": {}}, "unknown key 'env'"),
        ({"url": "https://x/mcp", "headers": {"Mcp-Session-Id": "s"}}, "is set by the gateway itself"),
        ({"url": "https://x/mcp", "headers": {"Host": "evil"}}, "is set by the gateway itself"),
        ({"url": "https://x/mcp", "headers": {"A": 1}}, ".headers.A must be a string"),
        (
            {"url": "https://x/mcp", "headers_from_request": {"X-T": "X-U"}},
            'needs "isolation": "per-session"',
        ),
        (
            {
                "url": "https://x/mcp",
                "isolation": "per-session",
                "headers_from_request": {"Authorization": "X"},
            },
            "is not a header that may be passed on",
        ),
        (
            {
                "url": "https://x/mcp",
                "isolation": "per-session",
                "headers_from_request": {"X-T": "Mcp-Session-Id"},
            },
            "is not a header to set",
        ),
        ({"url": "https://x/mcp", "tls": {"verify": "no"}}, "tls.verify must be true or false"),
        ({"url": "https://x/mcp", "protocol": "2099-01-01"}, ".protocol must be one of 2024-11-05"),
        ({"url": "https://x/sse", "type": "sse", "protocol": "2026-07-28"}, 'over "type": "http" only'),
        ({"url": "https://x/mcp", "tls": {"ca": "x"}}, ".tls is an object of"),
        ({"url": "https://x/mcp", "tls": {"ca_file": "/nonexistent/ca.pem"}}, "is not a readable file"),
        ({"url": "https://x/mcp", "auth": {"type": "basic"}}, '.auth must be {"type": "oauth2"'),
        (
            {"url": "https://x/mcp", "auth": {"type": "oauth2", "clientId": "a", "tokenUrl": "https://t"}},
            "auth.clientSecret is required",
        ),
        (
            {
                "url": "https://x/mcp",
                "auth": {"type": "oauth2", "clientId": "a", "clientSecret": "b", "tokenUrl": "wss://t"},
            },
            "tokenUrl must be an http(s):// URL",
        ),
        (
            {
                "url": "https://x/mcp",
                "headers": {"authorization": "Bearer x"},
                "auth": {"type": "oauth2", "clientId": "a", "clientSecret": "b", "tokenUrl": "https://t"},
            },
            "not both",
        ),
        (
            {"url": "https://x/mcp", "circuit_breaker": {"failureThreshold": 0}},
            "failureThreshold must be a positive integer",
        ),
    ],
)
def test_bad_remote_entries_are_refused_naming_the_key(
    tmp_path: Path, entry: dict[str, Any], expected: str
) -> None:
    message = error_of(write(tmp_path, servers(r=entry)))
    assert "mcpServers.r" in message and expected in message, message


def test_url_and_headers_expand_variables_and_a_missing_one_is_named(tmp_path: Path) -> None:
    entry = {"url": "https://${HOST}/mcp", "headers": {"X-Key": "${KEY}"}}
    (spec,) = load_servers(write(tmp_path, servers(r=entry)), {"HOST": "h.example", "KEY": "k"})
    assert spec.url == "https://h.example/mcp" and dict(spec.headers) == {"X-Key": "k"}
    assert "${KEY} is not set" in error_of(write(tmp_path, servers(r=entry)), {"HOST": "h"})
