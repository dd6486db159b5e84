"""A remote MCP server as a backend: the gateway is its MCP client.

Three transports, chosen by the entry's "type" (a URL without one tries Streamable HTTP, then
the 2024-11-05 SSE transport, as the SDKs do):

- http: each message is one POST, answered with JSON or with an SSE stream of that request's
  messages; the server's own messages come on a GET stream. `Mcp-Session-Id` is kept; a 404 for
  it means the server forgot the session: it is initialized again and the request sent again. A
  stream that ends before its answer is resumed with `Last-Event-ID` when it carried event ids.
- sse: one GET stream that names the URL to POST to; every answer comes on that stream.
- ws: one WebSocket, one JSON-RPC message per text frame.

A server that answers `server/discover` at 2026-07-28 is spoken to statelessly: every request
carries its version in `_meta` and the routing headers (MCP-Protocol-Version, Mcp-Method,
Mcp-Name, Mcp-Param-*). Any other gets an initialize handshake and a session.

Ids are rewritten by the same Multiplexer as a child's, so answers, progress, cancellation and
the server's requests to clients are routed exactly as for children. A lost connection fails
every request in flight at once and is reconnected with exponential backoff and jitter.

SECURITY: only the configured URL is requested (and an SSE endpoint on the same origin);
redirects are never followed; every message is bounded by MAX_MESSAGE_BYTES; the caller's own
credentials never go upstream (MCP forbids token passthrough), only the operator's headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import ssl
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urljoin, urlsplit

import aiohttp

from .. import __version__
from ..ops.tracing import trace_headers
from ..protocol.jsonrpc import Message, dumps
from ..protocol.param_headers import encode_header_value, param_headers
from ..protocol.versions import HANDSHAKE_VERSIONS, LATEST_HANDSHAKE, MODERN_VERSIONS
from .backend import BACKOFF_BASE, BACKOFF_MAX, CRASH_LOOP_COUNT, INIT_TIMEOUT, MultiplexedBackend
from .child import accept
from .config import ServerSpec
from .multiplex import Multiplexer

if TYPE_CHECKING:
    from .credentials import ClientCredentials

__all__ = ["RemoteBackend"]

log = logging.getLogger("mcp_sse.upstream")

CONNECT_TIMEOUT: Final = 10.0
STREAM_RETRY: Final = 1.0
"""Wait before opening a dropped GET stream again (the server may say otherwise with `retry:`)."""
MODERN: Final = MODERN_VERSIONS[-1]
_NAMED: Final = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
_JSON: Final = "application/json"
_EVENTS: Final = "text/event-stream"


class RemoteError(Exception):
    """Why a connection to the remote could not be made or was lost; safe to show a client."""


class NotThisTransport(RemoteError):
    """The URL answers, but not as a Streamable HTTP endpoint (404 or 405 to a POST)."""


def _ssl_context(spec: ServerSpec) -> ssl.SSLContext | bool:
    tls = spec.tls
    if not tls.verify:
        return False  # the operator said so; logged at start
    if tls.ca_file is None and tls.cert is None:
        return True
    context = ssl.create_default_context(cafile=tls.ca_file)
    if tls.cert is not None:
        context.load_cert_chain(tls.cert, tls.key)
    return context


def _connection_problem(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"TLS certificate not trusted ({exc.certificate_error})"
    if isinstance(exc, aiohttp.ClientSSLError):
        return "TLS handshake failed"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect ({exc.os_error.strerror or exc.os_error})"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the response ended early"
    return str(exc) or type(exc).__name__


async def _read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes:
    body = await response.content.read(limit + 1)
    if len(body) > limit:
        raise RemoteError(f"an answer over {limit} bytes (MAX_MESSAGE_BYTES)")
    return body


async def _sse_events(
    response: aiohttp.ClientResponse, limit: int
) -> AsyncIterator[tuple[str, str, str | None]]:
    """(event, data, id) of each event of an SSE body, each bounded by `limit` bytes. Not a line
    reader: aiohttp's stops at 128 KiB lines, far below MCP's messages."""
    buffer = bytearray()
    event, event_id = "", None
    data: list[str] = []
    async for chunk in response.content.iter_any():
        buffer += chunk
        while (end := buffer.find(b"\n")) >= 0:
            line = bytes(buffer[:end]).rstrip(b"\r").decode("utf-8", "replace")
            del buffer[: end + 1]
            if not line:
                if data:
                    yield event or "message", "\n".join(data), event_id
                event, data = "", []
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "data":
                data.append(value)
                if sum(len(d) for d in data) > limit:
                    raise RemoteError(f"an event over {limit} bytes (MAX_MESSAGE_BYTES)")
            elif field == "event":
                event = value
            elif field == "id" and "\0" not in value:
                event_id = value
        if len(buffer) > limit:
            raise RemoteError(f"an event over {limit} bytes (MAX_MESSAGE_BYTES)")


class _Link(ABC):
    """One connection to the remote. `lost` is done, with why, once it can carry nothing more."""

    def __init__(self, remote: RemoteBackend) -> None:
        self.remote = remote
        self.lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def lose(self, why: str) -> None:
        if not self.lost.done():
            self.lost.set_result(why)

    @abstractmethod
    async def open(self) -> None:
        """Connect; RemoteError when that fails."""

    @abstractmethod
    def send(self, message: Message) -> None:
        """Send one message; delivery problems reach the Multiplexer, never the caller."""

    async def close(self) -> None:
        self.lose("closed")
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


class _StreamableLink(_Link):
    def __init__(self, remote: RemoteBackend) -> None:
        super().__init__(remote)
        self.session_id: str | None = None
        self.version: str | None = None  # sent as MCP-Protocol-Version once negotiated
        self.modern = False
        self._reinit: asyncio.Task[None] | None = None
        self._calls: dict[Any, asyncio.Task[None]] = {}  # upstream id -> its POST

    async def open(self) -> None:
        pinned = self.remote.spec.protocol
        if pinned in HANDSHAKE_VERSIONS:
            return  # the operator chose a session (say, a proxy that starts a child per request)
        if await self._discover():
            self.modern = True
            self.version = MODERN
        elif pinned is not None:
            raise RemoteError(f"the server does not answer server/discover at {pinned}")

    async def _discover(self) -> bool:
        """Whether the server speaks 2026-07-28: a server/discover it answers with that version."""
        message = {"jsonrpc": "2.0", "id": 0, "method": "server/discover", "params": {}}
        reply = await self.remote.http_call(self._modern(message), self._headers(message, modern=True))
        result = reply.get("result") if reply else None
        if isinstance(result, dict) and MODERN in (result.get("supportedVersions") or ()):
            self.remote.learn(result)
            return True
        return False

    def _modern(self, message: Message) -> Message:
        if "method" not in message or "id" not in message:
            return message
        params = dict(message.get("params") or {})
        params["_meta"] = {
            **(params.get("_meta") or {}),
            "io.modelcontextprotocol/protocolVersion": MODERN,
            # SECURITY/limits: the gateway declares no client capability, so a stateless remote
            # never asks for input (sampling, elicitation, roots) that could not reach the client.
            "io.modelcontextprotocol/clientCapabilities": {},
            "io.modelcontextprotocol/clientInfo": {"name": "mcp-sse", "version": __version__},
        }
        return {**message, "params": params}

    def _headers(self, message: Message, *, modern: bool = False) -> dict[str, str]:
        headers = {"Accept": f"{_JSON}, {_EVENTS}", "Content-Type": _JSON}
        if modern or self.modern:
            headers["MCP-Protocol-Version"] = MODERN
            if method := message.get("method"):
                headers["Mcp-Method"] = str(method)
                params = message.get("params") or {}
                if (key := _NAMED.get(str(method))) and isinstance(params.get(key), str):
                    headers["Mcp-Name"] = encode_header_value(params[key])
                if method == "tools/call" and (schema := self.remote.tool_schema(str(params.get("name")))):
                    headers.update(param_headers(schema, params.get("arguments")))
            return headers
        if self.session_id is not None:
            headers["Mcp-Session-Id"] = self.session_id
        if self.version is not None:
            headers["MCP-Protocol-Version"] = self.version
        return headers

    def send(self, message: Message) -> None:
        if self.lost.done():
            raise ConnectionError(f"backend {self.remote.name!r} is not connected")
        if self.modern and message.get("method") == "notifications/cancelled":
            # At 2026-07-28 a request is cancelled by closing its response stream, not by a message.
            if (call := self._calls.get((message.get("params") or {}).get("requestId"))) is not None:
                call.cancel()
            return
        task = asyncio.create_task(self._post(message))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        if "method" in message and "id" in message:
            self._calls[message["id"]] = task
            task.add_done_callback(lambda _: self._calls.pop(message["id"], None))

    async def _post(self, message: Message) -> None:
        remote = self.remote
        upstream_id = message.get("id") if "method" in message else None
        for attempt in (1, 2):
            outbound = self._modern(message) if self.modern else message
            try:
                async with remote.post(remote.spec.url or "", outbound, self._headers(outbound)) as response:
                    if response.status == 404 and self.session_id is not None and attempt == 1:
                        await self.reinitialize()
                        continue
                    if message.get("method") == "initialize" and (
                        issued := response.headers.get("Mcp-Session-Id")
                    ):
                        self.session_id = issued
                    await self._answer(response, upstream_id)
                    return
            except (RemoteError, aiohttp.ClientError, TimeoutError) as exc:
                why = exc.args[0] if isinstance(exc, RemoteError) else _connection_problem(exc)
                if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ServerDisconnectedError):
                    self.lose(why)  # the server is gone: every request fails now, then reconnect
                if upstream_id is not None:
                    remote.mux.fail_one(upstream_id, f"backend {remote.name!r}: {why}")
                return

    async def _answer(self, response: aiohttp.ClientResponse, upstream_id: Any) -> None:
        remote = self.remote
        if response.status in (202, 204):
            return
        kind = response.content_type
        if response.status == 200 and kind == _EVENTS:
            last = await self._read_stream(response, upstream_id)
            if upstream_id is not None and remote.mux.waiting(upstream_id):
                if last is None:
                    raise RemoteError("the server ended the stream before answering")
                await self._resume(last, upstream_id)
            return
        body = await _read_bounded(response, remote.max_message)
        if kind == _JSON and body.strip():
            remote.receive(body, "an answer")  # 4xx with a JSON-RPC error: the caller gets that error
        if upstream_id is not None and remote.mux.waiting(upstream_id):
            raise RemoteError(
                remote.http_problem(response.status)
                if response.status != 200
                else "the server's answer is not a JSON-RPC answer to the request"
            )

    async def _read_stream(self, response: aiohttp.ClientResponse, upstream_id: Any) -> str | None:
        """Deliver each message of one SSE response; returns the last event id seen."""
        last: str | None = None
        with contextlib.suppress(aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
            async for _, data, event_id in _sse_events(response, self.remote.max_message):
                last = event_id or last
                self.remote.receive(data.encode(), "an event")
                if upstream_id is not None and not self.remote.mux.waiting(upstream_id):
                    break  # answered: nothing more of this stream is ours to wait for
        return last

    async def _resume(self, last: str, upstream_id: Any) -> None:
        """The answer's stream ended early: ask for the rest (MCP's resumability)."""
        headers = {**self._headers({}), "Accept": _EVENTS, "Last-Event-ID": last}
        for _ in range(3):
            async with self.remote.get(self.remote.spec.url or "", headers) as response:
                if response.status != 200 or response.content_type != _EVENTS:
                    raise RemoteError("the server ended the stream before answering and cannot resume it")
                last = await self._read_stream(response, upstream_id) or last
            if not self.remote.mux.waiting(upstream_id):
                return
            headers["Last-Event-ID"] = last
        raise RemoteError("the server ended the stream before answering")

    async def reinitialize(self) -> None:
        """One re-initialize however many requests met the 404 at once."""
        if self._reinit is None or self._reinit.done():
            log.warning("backend %s: the server forgot our session; initializing again", self.remote.name)
            self.session_id = None
            self._reinit = asyncio.create_task(self.remote.handshake())
        await asyncio.shield(self._reinit)

    def listen(self) -> None:
        """The GET stream of the server's own messages (2025 era), kept open while the link is."""
        self.spawn(self._listen())

    async def _listen(self) -> None:
        last: str | None = None
        while not self.lost.done():
            headers = {**self._headers({}), "Accept": _EVENTS}
            if last is not None:
                headers["Last-Event-ID"] = last
            try:
                async with self.remote.get(self.remote.spec.url or "", headers) as response:
                    if response.status == 404 and self.session_id is not None:
                        await self.reinitialize()
                        continue
                    if response.status != 200 or response.content_type != _EVENTS:
                        return  # 405: this server sends nothing unasked
                    last = await self._read_stream(response, None) or last
            except aiohttp.ClientConnectorError as exc:
                self.lose(_connection_problem(exc))
                return
            except (aiohttp.ClientError, RemoteError, TimeoutError) as exc:
                log.info("backend %s: server stream ended (%s)", self.remote.name, _connection_problem(exc))
            await asyncio.sleep(STREAM_RETRY)

    async def close(self) -> None:
        if self.session_id is not None and not self.lost.done():
            # The server may free the session now rather than at its own idle expiry.
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, RemoteError):
                async with self.remote.http_send(
                    "DELETE", self.remote.spec.url or "", None, self._headers({})
                ):
                    pass
        await super().close()


class _SSELink(_Link):
    """The 2024-11-05 transport: a GET stream that names where to POST."""

    def __init__(self, remote: RemoteBackend) -> None:
        super().__init__(remote)
        self.endpoint: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def open(self) -> None:
        self.spawn(self._stream())
        done, _ = await asyncio.wait(
            {self.endpoint, self.lost}, timeout=INIT_TIMEOUT, return_when="FIRST_COMPLETED"
        )
        if self.endpoint in done:
            return
        raise RemoteError(self.lost.result() if self.lost.done() else "no endpoint event on the SSE stream")

    async def _stream(self) -> None:
        remote = self.remote
        url = remote.spec.url or ""
        try:
            async with remote.get(url, {"Accept": _EVENTS}) as response:
                if response.status != 200 or response.content_type != _EVENTS:
                    raise RemoteError(remote.http_problem(response.status, "the SSE stream"))
                async for event, data, _ in _sse_events(response, remote.max_message):
                    if event == "endpoint" and not self.endpoint.done():
                        endpoint = urljoin(url, data.strip())
                        if urlsplit(endpoint)[:2] != urlsplit(url)[:2]:
                            # SECURITY: a server must not point the gateway's requests at another host.
                            raise RemoteError("the SSE endpoint is on another origin; refused")
                        self.endpoint.set_result(endpoint)
                    elif event == "message":
                        remote.receive(data.encode(), "an event")
            self.lose("the server closed the SSE stream")
        except (RemoteError, aiohttp.ClientError, TimeoutError) as exc:
            self.lose(exc.args[0] if isinstance(exc, RemoteError) else _connection_problem(exc))

    def send(self, message: Message) -> None:
        if self.lost.done() or not self.endpoint.done():
            raise ConnectionError(f"backend {self.remote.name!r} is not connected")
        self.spawn(self._post(message))

    async def _post(self, message: Message) -> None:
        remote = self.remote
        try:
            async with remote.post(self.endpoint.result(), message, {"Content-Type": _JSON}) as response:
                if response.status == 404:
                    self.lose("the server forgot the session")  # reconnect: a new stream, a new session
                elif response.status >= 300 and "method" in message and "id" in message:
                    remote.mux.fail_one(
                        message["id"], f"backend {remote.name!r}: {remote.http_problem(response.status)}"
                    )
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.lose(_connection_problem(exc))


class _WebSocketLink(_Link):
    def __init__(self, remote: RemoteBackend) -> None:
        super().__init__(remote)
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.queue: asyncio.Queue[str] = asyncio.Queue()

    async def open(self) -> None:
        remote = self.remote
        for attempt in (1, 2):
            headers = await remote.auth_headers()
            try:
                self.ws = await remote.http.ws_connect(
                    remote.url,
                    protocols=("mcp",),
                    headers=headers,
                    max_msg_size=remote.max_message,
                    heartbeat=30.0,
                )
                break
            except aiohttp.WSServerHandshakeError as exc:
                if exc.status == 401 and remote.credentials is not None and attempt == 1:
                    remote.credentials.rejected(headers["Authorization"])  # revoked early: fetch anew
                    continue
                raise RemoteError(remote.http_problem(exc.status, "the WebSocket handshake")) from None
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise RemoteError(_connection_problem(exc)) from None
        assert self.ws is not None
        self.spawn(self._read(self.ws))
        self.spawn(self._write(self.ws))

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for frame in ws:
            if frame.type == aiohttp.WSMsgType.TEXT:
                self.remote.receive(frame.data.encode(), "a frame")
            elif frame.type == aiohttp.WSMsgType.ERROR:
                break
        self.lose(f"the WebSocket closed ({ws.close_code or 'no code'})")

    async def _write(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        while True:
            text = await self.queue.get()
            try:
                await ws.send_str(text)
            except (aiohttp.ClientError, ConnectionError) as exc:
                self.lose(_connection_problem(exc))
                return

    def send(self, message: Message) -> None:
        if self.lost.done():
            raise ConnectionError(f"backend {self.remote.name!r} is not connected")
        self.queue.put_nowait(dumps(message))

    async def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(aiohttp.ClientError, ConnectionError):
                await self.ws.close()
        await super().close()


class RemoteBackend(MultiplexedBackend):
    def __init__(self, spec: ServerSpec, *, max_message: int) -> None:
        super().__init__()
        self.spec = spec
        self.name = spec.name
        self.url = spec.url or ""
        self.timeout = spec.timeout
        self.max_message = max_message
        self.restarts = 0
        self.transport: str | None = spec.transport
        self.credentials: ClientCredentials | None = None
        if spec.auth is not None:
            from .credentials import ClientCredentials  # only a remote with "auth" needs it

            self.credentials = ClientCredentials(spec.auth, name=spec.name)
        self.mux = Multiplexer(spec.name, self._write)
        self._link: _Link | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._retry_now = asyncio.Event()
        self._http: aiohttp.ClientSession | None = None
        self._stopping = False

    # -- HTTP: the one place requests to the remote are made -----------------------------------

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=_ssl_context(self.spec), limit=100),
                headers=dict(self.spec.headers),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT),
                auto_decompress=False,  # a small compressed body must not expand past the bound
                skip_auto_headers=("Accept-Encoding",),
            )
        return self._http

    async def auth_headers(self) -> dict[str, str]:
        if self.credentials is None:
            return {}
        from .credentials import UpstreamAuthError

        try:
            return {"Authorization": await self.credentials.authorization(self.http)}
        except UpstreamAuthError as exc:
            raise RemoteError(str(exc)) from None

    @contextlib.asynccontextmanager
    async def http_send(
        self, method: str, url: str, message: Message | None, headers: dict[str, str]
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """One HTTP request, with the credentials; a 401 to a fetched token fetches a new one once."""
        body = None if message is None else dumps(message)
        for attempt in (1, 2):
            # The traced call's context (ops/tracing.py): empty with tracing off, or for our own requests.
            sent = {**headers, **trace_headers(), **await self.auth_headers()}
            async with self.http.request(
                method, url, data=body, headers=sent, allow_redirects=False
            ) as response:
                if response.status == 401 and self.credentials is not None and attempt == 1:
                    self.credentials.rejected(sent["Authorization"])  # revoked or expired early
                    continue
                yield response
                return

    def post(self, url: str, message: Message, headers: dict[str, str]) -> Any:
        return self.http_send("POST", url, message, headers)

    def get(self, url: str, headers: dict[str, str]) -> Any:
        return self.http_send("GET", url, None, headers)

    def http_problem(self, status: int, what: str = "the request") -> str:
        if status == 401:
            fix = (
                'the credentials in its "headers" or "auth"'
                if self.spec.headers or self.credentials
                else ('no credentials: set "headers" or "auth" in the servers file')
            )
            return f"the server refused {what} with HTTP 401 ({fix})"
        if 300 <= status < 400:
            return f"the server answered {what} with a redirect (HTTP {status}), which is not followed"
        return f"the server answered {what} with HTTP {status}"

    async def http_call(self, message: Message, headers: dict[str, str]) -> Message | None:
        """One request answered in its own response (server/discover); None when it is refused."""
        async with self.post(self.url, message, headers) as response:
            if response.status in (404, 405):
                raise NotThisTransport(self.http_problem(response.status))
            if response.status != 200:
                return None
            if response.content_type == _EVENTS:
                async for _, data, _ in _sse_events(response, self.max_message):
                    if (reply := self._decode(data.encode())) and reply.get("id") == message["id"]:
                        return reply
                return None
            return self._decode(await _read_bounded(response, self.max_message))

    def _decode(self, raw: bytes) -> Message | None:
        return accept(self.name, raw, reply=lambda _: None, on_refused=lambda *_: None, what="an answer")

    # -- messages ---------------------------------------------------------------------------------

    def receive(self, raw: bytes, what: str) -> None:
        if isinstance(decoded := _maybe_batch(raw), list):
            for item in decoded:
                self.receive(item, what)
            return
        message = accept(self.name, raw, reply=self._write_quietly, on_refused=self._refused, what=what)
        if message is not None:
            self.mux.on_message(message)

    def _refused(self, upstream_id: str | int, why: str) -> None:
        self.mux.fail_one(upstream_id, f"backend {self.name!r} {why}")

    def _write(self, message: Message) -> None:
        link = self._link
        if link is None or link.lost.done():
            raise ConnectionError(
                f"backend {self.name!r} is {self.state}: {self.last_error or 'not connected'}"
            )
        link.send(message)

    def _write_quietly(self, message: Message) -> None:
        with contextlib.suppress(ConnectionError):
            self._write(message)

    # -- the connection's life ----------------------------------------------------------------------

    async def start(self) -> None:
        if not self.spec.tls.verify:
            log.warning("backend %s: TLS certificates are NOT verified (tls.verify is false)", self.name)
        self._supervisor = asyncio.create_task(self._supervise(), name=f"backend-{self.name}")

    def revive(self) -> int:
        if self.state in ("failed", "disconnected"):
            self._retry_now.set()  # reconnect now, not at the end of the backoff
        return 0

    async def _supervise(self) -> None:
        failures = 0
        while not self._stopping:
            self._set("starting" if self.restarts == 0 and failures == 0 else "reconnecting")
            link: _Link | None = None
            try:
                link = await self._connect()
            except (RemoteError, aiohttp.ClientError, TimeoutError, ConnectionError, OSError) as exc:
                problem = (
                    exc.args[0] if isinstance(exc, RemoteError) and exc.args else _connection_problem(exc)
                )
                self.last_error = f"{self.url}: {problem}"
                log.error("backend %s: %s", self.name, self.last_error)
                if link is not None:
                    await link.close()
                failures += 1
                await self._back_off(failures)
                continue
            failures = 0
            self._set("running")
            why = await link.lost
            self.last_error = f"{self.url}: connection lost ({why})"
            log.warning("backend %s: %s; reconnecting", self.name, self.last_error)
            self._set("reconnecting")
            self.mux.fail_all(
                f"backend {self.name!r}: connection lost ({why}); the request was not completed"
            )
            await link.close()
            self._link = None
            self.restarts += 1

    def _set(self, state: str) -> None:
        self.state = state
        # Waiters wake when a connection is up, or when it is known not to be: they fail at once then.
        if state in ("running", "disconnected", "failed"):
            self._ready.set()
        else:
            self._ready.clear()

    async def _back_off(self, failures: int) -> None:
        self._set("failed" if failures >= CRASH_LOOP_COUNT else "disconnected")
        delay = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (failures - 1)) * random.uniform(0.8, 1.2)  # noqa: S311
        self._retry_now.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._retry_now.wait(), delay)

    async def _connect(self) -> _Link:
        kinds = [self.transport] if self.transport else ["http", "sse"]
        for kind in kinds:
            link: _Link = _LINKS[kind](self)
            self._link = link
            try:
                # One bound for all of it: a server that accepts and then says nothing must not
                # hold the supervisor (and every caller waiting for it) for ever.
                async with asyncio.timeout(INIT_TIMEOUT):
                    await link.open()
                    await self.handshake()
            except BaseException as exc:
                await link.close()
                self._link = None
                if kind == kinds[-1] or not isinstance(exc, NotThisTransport):
                    raise
                log.info("backend %s: no Streamable HTTP here (%s); trying SSE", self.name, exc.args[0])
                continue
            if self.transport is None:
                self.transport = kind  # what answered is what is used from now on, reconnects included
            log.info("backend %s: connected to %s over %s", self.name, self.url, kind)
            return link
        raise RemoteError("no transport")  # not reached: the last kind raises

    async def handshake(self) -> None:
        """initialize (or, at 2026-07-28, what discover told), then the tools and their schemas."""
        link = self._link
        if not (isinstance(link, _StreamableLink) and link.modern):
            result = await self._initialize(self.spec.protocol or LATEST_HANDSHAKE)
            if isinstance(link, _StreamableLink):
                version = result.get("protocolVersion")
                link.version = version if isinstance(version, str) else LATEST_HANDSHAKE
        await self._list_tools()
        if isinstance(link, _StreamableLink) and not link.modern:
            link.listen()
        self.mux.resubscribe(self.timeout)

    def _setup_failed(self, why: str) -> Exception:
        return RemoteError(why)

    async def stop(self) -> None:
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        if self._link is not None:
            await self._link.close()
            self._link = None
        self.mux.fail_all(f"backend {self.name!r} stopped; the request was not completed")
        if self._http is not None:
            await self._http.close()
        self.state = "stopped"

    # -- the Backend interface (the rest is MultiplexedBackend's) ------------------------------

    def _unavailable(self) -> str:
        why = f": {self.last_error}" if self.last_error else ""
        return f"backend {self.name!r} is {self.state}{why}"

    def status(self) -> dict[str, Any]:
        link = self._link
        status: dict[str, Any] = {
            "name": self.name,
            "state": self.state,
            "url": _shown(self.url),
            "transport": self.transport,
            "era": None if link is None else "2026-07-28" if getattr(link, "modern", False) else "session",
            "reconnects": self.restarts,
            "tools": self.tool_count,
            "sessions": len(self.mux.sessions),
            "last_error": self.last_error,
        }
        if self.credentials is not None:
            status["auth"] = self.credentials.status()
        return status


_LINKS: Final[dict[str, type[_StreamableLink | _SSELink | _WebSocketLink]]] = {
    "http": _StreamableLink,
    "sse": _SSELink,
    "ws": _WebSocketLink,
}


def _shown(url: str) -> str:
    """The URL without its query, which may carry a key the operator put there."""
    parts = urlsplit(url)
    return parts._replace(query="", fragment="").geturl()


def _maybe_batch(raw: bytes) -> list[bytes] | None:
    """A JSON array of messages (2025-03-26 allowed batches), as the raw bytes of each."""
    if not raw.lstrip().startswith(b"["):
        return None
    try:
        items = json.loads(raw)
    except ValueError:
        return None
    return [dumps(item).encode() for item in items] if isinstance(items, list) else None
