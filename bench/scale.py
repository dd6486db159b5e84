"""python -m bench scale: throughput at saturation with WORKERS=1 against WORKERS=2, and the latency
the hop adds to a 2025-era session when its request lands on an instance that does not own it.

Throughput: wrk (C, bench/saturation.lua) drives ours with WORKERS=1 and 2, both with REDIS_URL,
on the in-process twin of the child's tool (2025 sessions and 2026 stateless) and on the stdio
child; the same driver and rows as `python -m bench saturation --only scale`.

The hop: one session on instance A, serial raw calls sent to A directly and to B (which relays
them to A), interleaved for `--rounds` rounds; the added p50 is the median over rounds of
p50(via B) - p50(direct).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.fernet import Fernet

from .clients import RawStreamable, timed_calls
from .phases import percentile
from .procs import HOST, Gateway, Processes, free_port


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench scale", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds, hop and wrk (5)")
    parser.add_argument("--calls", type=int, default=300, help="serial hop calls per target per round (300)")
    parser.add_argument("--only", default="throughput,hop", help="throughput, hop or both (default)")
    parser.add_argument("--seconds", type=int, default=8, help="wrk's window per target per round (8)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (2)")
    parser.add_argument("--sessions", type=int, default=4, help="2025 sessions for the wrk rows (4)")
    parser.add_argument(
        "--quiet-wait", type=int, default=120, help="seconds to wait for a quiet machine before a run (120)"
    )
    return parser


def _start_redis(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("the scale row needs redis-server (apt-get install redis-server)")
    port = free_port()
    args = [server, "--bind", HOST, "--port", str(port), "--save", "", "--appendonly", "no"]
    process = subprocess.Popen([*args, "--dir", str(directory)], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done = subprocess.run(
            ["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True, check=False
        )
        if done.stdout.strip() == "PONG":
            return process, f"redis://{HOST}:{port}/0"
        time.sleep(0.1)
    process.kill()
    raise SystemExit("redis-server did not start")


def _ours(
    processes: Processes,
    tmp: Path,
    name: str,
    settings: dict[str, str],
    backend: dict[str, Any] | None = None,
) -> Gateway:
    settings = {"LOG_LEVEL": "INFO", **settings}
    gateway = processes.ours(tmp / f"{name}.json", name, backend=backend, settings=settings)
    log = tmp / f"{name}.log"
    workers = int(settings.get("WORKERS", "1"))
    marker = f"{workers} workers listening" if workers > 1 else "internal listener"
    deadline = time.monotonic() + 60
    while marker not in log.read_text(errors="replace"):  # every worker up, not just the first
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} never logged {marker!r}:\n{log.read_text()[-2000:]}")
        time.sleep(0.1)
    return gateway


async def _hop(a: Gateway, b: Gateway, token: str, args: argparse.Namespace) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as http_a, aiohttp.ClientSession() as http_b:
        direct = await RawStreamable(http_a, f"http://{HOST}:{a.port}/mcp", headers).open()
        relayed = RawStreamable(http_b, f"http://{HOST}:{b.port}/mcp", headers)
        relayed.headers = dict(direct.headers)  # the same session, sent to the instance that does not own it
        await timed_calls(relayed, 20)
        await timed_calls(direct, 20)
        added, p50s, p50d = [], [], []
        for _ in range(args.rounds):
            d = percentile(await timed_calls(direct, args.calls), 50)
            r = percentile(await timed_calls(relayed, args.calls), 50)
            p50d.append(d * 1000)
            p50s.append(r * 1000)
            added.append((r - d) * 1000)
        await direct.close()
    return {
        "direct_p50_ms": statistics.median(p50d),
        "relayed_p50_ms": statistics.median(p50s),
        "added_p50_ms": statistics.median(added),
        "rounds": {"direct_p50_ms": p50d, "relayed_p50_ms": p50s, "added_p50_ms": added},
    }


def _hop_run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    token, secret = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    processes = Processes(tmp)
    redis, url = _start_redis(tmp)
    try:
        shared = {"REDIS_URL": url, "AUTH_TOKEN": token, "SESSION_SECRET": secret}
        a = _ours(processes, tmp, "a", shared)
        b = _ours(processes, tmp, "b", shared)
        return asyncio.run(_hop(a, b, token, args))
    finally:
        processes.stop_all()
        redis.kill()
        redis.wait()


def main(argv: list[str]) -> int:
    from .saturation import load_average, run_record, save, scale_rows, scale_table, wrk_version

    args = _parser().parse_args(argv)
    only = set(args.only.split(","))
    if "throughput" in only and shutil.which("wrk") is None:
        print("python -m bench scale needs wrk for its throughput rows: apt-get install wrk", file=sys.stderr)
        return 2
    data = run_record(argv, args)
    with tempfile.TemporaryDirectory(prefix="mcp-sse-scale-") as tmp:
        if "throughput" in only:
            data["wrk"] = wrk_version()
            processes = Processes(Path(tmp))
            try:
                data["throughput"] = scale_rows(processes, args, Path(tmp))
            finally:
                processes.stop_all()
        if "hop" in only:
            data["hop"] = _hop_run(args, Path(tmp))
            print(f"hop: {data['hop']}", flush=True)
    data["load_after"] = load_average()
    out = [
        f"Run {data['date']}, `python -m bench scale {' '.join(argv)}`; load average (1 min) "
        f"before/after: {data['load_before']} / {data['load_after']}.",
        "",
    ]
    if "throughput" in data:
        out += [
            f"Throughput at saturation: wrk {data['wrk']}, {args.connections} connections on "
            f"{args.threads} threads, {args.seconds} s per target per round, {args.rounds} "
            f"interleaved rounds, medians; {args.sessions} sessions for the 2025 rows.",
            "",
            *scale_table(data["throughput"]),
            "",
        ]
    if "hop" in data:
        hop = data["hop"]
        out += [
            "| measure | value |",
            "|---|--:|",
            f"| 2025 session, p50 direct to its owner (ms) | {hop['direct_p50_ms']:.2f} |",
            f"| 2025 session, p50 through another instance (ms) | {hop['relayed_p50_ms']:.2f} |",
            f"| added by the hop, p50 (ms) | {hop['added_p50_ms']:.2f} |",
            "",
            "The direct and relayed rows are medians of each round's p50; the added row is the median of",
            "each round's difference (the rounds interleave, so drift of the machine falls on both).",
        ]
    save("scale", data, "\n".join(out) + "\n")
    return 0
