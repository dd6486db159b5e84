"""The README's client script, run as a reader would: the exact code block, as a file, by the real
interpreter, against `python server_secure.py` on a loopback port."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import Launched, launch

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
# Wraps the script: records the timeout of every httpx2 client it makes, then runs it unchanged.
SPY = """\
import json, runpy, sys
import httpx2
made = httpx2.AsyncClient.__init__
def spy(self, *args, **kwargs):
    made(self, *args, **kwargs)
    print("timeout:", json.dumps(self.timeout.as_dict()), file=sys.stderr)
httpx2.AsyncClient.__init__ = spy
runpy.run_path(sys.argv[1], run_name="__main__")
"""


def python_block(title: str) -> str:
    """The one ```python block of the README section `## title`."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    blocks = re.findall(r"^```python\n(.*?)^```$", text[start : end if end > 0 else None], re.S | re.M)
    assert len(blocks) == 1, f"expected one python block under '## {title}', found {len(blocks)}"
    return str(blocks[0])


@pytest.fixture
def token() -> str:
    return secrets.token_urlsafe(32)


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Only what a fresh shell has: the developer's settings cannot change what is tested."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {"PATH": os.environ["PATH"], "HOME": str(home), "LANG": "C.UTF-8", **extra}


@pytest.fixture
async def gateway(tmp_path: Path, token: str) -> AsyncIterator[Launched]:
    """The README's first command, `python server_secure.py`, on any free loopback port."""
    env = clean_env(tmp_path, AUTH_TOKEN=token, AUDIT_LOG=str(tmp_path / "audit.log"))
    argv = [sys.executable, str(REPO / "server_secure.py"), "--port", "0", "--env-file", os.devnull]
    server = await launch(argv, env=env, cwd=tmp_path)
    try:
        yield server
    finally:
        assert await server.stop() == 0


async def run_script(tmp_path: Path, *argv: str, env: dict[str, str]) -> tuple[str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *argv,
        cwd=tmp_path,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    return out.decode(), err.decode()


async def test_connect_a_client_script_runs(tmp_path: Path, gateway: Launched, token: str) -> None:
    script = tmp_path / "client.py"
    script.write_text(python_block("Connect a client"))
    env = clean_env(tmp_path, AUTH_TOKEN=token, MCP_SSE_URL=gateway.url)
    out, _ = await run_script(tmp_path, str(script), env=env)
    assert out == "hello\n"


async def test_connect_a_client_script_waits_for_slow_tools(
    tmp_path: Path, gateway: Launched, token: str
) -> None:
    # httpx2's default (5 s for every phase) fails any tool call that takes longer over /mcp.
    script = tmp_path / "client.py"
    script.write_text(python_block("Connect a client"))
    env = clean_env(tmp_path, AUTH_TOKEN=token, MCP_SSE_URL=gateway.url)
    out, err = await run_script(tmp_path, "-c", SPY, str(script), env=env)
    assert out == "hello\n"
    timeouts = [json.loads(line[9:]) for line in err.splitlines() if line.startswith("timeout: ")]
    assert timeouts, err
    for timeout in timeouts:
        assert timeout["read"] is None or timeout["read"] >= 60, timeouts
