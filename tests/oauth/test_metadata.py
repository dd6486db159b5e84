"""RFC 9728 metadata, well-known paths and WWW-Authenticate values, read back by the MCP SDK's parsers."""

from __future__ import annotations

import httpx2
import pytest
from aiohttp import web
from mcp.client.auth.utils import (
    build_protected_resource_metadata_discovery_urls,
    extract_resource_metadata_from_www_auth,
    extract_scope_from_www_auth,
)
from mcp.shared.auth import ProtectedResourceMetadata

from mcp_sse.oauth.metadata import (
    SCOPES,
    canonical_resource,
    metadata_url,
    protected_resource_metadata,
    well_known_path,
    www_authenticate,
)

RESOURCE = "https://mcp.example.com/mcp"
PRM = "https://mcp.example.com/.well-known/oauth-protected-resource/mcp"


def challenge(status: int, value: str) -> httpx2.Response:
    return httpx2.Response(status, headers={"WWW-Authenticate": value})


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("", "/.well-known/oauth-protected-resource"),
        ("/", "/.well-known/oauth-protected-resource"),
        ("/mcp", "/.well-known/oauth-protected-resource/mcp"),
        ("/sse", "/.well-known/oauth-protected-resource/sse"),
        ("/servers/time/mcp", "/.well-known/oauth-protected-resource/servers/time/mcp"),
        ("/servers/time/sse", "/.well-known/oauth-protected-resource/servers/time/sse"),
    ],
)
def test_well_known_path_appends_the_resource_path(path: str, expected: str) -> None:
    assert well_known_path(path) == expected


@pytest.mark.parametrize("path", ["mcp", "/mcp?x=1", "/mcp#frag"])
def test_well_known_path_refuses_what_is_no_resource_path(path: str) -> None:
    with pytest.raises(ValueError, match="resource path"):
        well_known_path(path)


@pytest.mark.parametrize(
    "server_url",
    ["https://mcp.example.com/mcp", "https://mcp.example.com/servers/time/mcp", "https://mcp.example.com"],
)
def test_the_sdk_client_looks_where_the_document_is(server_url: str) -> None:
    """The SDK builds the well-known URLs itself when a 401 names none: ours must be among them, first."""
    assert build_protected_resource_metadata_discovery_urls(None, server_url)[0] == metadata_url(server_url)


@pytest.mark.parametrize(
    ("url", "canonical"),
    [
        ("https://MCP.Example.COM/mcp", "https://mcp.example.com/mcp"),
        ("HTTPS://mcp.example.com:8443/Servers/Time/mcp", "https://mcp.example.com:8443/Servers/Time/mcp"),
        ("https://mcp.example.com/", "https://mcp.example.com"),
        ("https://mcp.example.com", "https://mcp.example.com"),
        ("https://mcp.example.com/mcp/", "https://mcp.example.com/mcp/"),  # a path's slash is significant
        ("http://[::1]:8080/mcp", "http://[::1]:8080/mcp"),
        ("http://[FE80::1]/mcp", "http://[fe80::1]/mcp"),
    ],
)
def test_canonical_resource_folds_only_scheme_and_host(url: str, canonical: str) -> None:
    assert canonical_resource(url) == canonical


@pytest.mark.parametrize(
    "url",
    [
        "mcp.example.com/mcp",
        "ftp://mcp.example.com/mcp",
        "https:///mcp",
        "https://mcp.example.com/mcp#fragment",
        "https://mcp.example.com/mcp?tenant=1",
        "https://mcp.example.com/mcp?",
        "https://user:pw@mcp.example.com/mcp",
        'https://mcp.example.com/m"cp',
        "https://mcp.example.com/mcp\r\nX-Injected: 1",
        "https://mcp.example.com/m cp",
        "https://mcp.example.com:99999/mcp",
    ],
)
def test_canonical_resource_refuses_what_cannot_name_a_resource(url: str) -> None:
    with pytest.raises(ValueError, match="resource URL"):
        canonical_resource(url)


def test_metadata_url_of_root_and_path_resources() -> None:
    assert metadata_url("https://Host.example") == "https://host.example/.well-known/oauth-protected-resource"
    assert metadata_url(RESOURCE) == PRM
    assert (
        metadata_url("http://127.0.0.1:8000/servers/time/mcp")
        == "http://127.0.0.1:8000/.well-known/oauth-protected-resource/servers/time/mcp"
    )


def test_document_has_the_fields_the_pages_ask_for_and_the_sdk_reads_it() -> None:
    document = protected_resource_metadata(
        "https://MCP.example.com/mcp", ["https://idp.example.com/realms/x"], resource_name="mcp-sse"
    )
    assert document == {
        "resource": RESOURCE,
        "authorization_servers": ["https://idp.example.com/realms/x"],
        "scopes_supported": ["mcp:admin", "mcp:operator", "mcp:viewer"],
        "bearer_methods_supported": ["header"],
        "resource_name": "mcp-sse",
    }
    assert "offline_access" not in SCOPES  # the 2026-07-28 page: a resource SHOULD NOT list it
    parsed = ProtectedResourceMetadata.model_validate(document)
    assert str(parsed.resource) == RESOURCE
    assert [str(a) for a in parsed.authorization_servers] == ["https://idp.example.com/realms/x"]


@pytest.mark.parametrize(
    "servers",
    [[], ["idp.example.com"], ["https://idp.example.com/?tenant=1"], ["https://idp.example.com/#x"]],
)
def test_document_refuses_missing_or_malformed_authorization_servers(servers: list[str]) -> None:
    with pytest.raises(ValueError, match=r"authorization.server"):
        protected_resource_metadata(RESOURCE, servers)


def test_document_refuses_a_scope_that_is_no_scope_token() -> None:
    with pytest.raises(ValueError, match="scope-token"):
        protected_resource_metadata(RESOURCE, ["https://idp.example.com"], scopes_supported=["mcp admin"])


def test_401_without_a_token_names_the_document_and_the_scope() -> None:
    value = www_authenticate(PRM, scope=["mcp:operator"])
    assert value == f'Bearer scope="mcp:operator", resource_metadata="{PRM}"'
    response = challenge(401, value)
    assert extract_resource_metadata_from_www_auth(response) == PRM
    assert extract_scope_from_www_auth(response) == "mcp:operator"


def test_401_for_a_bad_token_says_invalid_token() -> None:
    value = www_authenticate(PRM, error="invalid_token", error_description="the token has expired")
    assert value == (
        f'Bearer error="invalid_token", resource_metadata="{PRM}", error_description="the token has expired"'
    )


def test_403_says_insufficient_scope_with_every_scope_needed_once() -> None:
    value = www_authenticate(
        PRM, scope=["mcp:viewer", "mcp:operator", "mcp:viewer"], error="insufficient_scope"
    )
    assert (
        value
        == f'Bearer error="insufficient_scope", scope="mcp:viewer mcp:operator", resource_metadata="{PRM}"'
    )
    assert extract_scope_from_www_auth(challenge(403, value)) == "mcp:viewer mcp:operator"


def test_a_hostile_description_cannot_break_out_of_the_header() -> None:
    hostile = (
        'tool "x"\r\nSet-Cookie: a=b\\", resource_metadata="https://evil.example/", '
        'scope="mcp:admin\x00\u2028é'
    )
    value = www_authenticate(PRM, scope=["mcp:viewer"], error="insufficient_scope", error_description=hostile)
    # Only the characters RFC 6750 allows in error_description remain; the rest became '?'.
    description = value.split('error_description="', 1)[1]
    assert description.endswith('"') and '"' not in description[:-1]
    assert not any(c in value for c in "\r\n\\\x00\u2028é")
    assert all(0x20 <= ord(c) <= 0x7E for c in value)
    # The real parameters come first, so even a first-match parser (the SDK's) reads ours, not the attacker's.
    response = challenge(403, value)
    assert extract_resource_metadata_from_www_auth(response) == PRM
    assert extract_scope_from_www_auth(response) == "mcp:viewer"
    # And aiohttp, which refuses CR/LF in header values, takes it.
    assert web.Response(status=403, headers={"WWW-Authenticate": value}).headers["WWW-Authenticate"] == value


def test_a_long_description_is_cut() -> None:
    value = www_authenticate(PRM, error="invalid_token", error_description="x" * 5000)
    assert len(value) < 400


@pytest.mark.parametrize(
    "kwargs",
    [
        {"resource_metadata": f'{PRM}", error="x'},
        {"resource_metadata": PRM + "\r\nX: y"},
        {"resource_metadata": "/relative"},
        {"resource_metadata": PRM, "scope": ['mcp:admin" x="y']},
        {"resource_metadata": PRM, "scope": ["mcp:admin\r\n"]},
        {"resource_metadata": PRM, "scope": ["two words"]},
        {"resource_metadata": PRM, "scope": [""]},
        {"resource_metadata": PRM, "error": 'invalid_token", x="y'},
    ],
)
def test_configuration_that_cannot_be_quoted_safely_is_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        www_authenticate(**kwargs)  # type: ignore[arg-type]
