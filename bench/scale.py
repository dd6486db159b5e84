"""python -m bench scale: the latency the hop adds to a 2025-era session when its request lands on
an instance that does not own it. (Throughput at saturation with WORKERS=1 and 2 is `python -m
bench saturation`'s scale rows, under wrk.)

One session on instance A, serial raw calls sent to A directly and to B (which relays them to A),
interleaved for `--rounds` rounds; the added p50 is the median over rounds of p50(via B) -
p50(direct).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
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
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds for the hop (5)")
    parser.add_argument("--calls", type=int, default=300, help="serial calls per target per round (300)")
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
    token, secret = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    data: dict[str, Any] = {"args": vars(args), "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    with tempfile.TemporaryDirectory(prefix="mcp-sse-scale-") as tmp:
        processes = Processes(Path(tmp))
        redis, url = _start_redis(Path(tmp))
        try:
            shared = {"REDIS_URL": url, "AUTH_TOKEN": token, "SESSION_SECRET": secret}
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
        f"| 2025 session, p50 direct to its owner (ms) | {data['hop']['direct_p50_ms']:.2f} |\n"
        f"| 2025 session, p50 through another instance (ms) | {data['hop']['relayed_p50_ms']:.2f} |\n"
        f"| added by the hop, p50 (ms) | {data['hop']['added_p50_ms']:.2f} |\n"
        "\nThe direct and relayed rows are medians of each round's p50; the added row is the median of\n"
        "each round's difference (the rounds interleave, so drift of the machine falls on both).\n"
    )
    (RESULTS / "scale.md").write_text(table)
    print(table)
    return 0
