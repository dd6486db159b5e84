"""Real instances behind a real HAProxy, for the scale-out suites (and anyone who needs them later).

`start_cluster(n)` starts a redis-server of its own (tests/redis_server.py), N `server_secure.py`
processes sharing it, and HAProxy on a free loopback port doing plain round-robin (no stickiness,
each request balanced on its own: no `prefer-last-server`), with its stats page for proof that
every instance answered. It returns once /health answers through HAProxy from every instance.
Everything is stopped at the end of the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import os
import re
import secrets
import shutil
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from cryptography.fernet import Fernet

from ..conftest import Launched, launch
from ..redis_server import REDIS_SERVER, RedisServer
from ..test_cli import GATEWAY_VARIABLES

REPO = Path(__file__).resolve().parents[2]
SCRIPT = str(REPO / "server_secure.py")
HAPROXY = shutil.which("haproxy")
needs_haproxy = pytest.mark.skipif(
    HAPROXY is None or REDIS_SERVER is None,
    reason="haproxy and redis-server are needed (apt-get install haproxy redis-server)",
)
INSTANCE = re.compile(r"cluster instance ([0-9a-f]{8}): internal listener (\S+)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Instance:
    process: Launched
    port: int
    audit: Path

    @property
    def instance_ids(self) -> list[str]:
        """The 8-hex-digit prefixes of the cluster ids this process (or its workers) announced."""
        return [m[0] for m in INSTANCE.findall(self.process.stderr)]


@dataclass
class Cluster:
    redis: RedisServer
    token: str
    env: dict[str, str]
    directory: Path
    instances: list[Instance] = field(default_factory=list)
    proxy: Launched | None = None
    proxy_url: str = ""
    stats_url: str = ""

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def responses_by_server(self) -> dict[str, int]:
        """HAProxy's count of HTTP responses each instance gave (its stats page, as CSV)."""
        async with aiohttp.ClientSession() as http, http.get(f"{self.stats_url};csv") as response:
            text = (await response.text()).lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        counts = {}
        for row in rows:
            if row["pxname"] == "gateways" and row["svname"] not in ("FRONTEND", "BACKEND"):
                counts[row["svname"]] = sum(int(row[f"hrsp_{c}xx"] or 0) for c in range(1, 6))
        return counts


def instance_env(cluster: Cluster, port: int, audit: Path, **extra: str) -> dict[str, str]:
    return {
        **cluster.env,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "AUDIT_LOG": str(audit),
        **extra,
    }


async def start_instance(cluster: Cluster, number: int, **extra: str) -> Instance:
    port = free_port()
    audit = cluster.directory / f"audit-{number}.log"
    process = await launch(
        [sys.executable, SCRIPT, "--env-file", str(cluster.directory / "empty.env")],
        env=instance_env(cluster, port, audit, **extra),
        cwd=cluster.directory,
        until="internal listener",
    )
    return Instance(process, port, audit)


def haproxy_config(front: int, stats: int, ports: list[int]) -> str:
    servers = "\n".join(
        f"    server gw{i} 127.0.0.1:{port} check inter 300ms fall 1 rise 1" for i, port in enumerate(ports)
    )
    return f"""\
global
    maxconn 2000

defaults
    mode http
    timeout connect 2s
    timeout client 300s
    timeout server 300s
    # SSE streams are long responses: the server timeout above bounds a silent one.
    option redispatch
    retries 2

frontend mcp
    bind 127.0.0.1:{front}
    default_backend gateways

backend gateways
    balance roundrobin
    # HTTP/1.1 with a Host the gateway accepts (HTTP/1.0 without one is refused, as any would be).
    option httpchk
    http-check send meth GET uri /health ver HTTP/1.1 hdr Host 127.0.0.1
{servers}

listen stats
    bind 127.0.0.1:{stats}
    stats enable
    stats uri /stats
"""


async def start_proxy(cluster: Cluster) -> None:
    assert HAPROXY is not None
    front, stats = free_port(), free_port()
    config = cluster.directory / "haproxy.cfg"
    config.write_text(haproxy_config(front, stats, [i.port for i in cluster.instances]))
    process = await asyncio.create_subprocess_exec(
        HAPROXY, "-db", "-f", str(config),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    lines: list[str] = []

    async def drain() -> None:
        assert process.stderr is not None
        while raw := await process.stderr.readline():
            lines.append(raw.decode(errors="replace").rstrip("\n"))

    cluster.proxy = Launched(process, f"http://127.0.0.1:{front}", lines, asyncio.create_task(drain()))
    cluster.proxy_url = f"http://127.0.0.1:{front}"
    cluster.stats_url = f"http://127.0.0.1:{stats}/stats"
    await wait_ready(cluster)


async def wait_ready(cluster: Cluster, timeout: float = 30) -> None:
    """Until HAProxy sees every instance up (its health checks) and /health answers through it."""
    last = ""
    try:
        async with asyncio.timeout(timeout), aiohttp.ClientSession() as http:
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{cluster.stats_url};csv") as response:
                        last = (await response.text()).lstrip("# ")
                    rows = [r for r in csv.DictReader(io.StringIO(last)) if r["pxname"] == "gateways"]
                    up = [
                        r for r in rows if r["svname"] not in ("FRONTEND", "BACKEND") and r["status"] == "UP"
                    ]
                    if len(up) == len(cluster.instances):
                        async with http.get(
                            f"{cluster.proxy_url}/health", headers=cluster.headers
                        ) as response:
                            if response.status == 200:
                                return
                await asyncio.sleep(0.1)
    except TimeoutError:
        lines = cluster.proxy.lines if cluster.proxy else []
        raise AssertionError("HAProxy never saw every instance up:\n" + last + "\n".join(lines)) from None


StartCluster = Callable[..., Awaitable[Cluster]]


@pytest.fixture
async def start_cluster(tmp_path: Path) -> AsyncIterator[StartCluster]:
    """start_cluster(n, **env): n instances sharing a redis-server, behind HAProxy."""
    started: list[Cluster] = []

    async def start(count: int, **extra: str) -> Cluster:
        directory = tmp_path / f"cluster{len(started)}"
        directory.mkdir()
        (directory / "empty.env").write_text("")
        redis = RedisServer(directory)
        await asyncio.to_thread(redis.start)
        clean = {k: v for k, v in os.environ.items() if k not in GATEWAY_VARIABLES}
        env = {
            **clean,
            "HOME": str(directory),
            "AUTH_TOKEN": secrets.token_urlsafe(32),
            "SESSION_SECRET": Fernet.generate_key().decode(),  # the same everywhere: it signs the hops
            "REDIS_URL": redis.url(0),
            "HEALTH_PUBLIC": "true",  # HAProxy's health check has no key
            "RATE_LIMIT_MAX_REQUESTS": "100000",
            **extra,
        }
        cluster = Cluster(redis, env["AUTH_TOKEN"], env, directory)
        started.append(cluster)
        cluster.instances = list(await asyncio.gather(*(start_instance(cluster, n) for n in range(count))))
        await start_proxy(cluster)
        return cluster

    yield start
    for cluster in started:
        processes = [i.process for i in cluster.instances] + ([cluster.proxy] if cluster.proxy else [])
        await asyncio.gather(*(p.stop() for p in processes), return_exceptions=True)
        cluster.redis.stop()
