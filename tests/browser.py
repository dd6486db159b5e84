"""Headless Chromium driven over the DevTools protocol: just enough of it for the browser tests
(the OAuth pages, the console). Chromium is Debian's package; tests skip without it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp

__all__ = ["CHROMIUM", "CHROMIUM_FLAGS", "DevTools", "chromium"]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
# Headless on a machine with no network but loopback: without the background-networking flags
# Chromium keeps trying (and failing) to reach its own services.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)


class DevTools:
    """Just enough of the Chrome DevTools protocol: commands with replies, and awaited events.

    Every event is also handed to `listeners` as it arrives (a test collecting console errors or
    CSP violations sees all of them, whatever it is waiting for)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 0
        self.replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            data = json.loads(message.data)
            if "id" in data and data["id"] in self.replies:
                self.replies.pop(data["id"]).set_result(data)
            elif "method" in data:
                for listener in self.listeners:
                    listener(data)
                await self.events.put(data)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        reply: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.replies[self.next_id] = reply
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        answer = await asyncio.wait_for(reply, 30)
        if "error" in answer:
            raise AssertionError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer.get("result", {})
        return result

    async def event(self, method: str) -> dict[str, Any]:
        while True:
            event = await asyncio.wait_for(self.events.get(), 30)
            if event["method"] == method:
                return event

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 30) -> Any:
        """Poll a page expression until it is truthy (bounded: the page's fetches are async)."""
        async with asyncio.timeout(timeout):
            while not (value := await self.evaluate(expression)):
                await asyncio.sleep(0.05)
        return value

    async def close(self) -> None:
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader


@contextlib.asynccontextmanager
async def chromium(profile: Path, *flags: str) -> AsyncIterator[DevTools]:
    """A headless Chromium on a profile of its own, its first page's DevTools session."""
    assert CHROMIUM is not None
    process = await asyncio.create_subprocess_exec(
        CHROMIUM,
        *CHROMIUM_FLAGS,
        *flags,
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
        "about:blank",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stderr is not None
        endpoint = None
        while endpoint is None:
            line = await asyncio.wait_for(process.stderr.readline(), 60)
            if not line:
                raise AssertionError("Chromium exited before its DevTools endpoint was up")
            if match := re.search(rb"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line):
                endpoint = f"http://127.0.0.1:{int(match.group(1))}"
        async with aiohttp.ClientSession() as session:
            async with session.get(endpoint + "/json/list") as response:
                targets = await response.json()
            page = next(t for t in targets if t["type"] == "page")
            async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                tools = DevTools(ws)
                try:
                    await tools.send("Page.enable")
                    await tools.send("Runtime.enable")
                    yield tools
                finally:
                    await tools.close()
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
