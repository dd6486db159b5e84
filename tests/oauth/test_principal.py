"""Principal: from a key it decides as the key does; from a token it carries issuer, subject and scopes."""

from __future__ import annotations

import dataclasses
import datetime as dt
from types import MappingProxyType
from typing import Any

import pytest

from mcp_sse.oauth.resource import VerifiedToken
from mcp_sse.principal import Principal, oauth_id
from mcp_sse.security.keys import ApiKey, digest

KEYS = [
    ApiKey(id="k-all", name="all", sha256=digest("a"), role="admin"),
    ApiKey(
        id="k-some",
        name="some",
        sha256=digest("b"),
        role="operator",
        backends=("time", "files"),
        tools_allow=("get_*", "read_*"),
        tools_deny=("*delete*", "get_secret"),
        expires=dt.datetime(2030, 1, 1, tzinfo=dt.UTC),
        rate_limit=50,
    ),
    ApiKey(id="k-none", name="none", sha256=digest("c"), role="viewer", backends=()),
]
BACKENDS = ["time", "files", "other", "*", ""]
TOOLS = ["get_time", "GET_time", "read_file", "get_secret", "get_delete_all", "write_file", "", "get_"]


@pytest.mark.parametrize("key", KEYS, ids=lambda k: k.id)
@pytest.mark.parametrize("source", ["key", "cookie"])
def test_from_key_decides_as_the_key_does(key: ApiKey, source: Any) -> None:
    principal = Principal.from_key(key, source=source)
    assert (principal.id, principal.name, principal.role, principal.source) == (
        key.id,
        key.name,
        key.role,
        source,
    )
    assert (principal.expires, principal.rate_limit) == (key.expires, key.rate_limit)
    assert principal.issuer is None and principal.scopes == frozenset()
    for backend in BACKENDS:
        assert principal.may_use_backend(backend) == key.may_use_backend(backend), backend
    for tool in TOOLS:
        assert principal.may_use_tool(tool) == key.may_use_tool(tool), tool
    for now in (dt.datetime(2029, 12, 31, 23, 59, tzinfo=dt.UTC), dt.datetime(2030, 1, 1, tzinfo=dt.UTC)):
        assert principal.expired(now) == key.expired(now)


def test_the_aggregate_is_for_principals_limited_to_no_backend() -> None:
    limited = Principal(id="p", name="p", role="operator", source="key", backends=("time",))
    assert limited.may_use_backend("time") and not limited.may_use_backend("*")
    assert Principal(id="p", name="p", role="operator", source="key").may_use_backend("*")


def token(**overrides: Any) -> VerifiedToken:
    fields: dict[str, Any] = {
        "issuer": "https://idp.example.com",
        "subject": "user-1",
        "client_id": "claude",
        "scopes": frozenset({"mcp:viewer", "files:read"}),
        "audience": ("https://mcp.example.com/mcp",),
        "expires_at": 1_900_000_000.0,
        "issued_at": 1_899_999_000.0,
        "key_id": "k1",
        "algorithm": "RS256",
        "claims": MappingProxyType({"sub": "user-1", "email": "ada@example.com"}),
    }
    return VerifiedToken(**{**fields, **overrides})


def test_from_token_carries_issuer_subject_scopes_client_and_expiry() -> None:
    principal = Principal.from_token(token(), role="viewer", backends=["time"], tools_deny=["*write*"])
    assert principal.source == "oauth"
    assert (principal.issuer, principal.subject, principal.client_id) == (
        "https://idp.example.com",
        "user-1",
        "claude",
    )
    assert principal.scopes == {"mcp:viewer", "files:read"}
    assert principal.name == "ada@example.com"
    assert principal.expires == dt.datetime.fromtimestamp(1_900_000_000, dt.UTC)
    assert principal.backends == ("time",) and principal.tools_deny == ("*write*",)
    assert principal.may_use_tool("read_file") and not principal.may_use_tool("write_file")
    with pytest.raises(dataclasses.FrozenInstanceError):
        principal.role = "admin"  # type: ignore[misc]


def test_oauth_ids_separate_issuers_and_never_collide_with_key_ids() -> None:
    same_sub_other_issuer = Principal.from_token(token(issuer="https://other.example.com"), role="viewer")
    assert same_sub_other_issuer.id != Principal.from_token(token(), role="viewer").id
    # The separator cannot be forged by moving characters between issuer and subject.
    assert oauth_id("https://a", "b\0c") != oauth_id("https://a\0b", "c")
    assert oauth_id("https://idp", "u").startswith("oauth-")
    assert all(not k.id.startswith("oauth-") for k in KEYS)


def test_a_client_credentials_token_is_named_by_its_client() -> None:
    principal = Principal.from_token(token(subject=None, claims=MappingProxyType({})), role="operator")
    assert principal.subject == "claude" and principal.name == "claude"


def test_display_names_are_printable_and_bounded() -> None:
    claims = MappingProxyType({"name": "Mallory\r\n[admin] \x1b[31m" + "x" * 500})
    name = Principal.from_token(token(claims=claims), role="viewer").name
    assert name.isprintable() and len(name) == 100 and name.startswith("Mallory??[admin] ?[31m")


def test_a_token_naming_nobody_is_refused() -> None:
    with pytest.raises(ValueError, match="neither a subject nor a client"):
        Principal.from_token(token(subject=None, client_id=None), role="viewer")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"role": "root"}, "role must be one of"),
        ({"source": "ticket"}, "source must be one of"),
        ({"source": "oauth"}, "needs its issuer and subject"),
        ({"expires": dt.datetime(2030, 1, 1)}, "timezone-aware"),
    ],
)
def test_invalid_principals_cannot_be_made(kwargs: dict[str, Any], message: str) -> None:
    fields: dict[str, Any] = {"id": "p", "name": "p", "role": "viewer", "source": "key", **kwargs}
    with pytest.raises(ValueError, match=message):
        Principal(**fields)
