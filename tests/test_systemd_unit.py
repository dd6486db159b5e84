"""The systemd unit passes systemd's own checks; install.sh does what it says, dry or staged."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mcp_sse.settings import read_env_file

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "mcp-sse.service"
INSTALL = REPO / "systemd" / "install.sh"
UNINSTALL = REPO / "systemd" / "uninstall.sh"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def directives(text: str) -> dict[str, list[str]]:
    """Key -> every value it is given (systemd allows repeats), comments skipped."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def runnable_copy(tmp_path: Path, extra: str = "") -> Path:
    """`verify` insists the ExecStart= binary exists: point it at one that does, change nothing else."""
    text = UNIT.read_text().replace("ExecStart=/opt/mcp-sse/venv/bin/python", "ExecStart=" + sys.executable)
    assert text != UNIT.read_text()
    copy = tmp_path / "mcp-sse.service"
    copy.write_text(text + extra)
    return copy


def analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_unit_has_the_service_contract() -> None:
    unit = directives(UNIT.read_text())
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "30",
        "Restart": "on-failure",
        "EnvironmentFile": "/etc/mcp-sse/mcp-sse.env",
        "StateDirectory": "mcp-sse",
        "LogsDirectory": "mcp-sse",
        "WorkingDirectory": "/var/lib/mcp-sse",
        "UMask": "0077",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "ProtectSystem": "strict",
        "CapabilityBoundingSet": "",
        "MemoryDenyWriteExecute": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    }
    for key, value in expected.items():
        assert unit.get(key) == [value], key
    assert unit["ExecStart"] == ["/opt/mcp-sse/venv/bin/python -m mcp_sse serve"]
    assert "AUDIT_LOG=/var/log/mcp-sse/secure-server.log" in unit["Environment"]
    assert unit["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]
    assert "TimeoutStopSec" in unit


@needs_analyze
def test_unit_verifies_clean(tmp_path: Path) -> None:
    result = analyze("verify", str(runnable_copy(tmp_path)), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if "mcp-sse" in line] == []
    # ... and this systemd does report a bad directive, so the silence above means something.
    broken = analyze("verify", str(runnable_copy(tmp_path, "ProtectSystem=sideways\n")), cwd=tmp_path)
    assert "ProtectSystem" in broken.stderr


@needs_analyze
def test_unit_exposure_is_at_most_2(tmp_path: Path) -> None:
    result = analyze("security", "--offline=true", str(runnable_copy(tmp_path)), cwd=tmp_path)
    if "--offline" in result.stderr and "unrecognized" in result.stderr:
        pytest.skip("this systemd-analyze has no --offline (systemd < 250)")
    match = re.search(r"Overall exposure level for mcp-sse\.service: (\d+\.\d+)", result.stdout)
    assert match is not None, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout
    noted = re.search(
        r"security --offline=true mcp-sse\.service` \(systemd \d+\): (\d+\.\d+)", UNIT.read_text()
    )
    assert noted is not None and noted.group(1) == match.group(1), "update the score noted in the unit"


def fake_tools(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """PATH where the commands that change the system only record that they were called, and fail."""
    bin_dir, log = tmp_path / "bin", tmp_path / "called.log"
    bin_dir.mkdir()
    for name in ("systemctl", "useradd", "userdel", "chgrp", "chown", "pip", "python3"):
        tool = bin_dir / name
        tool.write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\nexit 1\n')
        tool.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHON=str(bin_dir / "python3"))
    env.pop("DESTDIR", None)
    return env, log


def setup_env_file(tmp_path: Path) -> Path:
    """A real .env from setup_secure.py, naming a servers file and a relative audit log."""
    project = tmp_path / "project"
    project.mkdir()
    flags = ["--servers-file", "servers.json", "--audit-log", "audit.log", "--api-key", "X_API_KEY=a b"]
    result = subprocess.run(
        [sys.executable, str(REPO / "setup_secure.py"), "--non-interactive", "--output", ".env", *flags],
        cwd=project,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return project / ".env"


def test_install_dry_run_changes_nothing(tmp_path: Path) -> None:
    env, log = fake_tools(tmp_path)
    env_file = setup_env_file(tmp_path)
    opt_before = Path("/opt/mcp-sse").exists()
    result = subprocess.run(
        [str(INSTALL), "--dry-run", "--env-file", str(env_file)], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert not log.exists(), log.read_text()  # nothing was run
    assert Path("/opt/mcp-sse").exists() == opt_before
    out = result.stdout
    for line in (
        f"+ {tmp_path}/bin/python3 -m venv /opt/mcp-sse/venv",
        f"+ /opt/mcp-sse/venv/bin/pip install --quiet {REPO}\\[fast\\]",  # printf %q
        "+ install -d -m 0750 /etc/mcp-sse",
        f"+ install -m 0600 {env_file} /etc/mcp-sse/mcp-sse.env",
        f"+ install -m 0640 {env_file.parent}/servers.json /etc/mcp-sse/servers.json",
        "+ set MCP_SERVERS_FILE=/etc/mcp-sse/servers.json in /etc/mcp-sse/mcp-sse.env",
        f"+ install -m 0644 {UNIT} /etc/systemd/system/mcp-sse.service",
        "+ systemctl daemon-reload",
        "sudo systemctl enable --now mcp-sse",
        "journalctl -u mcp-sse -f",
    ):
        assert line in out, line


def test_install_and_uninstall_staged_under_a_root(tmp_path: Path) -> None:
    env, log = fake_tools(tmp_path)
    env_file = setup_env_file(tmp_path)
    root = tmp_path / "root"
    result = subprocess.run(
        [str(INSTALL), "--root", str(root), "--skip-venv", "--env-file", str(env_file)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert not log.exists(), log.read_text()  # no user, chgrp or systemctl when staging

    etc = root / "etc" / "mcp-sse"
    modes = {p.name: p.stat().st_mode & 0o777 for p in [etc, *etc.iterdir()]}
    assert modes == {"mcp-sse": 0o750, "mcp-sse.env": 0o600, "servers.json": 0o640}
    installed_unit = root / "etc" / "systemd" / "system" / "mcp-sse.service"
    assert installed_unit.read_text() == UNIT.read_text()
    assert installed_unit.stat().st_mode & 0o777 == 0o644
    source, installed = read_env_file(env_file), read_env_file(etc / "mcp-sse.env")
    assert installed["MCP_SERVERS_FILE"] == "/etc/mcp-sse/servers.json"
    assert "AUDIT_LOG" not in installed  # relative: the unit's /var/log/mcp-sse applies instead
    for key in ("AUTH_TOKEN", "SESSION_SECRET", "ALLOWED_IPS", "X_API_KEY"):
        assert installed[key] == source[key], key
    assert (etc / "servers.json").read_bytes() == Path(source["MCP_SERVERS_FILE"]).read_bytes()

    kept = subprocess.run([str(UNINSTALL), "--root", str(root)], env=env, capture_output=True, text=True)
    assert kept.returncode == 0, kept.stderr
    assert not installed_unit.exists() and (etc / "mcp-sse.env").exists()
    purged = subprocess.run(
        [str(UNINSTALL), "--root", str(root), "--purge"], env=env, capture_output=True, text=True
    )
    assert purged.returncode == 0, purged.stderr
    assert not etc.exists()
    assert not log.exists(), log.read_text()


def test_install_refuses_a_missing_env_file(tmp_path: Path) -> None:
    env, _ = fake_tools(tmp_path)
    result = subprocess.run(
        [str(INSTALL), "--dry-run", "--env-file", str(tmp_path / "nope.env")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and "setup_secure.py" in result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_scripts_are_shellcheck_clean() -> None:
    result = subprocess.run(["shellcheck", str(INSTALL), str(UNINSTALL)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
