"""OAuth clients: client ID metadata documents (the guarded fetch), redirect URI patterns, and
registered clients that expire or are evicted at the cap.

No test sends a packet anywhere but loopback. The address checks are tested on their own (a
function of an address, and the socket factory, which only makes a socket), and the fetch
itself against metadata servers the tests start on 127.0.0.1; a name that "resolves" to a
refused address comes from a resolver the test supplies, and the loopback server it points at
counts that no connection arrived.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestServer

from mcp_sse.oauth.clients import (
    DEFAULT_REDIRECT_URIS,
    ClientError,
    MetadataFetcher,
    RedirectPolicy,
    _guarded_socket,
    is_public_address,
)

from .as_helpers import (
    AS,
    LOOPBACK_CALLBACK,
    Browser,
    FakeClock,
    authorization_params,
    pkce,
    register,
    start_as,
    token,
)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.8.9.10",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata service
        "100.64.0.1",  # carrier-grade NAT
        "0.0.0.0",
        "255.255.255.255",
        "224.0.0.1",  # multicast (Python calls it global)
        "192.0.0.8",  # IETF protocol assignments (Python 3.11 calls it global)
        "198.18.0.1",
        "240.0.0.1",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "ff02::1",
        "::ffff:127.0.0.1",  # IPv4-mapped
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "::127.0.0.1",  # IPv4-compatible
        "2002:7f00:1::",  # 6to4 around 127.0.0.1
        "2002:a00:1::",  # 6to4 around 10.0.0.1
        "64:ff9b::a00:1",  # NAT64 around 10.0.0.1
        "64:ff9b::7f00:1",
        "2001::1",  # Teredo
        "2001:db8::1",  # documentation
        "not an address",
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert not is_public_address(address)


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]
)
def test_public_addresses_are_allowed(address: str) -> None:
    assert is_public_address(address)


@pytest.mark.parametrize(
    ("family", "address"),
    [
        (socket.AF_INET, "127.0.0.1"),
        (socket.AF_INET, "10.0.0.1"),
        (socket.AF_INET, "169.254.169.254"),
        (socket.AF_INET6, "::1"),
        (socket.AF_INET6, "::ffff:127.0.0.1"),
    ],
)
def test_the_socket_factory_refuses_to_make_a_socket_for_a_refused_address(family: int, address: str) -> None:
    # The factory is what aiohttp calls with each resolved address right before connecting to it;
    # it only makes a socket, so this connects nowhere even when it fails.
    factory = _guarded_socket(allow_loopback=False)
    sockaddr: tuple[Any, ...] = (address, 443) if family == socket.AF_INET else (address, 443, 0, 0)
    with pytest.raises(OSError, match="non-public"):
        factory((family, socket.SOCK_STREAM, 6, "", sockaddr))
    made = factory((socket.AF_INET, socket.SOCK_STREAM, 6, "", ("8.8.8.8", 443)))
    made.close()


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("https://127.0.0.1/client.json", "non-public address"),
        ("https://10.0.0.1/client.json", "non-public address"),
        ("https://169.254.169.254/latest/meta-data", "non-public address"),
        ("https://[::1]/client.json", "non-public address"),
        ("https://[::ffff:127.0.0.1]/client.json", "non-public address"),
        ("https://localhost/client.json", "this machine"),
        ("https://app.localhost/client.json", "this machine"),
        ("http://example.com/client.json", "https"),
        ("https://example.com", "path"),
        ("https://example.com/", "path"),
        ("https://example.com/a/../client.json", "path"),
        ("https://user:pw@example.com/client.json", "user info"),
        ("https://example.com/client.json#x", "fragment"),
        ("https://example.com:99999/client.json", "not a valid URL"),
        ("https://example.com/client .json", "spaces"),
    ],
)
async def test_metadata_urls_are_refused_before_any_connection(url: str, problem: str) -> None:
    fetcher = MetadataFetcher(RedirectPolicy(), allow_loopback=False)
    try:
        with pytest.raises(ClientError, match=problem):
            await fetcher.get(url)
        assert fetcher._session is None  # no client session was even made
    finally:
        await fetcher.close()


# -- a metadata server of our own, on loopback --------------------------------------------------------


class DocumentServer:
    """Serves client metadata documents on 127.0.0.1 and counts every request."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.documents: dict[str, Any] = {}
        self.raw: dict[str, bytes] = {}
        self.headers: dict[str, dict[str, str]] = {}
        self.hang = asyncio.Event()
        app = web.Application()
        app.router.add_get("/{name}", self.serve)
        self.http = TestServer(app, host="127.0.0.1")

    @property
    def url(self) -> str:
        return str(self.http.make_url("")).rstrip("/")

    def document(self, name: str, **fields: Any) -> str:
        url = f"{self.url}/{name}"
        self.documents[name] = {
            "client_id": url,
            "client_name": "Doc Client",
            "redirect_uris": [LOOPBACK_CALLBACK],
            "token_endpoint_auth_method": "none",
            **fields,
        }
        return url

    async def serve(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.hits[name] = self.hits.get(name, 0) + 1
        if name == "hang":
            await self.hang.wait()  # never set: the fetch must give up on its own
        if name == "redirect":
            raise web.HTTPFound(location=f"{self.url}/target")
        if name in self.raw:
            return web.Response(body=self.raw[name], content_type="application/json")
        if name not in self.documents:
            raise web.HTTPNotFound()
        return web.json_response(self.documents[name], headers=self.headers.get(name, {}))


@pytest.fixture
async def docs() -> AsyncIterator[DocumentServer]:
    server = DocumentServer()
    await server.http.start_server()
    yield server
    server.hang.set()
    await server.http.close()


async def test_metadata_document_from_a_loopback_server_when_allowed(
    docs: DocumentServer, tmp_path: Path
) -> None:
    url = docs.document(
        "client.json", client_name="Docs App", redirect_uris=[LOOPBACK_CALLBACK, "https://evil.example/cb"]
    )
    as_ = await start_as(tmp_path, allow_loopback_metadata=True)
    browser = Browser(as_.url)
    try:
        verifier, challenge = pkce()
        params = authorization_params(as_, url, challenge)
        page = await browser.authorize(params)
        assert page.status == 200 and "Docs App" in await page.text()
        answer = await browser.approve(params, as_.keys.admin)
        status, body, _ = await token(
            as_.url,
            {
                "grant_type": "authorization_code",
                "code": answer["code"],
                "code_verifier": verifier,
                "client_id": url,
                "redirect_uri": LOOPBACK_CALLBACK,
                "resource": as_.resource,
            },
        )
        assert status == 200, body
        own = await as_.server.verify_own_token(body["access_token"], as_.resource)
        assert getattr(own, "client_id", None) == url
        status, refreshed, _ = await token(
            as_.url, {"grant_type": "refresh_token", "refresh_token": body["refresh_token"], "client_id": url}
        )
        assert status == 200, refreshed
        # Cached: four page views and two token requests, one fetch.
        assert docs.hits == {"client.json": 1}
        # Only the allowed redirect URI counts: the document's other one gets the error page.
        response = await browser.authorize(
            authorization_params(as_, url, challenge, redirect_uri="https://evil.example/cb")
        )
        assert response.status == 400 and "Location" not in response.headers
        consent = await browser.authorize(params)
        assert "Identified by its metadata document at 127.0.0.1" in await consent.text()
    finally:
        await browser.close()
        await as_.http.close()


async def test_a_loopback_metadata_url_is_refused_when_loopback_is_not_allowed(
    docs: DocumentServer, as_: AS
) -> None:
    url = docs.document("client.json")
    browser = Browser(as_.url)
    try:
        _, challenge = pkce()
        response = await browser.authorize(authorization_params(as_, url, challenge))
        assert response.status == 400 and "Location" not in response.headers
        assert "https" in await response.text() or "non-public" in await response.text()
        https_url = url.replace("http://", "https://")
        response = await browser.authorize(authorization_params(as_, https_url, challenge))
        assert response.status == 400 and "non-public address" in await response.text()
        assert docs.hits == {}
    finally:
        await browser.close()


@pytest.fixture
async def as_(tmp_path: Path) -> AsyncIterator[AS]:
    running = await start_as(tmp_path)
    yield running
    await running.http.close()


class RebindingResolver(AbstractResolver):
    """DNS that says whatever the test wants: a public-looking name that resolves to loopback."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append(host)
        return [
            {
                "hostname": host,
                "host": self.address,
                "port": port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": 0,
            }
        ]

    async def close(self) -> None:
        pass


async def test_a_name_that_resolves_to_loopback_is_not_connected_to() -> None:
    # https://metadata.example:<port>/... passes every check on the URL; its address is refused
    # when the connection is made, so the listener behind it never sees a connection at all.
    connections: list[object] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer.get_extra_info("peername"))
        writer.close()

    listener = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    resolver = RebindingResolver("127.0.0.1")
    fetcher = MetadataFetcher(RedirectPolicy(), allow_loopback=False, resolver=resolver, timeout=5)
    try:
        with pytest.raises(ClientError, match="could not be fetched"):
            await fetcher.get(f"https://metadata.example:{port}/client.json")
        assert resolver.asked == ["metadata.example"]
        assert connections == []
        # The same fetcher, allowed loopback, does connect: the listener is reachable, so the
        # refusal above was the address check, not a dead port.
        allowed = MetadataFetcher(RedirectPolicy(), allow_loopback=True, resolver=resolver, timeout=5)
        try:
            with pytest.raises(ClientError):
                await allowed.get(f"https://metadata.example:{port}/client.json")
        finally:
            await allowed.close()
        assert len(connections) == 1
    finally:
        await fetcher.close()
        listener.close()
        await listener.wait_closed()


async def fetcher_for(docs: DocumentServer, clock: FakeClock | None = None, **kwargs: Any) -> MetadataFetcher:
    return MetadataFetcher(RedirectPolicy(), allow_loopback=True, clock=clock or FakeClock(), **kwargs)


FetcherTest = Callable[[MetadataFetcher], Awaitable[None]]


@pytest.mark.parametrize(
    ("setup", "problem"),
    [
        (lambda d: d.document("c.json", client_id="https://other.example/c.json"), "not its own URL"),
        (lambda d: d.document("c.json", client_secret="s"), "client secret"),
        (lambda d: d.document("c.json", token_endpoint_auth_method="private_key_jwt"), "public clients"),
        (lambda d: d.document("c.json", token_endpoint_auth_method="client_secret_basic"), "public clients"),
        (
            lambda d: d.document("c.json", redirect_uris=["https://evil.example/cb"]),
            "none of the client's redirect URIs",
        ),
        (lambda d: d.document("c.json", redirect_uris=[]), "no redirect_uris"),
        (lambda d: d.document("c.json", client_name=""), "no client_name"),
        (lambda d: d.document("c.json", client_name="\u202e\u200b"), "no client_name"),
        (lambda d: d.document("c.json", grant_types=["implicit"]), "grant_types"),
        (lambda d: d.document("c.json", response_types=["token"]), "response_types"),
    ],
)
async def test_bad_metadata_documents_are_refused(
    docs: DocumentServer, setup: Callable[[DocumentServer], str], problem: str
) -> None:
    url = setup(docs)
    fetcher = await fetcher_for(docs)
    try:
        with pytest.raises(ClientError, match=problem):
            await fetcher.get(url)
    finally:
        await fetcher.close()


async def test_redirects_large_and_slow_documents_are_refused(docs: DocumentServer) -> None:
    docs.raw["big.json"] = b'{"client_id": "' + b"x" * 6000 + b'"}'
    docs.raw["list.json"] = b"[1, 2]"
    docs.raw["text.json"] = b"not json"
    docs.raw["deep.json"] = b"[" * 4000
    fetcher = await fetcher_for(docs, timeout=0.5)
    try:
        with pytest.raises(ClientError, match="HTTP 302"):
            await fetcher.get(f"{docs.url}/redirect")
        assert "target" not in docs.hits  # the redirect was not followed
        with pytest.raises(ClientError, match="too large"):
            await fetcher.get(f"{docs.url}/big.json")
        with pytest.raises(ClientError, match="not a JSON object"):
            await fetcher.get(f"{docs.url}/list.json")
        with pytest.raises(ClientError, match="not JSON"):
            await fetcher.get(f"{docs.url}/text.json")
        with pytest.raises(ClientError, match="not JSON"):
            await fetcher.get(f"{docs.url}/deep.json")
        with pytest.raises(ClientError, match="HTTP 404"):
            await fetcher.get(f"{docs.url}/missing.json")
        with pytest.raises(ClientError, match="could not be fetched"):
            await fetcher.get(f"{docs.url}/hang")  # bounded by the fetch timeout
    finally:
        await fetcher.close()


async def test_documents_are_cached_for_their_max_age_and_failures_briefly(docs: DocumentServer) -> None:
    clock = FakeClock()
    url = docs.document("c.json")
    docs.headers["c.json"] = {"Cache-Control": "max-age=300"}
    fetcher = await fetcher_for(docs, clock)
    try:
        first = await fetcher.get(url)
        assert (await fetcher.get(url)) == first and docs.hits["c.json"] == 1
        clock.advance(301)
        await fetcher.get(url)
        assert docs.hits["c.json"] == 2

        missing = f"{docs.url}/later.json"
        with pytest.raises(ClientError):
            await fetcher.get(missing)
        docs.document("later.json")
        with pytest.raises(ClientError):
            await fetcher.get(missing)  # the failure is remembered for a minute: no second fetch
        assert docs.hits["later.json"] == 1
        clock.advance(61)
        assert (await fetcher.get(missing)).client_name == "Doc Client"
    finally:
        await fetcher.close()


# -- redirect URI patterns ----------------------------------------------------------------------------


def test_default_redirect_policy() -> None:
    policy = RedirectPolicy(DEFAULT_REDIRECT_URIS)
    for uri in (
        "https://claude.ai/api/mcp/auth_callback",
        "https://claude.com/api/mcp/auth_callback",
        "https://chatgpt.com/connector_platform_oauth_redirect",
        "http://127.0.0.1:33418/callback",
        "http://127.0.0.1/callback",
        "http://localhost:6274/oauth/callback?x=1",
        "http://[::1]:5000/cb",
    ):
        assert policy.allows(uri), uri
    for uri in (
        "https://claude.ai/api/mcp/auth_callback/",
        "https://claude.ai/api/mcp/auth_callback?x=1",
        "https://claude.ai.evil.example/api/mcp/auth_callback",
        "https://evil.example/cb",
        "http://127.0.0.2:80/cb",
        "https://127.0.0.1:33418/callback",  # the pattern is http
        "http://127.0.0.1:33418/callback#frag",
        "http://user@127.0.0.1:33418/callback",
        "http://localhost.evil.example:80/cb",
    ):
        assert not policy.allows(uri), uri


@pytest.mark.parametrize(
    "pattern",
    [
        "https://*.example.com/cb",
        "https://example.com/*",
        "http://10.0.0.1:*/*",
        "*",
        "http://example.com/cb",
    ],
)
def test_redirect_patterns_that_cannot_be_meant_are_refused(pattern: str) -> None:
    with pytest.raises(ValueError, match="OAUTH_REDIRECT_URIS"):
        RedirectPolicy([pattern])


async def test_an_operator_may_narrow_the_redirect_uris(tmp_path: Path) -> None:
    as_ = await start_as(tmp_path, redirect_uri_patterns=["https://claude.ai/api/mcp/auth_callback"])
    try:
        status, body = await register(as_.url, redirect_uris=[LOOPBACK_CALLBACK])
        assert (status, body["error"]) == (400, "invalid_redirect_uri")
        status, _ = await register(as_.url, redirect_uris=["https://claude.ai/api/mcp/auth_callback"])
        assert status == 201
    finally:
        await as_.http.close()


# -- registered clients expire and are capped -----------------------------------------------------------


async def test_unused_clients_expire_and_used_ones_stay(as_: AS) -> None:
    status, unused = await register(as_.url)
    status, used = await register(as_.url)
    browser = Browser(as_.url)
    try:
        verifier, challenge = pkce()
        answer = await browser.approve(
            authorization_params(as_, used["client_id"], challenge), as_.keys.admin
        )
        form = {
            "grant_type": "authorization_code",
            "code": answer["code"],
            "code_verifier": verifier,
            "client_id": used["client_id"],
        }
        status, body, _ = await token(as_.url, form)
        assert status == 200
        as_.clock.advance(86400 + 1)
        await as_.server.prune()
        assert await as_.server.store.get_client(unused["client_id"]) is None
        assert await as_.server.store.get_client(used["client_id"]) is not None  # its grant is live
        response = await browser.authorize(authorization_params(as_, unused["client_id"], challenge))
        assert response.status == 400 and "not registered" in await response.text()
        status, error, _ = await token(as_.url, {**form, "client_id": unused["client_id"]})
        assert (status, error["error"]) == (401, "invalid_client")  # Claude registers again on this
        # Once the grant is gone (revoked), the client is unused and goes too.
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                as_.url + "/oauth/revoke",
                data={"token": body["refresh_token"], "client_id": used["client_id"]},
            ) as response,
        ):
            assert response.status == 200
        as_.clock.advance(1)
        await as_.server.prune()
        assert await as_.server.store.get_client(used["client_id"]) is None
    finally:
        await browser.close()


async def test_the_client_table_has_a_hard_cap(tmp_path: Path) -> None:
    as_ = await start_as(tmp_path, max_clients=3)
    browser = Browser(as_.url)
    try:
        ids = []
        for _ in range(3):
            _, body = await register(as_.url)
            ids.append(body["client_id"])
            as_.clock.advance(1)
        status, body = await register(as_.url)
        assert status == 201
        assert await as_.server.store.get_client(ids[0]) is None  # the least recently used went
        assert await as_.server.store.count_clients() == 3
        # Clients with live grants are never evicted: when all have one, registration waits.
        for client_id in [*ids[1:], body["client_id"]]:
            verifier, challenge = pkce()
            answer = await browser.approve(authorization_params(as_, client_id, challenge), as_.keys.admin)
            status, _, _ = await token(
                as_.url,
                {
                    "grant_type": "authorization_code",
                    "code": answer["code"],
                    "code_verifier": verifier,
                    "client_id": client_id,
                },
            )
            assert status == 200
        status, body = await register(as_.url)
        assert (status, body["error"]) == (503, "temporarily_unavailable")
    finally:
        await browser.close()
        await as_.http.close()
