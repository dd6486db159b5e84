"""A revoked or expired key ends what a 2026-07-28 client holds open, as it ends a 2025 session.

That era has no sessions, but a `subscriptions/listen` stream and a call waiting for the client's
input (an InputRequiredResult, until the retry brings `inputResponses`) are held for a key all the
same: each must end when the key does, at once on a reload, when the reaper sees an expiry.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mcp_sse import app as app_module
from mcp_sse.app import reload_keys
from mcp_sse.state import TASKS
from tests.conftest import SDK_SERVER, StartGateway, next_message, until_eof, wait_for_text
from tests.interop.test_modern import RAW_SERVER, modern_headers, modern_request

from .helpers import audit_lines
from .test_pipeline import new_key, write_keys

LISTEN = modern_request("subscriptions/listen", {"notifications": {"toolsListChanged": True}}, 7)
ACK = "notifications/subscriptions/acknowledged"


@pytest.fixture
async def http() -> Any:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_reload_ends_a_revoked_keys_listen_streams_and_parked_calls_at_once(
    start_gateway: StartGateway, http: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The reaper never runs here: only the revocation can end them.
    monkeypatch.setattr(app_module, "REAP_INTERVAL", 1e6)
    leaving_secret, leaving = new_key("leaving")
    staying_secret, staying = new_key("staying")
    keys = tmp_path / "keys.json"
    write_keys(keys, leaving, staying)
    gw = await start_gateway({"raw": RAW_SERVER, "test": SDK_SERVER}, keys_file=keys)
    raw, test = gw.url + "/servers/raw/mcp", gw.url + "/servers/test/mcp"
    async with asyncio.timeout(60):
        # The startup check for resource URIs offered twice lists them as a session of its own,
        # which would make the child's sampling request below ambiguous: let it finish first.
        while gw.app[TASKS]:
            await asyncio.sleep(0.02)
    marker = tmp_path / "parked"
    ask = modern_request(
        "tools/call",
        {"name": "ask_and_record", "arguments": {"question": "?", "path": str(marker)}},
        capabilities={"sampling": {}},
    )
    async with (
        http.post(raw, json=LISTEN, headers=modern_headers(leaving_secret, "subscriptions/listen")) as gone,
        http.post(raw, json=LISTEN, headers=modern_headers(staying_secret, "subscriptions/listen")) as kept,
    ):
        for stream in (gone, kept):
            assert (await next_message(stream))["method"] == ACK
        parked = await http.post(
            test, json=ask, headers=modern_headers(leaving_secret, "tools/call", "ask_and_record")
        )
        assert (await parked.json())["result"]["resultType"] == "input_required"
        write_keys(keys, staying)
        reload_keys(gw.app)
        await until_eof(gone)
        await wait_for_text(marker, "cancelled")  # the child was told to stop waiting for the answer
        touch = modern_request("tools/call", {"name": "touch", "arguments": {}})
        await http.post(raw, json=touch, headers=modern_headers(staying_secret, "tools/call", "touch"))
        # Sent after the revocation: the other key's stream is still open.
        assert (await next_message(kept, timeout=60))["method"] == "notifications/tools/list_changed"
    reloads = [line for line in audit_lines(tmp_path / "audit.log") if line["event"] == "keys.reload"]
    assert reloads[-1]["sessions_closed"] == 2


async def test_a_key_reloaded_past_its_expiry_ends_its_listen_stream_at_once(
    start_gateway: StartGateway, http: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app_module, "REAP_INTERVAL", 1e6)  # only the reload itself can end it
    secret, entry = new_key("expiring")
    keys = tmp_path / "keys.json"
    write_keys(keys, entry)
    gw = await start_gateway({"raw": RAW_SERVER}, keys_file=keys)
    async with http.post(
        gw.url + "/mcp", json=LISTEN, headers=modern_headers(secret, "subscriptions/listen")
    ) as s:
        assert (await next_message(s))["method"] == ACK
        # Still in the file, but past its expiry: no key was removed, yet it is no longer in force.
        write_keys(keys, {**entry, "expires": "2000-01-01T00:00:00Z"})
        reload_keys(gw.app)
        await until_eof(s)
    reloads = [line for line in audit_lines(tmp_path / "audit.log") if line["event"] == "keys.reload"]
    assert reloads[-1]["sessions_closed"] == 1 and reloads[-1]["loaded"] >= 1


async def test_a_key_that_expires_while_loaded_has_its_listen_stream_ended_by_the_reaper(
    start_gateway: StartGateway, http: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app_module, "REAP_INTERVAL", 0.05)
    secret, entry = new_key("expiring")
    keys = tmp_path / "keys.json"
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2)
    write_keys(keys, {**entry, "expires": soon.strftime("%Y-%m-%dT%H:%M:%SZ")})
    gw = await start_gateway({"raw": RAW_SERVER}, keys_file=keys)
    async with http.post(
        gw.url + "/mcp", json=LISTEN, headers=modern_headers(secret, "subscriptions/listen")
    ) as s:
        assert (await next_message(s))["method"] == ACK
        await until_eof(s)  # no reload: the reaper finds the key expired
    expired = [line for line in audit_lines(tmp_path / "audit.log") if line["event"] == "session.expired"]
    assert [line["sessions_closed"] for line in expired] == [1]
    assert entry["id"] in expired[0]["key_ids"]  # named, not masked as a secret


async def test_a_reaper_pass_that_fails_is_logged_and_the_next_one_ends_the_stream(
    start_gateway: StartGateway,
    http: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A fault injected into one pass (the first): the reaper goes on, so expiry still ends streams."""
    monkeypatch.setattr(app_module, "REAP_INTERVAL", 0.05)
    real, failed = app_module._gone_identities, []

    def once_failing(app: Any) -> set[str]:
        if not failed:
            failed.append(True)
            raise RuntimeError("injected")
        return real(app)

    monkeypatch.setattr(app_module, "_gone_identities", once_failing)
    secret, entry = new_key("expiring")
    keys = tmp_path / "keys.json"
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2)
    write_keys(keys, {**entry, "expires": soon.strftime("%Y-%m-%dT%H:%M:%SZ")})
    gw = await start_gateway({"raw": RAW_SERVER}, keys_file=keys)
    async with http.post(
        gw.url + "/mcp", json=LISTEN, headers=modern_headers(secret, "subscriptions/listen")
    ) as s:
        assert (await next_message(s))["method"] == ACK
        await until_eof(s)
    assert failed
    assert "reaper pass failed (RuntimeError); the next one runs as usual" in caplog.text
    assert "injected" not in caplog.text and "Traceback" not in caplog.text
