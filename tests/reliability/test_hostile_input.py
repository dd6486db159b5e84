"""A corpus of over 1,000 hostile inputs against both transports of one real gateway.

Each input gets a 4xx or a JSON-RPC error, never a 5xx, a stack trace or the token in a
body; then the sessions it was aimed at (and another key's) still answer a real call, and
the child behind them was never disturbed. See corpus.py for what is in it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import aiohttp
import pytest

from mcp_sse.security.keys import generate_key
from mcp_sse.state import BACKENDS, SESSIONS, TASKS
from tests.conftest import SDK_SERVER, Running, StartGateway
from tests.reliability.corpus import Case, Targets, fire, generate, open_targets, surrogate_cases
from tests.reliability.harness import (
    Legacy,
    Streamable,
    call,
    fault_server,
    gateway_process,
    text_result,
    wait_until,
)

MAX_BODY = 64 * 1024


async def hostile_gateway(start_gateway: StartGateway, tmp_path: Path) -> tuple[Running, str]:
    """A gateway with a second key (whose sessions must stay out of reach) and no lockout to trip.

    Its child's request timeout is an hour: an input that left a call waiting on the child, to be
    ended by a timeout rather than answered, holds its case past the test's own timeout."""
    other_secret, entry = generate_key("other", "operator")
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [entry]}))
    gw = await start_gateway(
        {"test": {**SDK_SERVER, "timeout": 3600}},
        max_body=MAX_BODY,
        keys_file=keys,
        lockout_failures=1_000_000,
    )
    assert await wait_until(lambda: gw.app[BACKENDS]["test"].state == "running", 30)
    return gw, other_secret


async def assert_still_working(targets: Targets) -> None:
    """A real call on every session the corpus was aimed at, and on the other key's."""
    assert not targets.legacy.ended.is_set(), "the legacy stream was closed by the corpus"
    reply = await targets.legacy.request(call("after-sse", "echo", text="alive"))
    assert text_result(reply) == "alive"
    for client in (targets.streamable, targets.batch, *targets._keep[1::2]):  # type: ignore[attr-defined]
        assert text_result(await client.request(call("after", "echo", text="alive"))) == "alive"
    other_legacy = targets._keep[0]  # type: ignore[attr-defined]
    assert text_result(await other_legacy.request(call("after-other", "add", a=2, b=3))) == "5"


async def test_hostile_corpus_against_both_transports(
    start_gateway: StartGateway, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    gw, other_secret = await hostile_gateway(start_gateway, tmp_path)
    cases = generate(max_body=MAX_BODY)
    assert len(cases) >= 1000
    pid = gw.app[BACKENDS]["test"].status()["pid"]
    port = int(gw.url.rsplit(":", 1)[1])
    async with aiohttp.ClientSession() as http:
        targets = await open_targets(http, gw.url, gw.token, other_secret, other_route="/servers/test")
        sessions_before = len(gw.app[SESSIONS])
        started = time.monotonic()
        verdicts = await fire(http, cases, targets, token=gw.token, port=port)
        elapsed = time.monotonic() - started
        print(
            f"[measure] hostile corpus: {len(cases)} cases, {len(verdicts.outcomes)} requests in "
            f"{elapsed:.1f} s; statuses {verdicts.statuses()}; legacy stream errors checked "
            f"{len(verdicts.legacy_expected)}"
        )
        assert not verdicts.problems, f"{len(verdicts.problems)} problems:\n" + "\n".join(
            verdicts.problems[:60]
        )
        await assert_still_working(targets)
        # Nothing the corpus sent opened or ended a session.
        assert len(gw.app[SESSIONS]) == sessions_before
        status = gw.app[BACKENDS]["test"].status()
        await targets.legacy.close()
        for client in targets._keep[::2]:  # type: ignore[attr-defined]
            await client.close()
    assert status["pid"] == pid and status["restarts"] == 0 and status["state"] == "running"
    # The gateway's own code logged no error (aiohttp's parser errors are test_malformed_http_...'s).
    errors = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.startswith(("mcp_sse", "asyncio"))
    ]
    assert errors == [], errors[:20]


# -- inputs that once showed a bug -----------------------------------------------------------------


async def fire_at_fresh_targets(
    start_gateway: StartGateway, tmp_path: Path, cases: list[Case]
) -> tuple[list[str], Targets, aiohttp.ClientSession]:
    gw, other_secret = await hostile_gateway(start_gateway, tmp_path)
    http = aiohttp.ClientSession()
    targets = await open_targets(http, gw.url, gw.token, other_secret, other_route="/servers/test")
    port = int(gw.url.rsplit(":", 1)[1])
    verdicts = await fire(http, cases, targets, token=gw.token, port=port, answer_timeout=30)
    return verdicts.problems, targets, http


async def test_lone_surrogates_get_an_error_and_the_session_survives(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    problems, targets, http = await fire_at_fresh_targets(start_gateway, tmp_path, surrogate_cases())
    try:
        assert problems == []
        await assert_still_working(targets)
    finally:
        await targets.legacy.close()
        await http.close()


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
async def test_non_json_numbers_are_a_parse_error(start_gateway: StartGateway, literal: str) -> None:
    gw = await start_gateway({"test": SDK_SERVER})
    body = f'{{"jsonrpc":"2.0","id":1,"method":"ping","params":{{"x":{literal}}}}}'.encode()
    async with aiohttp.ClientSession() as http:
        client = await Streamable(http, gw.url, gw.token).initialize()
        status, messages = await client.post(body)
        assert status == 400 and messages[0]["error"]["code"] == -32700, (status, messages)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_body_that_does_not_decode_is_a_400(
    start_gateway: StartGateway, caplog: pytest.LogCaptureFixture, encoding: str
) -> None:
    caplog.set_level(logging.ERROR)
    gw = await start_gateway({"test": SDK_SERVER})
    async with aiohttp.ClientSession() as http:
        client = await Streamable(http, gw.url, gw.token).initialize()
        legacy = await Legacy(http, gw.url, gw.token).open()
        body = json.dumps(call(1, "echo", text="x")).encode()
        try:
            streamable_status, _ = await client.post(body, **{"Content-Encoding": encoding})
        except aiohttp.ClientError:
            streamable_status = 0  # the server dropped the connection instead of answering
        try:
            legacy_status = await legacy.post(body, **{"Content-Encoding": encoding})
        except aiohttp.ClientError:
            legacy_status = 0
        await legacy.close()
    assert (streamable_status, legacy_status) == (400, 400)
    assert not [r for r in caplog.records if r.name.startswith("mcp_sse")]


async def test_tool_arguments_are_checked_without_a_prior_tools_list(start_gateway: StartGateway) -> None:
    gw = await start_gateway({"test": SDK_SERVER})
    assert await wait_until(lambda: gw.app[BACKENDS]["test"].state == "running", 15)
    async with aiohttp.ClientSession() as http:
        client = await Streamable(http, gw.url, gw.token).initialize()
        reply = await client.request(call(1, "echo", text=5))
    assert reply.get("error", {}).get("code") == -32602, reply
    assert "text" in reply["error"]["message"]


async def test_refused_subscription_is_never_reported_as_success(start_gateway: StartGateway) -> None:
    gw = await start_gateway({"test": SDK_SERVER})  # it does not support resources/subscribe
    async with aiohttp.ClientSession() as http:
        first = await Streamable(http, gw.url, gw.token).initialize()
        second = await Streamable(http, gw.url, gw.token).initialize()

        def subscribe(n: int) -> dict[str, object]:
            return {"jsonrpc": "2.0", "id": n, "method": "resources/subscribe", "params": {"uri": "nope://x"}}

        replies = await asyncio.gather(first.request(subscribe(1)), second.request(subscribe(2)))
        replies.append(await first.request(subscribe(3)))
    assert all("error" in reply for reply in replies), replies


async def test_malformed_http_neither_echoes_nor_logs_the_token(tmp_path: Path) -> None:
    async with gateway_process(tmp_path, {"test": SDK_SERVER}) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        # Bare LF line endings: aiohttp's parser refuses the request.
        writer.write(
            f"POST /mcp HTTP/1.1\nHost: 127.0.0.1\nAuthorization: Bearer {gw.token}\n"
            "Content-Type: application/json\nConnection: close\nContent-Length: 2\n\n{}".encode()
        )
        answer = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        # The refusal's own log line is written: only then can the log be checked for the token.
        assert await wait_until(lambda: "refused a malformed HTTP request" in gw.stderr, 30), gw.stderr
        assert answer.split(b" ", 2)[1].startswith(b"4"), answer[:80]
        assert gw.token.encode() not in answer
        assert gw.token not in gw.stderr
        assert "Traceback" not in gw.stderr


async def test_duplicate_request_id_in_flight_is_answered_and_leaks_nothing(
    start_gateway: StartGateway,
) -> None:
    # No request timeout to fall back on (an hour): a call whose answer the reused id lost is never
    # answered at all, rather than by a timeout error.
    gw = await start_gateway({"f": fault_server(timeout=3600)})
    async with aiohttp.ClientSession() as http:
        client = await Streamable(http, gw.url, gw.token).initialize()

        async def post(message: dict[str, object]) -> tuple[int, list[dict[str, object]]] | str:
            try:
                return await asyncio.wait_for(client.post(message), 60)
            except TimeoutError:
                return "no complete answer within 60 s"

        first, second = await asyncio.gather(
            post(call(7, "sleep", seconds=1)), post(call(7, "echo", text="second"))
        )
        session = gw.app[SESSIONS].get(client.session_id)
        assert session is not None
        # Each POST is answered (its result, or an error refusing the reused id) and nothing stays open.
        assert not isinstance(first, str), first
        assert not isinstance(second, str), second
        assert await wait_until(lambda: not session.request_streams and not gw.app[TASKS], 30)
