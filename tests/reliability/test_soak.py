"""The short soak: ~20 s of mixed calls, stream churn, hostile input and child kills (see workload.py).

The long one is the same code: `python -m tests.soak --minutes 30`.
"""

from __future__ import annotations

import logging

import pytest

from tests.conftest import StartGateway
from tests.reliability.workload import SOAK_SETTINGS, run_soak, soak_problems, soak_servers

pytestmark = pytest.mark.slow  # long: `pytest -m 'not slow'` skips it in a quick local loop; CI runs it

SECONDS = 20.0
KILL_EVERY = 6.0  # at most 2 kills per backend: well under a crash loop (5 exits within 30 s)
RSS_GROWTH_MB = 25.0


async def test_short_soak(start_gateway: StartGateway, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    gw = await start_gateway(soak_servers(), **SOAK_SETTINGS)
    report = await run_soak(gw.url, gw.token, gw.app, seconds=SECONDS, kill_every=KILL_EVERY)
    print(f"[measure] short soak: {report.summary()}")
    problems = soak_problems(report, rss_growth_mb=RSS_GROWTH_MB)
    assert problems == [], "\n".join(problems[:40])
    assert len(report.kills) >= 2 and all(report.restarts.values()), (report.kills, report.restarts)
    assert report.hostile_sent > 300 and report.requests > 200
    # Nothing the workload did made the gateway's own code fail.
    failures = [
        r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("asyncio")
    ]
    assert failures == [], failures[:10]
