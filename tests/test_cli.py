"""The command line as users run it: real `python server_secure.py` processes on real ports."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from mcp_sse.settings import Settings
from tests.conftest import Launched, launch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "server_secure.py")
# Every variable the gateway reads, so the developer's shell cannot change what is tested.
# Every setting, and what systemd passes: a developer's shell must not change these tests.
GATEWAY_VARIABLES = {f.metadata["env"] for f in dataclasses.fields(Settings) if "env" in f.metadata} | {
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "STATE_DIRECTORY",
}


def _ours(name: str) -> bool:
    return name in GATEWAY_VARIABLES or name.startswith("OTEL_")  # OpenTelemetry's own (ops/tracing.py)


TOKEN_LINE = re.compile(r"^\s*export AUTH_TOKEN=(\S+)\s*$")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir()
    clean = {k: v for k, v in os.environ.items() if not _ours(k)}
    # The audit log defaults to ./secure-server.log: keep it out of the repository.
    return {**clean, "HOME": str(home), "AUDIT_LOG": str(tmp_path / "audit.log")}


@pytest.fixture
def empty_env_file(tmp_path: Path) -> str:
    # An explicit, empty settings file: a developer's ./.env must not change these tests.
    path = tmp_path / "empty.env"
    path.write_text("")
    return str(path)


@pytest.fixture
def occupied_port() -> Iterator[int]:
    """A port with a listener on every IPv4 address: anything that tries to bind it fails."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        yield sock.getsockname()[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def serve(*args: str, env: dict[str, str], until: str | None = None) -> AsyncIterator[Launched]:
    """Start server_secure.py, wait for its `listening on` line (and `until`), stop it at the end."""
    server = await launch(
        [sys.executable, SCRIPT, *args], env=env, cwd=REPO, until=until, stdout=asyncio.subprocess.PIPE
    )
    try:
        yield server
    finally:
        if server.process.returncode is None:
            server.process.kill()
            await server.process.wait()


async def get_health(url: str, token: str | None) -> tuple[int, dict[str, str]]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with aiohttp.ClientSession() as http, http.get(f"{url}/health", headers=headers) as response:
        await response.read()
        return response.status, dict(response.headers)


def run(*args: str, env: dict[str, str], timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# -- refusing to start -------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1", "::"])
def test_public_host_without_token_refuses_before_binding(
    host: str, env: dict[str, str], empty_env_file: str, occupied_port: int
) -> None:
    # Binding first would fail differently (address in use / not available, exit 1): exit 2 naming
    # AUTH_TOKEN proves the refusal came before any socket.
    done = run(SCRIPT, "--host", host, "--port", str(occupied_port), "--env-file", empty_env_file, env=env)
    assert done.returncode == 2, done.stderr
    assert "AUTH_TOKEN" in done.stderr
    assert host in done.stderr
    assert "Traceback" not in done.stderr
    assert "in use" not in done.stderr and "assign" not in done.stderr
    assert "listening" not in done.stderr
    assert "Bearer" not in done.stdout + done.stderr  # no token was generated for a public address


def test_public_host_from_environment_with_empty_token_refuses(
    env: dict[str, str], empty_env_file: str, occupied_port: int
) -> None:
    env = {**env, "HOST": "0.0.0.0", "PORT": str(occupied_port), "AUTH_TOKEN": ""}
    done = run(SCRIPT, "--env-file", empty_env_file, env=env)
    assert done.returncode == 2, done.stderr
    assert "AUTH_TOKEN" in done.stderr


# -- loopback with a generated token -----------------------------------------------------------


async def test_loopback_generates_a_token_once_and_serves(env: dict[str, str], empty_env_file: str) -> None:
    args = ("--host", "127.0.0.1", "--port", "0", "--env-file", empty_env_file)
    async with serve(*args, env=env, until="mcpServers") as server:
        labelled = [m.group(1) for line in server.lines if (m := TOKEN_LINE.match(line))]
        assert len(labelled) == 1, server.stderr
        token = labelled[0]
        assert len(token) >= 32
        port = int(server.url.rsplit(":", 1)[1])
        assert port != 0

        config_line = next(line for line in server.lines if "mcpServers" in line)
        desktop = json.loads(config_line)
        (entry,) = desktop["mcpServers"].values()
        assert entry["command"] == "npx"
        assert "mcp-remote" in entry["args"]
        assert f"{server.url}/sse" in entry["args"]
        assert "Authorization: Bearer ${AUTH_TOKEN}" in entry["args"]  # mcp-remote expands it from "env"
        assert set(entry["env"]) == {"AUTH_TOKEN"}
        assert f'curl -H "Authorization: Bearer $AUTH_TOKEN" {server.url}/health' in server.stderr

        status, _ = await get_health(server.url, token)
        assert status == 200
        status, headers = await get_health(server.url, None)
        assert status == 401
        assert headers["WWW-Authenticate"].startswith("Bearer")
        status, headers = await get_health(server.url, token + "x")
        assert status == 401
        assert headers["WWW-Authenticate"].startswith("Bearer")
        status, _ = await get_health(server.url, "")
        assert status == 401

        assert await server.stop() == 0
        stdout = await server.process.stdout.read() if server.process.stdout else b""
    # Printed once, on its labelled line; not in the config, a log line, stdout, or at shutdown.
    with_token = [line.strip() for line in server.lines if token in line]
    assert with_token == [f"export AUTH_TOKEN={token}"], with_token
    assert token.encode() not in stdout


# -- where settings come from ------------------------------------------------------------------


async def test_token_from_env_file(env: dict[str, str], tmp_path: Path) -> None:
    env_file = tmp_path / "gateway.env"
    env_file.write_text("# settings\nexport AUTH_TOKEN='file-token-0123456789abcdef'\n")
    async with serve("--host", "127.0.0.1", "--port", "0", "--env-file", str(env_file), env=env) as server:
        assert (await get_health(server.url, "file-token-0123456789abcdef"))[0] == 200
        assert (await get_health(server.url, "something-else"))[0] == 401
        assert await server.stop() == 0
    assert "Authorization: Bearer" not in server.stderr  # nothing generated, nothing printed
    assert "file-token-0123456789abcdef" not in server.stderr


async def test_environment_wins_over_env_file(env: dict[str, str], tmp_path: Path) -> None:
    env_file = tmp_path / "gateway.env"
    env_file.write_text("AUTH_TOKEN=file-token-0123456789abcdef\n")
    env = {**env, "AUTH_TOKEN": "env-token-0123456789abcdef"}
    async with serve("--host", "127.0.0.1", "--port", "0", "--env-file", str(env_file), env=env) as server:
        assert (await get_health(server.url, "env-token-0123456789abcdef"))[0] == 200
        assert (await get_health(server.url, "file-token-0123456789abcdef"))[0] == 401
        assert await server.stop() == 0


@pytest.mark.parametrize("where", ["environment", "env-file"])
async def test_port_argument_wins_over_port_setting(
    env: dict[str, str], tmp_path: Path, occupied_port: int, where: str
) -> None:
    # PORT names a port that cannot be bound: starting at all shows --port was used instead.
    env_file = tmp_path / "gateway.env"
    env_file.write_text(f"PORT={occupied_port}\n" if where == "env-file" else "")
    if where == "environment":
        env = {**env, "PORT": str(occupied_port)}
    wanted = free_port()
    args = ("--host", "127.0.0.1", "--port", str(wanted), "--env-file", str(env_file))
    async with serve(*args, env={**env, "AUTH_TOKEN": "t" * 32}) as server:
        assert server.url == f"http://127.0.0.1:{wanted}"
        assert (await get_health(server.url, "t" * 32))[0] == 200
        assert await server.stop() == 0


async def test_port_zero_argument_is_not_treated_as_unset(env: dict[str, str], occupied_port: int) -> None:
    env = {**env, "PORT": str(occupied_port), "AUTH_TOKEN": "t" * 32}
    async with serve("--host", "127.0.0.1", "--port", "0", "--env-file", os.devnull, env=env) as server:
        assert int(server.url.rsplit(":", 1)[1]) not in (0, occupied_port)
        assert (await get_health(server.url, "t" * 32))[0] == 200
        assert await server.stop() == 0


# -- the event loop ----------------------------------------------------------------------------


@pytest.fixture
def without_uvloop(tmp_path: Path) -> str:
    """A PYTHONPATH entry on which `import uvloop` fails, as on a machine without the fast extra."""
    shim = tmp_path / "shim" / "uvloop"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('uvloop is not installed here')\n")
    return os.pathsep.join([str(shim.parent), str(REPO)])


@pytest.mark.parametrize(
    ("choice", "uvloop_installed", "runs_on"),
    [
        ("auto", True, "uvloop"),
        ("auto", False, "asyncio"),
        ("asyncio", True, "asyncio"),
        ("uvloop", True, "uvloop"),
    ],
)
async def test_event_loop_setting_chooses_the_loop(
    env: dict[str, str], without_uvloop: str, choice: str, uvloop_installed: bool, runs_on: str
) -> None:
    env = {**env, "EVENT_LOOP": choice, "AUTH_TOKEN": "t" * 32}
    if not uvloop_installed:
        env["PYTHONPATH"] = without_uvloop
    async with serve("--host", "127.0.0.1", "--port", "0", "--env-file", os.devnull, env=env) as server:
        assert f"(event loop: {runs_on})" in server.stderr
        assert (await get_health(server.url, "t" * 32))[0] == 200
        assert await server.stop() == 0


def test_event_loop_uvloop_without_uvloop_is_refused(env: dict[str, str], without_uvloop: str) -> None:
    env = {**env, "EVENT_LOOP": "uvloop", "AUTH_TOKEN": "t" * 32, "PYTHONPATH": without_uvloop}
    done = run(SCRIPT, "--host", "127.0.0.1", "--port", "0", "--env-file", os.devnull, env=env)
    assert done.returncode == 2, done.stderr
    assert "mcp-sse[fast]" in done.stderr and "Traceback" not in done.stderr


def test_unknown_event_loop_is_refused(env: dict[str, str]) -> None:
    env = {**env, "EVENT_LOOP": "trio", "AUTH_TOKEN": "t" * 32}
    done = run(SCRIPT, "--host", "127.0.0.1", "--port", "0", "--env-file", os.devnull, env=env)
    assert done.returncode == 2, done.stderr
    assert "EVENT_LOOP must be auto, asyncio or uvloop" in done.stderr


def test_sigterm_right_after_bind_is_a_graceful_stop(env: dict[str, str]) -> None:
    # Deterministic version of a race seen in practice: the signal arrives the moment the port is open.
    script = (
        "import os, signal, sys\n"
        "from aiohttp import web\n"
        "from mcp_sse import cli\n"
        "original = web.TCPSite.start\n"
        "async def start_then_sigterm(self):\n"
        "    await original(self)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "web.TCPSite.start = start_then_sigterm\n"
        "sys.exit(cli.main(['--host', '127.0.0.1', '--port', '0', '--env-file', os.devnull]))\n"
    )
    done = run("-c", script, env=env)
    assert done.returncode == 0, done.stderr
    assert "shutting down" in done.stderr


# -- help ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", [("-m", "mcp_sse"), (SCRIPT,)], ids=["module", "script"])
def test_help(env: dict[str, str], form: tuple[str, ...]) -> None:
    done = run(*form, "--help", env=env)
    assert done.returncode == 0, done.stderr
    assert "--host" in done.stdout and "--port" in done.stdout and "--config" in done.stdout
    assert done.stderr == ""


# -- --check-config and --check: would each backend's child start? ------------------------------


@pytest.fixture
def bare_python(tmp_path: Path) -> Path:
    """A directory whose `python` is a real interpreter with nothing installed, as on a machine where
    `pip install .` ran but `pip install mcp-server-time` did not."""
    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    return venv / "bin"


def check_config(
    tmp_path: Path, servers: dict[str, object], env: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "servers.json"
    path.write_text(json.dumps({"mcpServers": servers}))
    command = args or ("--check-config",)
    return run(SCRIPT, *command, "--config", str(path), "--env-file", os.devnull, env=env)


TIME = ["-m", "mcp_server_time"]


def test_check_config_passes_backends_that_start(env: dict[str, str], tmp_path: Path) -> None:
    script = tmp_path / "srv" / "serve.sh"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\nexec true\n")
    script.chmod(0o755)
    servers = {
        "time": {"command": sys.executable, "args": TIME},
        "clustered": {"command": sys.executable, "args": ["-Im", "mcp_server_time"]},
        "relative": {"command": "./serve.sh", "cwd": str(script.parent)},  # found from its own cwd
        "script": {"command": sys.executable, "args": [str(script)]},  # not -m: nothing to import
        "mine": {"module": "tests.servers.custom_tools:tools"},
    }
    done = check_config(tmp_path, servers, {**env, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert done.stdout == "ok: 5 backend(s): time, clustered, relative, script, mine\n"


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (
            {"command": "no-such-mcp-server"},
            ["backend 'broken'", "'no-such-mcp-server' not found on the child's PATH", "absolute path"],
        ),
        (
            {"command": sys.executable, "args": ["-m", "no_such_mcp_module"]},
            ["backend 'broken'", "cannot import 'no_such_mcp_module'", "-m pip install no-such-mcp-module"],
        ),
        (
            {"command": sys.executable, "args": ["-m", "json"]},
            ["backend 'broken'", "'json' is a package without __main__"],
        ),
        (
            {"command": "./serve.sh", "cwd": "/"},
            ["backend 'broken'", "'./serve.sh' is not an executable file (relative to its cwd '/')"],
        ),
        (
            {"command": "true", "cwd": "/no/such/dir"},
            ["backend 'broken'", "'/no/such/dir' is not a directory"],
        ),
    ],
    ids=["not-on-path", "module-missing", "package-without-main", "relative-to-cwd", "no-cwd"],
)
def test_check_config_names_the_backend_that_cannot_start(
    env: dict[str, str], tmp_path: Path, entry: dict[str, object], expected: list[str]
) -> None:
    servers = {"good": {"command": sys.executable, "args": TIME}, "broken": entry}
    done = check_config(tmp_path, servers, env)
    assert done.returncode == 1, done.stdout
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    for text in expected:
        assert text in line
    assert "Traceback" not in done.stderr


def test_check_config_resolves_python_on_the_childs_path(
    env: dict[str, str], tmp_path: Path, bare_python: Path
) -> None:
    # The same entry is good or not depending on which `python` the child's PATH finds first.
    servers: dict[str, object] = {"time": {"command": "python", "args": TIME}}
    ours = str(Path(sys.executable).parent)
    good = check_config(tmp_path, servers, {**env, "PATH": f"{ours}{os.pathsep}{bare_python}"})
    assert good.returncode == 0, good.stderr

    bad = check_config(tmp_path, servers, {**env, "PATH": f"{bare_python}{os.pathsep}{ours}"})
    assert bad.returncode == 1
    bare = bare_python / "python"
    assert f"backend 'time': 'python' ({bare}) cannot import 'mcp_server_time'" in bad.stderr
    assert f"{bare} -m pip install mcp-server-time" in bad.stderr

    # The entry's own "env" PATH is the child's, whatever the gateway's is.
    servers = {"time": {"command": "python", "args": TIME, "env": {"PATH": str(bare_python)}}}
    own = check_config(tmp_path, servers, {**env, "PATH": f"{ours}{os.pathsep}{env['PATH']}"})
    assert own.returncode == 1 and "cannot import 'mcp_server_time'" in own.stderr

    # A per-session backend's children are checked with the same environment.
    servers = {"time": {"command": "python", "args": TIME, "isolation": "per-session"}}
    per_session = check_config(tmp_path, servers, {**env, "PATH": f"{bare_python}{os.pathsep}{ours}"})
    assert per_session.returncode == 1 and "backend 'time'" in per_session.stderr


def test_check_reports_a_backend_that_cannot_start_as_critical(env: dict[str, str], tmp_path: Path) -> None:
    servers: dict[str, object] = {"ghost": {"command": "no-such-mcp-server"}}
    done = check_config(tmp_path, servers, {**env, "AUTH_TOKEN": "Aa1-" + "b2C3d4E5" * 5}, "--check")
    assert done.returncode == 1, done.stdout
    critical = "CRITICAL: backend 'ghost': command 'no-such-mcp-server' not found on the child's PATH"
    assert critical in done.stdout
    assert "no problems found" not in done.stdout

    path = tmp_path / "servers.json"
    path.write_text("{not json")
    broken = run(SCRIPT, "--check", "--config", str(path), "--env-file", os.devnull, env=env)
    assert broken.returncode == 1 and f"CRITICAL: {path}: not valid JSON" in broken.stdout


def test_a_hung_interpreter_is_given_up_on(tmp_path: Path) -> None:
    from mcp_sse.upstream.config import ServerSpec, launch_problem

    # A "python" that never answers, and has started a grandchild holding its stderr open.
    fake = tmp_path / "python3"
    fake.write_text("#!/bin/sh\nsleep infinity &\nexec sleep infinity\n")
    fake.chmod(0o755)
    spec = ServerSpec(name="slow", command=str(fake), args=("-m", "anything"))
    problem = launch_problem(spec, {"PATH": os.environ["PATH"]}, timeout=0.5)
    assert problem == f"backend 'slow': {fake} did not say within 0.5 s whether it can import 'anything'"

    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'error while loading shared libraries' >&2\nexit 127\n")
    broken.chmod(0o755)
    spec = ServerSpec(name="broken", command=str(broken), args=("-m", "anything"))
    problem = launch_problem(spec, {"PATH": os.environ["PATH"]})
    assert problem is not None and "error while loading shared libraries" in problem


# -- --check and OAuth: where tokens and sign-in keys travel, where the signing key lives ----------

STRONG = "Aa1-" + "b2C3d4E5" * 5
SECRET = "x" * 43 + "="  # a Fernet key: 32 bytes of urlsafe base64


def check_oauth(env: dict[str, str], tmp_path: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    values = {
        "AUTH_TOKEN": STRONG,
        "SESSION_SECRET": SECRET,
        "STATE_DIR": str(tmp_path / "state"),
        **settings,
    }
    empty = tmp_path / "check.env"
    empty.touch(mode=0o600)  # os.devnull is 0666, itself a finding
    return run(SCRIPT, "--check", "--env-file", str(empty), env={**env, **values})


@pytest.mark.parametrize("mode", [{"OAUTH_SERVER": "true"}, {"OAUTH_ISSUERS": "https://idp.example.com"}])
def test_check_plain_http_public_url_with_oauth_is_critical(
    env: dict[str, str], tmp_path: Path, mode: dict[str, str]
) -> None:
    # An attacker on the path reads codes, tokens and the sign-in key off a plain-http PUBLIC_URL.
    done = check_oauth(env, tmp_path, HOST="127.0.0.1", PUBLIC_URL="http://mcp.example.com:8080", **mode)
    assert done.returncode == 1, done.stdout + done.stderr
    (line,) = [line for line in done.stdout.splitlines() if "PUBLIC_URL" in line]
    assert line.startswith("CRITICAL: PUBLIC_URL=http://mcp.example.com:8080 is plain http"), line
    assert "no problems found" not in done.stdout
    assert STRONG not in done.stdout + done.stderr and SECRET not in done.stdout + done.stderr

    https = check_oauth(env, tmp_path, PUBLIC_URL="https://mcp.example.com", **mode)
    assert https.returncode == 0, https.stdout
    assert "PUBLIC_URL" not in https.stdout


@pytest.mark.parametrize("public_url", [None, "http://localhost:3001", "http://[::1]:3001"])
def test_check_plain_http_on_loopback_is_fine(
    env: dict[str, str], tmp_path: Path, public_url: str | None
) -> None:
    extra = {} if public_url is None else {"PUBLIC_URL": public_url}
    done = check_oauth(env, tmp_path, OAUTH_SERVER="true", **extra)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "CRITICAL" not in done.stdout and "WARNING" not in done.stdout
    assert "OK: PUBLIC_URL http://" in done.stdout and "loopback" in done.stdout


def test_check_oauth_on_a_network_bind_without_public_url_is_refused(
    env: dict[str, str], tmp_path: Path
) -> None:
    done = check_oauth(env, tmp_path, HOST="0.0.0.0", OAUTH_SERVER="true")
    assert done.returncode != 0
    assert "PUBLIC_URL is required" in done.stderr and "HOST=0.0.0.0" in done.stderr
    assert "Traceback" not in done.stderr


def test_check_warns_of_a_state_dir_it_cannot_use(env: dict[str, str], tmp_path: Path) -> None:
    # A file where STATE_DIR's parent should be: no process can make the directory, root neither.
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    done = check_oauth(env, tmp_path, OAUTH_SERVER="true", STATE_DIR=str(blocker / "state"))
    assert done.returncode == 0, done.stdout  # a warning, not critical
    assert f"WARNING: STATE_DIR={blocker / 'state'} is not writable" in done.stdout
    assert "no problems found" not in done.stdout

    # The files the server made, loosened: others could read the signing key.
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    key = state / "oauth-signing-key.pem"
    key.write_text("not checked here")
    key.chmod(0o600)
    tight = check_oauth(env, tmp_path, OAUTH_SERVER="true")
    assert "STATE_DIR" not in tight.stdout and "no problems found" in tight.stdout
    key.chmod(0o644)
    loose = check_oauth(env, tmp_path, OAUTH_SERVER="true")
    assert f"WARNING: STATE_DIR={state} has files readable by others: {key}" in loose.stdout
    # Only the built-in server keeps files there: external issuers alone are not warned about it.
    issuers = check_oauth(
        env, tmp_path, OAUTH_ISSUERS="https://idp.example.com", PUBLIC_URL="https://a.example"
    )
    assert "STATE_DIR" not in issuers.stdout
