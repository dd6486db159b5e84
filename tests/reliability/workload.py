"""The soak: a bounded mixed workload against one gateway, with accounting for every request.

Shared by the short soak in the test suite (tests/reliability/test_soak.py, ~20 s) and the
long one (`python -m tests.soak --minutes 30`). Concurrently, for `seconds`:

- callers make real tool calls over both transports and check every answer;
- a misbehaving client drives the fault child (hangs, garbage, floods, oversize lines);
- stream churn opens and drops sessions and streams, some mid-request;
- a hostile worker fires a rotating sample of the corpus at live sessions;
- a killer SIGKILLs a child every `kill_every` seconds.

Every request must get its answer: the right result, or a JSON-RPC error that the fault
explains (a killed child, a timeout of the hanging tool). At the end: no session, task, fd
or child is left over, killed children are gone, and RSS grew less than the bound after
warm-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from mcp_sse.state import BACKENDS, SESSIONS, TASKS

from .corpus import Targets, fire, generate
from .harness import (
    Legacy,
    Streamable,
    alive,
    call,
    child_pids,
    fd_count,
    rss_mb,
    task_count,
    wait_until,
)

MAX_LINE = 256 * 1024
SOAK_SETTINGS: dict[str, Any] = {
    "max_body": 64 * 1024,
    "max_line": MAX_LINE,
    "keepalive": 2.0,
    "lockout_failures": 1_000_000,
    "rate_limit_max_requests": 10_000_000,
    "max_streams_per_key": 256,
}
"""Gateway settings for a soak (on top of the secrets); the fixture and the command both use them."""

# What a call may get while the soak kills its child: "is not running" is the moment between the
# child's death and the supervisor's noticing it, which a loaded machine widens; "circuit is" the
# circuit breaker that the failures of a kill opened, until it has closed again.
_CHILD_FAULT = re.compile(
    r"exited|restarting|starting|not completed|is stopped|is not running|session ended|circuit is"
)


def soak_servers() -> dict[str, dict[str, Any]]:
    from tests.conftest import SDK_SERVER

    from .harness import fault_server

    # A kill fails every call in flight, which rightly opens sdk's circuit: a short open timeout
    # takes it through open, half-open and closed again after each kill. f fails 2 of every 5 calls
    # on purpose (hang, oversize), for which a breaker would rightly stay open: it has none here.
    sdk = {**SDK_SERVER, "circuit_breaker": {"timeout": 1}}
    return {"sdk": sdk, "f": {**fault_server(timeout=1.5), "circuit_breaker": False}}


@dataclass
class SoakReport:
    seconds: float = 0.0
    requests: int = 0
    answered: int = 0
    results: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    sessions_opened: int = 0
    streams_opened: int = 0
    hostile_sent: int = 0
    kills: list[tuple[str, int]] = field(default_factory=list)
    restarts: dict[str, int] = field(default_factory=dict)
    gauges: dict[str, Any] = field(default_factory=dict)

    def problem(self, text: str) -> None:
        if len(self.problems) < 200:
            self.problems.append(text)

    def summary(self) -> str:
        g = self.gauges
        return (
            f"{self.seconds:.0f} s: {self.requests} requests, {self.answered} answered "
            f"({self.results} results, errors {dict(self.errors)}), "
            f"{self.sessions_opened} sessions and {self.streams_opened} streams opened, "
            f"{self.hostile_sent} hostile inputs, {len(self.kills)} child kills, restarts {self.restarts}; "
            f"RSS {g.get('rss_start', 0):.1f} -> {g.get('rss_warm', 0):.1f} (after warm-up) -> "
            f"{g.get('rss_end', 0):.1f} MB (peak {g.get('rss_peak', 0):.1f}); "
            f"fds {g.get('fds_start')} -> {g.get('fds_end')}; "
            f"tasks {g.get('tasks_start')} -> {g.get('tasks_end')}; "
            f"children {g.get('children_start')} -> {g.get('children_end')}; "
            f"sessions left {g.get('sessions_end')}; problems {len(self.problems)}"
        )


class Soak:
    def __init__(self, url: str, token: str, app: web.Application, report: SoakReport, seed: int) -> None:
        self.url, self.token, self.app, self.report = url, token, app, report
        self.rng = random.Random(seed)
        self.stop = asyncio.Event()
        self.ids = itertools.count(1)

    # -- accounting ---------------------------------------------------------------------------

    def _check(self, where: str, reply: dict[str, Any] | None, expect: Any) -> None:
        """One request's outcome: the expected result, or an error a fault explains."""
        report = self.report
        report.requests += 1
        if reply is None:
            report.problem(f"{where}: no answer")
            return
        report.answered += 1
        if "error" in reply:
            message = str(reply["error"].get("message", ""))
            if _CHILD_FAULT.search(message):
                report.errors["child fault"] += 1
            elif reply["error"].get("code") == -32001:
                report.errors["timeout"] += 1
            else:
                report.errors["other"] += 1
                report.problem(f"{where}: unexpected error {json.dumps(reply)[:300]}")
            return
        try:
            got = reply["result"]["content"][0]["text"]
        except (KeyError, IndexError, TypeError):
            report.problem(f"{where}: malformed result {json.dumps(reply)[:300]}")
            return
        if expect is not None and not (expect(got) if callable(expect) else got == expect):
            report.problem(f"{where}: wrong result {got[:100]!r}")
            return
        report.results += 1

    async def _request(self, client: Streamable | Legacy, message: dict[str, Any]) -> dict[str, Any] | None:
        try:
            if isinstance(client, Streamable):
                status, messages = await asyncio.wait_for(client.post(message), 60)
                answers = [m for m in messages if "method" not in m]
                if status != 200 or len(answers) != 1 or answers[0].get("id") != message["id"]:
                    self.report.problem(
                        f"{message['params']['name']}: status {status}, {str(messages)[:200]}"
                    )
                    return None
                return answers[0]
            return await client.request(message, timeout=60)
        except (aiohttp.ClientError, TimeoutError, EOFError, AssertionError) as exc:
            self.report.problem(f"{message['params']['name']}: {type(exc).__name__} {exc}"[:300])
            return None

    async def _session(
        self, http: aiohttp.ClientSession, prefix: str, streamable: bool
    ) -> Streamable | Legacy:
        self.report.sessions_opened += 1
        if streamable:
            version = self.rng.choice(["2025-03-26", "2025-06-18", "2025-11-25"])
            return await Streamable(http, self.url, self.token, prefix + "/mcp").initialize(version)
        return await Legacy(http, self.url, self.token, prefix).open()

    async def _close(self, client: Streamable | Legacy) -> None:
        if isinstance(client, Streamable):
            with contextlib.suppress(aiohttp.ClientError):
                await client.delete()
        else:
            await client.close()

    # -- workers ------------------------------------------------------------------------------

    async def caller(self, http: aiohttp.ClientSession, n: int) -> None:
        while not self.stop.is_set():
            client = await self._session(http, "/servers/sdk", streamable=n % 2 == 0)
            try:
                for _ in range(self.rng.randint(5, 25)):
                    if self.stop.is_set():
                        break
                    request_id: Any = next(self.ids) if self.rng.random() < 0.5 else f"c{next(self.ids)}"
                    kind = self.rng.choice(["echo", "add", "sleep", "slow", "big", "log"])
                    if kind == "echo":
                        text = f"soak {request_id} {self.rng.random()}"
                        message, expect = call(request_id, "echo", text=text), text
                    elif kind == "add":
                        a, b = self.rng.randint(-(10**6), 10**6), self.rng.randint(-(10**6), 10**6)
                        message, expect = call(request_id, "add", a=a, b=b), str(a + b)
                    elif kind == "sleep":
                        message, expect = (
                            call(request_id, "sleep", seconds=self.rng.uniform(0.01, 0.3)),
                            "slept",
                        )
                    elif kind == "slow":
                        message, expect = call(request_id, "slow", steps=3, delay=0.02), "done 3"
                        message["params"]["_meta"] = {"progressToken": f"p{request_id}"}
                    elif kind == "big":
                        size = self.rng.choice([10, 20_000, 100_000])
                        message, expect = (
                            call(request_id, "big", size=size),
                            (lambda got, s=size: len(got) == s),
                        )
                    else:
                        message, expect = call(request_id, "log_and_answer", text="logged"), "logged"
                    self._check(f"sdk {kind}", await self._request(client, message), expect)
            finally:
                await self._close(client)

    async def misbehaver(self, http: aiohttp.ClientSession) -> None:
        """Drives the fault child: each call gets its answer or the error its fault explains."""
        while not self.stop.is_set():
            client = await self._session(http, "/servers/f", streamable=True)
            try:
                plan = [
                    (call(next(self.ids), "echo", text="f"), "f"),
                    (call(next(self.ids), "garbage"), "after garbage"),
                    (call(next(self.ids), "hang"), None),  # must time out, as an error
                    (
                        call(next(self.ids), "flood", count=200, size=200, kind="log", pace=0.001),
                        "flooded 200",
                    ),
                    (call(next(self.ids), "oversize", size=2 * MAX_LINE), None),  # must fail, as an error
                ]
                for message, expect in plan:
                    if self.stop.is_set():
                        break
                    reply = await self._request(client, message)
                    name = message["params"]["name"]
                    if expect is None and reply is not None and "error" not in reply:
                        self.report.problem(
                            f"f {name}: answered {json.dumps(reply)[:200]} instead of an error"
                        )
                    if expect is None and reply is not None and "error" in reply:
                        self.report.requests += 1
                        self.report.answered += 1
                        self.report.errors["expected fault"] += 1
                    else:
                        self._check(f"f {name}", reply, expect)
            finally:
                await self._close(client)

    async def churn(self, http: aiohttp.ClientSession) -> None:
        while not self.stop.is_set():
            kind = self.rng.randrange(4)
            client = await self._session(http, "/servers/sdk", streamable=kind % 2 == 0)
            try:
                if kind == 0:  # open the GET stream, read its priming event, drop it
                    assert isinstance(client, Streamable)
                    async with http.get(
                        client.url, headers=client.headers(Accept="text/event-stream")
                    ) as stream:
                        self.report.streams_opened += 1
                        if stream.status != 200:
                            self.report.problem(f"GET stream: status {stream.status}")
                        elif client.version >= "2025-11-25":
                            await asyncio.wait_for(stream.content.readline(), 5)
                elif kind == 1:  # a legacy session, opened and dropped
                    self.report.streams_opened += 1
                else:  # leave mid-request
                    self.report.streams_opened += kind == 3
                    request = asyncio.create_task(client.post(call(next(self.ids), "sleep", seconds=0.2)))
                    await asyncio.sleep(self.rng.uniform(0.0, 0.1))
                    request.cancel()
                    await asyncio.gather(request, return_exceptions=True)
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.report.problem(f"churn {kind}: {type(exc).__name__} {exc}"[:200])
            finally:
                await self._close(client)
            await asyncio.sleep(0.01)

    async def hostile(self, http: aiohttp.ClientSession) -> None:
        cases = [
            c for c in generate(max_body=SOAK_SETTINGS["max_body"]) if not (c.session or "").startswith("<")
        ]
        self.rng.shuffle(cases)
        legacy = await Legacy(http, self.url, self.token, "/servers/sdk").open()
        streamable = await Streamable(http, self.url, self.token, "/servers/sdk/mcp").initialize()
        batch = await Streamable(http, self.url, self.token, "/servers/sdk/mcp").initialize("2025-03-26")
        for client in (legacy, streamable, batch):
            await client.request({"jsonrpc": "2.0", "id": "list", "method": "tools/list"})
        targets = Targets(legacy, streamable, batch, foreign={})
        port = int(self.url.rsplit(":", 1)[1])
        try:
            for start in itertools.count(0, 25):
                if self.stop.is_set():
                    break
                sample = [cases[(start + i) % len(cases)] for i in range(25)]
                verdicts = await fire(http, sample, targets, token=self.token, port=port, concurrency=4)
                self.report.hostile_sent += len(verdicts.outcomes)
                for text in verdicts.problems:
                    # A legacy error may be lost when its session's child is being killed right then: no.
                    self.report.problem(f"hostile {text}")
                if legacy.ended.is_set():
                    self.report.problem("hostile: the legacy stream under attack ended")
                    break
                await asyncio.sleep(0.05)
        finally:
            await legacy.close()
            for client in (streamable, batch):
                await self._close(client)

    async def killer(self, kill_every: float) -> None:
        names = itertools.cycle(["sdk", "f"])
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), kill_every)
            if self.stop.is_set():
                return
            name = next(names)
            backend = self.app[BACKENDS][name]
            status = backend.status()
            if status.get("state") != "running" or not status.get("pid"):
                continue
            pid = status["pid"]
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            self.report.kills.append((name, pid))
            if not await wait_until(lambda b=backend: b.status().get("state") == "running", 30):
                self.report.problem(f"backend {name} did not come back after a kill: {backend.status()}")


def gauges(app: web.Application) -> dict[str, Any]:
    return {
        "rss": rss_mb(),
        "fds": fd_count(),
        "tasks": task_count(),
        "children": len(child_pids()),
        "sessions": len(app[SESSIONS]),
        "spawned": len(app[TASKS]),
    }


async def run_soak(
    url: str,
    token: str,
    app: web.Application,
    *,
    seconds: float,
    kill_every: float,
    callers: int = 4,
    warmup: float | None = None,
    seed: int = 1,
) -> SoakReport:
    report = SoakReport()
    assert await wait_until(lambda: all(b.state == "running" for b in app[BACKENDS].values()), 30)
    # The start-up checks (spawned tasks: the resource-collision listing runs as a session of its
    # own) are done, rather than 0.2 s having passed: the baseline holds no transient task.
    assert await wait_until(lambda: not app[TASKS] and len(app[SESSIONS]) == 0, 30)
    start = gauges(app)
    backends_before = {name: b.status()["restarts"] for name, b in app[BACKENDS].items()}
    soak = Soak(url, token, app, report, seed)
    warmup = min(max(3.0, seconds / 5), 60.0) if warmup is None else warmup
    started = time.monotonic()
    peak = start["rss"]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:
        workers = [asyncio.create_task(soak.caller(http, n)) for n in range(callers)]
        workers += [
            asyncio.create_task(soak.misbehaver(http)),
            asyncio.create_task(soak.churn(http)),
            asyncio.create_task(soak.hostile(http)),
            asyncio.create_task(soak.killer(kill_every)),
        ]
        await asyncio.sleep(warmup)
        warm = gauges(app)
        while time.monotonic() - started < seconds and not any(w.done() for w in workers):
            await asyncio.sleep(0.5)
            peak = max(peak, rss_mb())
        soak.stop.set()
        done = await asyncio.gather(*workers, return_exceptions=True)
        for outcome in done:
            if isinstance(outcome, BaseException):
                report.problem(f"a worker failed: {type(outcome).__name__}: {outcome}"[:300])
    report.seconds = time.monotonic() - started
    # Quiet again: no session, no spawned task, no extra task, fd or child.
    await wait_until(
        lambda: (
            len(app[SESSIONS]) == 0
            and not app[TASKS]
            and task_count() <= start["tasks"]
            and fd_count() <= start["fds"]
            and len(child_pids()) == start["children"]
        ),
        15,
        interval=0.1,
    )
    end = gauges(app)
    report.restarts = {
        name: b.status()["restarts"] - backends_before[name] for name, b in app[BACKENDS].items()
    }
    report.gauges = {
        "rss_start": start["rss"],
        "rss_warm": warm["rss"],
        "rss_end": end["rss"],
        "rss_peak": max(peak, end["rss"]),
        "fds_start": start["fds"],
        "fds_end": end["fds"],
        "tasks_start": start["tasks"],
        "tasks_end": end["tasks"],
        "children_start": start["children"],
        "children_end": end["children"],
        "sessions_end": end["sessions"],
        "spawned_end": end["spawned"],
    }
    return report


def soak_problems(report: SoakReport, *, rss_growth_mb: float) -> list[str]:
    """Everything the soak must not show, as readable lines (empty when it passed)."""
    g = report.gauges
    problems = list(report.problems)
    if report.answered != report.requests:
        problems.append(f"{report.requests - report.answered} requests were never answered")
    if g["sessions_end"] or g["spawned_end"]:
        problems.append(f"left behind: {g['sessions_end']} sessions, {g['spawned_end']} spawned tasks")
    if g["tasks_end"] > g["tasks_start"] or g["fds_end"] > g["fds_start"]:
        problems.append(
            f"tasks {g['tasks_start']} -> {g['tasks_end']}, fds {g['fds_start']} -> {g['fds_end']}"
        )
    if g["children_end"] != g["children_start"]:
        problems.append(f"children {g['children_start']} -> {g['children_end']}")
    if zombies := [pid for _, pid in report.kills if alive(pid)]:
        problems.append(f"killed children still alive: {zombies}")
    if g["rss_end"] - g["rss_warm"] > rss_growth_mb:
        problems.append(
            f"RSS grew {g['rss_end'] - g['rss_warm']:.1f} MB after warm-up (bound {rss_growth_mb} MB)"
        )
    if report.results < report.requests / 2:
        problems.append(f"only {report.results} of {report.requests} calls succeeded")
    return problems


@contextlib.asynccontextmanager
async def inprocess_gateway(
    workdir: Path, servers: dict[str, dict[str, Any]]
) -> AsyncIterator[tuple[str, str, web.Application]]:
    """create_app() served as serve() serves it (handler cancellation on), on 127.0.0.1:<free port>."""
    import secrets

    from cryptography.fernet import Fernet

    from mcp_sse.app import create_app
    from mcp_sse.settings import Secret, Settings

    token = secrets.token_urlsafe(32)
    (workdir / "servers.json").write_text(json.dumps({"mcpServers": servers}))
    settings = Settings(
        auth_token=Secret(token),
        session_secret=Secret(Fernet.generate_key().decode()),
        audit_log=workdir / "audit.log",
        servers_file=workdir / "servers.json",
        **SOAK_SETTINGS,
    )
    app = create_app(settings)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}", token, app
    finally:
        await runner.cleanup()
