"""python -m bench.instructions: CPU instructions our gateway spends per tools/call, counted by callgrind.

A count, not a time: it repeats within a fraction of a percent from run to run whatever else the
machine is doing, so a change worth a few percent shows where timings on a shared VM cannot.
It counts the gateway's own user-space instructions only (not the kernel, the client or the child)
and says nothing of waiting; `python -m bench` remains the measure of speed.

    python -m bench.instructions                 # this checkout, legacy SSE and Streamable HTTP
    python -m bench.instructions DIR [DIR ...]   # directories holding other copies of mcp_sse

Needs valgrind (Debian's package `valgrind`). Everything runs on 127.0.0.1, as in `python -m bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from . import clients
from .procs import HERE, Processes


def _total(dump: Path) -> int:
    for line in dump.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {dump}")


async def per_call(source: Path, transport: str, calls: int, warmup: int, scratch: Path) -> float:
    """Instructions per call in the gateway from `source`, after `warmup` calls, over `calls` calls."""
    out = scratch / f"callgrind-{transport}-{abs(hash(source))}"
    wrapper = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    procs = Processes(scratch)
    try:
        # Several times slower under valgrind: more time to start and to answer.
        gateway = procs.ours(scratch / "servers.json", source=source, wrapper=wrapper, ready_timeout=300)
        async with clients.http_session() as http:
            url = gateway.url("sse" if transport == "sse" else "mcp")
            client = await clients.raw_client(http, transport, url, gateway.headers)
            await clients.timed_calls(client, warmup, budget=600)
            await _callgrind_control("--zero", gateway.pid)
            await clients.timed_calls(client, calls, budget=600)
            await _callgrind_control("--dump", gateway.pid)
            await client.close()
    finally:
        procs.stop_all()
    return _dumped(out) / calls


async def _callgrind_control(action: str, pid: int) -> None:
    control = await asyncio.create_subprocess_exec(
        "callgrind_control", action, str(pid), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    if await control.wait() != 0:
        raise RuntimeError(f"callgrind_control {action} failed")


def _dumped(out: Path) -> int:
    """The instructions counted between --zero and --dump (the dump callgrind numbers .1, .2, ...)."""
    dumps = [p for p in out.parent.glob(f"{out.name}.*") if p.suffix[1:].isdigit()]
    if not dumps:
        raise RuntimeError("callgrind wrote no dump")
    return max(_total(d) for d in dumps)


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.splitlines()[0])
    parser.add_argument(
        "sources", nargs="*", type=Path, help="directories holding mcp_sse (default: this checkout)"
    )
    parser.add_argument("--transport", choices=["sse", "streamable", "both"], default="both")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=200)
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind is not installed (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    sources = args.sources or [HERE.parent]
    transports = ["sse", "streamable"] if args.transport == "both" else [args.transport]
    print("| source | transport | instructions per call |\n|---|---|--:|")
    with tempfile.TemporaryDirectory(prefix="mcp-sse-instructions-") as tmp:
        for source in sources:
            for transport in transports:
                count = await per_call(source.resolve(), transport, args.calls, args.warmup, Path(tmp))
                print(f"| {source} | {transport} | {count / 1000:,.1f} k |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
