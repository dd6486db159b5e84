"""python -m bench saturation: throughput at saturation, with wrk (C) as the load generator.

A Python generator spends more CPU per call than the gateway it measures, on the same 2 cores,
so it measures itself. wrk spends a few microseconds per call, so what saturates is the gateways,
their children and the machine. Only answers that carry a JSON-RPC result count; an HTTP 200 is
not enough (the Lua script in bench/saturation.lua checks each body).

Two measurements, each in `--rounds` interleaved rounds (the order rotates), medians reported:

* **peers**: ours, supergateway 4.0.0 and mcp-proxy 0.13.0, each in front of the same child
  program (`mcp-server-time`), `--sessions` 2025-06-18 Streamable HTTP sessions each (opened
  first in Python: initialize, notifications/initialized), every wrk connection taking the next
  session in turn for each request. Ours and mcp-proxy serve all sessions from one child;
  supergateway starts one child per session, so with `--sessions 1` everyone has exactly one
  child. Ours has every security layer on, bearer authentication included.
* **scale**: ours with WORKERS=1 and WORKERS=2 (REDIS_URL set for both, so only the worker count
  differs): on the in-process twin of the child's tool (`bench/timetools.py`: no child, so the
  gateway's own CPU is what the workers divide), with 2025-06-18 sessions (a call that lands on
  the worker not owning its session is relayed to the owner) and with 2026-07-28 stateless calls
  (served by whichever worker accepts the connection); and on the stdio child (one per worker),
  stateless.

Each row also gives CPU per call, from schedstat: the gateway (its workers included), its MCP
children, wrk itself, and how many of the machine's CPUs were busy, so a reader sees who was the
ceiling. Before measuring, each target answers one request from the same wrk script (printed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from .clients import RawStreamable
from .procs import CHILD, HERE, Gateway, Processes, _descendants, busy_cpus, cpu_seconds, missing_peers
from .scale import _ours, _start_redis

RESULTS = HERE / "results"
LUA = HERE / "saturation.lua"
ACCEPT = "application/json, text/event-stream"
UNLIMITED = {"KEY_RATE_LIMIT_MAX_REQUESTS": "1000000000", "RATE_LIMIT_MAX_REQUESTS": "1000000000"}
MODERN = {
    "Accept": ACCEPT,
    "MCP-Protocol-Version": "2026-07-28",
    "Mcp-Method": "tools/call",
    "Mcp-Name": "get_current_time",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench saturation", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="peers,scale", help="peers, scale or both (default)")
    parser.add_argument("--seconds", type=int, default=8, help="wrk's window per target per round (8)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (2)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    parser.add_argument("--sessions", type=int, default=4, help="2025 sessions per target (4)")
    parser.add_argument(
        "--quiet-wait", type=int, default=120, help="seconds to wait for a quiet machine before a run (120)"
    )
    parser.add_argument("--label", default="saturation", help="results file name (saturation)")
    return parser


def _is_child(pid: int) -> bool:
    """Whether `pid` is the MCP server (`python -m mcp_server_time`), not a gateway or its worker."""
    try:
        return CHILD[2].encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _tree(pid: int) -> tuple[float, float]:
    """CPU seconds of (the gateway: the process and its workers, not its MCP children; the whole
    tree, children included)."""
    gateway = total = cpu_seconds(pid)
    for descendant in _descendants(pid):
        seconds = cpu_seconds(descendant)
        total += seconds
        gateway += 0.0 if _is_child(descendant) else seconds
    return gateway, total


def _machine() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields[:8]) - idle, sum(fields[:8])


def _wrk(
    url: str,
    headers: dict[str, str],
    era: str,
    args: argparse.Namespace,
    sessions: list[str],
    check: bool = False,
    seconds: int | None = None,
) -> dict[str, Any]:
    """One wrk run; `check`: one connection for three seconds, printing the first reply body."""
    threads, connections = (1, 1) if check else (args.threads, args.connections)
    seconds = 3 if check else seconds or args.seconds
    command = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s", "--timeout", "10s"]
    command += ["-s", str(LUA)]
    for name, value in {**headers, "Content-Type": "application/json"}.items():
        command += ["-H", f"{name}: {value}"]
    command += [url, "--", era, "show" if check else "quiet", *sessions]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout[-800:]} {done.stderr[-800:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    result["replies"] = [line[6:] for line in done.stdout.splitlines() if line.startswith("REPLY ")]
    return result


def _wait_quiet(limit: float) -> None:
    """Wait up to `limit` seconds for the machine to be quiet (under 0.3 CPUs busy over a second):
    other users' work on these cores would be measured as ours. Each row says how much remained."""
    deadline = time.monotonic() + limit
    while (busy := busy_cpus(1.0)) > 0.3 and time.monotonic() < deadline:
        print(f"  waiting: {busy:.2f} CPUs busy with other work", flush=True)
        time.sleep(4)


class Target:
    """A gateway, and the wrk request that drives it."""

    def __init__(
        self,
        gateway: Gateway,
        headers: dict[str, str],
        era: str,
        args: argparse.Namespace,
        sessions: list[str] | None = None,
    ) -> None:
        self.gateway, self.headers, self.era, self.args = gateway, headers, era, args
        self.url, self.sessions = gateway.url("mcp"), sessions or []
        self.redis_pid: int | None = None  # the scale rows' redis-server: its CPU is the target's too

    def check(self) -> str:
        """Three seconds of wrk on one connection: every reply must carry a result. Then a warm-up
        at full load (every worker starts its child, if it has one), not counted."""
        found = _wrk(self.url, self.headers, self.era, self.args, self.sessions, check=True)
        _wrk(self.url, self.headers, self.era, self.args, self.sessions, seconds=2)
        reply = found["replies"][0] if found["replies"] else "(none)"
        name = self.gateway.name
        print(f"{name}: wrk check {found['ok']} ok, {found['bad']} bad; one reply: {reply[:400]}")
        if found["ok"] == 0 or found["bad"]:
            raise RuntimeError(f"{self.gateway.name} does not answer wrk's tools/call correctly: {reply}")
        return reply

    def __call__(self) -> dict[str, Any]:
        pid = self.gateway.pid
        _wait_quiet(self.args.quiet_wait)
        own0, tree0 = _tree(pid)
        redis0 = cpu_seconds(self.redis_pid) if self.redis_pid else 0.0
        busy0, total0 = _machine()
        wrk0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.monotonic()
        found = _wrk(self.url, self.headers, self.era, self.args, self.sessions)
        wall = time.monotonic() - start
        wrk1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        busy1, total1 = _machine()
        own1, tree1 = _tree(pid)
        redis1 = cpu_seconds(self.redis_pid) if self.redis_pid else 0.0
        ok = max(1, found["ok"])
        busy = (busy1 - busy0) / max(1, total1 - total0) * (os.cpu_count() or 1)
        wrk_cpu = (wrk1.ru_utime + wrk1.ru_stime) - (wrk0.ru_utime + wrk0.ru_stime)
        return {
            "calls_per_s": found["ok"] / found["seconds"],
            "ok": found["ok"],
            "bad": found["bad"],
            "non2xx": found["non2xx"],
            "socket_errors": found["socket_errors"],
            "p50_ms": found["p50_us"] / 1000,
            "p99_ms": found["p99_us"] / 1000,
            "own_cpu_ms": (own1 - own0) * 1000 / ok,
            "tree_cpu_ms": (tree1 - tree0) * 1000 / ok,
            "child_cpu_ms": ((tree1 - tree0) - (own1 - own0)) * 1000 / ok,
            "wrk_cpu_ms": wrk_cpu * 1000 / ok,
            "redis_cpu_ms": (redis1 - redis0) * 1000 / ok if self.redis_pid else None,
            "busy_cpus": busy,
            "other_cpus": max(0.0, busy - ((tree1 - tree0) + (redis1 - redis0) + wrk_cpu) / wall),
        }


async def _sessions(gateway: Gateway, count: int) -> tuple[dict[str, str], list[str]]:
    """`count` 2025 sessions opened on `gateway`, each on its own connection (so with several
    workers they are owned by both): the headers their calls carry, and their ids (left open)."""
    ids, headers = [], {}
    for _ in range(count):
        async with aiohttp.ClientSession() as http:
            client = await RawStreamable(http, gateway.url("mcp"), dict(gateway.headers)).open()
            reply = await client.call(
                "tools/call", {"name": "get_current_time", "arguments": {"timezone": "UTC"}}
            )
            if "result" not in reply:
                raise RuntimeError(f"{gateway.name} did not answer a tools/call: {reply}")
            headers = dict(client.headers)
            ids.append(headers.pop("Mcp-Session-Id"))
    return headers, ids


def _rounds(targets: dict[str, Callable[[], dict[str, Any]]], rounds: int) -> dict[str, list[dict[str, Any]]]:
    names = list(targets)
    found: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            row = targets[name]()
            found[name].append(row)
            print(
                f"round {r + 1} {name}: {row['calls_per_s']:,.0f} calls/s, {row['bad']} bad, "
                f"p50 {row['p50_ms']:.2f} ms; per call: gateway {row['own_cpu_ms']:.3f} ms, "
                f"child {row['child_cpu_ms']:.3f} ms, wrk {row['wrk_cpu_ms']:.3f} ms; "
                f"{row['busy_cpus']:.2f} CPUs busy, {row['other_cpus']:.2f} of them other work",
                flush=True,
            )
    return found


def _median(rows: list[dict[str, Any]], field: str) -> float:
    return float(statistics.median(row[field] for row in rows))


def _ratios(rows: dict[str, list[dict[str, Any]]], a: str, b: str) -> list[float]:
    """a's calls/s over b's in each round (same round: the machine's drift falls on both)."""
    return [x["calls_per_s"] / max(1e-9, y["calls_per_s"]) for x, y in zip(rows[a], rows[b], strict=True)]


def _ratio(rows: dict[str, list[dict[str, Any]]], a: str, b: str) -> float:
    """The median over rounds of a's calls/s over b's."""
    return float(statistics.median(_ratios(rows, a, b)))


def _peers(processes: Processes, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    missing = missing_peers()
    if missing:
        raise SystemExit("peers missing; install them:\n" + "\n".join(missing.values()))
    gateways = {
        "ours": processes.ours(tmp / "ours.json", settings=UNLIMITED),
        "supergateway": processes.supergateway("mcp"),
        "mcp-proxy": processes.mcp_proxy(),
    }
    targets: dict[str, Callable[[], dict[str, Any]]] = {}
    replies = {}
    for name, gateway in gateways.items():
        headers, ids = asyncio.run(_sessions(gateway, args.sessions))
        target = Target(gateway, headers, "2025", args, ids)
        replies[name] = target.check()
        targets[name] = target
    rows = _rounds(targets, args.rounds)
    return {
        "sessions": args.sessions,
        "replies": replies,
        "rows": rows,
        "ours_vs_supergateway": _ratio(rows, "ours", "supergateway"),
        "ours_vs_mcp_proxy": _ratio(rows, "ours", "mcp-proxy"),
        "ours_vs_supergateway_rounds": _ratios(rows, "ours", "supergateway"),
        "ours_vs_mcp_proxy_rounds": _ratios(rows, "ours", "mcp-proxy"),
    }


SCALE_ROWS = (  # label, servers-file entry (None: the stdio child), era
    ("in-process, 2025 sessions", {"module": "bench.timetools:tools"}, "2025"),
    ("in-process, 2026 stateless", {"module": "bench.timetools:tools"}, "2026"),
    ("stdio child, 2026 stateless", None, "2026"),
)


def scale_rows(processes: Processes, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """WORKERS=1 against WORKERS=2 under wrk (also what `python -m bench scale` reports)."""
    redis, url = _start_redis(tmp)
    try:
        found: dict[str, Any] = {}
        for label, entry, era in SCALE_ROWS:
            targets: dict[str, Callable[[], dict[str, Any]]] = {}
            for workers in (1, 2):
                name = f"{label.replace(' ', '-').replace(',', '')}-workers{workers}"
                settings = {**UNLIMITED, "REDIS_URL": url, "WORKERS": str(workers)}
                gateway = _ours(processes, tmp, name, settings, backend=entry)
                if era == "2025":
                    headers, ids = asyncio.run(_sessions(gateway, args.sessions))
                    target = Target(gateway, headers, era, args, ids)
                else:
                    target = Target(gateway, {**gateway.headers, **MODERN}, era, args)
                target.redis_pid = redis.pid
                target.check()
                targets[f"WORKERS={workers}"] = target
            rows = _rounds(targets, args.rounds)
            found[label] = {
                "rows": rows,
                "two_vs_one": _ratio(rows, "WORKERS=2", "WORKERS=1"),
                "two_vs_one_rounds": _ratios(rows, "WORKERS=2", "WORKERS=1"),
            }
            processes.stop_all()
        return found
    finally:
        redis.kill()
        redis.wait()


HEADER = (
    "| target | correct calls/s | bad answers | p50 / p99 ms | gateway CPU per call ms | "
    "child CPU per call ms | Redis CPU per call ms | wrk CPU per call ms | CPUs busy (of {cpus}) | "
    "of them other work |\n"
    "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
)


def rows_table(label: str, found: dict[str, list[dict[str, Any]]]) -> list[str]:
    """One table line per target: medians over rounds (bad answers: summed)."""
    out = []
    for name, runs in found.items():
        bad = sum(r["bad"] + r["socket_errors"] for r in runs)
        redis = f"{_median(runs, 'redis_cpu_ms'):.3f}" if runs[0].get("redis_cpu_ms") is not None else "—"
        out.append(
            f"| {label}{name} | {_median(runs, 'calls_per_s'):,.0f} | {bad} | "
            f"{_median(runs, 'p50_ms'):.2f} / {_median(runs, 'p99_ms'):.2f} | "
            f"{_median(runs, 'own_cpu_ms'):.3f} | {_median(runs, 'child_cpu_ms'):.3f} | {redis} | "
            f"{_median(runs, 'wrk_cpu_ms'):.3f} | {_median(runs, 'busy_cpus'):.2f} | "
            f"{_median(runs, 'other_cpus'):.2f} |"
        )
    return out


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x ({min(values):.2f} to {max(values):.2f})"


def scale_table(found: dict[str, Any]) -> list[str]:
    out = [HEADER.format(cpus=os.cpu_count())]
    for label, block in found.items():
        out += rows_table(f"{label}, ", block["rows"])
    out += ["", "| WORKERS=2 ÷ WORKERS=1 (median of per-round ratios, range) | |", "|---|--:|"]
    out += [f"| {label} | **{_spread(block['two_vs_one_rounds'])}** |" for label, block in found.items()]
    return out


def _table(data: dict[str, Any]) -> str:
    a = data["args"]
    out = [
        f"Run {data['date']}, `python -m bench saturation {' '.join(data['argv'])}`; wrk "
        f"{data['wrk']}, {a['connections']} connections on {a['threads']} threads, "
        f"{a['seconds']:g} s per target per round, {a['rounds']} interleaved rounds, medians; "
        f"{a['sessions']} sessions per 2025 target. Load average (1 min) before/after: "
        f"{data['load_before']} / {data['load_after']}.",
        "",
    ]
    if "peers" in data:
        peers = data["peers"]
        out += [HEADER.format(cpus=os.cpu_count())]
        out += rows_table(f"{peers['sessions']} 2025 sessions: ", peers["rows"])
        out += [
            "",
            "| ratio (median of per-round ratios, range) | |",
            "|---|--:|",
            f"| ours ÷ supergateway | **{_spread(peers['ours_vs_supergateway_rounds'])}** |",
            f"| ours ÷ mcp-proxy | **{_spread(peers['ours_vs_mcp_proxy_rounds'])}** |",
            "",
        ]
    if "scale" in data:
        out += scale_table(data["scale"])
    return "\n".join(out) + "\n"


def load_average() -> str:
    """The 1-minute load average."""
    return Path("/proc/loadavg").read_text().split()[0]


def wrk_version() -> str:
    version = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    return (version.stdout or version.stderr).split()[1]


def run_record(argv: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """What every results file starts with: the command, its options, when, and the load before."""
    return {
        "argv": argv,
        "args": vars(args),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "load_before": load_average(),
    }


def save(label: str, data: dict[str, Any], table: str) -> None:
    """bench/results/<label>.{json,md}, and the table on stdout."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{label}.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    (RESULTS / f"{label}.md").write_text(table)
    print(table)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if shutil.which("wrk") is None:
        print("python -m bench saturation needs wrk: apt-get install wrk", file=sys.stderr)
        return 2
    data = {**run_record(argv, args), "wrk": wrk_version()}
    only = set(args.only.split(","))
    with tempfile.TemporaryDirectory(prefix="mcp-sse-saturation-") as tmp:
        processes = Processes(Path(tmp))
        try:
            if "peers" in only:
                data["peers"] = _peers(processes, args, Path(tmp))
                processes.stop_all()
            if "scale" in only:
                data["scale"] = scale_rows(processes, args, Path(tmp))
        finally:
            processes.stop_all()
    data["load_after"] = load_average()
    save(args.label, data, _table(data))
    return 0
