"""python -m bench: mcp-sse against supergateway, mcp-proxy and the child spoken to directly.

Every measurement is repeated for several rounds, and within a round every target runs in
turn (the order rotates each round), so drift of the machine falls on all of them alike.
Ratios are taken within a round and the median over rounds is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from . import report
from .phases import Target, idle_streams, raw_latency, sdk_concurrent, sdk_serial
from .procs import HERE, Gateway, Processes, busy_cpus, check_child, missing_peers, raise_fd_limit
from .report import PEERS

RESULTS = HERE / "results"
Measure = Callable[[Target], Awaitable[dict[str, Any]]]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per measurement (5)")
    parser.add_argument("--calls", type=int, default=200, help="serial SDK calls per target per round (200)")
    parser.add_argument("--clients", type=int, default=10, help="concurrent SDK clients (10)")
    parser.add_argument("--client-calls", type=int, default=30, help="calls per concurrent client (30)")
    parser.add_argument("--raw-calls", type=int, default=300, help="raw calls per target per round (300)")
    parser.add_argument("--streams", type=int, default=1000, help="idle SSE streams held (1000; full: 10000)")
    parser.add_argument(
        "--hold-seconds",
        type=float,
        default=16.0,
        help="time calls while streams are held (16: > keep-alive)",
    )
    parser.add_argument(
        "--peers", default="supergateway,mcp-proxy", help="peers to run, comma separated ('' for none)"
    )
    parser.add_argument(
        "--idle-peers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="hold idle streams on the peers too",
    )
    parser.add_argument("--only", default="serial,concurrent,raw,idle", help="measurements to run")
    parser.add_argument(
        "--candidate",
        type=Path,
        help="also run the mcp_sse package found in this directory (an A/B of a patch)",
    )
    parser.add_argument(
        "--metrics-ab",
        action="store_true",
        help="also run ours with METRICS=off (ours-nometrics): what the metrics cost per call",
    )
    parser.add_argument("--label", help="results file name (default: quick, or full with --streams >= 10000)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if (hint := check_child()) is not None:
        print(f"mcp-server-time (the MCP server under test) is missing: {hint}", file=sys.stderr)
        return 2
    missing = missing_peers()
    for peer, command in missing.items():
        print(f"skipping {peer}: not installed. Install it with:\n    {command}", file=sys.stderr)
    peers = [p for p in args.peers.split(",") if p and p not in missing]
    # This process holds one socket per stream, and so does the gateway (it inherits the limit).
    fds = raise_fd_limit(args.streams + 1024)
    if fds < args.streams + 512:
        print(f"RLIMIT_NOFILE is {fds}: holding at most {fds - 512} streams", file=sys.stderr)
        args.streams = fds - 512
    label = args.label or ("full" if args.streams >= 10_000 else "quick")

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    # The SDK logs a traceback whenever a peer writes to a client that has gone; the faults are counted.
    logging.getLogger("mcp").setLevel(logging.CRITICAL)
    busy_before = _busy()  # before anything of ours runs
    with tempfile.TemporaryDirectory(prefix="mcp-sse-bench-") as tmp:
        processes = Processes(Path(tmp))
        try:
            data = asyncio.run(_run(args, peers, processes, Path(tmp)))
        except Exception:
            _show_logs(Path(tmp))
            raise
        except BaseException:  # Ctrl-C or SIGTERM, perhaps wrapped in an exception group by the SDK
            print("interrupted: stopping every process this run started", file=sys.stderr)
            return 130
        finally:
            processes.stop_all()
    data["environment"].update(busy_cpus_before=busy_before, busy_cpus_after=_busy())
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{label}.json").write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    table = report.markdown(data)
    (RESULTS / f"{label}.md").write_text(table)
    chart = report.chart(data, RESULTS / f"{label}.png")
    print(table)
    print(
        f"written: {RESULTS / f'{label}.json'}, {RESULTS / f'{label}.md'}" + (f", {chart}" if chart else "")
    )
    return 0


def _show_logs(directory: Path) -> None:
    for log in sorted(directory.glob("*.log")):
        tail = log.read_text(errors="replace")[-1500:]
        if tail.strip():
            print(f"--- {log.name}\n{tail}", file=sys.stderr)


def _targets(gateways: list[Gateway], transport: str) -> list[Target]:
    return [
        Target(g.name, transport, g.url(transport), tuple(g.headers.items()), g.pid)
        for g in gateways
        if (g.sse_path if transport == "sse" else g.mcp_path) is not None
    ]


async def _rounds(
    name: str, targets: list[Target], rounds: int, measure: Measure
) -> dict[str, list[dict[str, Any]]]:
    """Run `measure` on every target, round after round, rotating the order each round."""
    results: dict[str, list[dict[str, Any]]] = {t.label: [] for t in targets}
    for number in range(rounds):
        shift = number % len(targets)
        for target in targets[shift:] + targets[:shift]:
            started = time.perf_counter()
            try:
                outcome = await asyncio.wait_for(measure(target), 600)
            except Exception as exc:
                outcome = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            results[target.label].append(outcome)
            shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in outcome.items()}
            print(
                f"  {name} round {number + 1}/{rounds} {target.label:<18} {shown} "
                f"({time.perf_counter() - started:.1f} s)",
                flush=True,
            )
    return results


async def _run(args: argparse.Namespace, peers: list[str], processes: Processes, tmp: Path) -> dict[str, Any]:
    only = set(args.only.split(","))
    gateways = [processes.ours(tmp / "servers.json")]
    if args.candidate is not None:
        gateways.append(processes.ours(tmp / "candidate.json", "candidate", args.candidate.resolve()))
    if args.metrics_ab:  # ours keeps its metrics on (the default), this one has none
        gateways.append(processes.ours(tmp / "nometrics.json", "ours-nometrics", settings={"METRICS": "off"}))
    if "supergateway" in peers:
        upstream = processes.supergateway("mcp")
        gateways += [processes.supergateway("sse"), upstream]
        # Ours with a remote backend: supergateway's Streamable HTTP, so `ours-remote` against
        # `supergateway` is what putting our gateway in front of a remote server costs. Pinned to a
        # session: supergateway answers 2026-07-28 requests by starting a child for each.
        remote = processes.ours(
            tmp / "remote.json",
            "ours-remote",
            backend={"type": "http", "url": upstream.url("mcp"), "protocol": "2025-11-25"},
        )
        remote.note = (
            "ours-remote: our gateway with supergateway's Streamable HTTP (mcp) as its remote backend"
        )
        gateways.append(remote)
    if "mcp-proxy" in peers:
        gateways.append(processes.mcp_proxy())
    for gateway in gateways:
        paths = ", ".join(p for p in (gateway.sse_path, gateway.mcp_path) if p)
        print(f"started {gateway.name}: pid {gateway.pid}, http://127.0.0.1:{gateway.port} ({paths})")
    stdio = Target("stdio", "stdio")
    sse, streamable = _targets(gateways, "sse"), _targets(gateways, "mcp")
    data: dict[str, Any] = {"environment": _environment(args, gateways), "notes": _notes(gateways)}
    started = time.perf_counter()
    if "serial" in only:
        print("1. serial tools/call through the MCP SDK client", flush=True)
        data["serial"] = await _rounds(
            "serial", [*sse, *streamable, stdio], args.rounds, lambda t: sdk_serial(t, args.calls)
        )
    if "concurrent" in only:
        print(f"2. {args.clients} concurrent SDK clients on one shared child", flush=True)
        shared = [t for t in [*sse, *streamable] if t.label != "supergateway mcp"]  # one child per session
        data["concurrent"] = await _rounds(
            "concurrent", shared, args.rounds, lambda t: sdk_concurrent(t, args.clients, args.client_calls)
        )
    if "raw" in only:
        print("3. raw JSON-RPC latency", flush=True)
        data["raw"] = await _rounds(
            "raw", [*sse, *streamable, stdio], args.rounds, lambda t: raw_latency(t, args.raw_calls)
        )
    if "idle" in only:
        print(f"4. {args.streams} idle SSE streams", flush=True)
        data["idle"] = {}
        for gateway in gateways:
            if gateway.sse_path is None or (gateway.name in PEERS and not args.idle_peers):
                continue
            outcome = await idle_streams(
                gateway, args.streams, args.hold_seconds, open_timeout=300, calls=200
            )
            data["idle"][gateway.name] = outcome
            print(f"  idle {gateway.name:<18} {outcome}", flush=True)
    data["environment"]["seconds"] = round(time.perf_counter() - started, 1)
    return data


def _busy() -> float:
    """CPUs kept busy by other processes, taken while nothing of ours runs: a busy machine skews figures."""
    busy = round(busy_cpus(1.0), 2)
    if busy > 0.2:
        print(f"warning: other processes keep {busy} CPUs busy; figures will be noisy", file=sys.stderr)
    return busy


def _environment(args: argparse.Namespace, gateways: list[Gateway]) -> dict[str, Any]:
    def output(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=30).stdout.strip()
        except OSError:
            return ""

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "commit": output("git", "-C", str(HERE.parent), "describe", "--always", "--dirty"),
        "cpus": len(os.sched_getaffinity(0)),
        "cpu": next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        ),
        "python": platform.python_version(),
        "node": output("node", "--version"),
        "mcp_sdk": version("mcp"),
        "aiohttp": version("aiohttp"),
        # Ours runs with EVENT_LOOP=auto: on uvloop when this interpreter has it (the bench extra does).
        "event_loop": f"uvloop {version('uvloop')}" if find_spec("uvloop") else "asyncio",
        "mcp_server_time": version("mcp-server-time"),
        "peers": sorted({g.name for g in gateways} - {"ours"}),
        "args": vars(args),
    }


def _notes(gateways: list[Gateway]) -> list[str]:
    return [g.note for g in gateways if g.note]
