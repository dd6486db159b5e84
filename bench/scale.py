"""python -m bench scale: the scale row. Raw-generator throughput at saturation with WORKERS=1 and
WORKERS=2 (REDIS_URL set for both, so only the worker count differs), and the latency the hop adds
to a 2025-era session when its request lands on an instance that does not own it.

Throughput: `--generators` processes, each holding `--connections` raw Streamable HTTP sessions
of its own (one TCP connection each, so a session's requests stay on the worker that accepted it),
calling tools/call back to back for `--seconds`; the calls answered in that window, summed.
The hop: one session on instance A, serial raw calls sent to A directly and to B (which relays
them to A), interleaved for `--rounds` rounds; the added p50 is the median over rounds of
p50(via B) - p50(direct).
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
from .procs import HERE, HOST, Gateway, Processes, free_port

RESULTS = HERE / "results"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench scale", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window per run (10)")
    parser.add_argument("--generators", type=int, default=2, help="load-generator processes (2)")
    parser.add_argument("--connections", type=int, default=16, help="sessions per generator (16)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds for the hop (5)")
    parser.add_argument("--calls", type=int, default=300, help="serial calls per target per round (300)")
    parser.add_argument("--generate", nargs=2, metavar=("URL", "TOKEN"), help=argparse.SUPPRESS)
    return parser


async def _generate(url: str, token: str, connections: int, seconds: float) -> int:
    """One generator: open the sessions, say so, wait for the common start time on stdin, then
    count the answers that arrive within the window."""
    headers = {"Authorization": f"Bearer {token}"}
    https = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) for _ in range(connections)]
    try:
        clients = [await RawStreamable(http, f"{url}/mcp", headers).open() for http in https]
        print("ready", flush=True)
        start = float(await asyncio.to_thread(sys.stdin.readline))
        await asyncio.sleep(max(0.0, start - time.time()))
        end = start + seconds
        answered = 0

        async def loop(client: RawStreamable) -> None:
            nonlocal answered
            while time.time() < end:
                await timed_calls(client, 1)
                if time.time() <= end:
                    answered += 1

        await asyncio.gather(*(loop(c) for c in clients))
        return answered
    finally:
        for http in https:
            await http.close()


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


def _throughput(gateway: Gateway, token: str, args: argparse.Namespace) -> float:
    command = [sys.executable, "-m", "bench", "scale", "--connections", str(args.connections)]
    command += ["--seconds", str(args.seconds), "--generate", f"http://{HOST}:{gateway.port}", token]
    generators = [
        subprocess.Popen(command, cwd=HERE.parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(args.generators)
    ]
    for generator in generators:  # every session open before the window starts
        assert generator.stdout is not None and generator.stdout.readline().strip() == "ready"
    start = time.time() + 0.5
    total = sum(int(json.loads(g.communicate(f"{start}\n", timeout=600)[0])["answered"]) for g in generators)
    return total / args.seconds


async def _hop(a: Gateway, b: Gateway, token: str, args: argparse.Namespace) -> dict[str, float]:
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


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.generate:
        url, token = args.generate
        answered = asyncio.run(_generate(url, token, args.connections, args.seconds))
        print(json.dumps({"answered": answered}))
        return 0
    token, secret = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    data: dict[str, Any] = {"args": vars(args), "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    with tempfile.TemporaryDirectory(prefix="mcp-sse-scale-") as tmp:
        processes = Processes(Path(tmp))
        redis, url = _start_redis(Path(tmp))
        try:
            shared = {"REDIS_URL": url, "AUTH_TOKEN": token, "SESSION_SECRET": secret}
            for workers in (1, 2):
                gateway = _ours(
                    processes, Path(tmp), f"workers{workers}", {**shared, "WORKERS": str(workers)}
                )
                data[f"workers{workers}_calls_per_s"] = _throughput(gateway, token, args)
                print(f"WORKERS={workers}: {data[f'workers{workers}_calls_per_s']:.0f} calls/s", flush=True)
                processes.stop_all()
            a = _ours(processes, Path(tmp), "a", shared)
            b = _ours(processes, Path(tmp), "b", shared)
            data["hop"] = asyncio.run(_hop(a, b, token, args))
            print(f"hop: {data['hop']}", flush=True)
        finally:
            processes.stop_all()
            redis.kill()
            redis.wait()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    table = (
        "| measure | value |\n|---|--:|\n"
        f"| raw `tools/call`/s at saturation, WORKERS=1 | {data['workers1_calls_per_s']:,.0f} |\n"
        f"| raw `tools/call`/s at saturation, WORKERS=2 | {data['workers2_calls_per_s']:,.0f} |\n"
        f"| 2025 session, p50 direct to its owner (ms) | {data['hop']['direct_p50_ms']:.2f} |\n"
        f"| 2025 session, p50 through another instance (ms) | {data['hop']['relayed_p50_ms']:.2f} |\n"
        f"| added by the hop, p50 (ms) | {data['hop']['added_p50_ms']:.2f} |\n"
        "\nThe direct and relayed rows are medians of each round's p50; the added row is the median of\n"
        "each round's difference (the rounds interleave, so drift of the machine falls on both).\n"
    )
    (RESULTS / "scale.md").write_text(table)
    print(table)
    return 0
