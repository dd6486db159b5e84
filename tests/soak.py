"""The long soak, the same workload as tests/reliability/test_soak.py for as long as you like.

    python -m tests.soak --minutes 30            # from the repository root, in the test virtualenv
    python -m tests.soak --minutes 120 --kill-every 45 --callers 8 --rss-growth-mb 40

It serves create_app() in this process (as `serve()` does, handler cancellation on) with two
real children, the SDK test server and the fault server, and runs for the given time:
tool calls over both transports with every answer checked, a client driving the fault
child (hangs, garbage, floods, oversize lines), stream churn with mid-request disconnects,
a rotating sample of the hostile corpus, and a SIGKILL of a child every --kill-every seconds
(default 35: more than the 30 s after which a run counts as stable, so deliberate kills are
never taken for a crash loop). It prints a progress line a minute and a summary, and exits 1
if any request went unanswered or wrong, anything leaked (sessions, tasks, fds, children),
a killed child survived, or RSS grew more than --rss-growth-mb after the warm-up.

RSS is this process's (gateway and clients share it), compared between the end of the
warm-up and the end. The gateway's audit lines and logs go to stderr: `2>soak.log` keeps
the summary readable. Not collected by pytest (the file name does not start with test_).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
from pathlib import Path

from tests.reliability.workload import inprocess_gateway, run_soak, soak_problems, soak_servers


async def main(args: argparse.Namespace) -> int:
    seconds = args.minutes * 60
    with tempfile.TemporaryDirectory(prefix="mcp-sse-soak-") as workdir:
        async with inprocess_gateway(Path(workdir), soak_servers()) as (url, token, app):
            print(
                f"soak: {url}, {args.minutes:g} min, a child killed every {args.kill_every:g} s", flush=True
            )
            progress = asyncio.create_task(_progress(app))
            try:
                report = await run_soak(
                    url,
                    token,
                    app,
                    seconds=seconds,
                    kill_every=args.kill_every,
                    callers=args.callers,
                    seed=args.seed,
                )
            finally:
                progress.cancel()
    print(f"soak: {report.summary()}")
    problems = soak_problems(report, rss_growth_mb=args.rss_growth_mb)
    for line in problems[:100]:
        print(f"FAIL: {line}")
    print("soak: PASSED" if not problems else f"soak: FAILED ({len(problems)} problems)")
    return 1 if problems else 0


async def _progress(app: object) -> None:
    from tests.reliability.workload import gauges

    minute = 0
    while True:
        await asyncio.sleep(60)
        minute += 1
        print(f"soak: minute {minute}: {gauges(app)}", flush=True)  # type: ignore[arg-type]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="how long to run (default 30)")
    parser.add_argument(
        "--kill-every", type=float, default=35.0, help="seconds between child kills (default 35)"
    )
    parser.add_argument("--callers", type=int, default=4, help="concurrent calling clients (default 4)")
    parser.add_argument(
        "--rss-growth-mb", type=float, default=40.0, help="allowed RSS growth after warm-up (default 40)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--log-level", default="ERROR")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse(sys.argv[1:])
    logging.basicConfig(
        level=arguments.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    raise SystemExit(asyncio.run(main(arguments)))
