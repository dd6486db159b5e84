"""setup_secure.py driven as a person would: through a real pseudo-terminal, then with flags only."""

from __future__ import annotations

import asyncio
import codecs
import datetime
import json
import os
import pty
import re
import select
import socket
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mcp_sse.settings import read_env_file
from mcp_sse.setup_env import Invalid, detect_addresses, format_env, mask
from tests.conftest import launch

REPO = Path(__file__).resolve().parents[1]
SETUP = REPO / "setup_secure.py"
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{43,}")
SSH_CLIENT = "203.0.113.7 50000 22"
STRONG = "Xq7-rT2mZp9_vL4kWc8nBd3hYf6jGs1aEu5"  # 35 varied characters
# Make the terminal the child's controlling tty (as a login shell has), so getpass reads /dev/tty.
CTTY = (
    "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


def child_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {
        # `python` is this interpreter, as in the activated virtualenv a user runs setup from.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "SSH_CLIENT": SSH_CLIENT,
    } | extra


class Terminal:
    """setup_secure.py on a real pty: `expect` text, `send` a line as if typed."""

    def __init__(
        self, tmp_path: Path, *args: str, umask: int = 0o022, python: str = sys.executable, **env: str
    ) -> None:
        master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            [python, "-c", CTTY, str(SETUP), *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=tmp_path,
            env=child_env(tmp_path, **env),
            start_new_session=True,
            umask=umask,
        )
        os.close(slave)
        self.fd = master
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.output = ""
        self.pos = 0

    def _read(self, timeout: float) -> bool:
        if not select.select([self.fd], [], [], max(timeout, 0))[0]:
            return False
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            return False
        self.output += self.decoder.decode(data)
        return bool(data)

    def expect(self, text: str, timeout: float = 8) -> str:
        """Wait for `text`; return what was printed since the last expect, up to and including it."""
        deadline = time.monotonic() + timeout
        while (found := self.output.find(text, self.pos)) < 0:
            if not self._read(deadline - time.monotonic()):
                raise AssertionError(f"no {text!r} on the terminal; it shows:\n{self.output[self.pos :]}")
        chunk, self.pos = self.output[self.pos : found + len(text)], found + len(text)
        return chunk

    def send(self, line: str = "") -> None:
        os.write(self.fd, line.encode() + b"\r")

    def answer(self, prompt: str, line: str = "") -> str:
        """Wait for a prompt containing `prompt` to be complete (every prompt ends with ": "), then type."""
        shown = self.expect(prompt) + self.expect(": ")
        self.send(line)
        return shown

    def finish(self, timeout: float = 8) -> int:
        while self._read(timeout):
            pass
        try:
            return self.proc.wait(timeout)
        finally:
            os.close(self.fd)


@pytest.fixture
def terminals() -> list[Terminal]:
    started: list[Terminal] = []
    yield started
    for term in started:
        if term.proc.poll() is None:
            term.proc.kill()
            term.proc.wait()


def run(
    tmp_path: Path, *args: str, umask: int = 0o022, python: str = sys.executable, **env: str
) -> subprocess.CompletedProcess[str]:
    """Non-interactive, as CI or Ansible would: no terminal, stdin at EOF."""
    return subprocess.run(
        [python, str(SETUP), *args],
        cwd=tmp_path,
        env=child_env(tmp_path, **env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        umask=umask,
    )


@pytest.fixture
def fresh_python(tmp_path: Path) -> Path:
    """A real Python with everything this one has but mcp-server-time, as after a plain
    `pip install .`: a new virtualenv whose site-packages links to ours, less that package."""
    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    query = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    found = subprocess.run([python, "-c", query], capture_output=True, text=True, check=True, timeout=30)
    theirs = Path(found.stdout.strip())
    for ours in {Path(sysconfig.get_paths()[key]) for key in ("purelib", "platlib")}:
        for entry in ours.iterdir():
            if not entry.name.startswith("mcp_server_time") and not (theirs / entry.name).exists():
                (theirs / entry.name).symlink_to(entry)
    assert subprocess.run([python, "-c", "import mcp_server_time"], capture_output=True).returncode == 1
    return python


def fresh_path(python: Path) -> str:
    """A PATH on which `python` is `python`."""
    return f"{python.parent}{os.pathsep}{os.environ['PATH']}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def printed(output: str, start: str, end: str) -> str:
    """A block of the next steps, from the line starting with `start` to the end of `end`, dedented."""
    output = output.replace("\r\n", "\n")
    begin = output.index(f"\n    {start}") + 1
    return textwrap.dedent(output[begin : output.index(end, begin) + len(end)])


def shown_once(output: str, token: str) -> None:
    """The token is on the screen exactly once, on the line under its label."""
    lines = output.replace("\r\n", "\n").splitlines()
    assert [i for i, line in enumerate(lines) if token in line] == [lines.index(f"    {token}")], output
    assert (
        lines[lines.index(f"    {token}") - 2] == "New AUTH_TOKEN (shown once, copy it to your clients now):"
    )


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def first_run_prompts(env_path: Path) -> list[str]:
    """Every prompt of a first run, in order (the starter servers file offered)."""
    return [
        "Bind address [",
        "Port [",
        "comma-separated [",
        "Auth token, hidden",
        "Browser origins",
        "Rate-limit window",
        "per window per client",
        "TLS certificate file",
        "Enable the built-in OAuth server",
        "ANTHROPIC_API_KEY",
        "PERPLEXITY_API_KEY",
        "Another API key",
        "MCP servers file",
        "Create a starter file?",
        f"Write {env_path}?",
    ]


def self_signed(tmp_path: Path, name: str = "tls") -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


# -- interactive -----------------------------------------------------------------------------------


def test_help() -> None:
    result = subprocess.run(
        [sys.executable, str(SETUP), "--help"], capture_output=True, text=True, check=True
    )
    for flag in ("--non-interactive", "--rotate-token", "--api-key", "--output", "--tls-key"):
        assert flag in result.stdout


def test_defaults_give_a_working_private_env(tmp_path: Path, terminals: list[Terminal]) -> None:
    env_path = tmp_path / ".env"
    term = Terminal(tmp_path, "--output", str(env_path))
    terminals.append(term)
    prompts = first_run_prompts(env_path)
    term.answer(prompts[0])
    term.answer(prompts[1])
    shown = term.expect(prompts[2]) + term.expect(": ")
    assert "connected over SSH from 203.0.113.7" in shown
    assert "[203.0.113.7, " in shown and shown.endswith("127.0.0.1, ::1]: ")  # detected, loopback last
    term.send()
    for prompt in prompts[3:]:
        term.answer(prompt)
    assert term.finish() == 0, term.output

    assert mode(env_path) == 0o600
    values = read_env_file(env_path)  # the server's own parser
    assert values["HOST"] == "127.0.0.1" and values["PORT"] == "3001"
    assert values["ALLOWED_IPS"].split(",")[0] == "203.0.113.7"
    assert {"127.0.0.1", "::1"} <= set(values["ALLOWED_IPS"].split(","))
    assert TOKEN_RE.fullmatch(values["AUTH_TOKEN"])
    Fernet(values["SESSION_SECRET"].encode())  # raises unless a valid Fernet key
    assert values["RATE_LIMIT_WINDOW_MS"] == "900000" and values["RATE_LIMIT_MAX_REQUESTS"] == "100"
    servers = Path(values["MCP_SERVERS_FILE"])
    assert servers == tmp_path / "servers.json" and mode(servers) == 0o600
    assert json.loads(servers.read_text())["mcpServers"]["time"]["args"] == ["-m", "mcp_server_time"]
    assert not (tmp_path / ".env.bak").exists()

    # On a terminal the new token is shown once, labelled; curl, Claude Desktop and the SDK name it.
    out, token = term.output, values["AUTH_TOKEN"]
    shown_once(out, token)
    assert 'curl -H "Authorization: Bearer $AUTH_TOKEN" http://127.0.0.1:3001/health' in out
    assert f"python server_secure.py --env-file {env_path}" in out
    assert "sudo systemd/install.sh" in out
    out = out.replace("\r\n", "\n")
    desktop = json.loads(out[out.index("through mcp-remote:") + 19 : out.index("MCP Python SDK")])
    remote = desktop["mcpServers"]["mcp-sse"]
    assert remote["args"][:4] == [
        "mcp-remote",
        "http://127.0.0.1:3001/sse",
        "--header",
        "Authorization: Bearer ${AUTH_TOKEN}",
    ]
    assert remote["env"] == {"AUTH_TOKEN": f"<AUTH_TOKEN from {env_path}>"}
    compile(printed(out, "import asyncio", "asyncio.run(main())"), "snippet", "exec")


def test_bad_answers_are_asked_again_with_a_reason(tmp_path: Path, terminals: list[Terminal]) -> None:
    env_path = tmp_path / ".env"
    term = Terminal(tmp_path, "--output", str(env_path))
    terminals.append(term)
    term.answer("Bind address [", "not a host!")
    assert "is neither an IP address nor a host name" in term.answer("Bind address [", "")
    term.answer("Port [", "99999")
    assert "'99999' is not a port number: use 1-65535" in term.answer("Port [", "8080")
    term.answer("comma-separated [", "300.1.1.1")
    assert "'300.1.1.1' is not an IP address" in term.answer("comma-separated [", "10.1.2.3/8")
    assert "did you mean 10.0.0.0/8?" in term.answer("comma-separated [", "10.0.0.0/8, 127.0.0.1")
    term.answer("Auth token, hidden", "password")
    assert "too short (8 characters)" in term.answer("Auth token, hidden", "a" * 40)
    assert "too little variety" in term.answer("Auth token, hidden", "")
    term.answer("Browser origins", "*")
    assert "'*' would let any web page" in term.answer("Browser origins", "https://app.example.com/path")
    assert "no path" in term.answer("Browser origins", "https://app.example.com, http://localhost:5173")
    term.answer("Rate-limit window", "-5")
    assert "not a positive whole number" in term.answer("Rate-limit window", "60000")
    term.answer("per window per client", "30")
    term.answer("TLS certificate file", str(tmp_path / "missing.crt"))
    term.answer("TLS private key file", str(tmp_path / "missing.key"))
    assert "no such file" in term.answer("TLS certificate file", "none")
    term.answer("Enable the built-in OAuth server", "maybe")
    assert "answer y or n" in term.answer("Enable the built-in OAuth server", "y")
    term.answer("Public URL", "https://mcp.example.com/mcp")
    assert "PUBLIC_URL 'https://mcp.example.com/mcp' must be scheme://host[:port] only" in term.answer(
        "Public URL", "ftp://mcp.example.com"
    )
    assert "PUBLIC_URL 'ftp://mcp.example.com' must be an absolute https://" in term.answer(
        "Public URL", "https://mcp.example.com:8443"
    )
    term.answer("OAuth state directory")
    for prompt in ("ANTHROPIC_API_KEY", "PERPLEXITY_API_KEY"):
        term.answer(prompt)
    term.answer("Another API key", "lower-case")
    assert "not an environment variable name" in term.answer("Another API key", "")
    term.answer("MCP servers file", "none")
    term.answer(f"Write {env_path}?", "")
    assert term.finish() == 0, term.output

    values = read_env_file(env_path)
    assert values["PORT"] == "8080"
    assert values["ALLOWED_IPS"] == "10.0.0.0/8,127.0.0.1"
    assert values["ALLOWED_ORIGINS"] == "https://app.example.com,http://localhost:5173"
    assert values["RATE_LIMIT_WINDOW_MS"] == "60000" and values["RATE_LIMIT_MAX_REQUESTS"] == "30"
    assert TOKEN_RE.fullmatch(values["AUTH_TOKEN"])
    assert "TLS_CERT" not in values and "MCP_SERVERS_FILE" not in values
    assert values["OAUTH_SERVER"] == "true" and values["PUBLIC_URL"] == "https://mcp.example.com:8443"
    assert "STATE_DIR" not in values  # the default, kept: not written


def test_typed_secrets_are_not_echoed(tmp_path: Path, terminals: list[Terminal]) -> None:
    env_path = tmp_path / ".env"
    api_key = "sk-ant-api03-" + "Zx9" * 12
    term = Terminal(tmp_path, "--output", str(env_path))
    terminals.append(term)
    for prompt in ("Bind address [", "Port [", "comma-separated ["):
        term.answer(prompt)
    term.answer("Auth token, hidden", STRONG)
    typed = term.expect("Browser origins")
    term.send()
    for prompt in ("Rate-limit window", "per window per client", "TLS certificate file"):
        term.answer(prompt)
    term.answer("Enable the built-in OAuth server")
    term.answer("ANTHROPIC_API_KEY", api_key)
    term.answer("PERPLEXITY_API_KEY")
    term.answer("Another API key", "CUSTOM_API_KEY")
    term.answer("CUSTOM_API_KEY", "custom value with spaces #1")
    term.answer("Another API key")
    term.answer("MCP servers file", "none")
    term.answer(f"Write {env_path}?", "")
    assert term.finish() == 0, term.output

    assert STRONG not in typed  # no echo while typing; it shows once, in the next steps, as it is new
    assert api_key not in term.output and "custom value" not in term.output
    values = read_env_file(env_path)
    assert values["AUTH_TOKEN"] == STRONG
    assert values["ANTHROPIC_API_KEY"] == api_key
    assert values["CUSTOM_API_KEY"] == "custom value with spaces #1"


def test_rerun_masks_secrets_and_keeps_them(tmp_path: Path, terminals: list[Terminal]) -> None:
    env_path = tmp_path / ".env"
    api_key = "pplx-" + "Qw8" * 12
    first = run(
        tmp_path,
        "--non-interactive",
        "--output",
        str(env_path),
        "--origins",
        "https://app.example.com",
        "--api-key",
        f"PERPLEXITY_API_KEY={api_key}",
        "--servers-file",
        "servers.json",
    )
    assert first.returncode == 0, first.stderr
    before = read_env_file(env_path)
    with env_path.open("a") as extra:  # a setting this script does not manage survives the rerun
        extra.write("LOG_LEVEL=DEBUG\n")

    term = Terminal(tmp_path, "--output", str(env_path))
    terminals.append(term)
    term.answer("Bind address [127.0.0.1]")
    term.answer("Port [3001]")
    shown = term.answer("comma-separated [")
    assert "[127.0.0.1, ::1]" in shown
    assert "203.0.113.7 is not in the current list" in shown
    assert f"Enter keeps {mask(before['AUTH_TOKEN'])}" in term.answer("Auth token, hidden")
    assert "[https://app.example.com]" in term.answer("Browser origins")
    for prompt in ("Rate-limit window", "per window per client", "TLS certificate file"):
        term.answer(prompt)
    assert "[y/N]" in term.answer("Enable the built-in OAuth server")  # off by default
    term.answer("ANTHROPIC_API_KEY")
    assert f"Enter keeps {mask(api_key)}" in term.answer("PERPLEXITY_API_KEY")
    term.answer("Another API key")
    assert f"[{tmp_path / 'servers.json'}]" in term.answer("MCP servers file")
    term.answer(f"Write {env_path}?")
    assert term.finish() == 0, term.output

    for secret in (before["AUTH_TOKEN"], before["SESSION_SECRET"], api_key):
        assert secret not in term.output
    assert mask(before["AUTH_TOKEN"]) in term.output
    assert f"<AUTH_TOKEN from {env_path}>" in term.output
    after = read_env_file(env_path)
    assert after == before | {"LOG_LEVEL": "DEBUG"}
    backup = tmp_path / ".env.bak"
    assert mode(backup) == 0o600 and mode(env_path) == 0o600
    assert read_env_file(backup) == before | {"LOG_LEVEL": "DEBUG"}


def test_no_terminal_without_non_interactive_is_refused(tmp_path: Path) -> None:
    result = run(tmp_path, "--output", str(tmp_path / ".env"))
    assert result.returncode == 2
    assert "--non-interactive" in result.stderr
    assert not (tmp_path / ".env").exists()


# -- non-interactive -------------------------------------------------------------------------------


def test_non_interactive_flags_write_every_key(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    env_path = tmp_path / "prod.env"
    token = "Aa1-" + "b2C3d4E5" * 5
    result = run(
        tmp_path,
        "--non-interactive",
        "--output",
        str(env_path),
        "--host",
        "0.0.0.0",
        "--port",
        "8443",
        "--allowed-ips",
        "198.51.100.0/24,127.0.0.1",
        "--origins",
        "https://app.example.com,https://admin.example.com:8443",
        "--token",
        token,
        "--rate-limit-window-ms",
        "60000",
        "--rate-limit-max",
        "50",
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        "--servers-file",
        str(tmp_path / "servers.json"),
        "--audit-log",
        "/var/log/mcp-sse/audit.log",
        "--api-key",
        "ANTHROPIC_API_KEY=sk-ant-xyz",
        "--api-key",
        "PERPLEXITY_API_KEY",  # copied from the environment
        PERPLEXITY_API_KEY="pplx-from-env",
    )
    assert result.returncode == 0, result.stderr
    assert mode(env_path) == 0o600
    values = read_env_file(env_path)
    session = values.pop("SESSION_SECRET")
    Fernet(session.encode())
    assert values == {
        "HOST": "0.0.0.0",
        "PORT": "8443",
        "AUTH_TOKEN": token,
        "ALLOWED_IPS": "198.51.100.0/24,127.0.0.1",
        "ALLOWED_ORIGINS": "https://app.example.com,https://admin.example.com:8443",
        "RATE_LIMIT_WINDOW_MS": "60000",
        "RATE_LIMIT_MAX_REQUESTS": "50",
        "TLS_CERT": str(cert),
        "TLS_KEY": str(key),
        "MCP_SERVERS_FILE": str(tmp_path / "servers.json"),
        "AUDIT_LOG": "/var/log/mcp-sse/audit.log",
        "ANTHROPIC_API_KEY": "sk-ant-xyz",
        "PERPLEXITY_API_KEY": "pplx-from-env",
    }
    assert "https://" in result.stdout and ":8443/health" in result.stdout
    assert session not in result.stdout and "sk-ant-xyz" not in result.stdout


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--port", "99999"], "--port: '99999' is not a port number"),
        (["--allowed-ips", "300.1.1.1"], "--allowed-ips: '300.1.1.1' is not an IP address"),
        (["--allowed-ips", "0.0.0.0/0"], "allows the whole Internet"),
        (["--token", "short"], "--token: too short"),
        (["--token", "x" * 32 + "y" * 32], "--token: too little variety"),
        (["--origins", "*"], "--origins: '*' would let any web page"),
        (["--origins", "ftp://files.example.com"], "not an origin"),
        (["--tls-cert", "/nonexistent.crt", "--tls-key", "/nonexistent.key"], "no such file"),
        (["--tls-cert", "/nonexistent.crt"], "TLS needs both"),
        (["--api-key", "ANTHROPIC_API_KEY=two\nlines"], "single line"),
        (["--api-key", "NOT_SET_ANYWHERE"], "is not set in the environment"),
        (["--api-key", "AUTH_TOKEN=x"], "is a server setting"),
    ],
)
def test_non_interactive_refuses_bad_flags(tmp_path: Path, args: list[str], reason: str) -> None:
    result = run(tmp_path, "--non-interactive", "--output", str(tmp_path / ".env"), *args)
    assert result.returncode == 2
    assert reason in result.stderr
    assert not (tmp_path / ".env").exists()


def test_tls_pair_must_match(tmp_path: Path) -> None:
    cert, _ = self_signed(tmp_path, "one")
    _, other_key = self_signed(tmp_path, "two")
    result = run(
        tmp_path,
        "--non-interactive",
        "--output",
        ".env",
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(other_key),
    )
    assert result.returncode == 2
    assert "do not load together" in result.stderr


def test_never_world_readable_even_with_umask_0(tmp_path: Path) -> None:
    env_path = tmp_path / ".env"
    env_path.write_text("AUTH_TOKEN=leaked-by-mode-0644-leaked-by-mode-0644-x1\n")
    env_path.chmod(0o644)
    result = run(
        tmp_path, "--non-interactive", "--output", str(env_path), "--servers-file", "servers.json", umask=0
    )
    assert result.returncode == 0, result.stderr
    assert "was readable by others" in result.stdout
    for path in (env_path, tmp_path / ".env.bak", tmp_path / "servers.json"):
        assert mode(path) == 0o600, path
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temp file left behind


def test_rotate_token_changes_only_the_token(tmp_path: Path) -> None:
    env_path = tmp_path / ".env"
    assert (
        run(tmp_path, "--non-interactive", "--output", str(env_path), "--api-key", "X_API_KEY=v").returncode
        == 0
    )
    before = read_env_file(env_path)
    result = run(tmp_path, "--rotate-token", "--output", str(env_path))
    assert result.returncode == 0, result.stderr
    after = read_env_file(env_path)
    new = after["AUTH_TOKEN"]
    assert new != before["AUTH_TOKEN"] and TOKEN_RE.fullmatch(new)
    assert after == before | {"AUTH_TOKEN": new}
    for secret in (new, before["AUTH_TOKEN"], before["SESSION_SECRET"]):  # not on a pipe: a log
        assert secret not in result.stdout + result.stderr
    assert f"New AUTH_TOKEN: in {env_path}, not printed as stdout is not a terminal" in result.stdout
    assert read_env_file(tmp_path / ".env.bak") == before
    assert mode(env_path) == mode(tmp_path / ".env.bak") == 0o600


def test_rotate_token_needs_an_existing_env(tmp_path: Path) -> None:
    result = run(tmp_path, "--rotate-token", "--output", str(tmp_path / ".env"))
    assert result.returncode == 2 and "no AUTH_TOKEN to rotate" in result.stderr


def test_rerun_non_interactive_keeps_values(tmp_path: Path) -> None:
    args = ("--non-interactive", "--output", ".env")
    assert run(tmp_path, *args, "--port", "4000").returncode == 0
    before = read_env_file(tmp_path / ".env")
    again = run(tmp_path, *args)
    assert again.returncode == 0, again.stderr
    assert read_env_file(tmp_path / ".env") == before
    assert before["AUTH_TOKEN"] not in again.stdout  # kept, so not shown again


# -- pieces ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["plain", "two words", "hash # inside", "cost $5 ${HOME}", 'say "hi"', "back\\slash", "a=b=c", "ünïcode"],
)
def test_values_read_back_as_written(tmp_path: Path, value: str) -> None:
    path = tmp_path / ".env"
    path.write_text(format_env({"AUTH_TOKEN": STRONG, "SOME_API_KEY": value}))
    assert read_env_file(path)["SOME_API_KEY"] == value


def test_multiline_values_are_refused() -> None:
    with pytest.raises(Invalid, match="single line"):
        format_env({"SOME_API_KEY": "a\nB=c"})


def test_detect_addresses_is_local_only(monkeypatch: pytest.MonkeyPatch) -> None:
    found = detect_addresses({"SSH_CONNECTION": "2001:db8::5 50000 2001:db8::1 22"})
    assert found[0] == "2001:db8::5"
    assert {"127.0.0.1", "::1"} <= set(found)
    assert not any(a.startswith("fe80:") for a in found)
    monkeypatch.setenv("PATH", "")  # no `ip` command: the ioctl and /proc fallback
    assert {"127.0.0.1", "::1"} <= set(detect_addresses({}))


# -- where a new token is shown: once, labelled, only to a terminal or when asked -------------------

SPECIAL = 'Zq8$"kR#;vL2!mW&nB4(hY)pT7<gS>aE1`x'  # $, quotes, backtick: single-quoted in the file
QUOTED = "Zq8\"kR#;vL2!mW&nB4'hY\\pT7<gS>aE1x"  # quotes and a backslash: double-quoted, escaped
DASHED = "-Zq8kR4vL2mWnB4hYpT7gSaE1x9Qw3Rt6Uy"  # as token_urlsafe makes one time in 64: not an option


@pytest.mark.parametrize(
    "given",
    [None, STRONG, SPECIAL, QUOTED, DASHED],
    ids=["generated", "plain", "dollar", "quotes", "leading-dash"],
)
def test_non_interactive_output_holds_no_token(tmp_path: Path, given: str | None) -> None:
    env_path = tmp_path / "ci.env"
    args = ["--non-interactive", "--output", str(env_path)] + (["--token", given] if given else [])
    result = run(tmp_path, *args)
    assert result.returncode == 0, result.stderr
    token = read_env_file(env_path)["AUTH_TOKEN"]
    assert token == (given or token)
    # What a CI log would keep: neither stream has the token, or any part of it worth having.
    for stream in (result.stdout, result.stderr):
        assert token not in stream and mask(token) not in stream and token[:12] not in stream
    assert f"New AUTH_TOKEN: in {env_path}, not printed as stdout is not a terminal" in result.stdout
    assert 'Authorization: Bearer $AUTH_TOKEN"' in result.stdout

    # The printed line loads it from the file into a shell, whatever characters it has.
    load = printed(result.stdout, "export AUTH_TOKEN=", ')"')
    shell = subprocess.run(
        ["sh", "-c", f'{load}\nprintf %s "$AUTH_TOKEN"'],
        cwd="/",
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert shell.returncode == 0 and shell.stdout == token, shell.stderr


def test_show_token_prints_it_once_labelled(tmp_path: Path) -> None:
    env_path = tmp_path / ".env"
    result = run(tmp_path, "--non-interactive", "--show-token", "--output", str(env_path))
    assert result.returncode == 0, result.stderr
    token = read_env_file(env_path)["AUTH_TOKEN"]
    shown_once(result.stdout, token)
    assert token not in result.stderr

    again = run(tmp_path, "--non-interactive", "--show-token", "--output", str(env_path))
    assert again.returncode == 0, again.stderr
    assert token not in again.stdout  # kept, so not new: nothing to copy
    assert f"AUTH_TOKEN: kept, in {env_path}." in again.stdout


def test_non_interactive_on_a_terminal_shows_the_new_token_once(
    tmp_path: Path, terminals: list[Terminal]
) -> None:
    env_path = tmp_path / ".env"
    term = Terminal(tmp_path, "--non-interactive", "--output", str(env_path))
    terminals.append(term)
    assert term.finish() == 0, term.output
    shown_once(term.output, read_env_file(env_path)["AUTH_TOKEN"])


def test_rotate_token_is_shown_only_on_a_terminal_or_when_asked(
    tmp_path: Path, terminals: list[Terminal]
) -> None:
    env_path = tmp_path / ".env"
    assert run(tmp_path, "--non-interactive", "--output", str(env_path)).returncode == 0

    asked = run(tmp_path, "--rotate-token", "--show-token", "--output", str(env_path))
    assert asked.returncode == 0, asked.stderr
    shown_once(asked.stdout, read_env_file(env_path)["AUTH_TOKEN"])

    term = Terminal(tmp_path, "--rotate-token", "--output", str(env_path))
    terminals.append(term)
    assert term.finish() == 0, term.output
    shown_once(term.output, read_env_file(env_path)["AUTH_TOKEN"])

    piped = run(tmp_path, "--rotate-token", "--output", str(env_path))
    assert piped.returncode == 0, piped.stderr
    token = read_env_file(env_path)["AUTH_TOKEN"]
    assert token not in piped.stdout + piped.stderr
    assert "--show-token prints it" in piped.stdout


# -- the starter servers file: offered only when it can run --------------------------------------


def test_starter_servers_file_is_refused_without_mcp_server_time(tmp_path: Path, fresh_python: Path) -> None:
    env = {"PATH": fresh_path(fresh_python)}
    args = ("--non-interactive", "--output", ".env", "--servers-file", "servers.json")
    result = run(tmp_path, *args, python=str(fresh_python), **env)
    assert result.returncode == 2, result.stdout
    message = result.stderr.strip()
    assert message.startswith(f"setup_secure.py: {tmp_path / 'servers.json'} does not exist, and no starter")
    assert "pip install mcp-server-time" in message and "built-in tools" in message
    assert f"which {fresh_python} cannot import" in message
    assert "Traceback" not in message
    assert not (tmp_path / ".env").exists() and not (tmp_path / "servers.json").exists()


async def printed_client(output: str, tmp_path: Path, python: Path, env: dict[str, str]) -> str:
    """Run the SDK snippet setup printed, with AUTH_TOKEN loaded by the line it printed, as a user
    would paste both into a shell; its stdout."""
    snippet = tmp_path / "client.py"
    snippet.write_text(printed(output, "import asyncio", "asyncio.run(main())"))
    load = printed(output, "export AUTH_TOKEN=", ')"')
    client = await asyncio.create_subprocess_exec(
        "sh",
        "-c",
        f'{load}\nexec "$0" "$1"',
        str(python),
        str(snippet),
        cwd=tmp_path,
        env=child_env(tmp_path, **env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(client.communicate(), 60)
    assert client.returncode == 0, err.decode()
    return out.decode()


async def test_first_run_without_mcp_server_time_serves_the_built_in_tools(
    tmp_path: Path, terminals: list[Terminal], fresh_python: Path
) -> None:
    env_path = tmp_path / ".env"
    env = {"PATH": fresh_path(fresh_python)}
    prompts = [p for p in first_run_prompts(env_path) if p != "Create a starter file?"]

    # A first run, every default taken: the built-in tools, and it says how to get the time server.
    port = free_port()
    first = term = Terminal(tmp_path, "--output", str(env_path), python=str(fresh_python), **env)
    terminals.append(term)
    term.answer(prompts[0])
    term.answer(prompts[1], str(port))
    for prompt in prompts[2:-2]:
        term.answer(prompt)
    shown = term.answer("MCP servers file", "")
    assert "no starter servers file is offered" in shown and "pip install mcp-server-time" in shown
    assert shown.endswith("or 'none' for the built-in one [none]: ")
    term.answer(prompts[-1])
    assert await asyncio.to_thread(term.finish) == 0, term.output
    assert "MCP_SERVERS_FILE" not in read_env_file(env_path)
    assert not (tmp_path / "servers.json").exists()

    # A rerun naming a file that does not exist: told why no starter can be made, and asked again.
    term = Terminal(tmp_path, "--output", str(env_path), python=str(fresh_python), **env)
    terminals.append(term)
    for prompt in prompts[:-2]:
        term.answer(prompt)
    term.answer("MCP servers file", "servers.json")
    term.answer("Create a starter file?", "y")
    assert "no starter file was made" in term.answer("MCP servers file", "none")
    term.answer(prompts[-1])
    assert await asyncio.to_thread(term.finish) == 0, term.output
    assert not (tmp_path / "servers.json").exists()

    script = str(REPO / "server_secure.py")
    server = await launch(
        [str(fresh_python), script, "--env-file", str(env_path)], env=child_env(tmp_path, **env), cwd=tmp_path
    )
    try:
        assert server.url == f"http://127.0.0.1:{port}"
        listed = await printed_client(first.output, tmp_path, fresh_python, env)
        assert listed.strip() == "['echo', 'server_time', 'gateway_status']"
    finally:
        assert await server.stop() == 0


async def test_setup_then_server_then_the_printed_client(tmp_path: Path) -> None:
    """The first hour with mcp-server-time installed: the starter file passes --check-config, the
    server serves it, and the SDK snippet setup printed, with the token it said how to load, works."""
    env_path = tmp_path / ".env"
    port = free_port()
    args = (
        "--non-interactive",
        "--output",
        str(env_path),
        "--port",
        str(port),
        "--servers-file",
        "servers.json",
    )
    setup = run(tmp_path, *args)
    assert setup.returncode == 0, setup.stderr
    token = read_env_file(env_path)["AUTH_TOKEN"]
    assert token not in setup.stdout + setup.stderr
    assert json.loads((tmp_path / "servers.json").read_text())["mcpServers"]["time"]["command"] == "python"

    check = subprocess.run(
        [sys.executable, str(REPO / "server_secure.py"), "--check-config", "--env-file", str(env_path)],
        cwd=tmp_path,
        env=child_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (check.returncode, check.stdout) == (0, "ok: 1 backend(s): time\n"), check.stderr

    server = await launch(
        [sys.executable, str(REPO / "server_secure.py"), "--env-file", str(env_path)],
        env=child_env(tmp_path),
        cwd=tmp_path,
    )
    try:
        listed = await printed_client(setup.stdout, tmp_path, Path(sys.executable), {})
        assert listed.strip() == "['get_current_time', 'convert_time']"
    finally:
        assert await server.stop() == 0
    assert token not in server.stderr


# -- the built-in OAuth server ---------------------------------------------------------------------


async def oauth_issuer(env_path: Path, tmp_path: Path) -> str:
    """Start server_secure.py on the written file (any free port), and read its issuer."""
    import aiohttp

    server = await launch(
        [sys.executable, str(REPO / "server_secure.py"), "--env-file", str(env_path), "--port", "0"],
        env=child_env(tmp_path),
        cwd=tmp_path,
    )
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{server.url}/.well-known/oauth-authorization-server") as response,
        ):
            assert response.status == 200, await response.text()
            issuer = (await response.json())["issuer"]
            assert isinstance(issuer, str)
            return issuer
    finally:
        assert await server.stop() == 0


async def test_interactive_oauth_server_then_a_rerun_keeps_it(
    tmp_path: Path, terminals: list[Terminal]
) -> None:
    env_path = tmp_path / ".env"
    port = free_port()
    term = Terminal(tmp_path, "--output", str(env_path))
    terminals.append(term)
    term.answer("Bind address [")
    term.answer("Port [", str(port))
    for prompt in ("comma-separated [", "Auth token, hidden", "Browser origins", "Rate-limit window"):
        term.answer(prompt)
    term.answer("per window per client")
    term.answer("TLS certificate file")
    assert "[y/N]" in term.answer("Enable the built-in OAuth server", "y")
    # Loopback without TLS: the default is the plain-http URL the server answers at.
    assert f"[http://127.0.0.1:{port}]" in term.answer("Public URL", "https://mcp.example.com/")
    assert "[state]" in term.answer("OAuth state directory", "oauth-state")
    for prompt in ("ANTHROPIC_API_KEY", "PERPLEXITY_API_KEY", "Another API key"):
        term.answer(prompt)
    term.answer("MCP servers file", "none")
    term.answer(f"Write {env_path}?")
    assert await asyncio.to_thread(term.finish) == 0, term.output

    values = read_env_file(env_path)
    assert values["OAUTH_SERVER"] == "true"
    assert values["PUBLIC_URL"] == "https://mcp.example.com"  # as settings normalise it
    assert values["STATE_DIR"] == str(tmp_path / "oauth-state")  # changed from the default: written
    out = term.output.replace("\r\n", "\n")
    assert "connector URL: https://mcp.example.com/mcp\n" in out
    assert "claude mcp add --transport http mcp-sse https://mcp.example.com/mcp" in out
    assert "mcp-remote: npx mcp-remote https://mcp.example.com/mcp\n" in out
    assert await oauth_issuer(env_path, tmp_path) == "https://mcp.example.com"
    assert (tmp_path / "oauth-state" / "oauth-signing-key.pem").exists()

    # A rerun: the current values are the defaults, Enter keeps each.
    term = Terminal(tmp_path, "--output", str(env_path))
    terminals.append(term)
    for prompt in first_run_prompts(env_path)[:8]:
        term.answer(prompt)
    assert "[Y/n]" in term.answer("Enable the built-in OAuth server")
    assert "[https://mcp.example.com]" in term.answer("Public URL")
    assert f"[{tmp_path / 'oauth-state'}]" in term.answer("OAuth state directory")
    for prompt in ("ANTHROPIC_API_KEY", "PERPLEXITY_API_KEY", "Another API key"):
        term.answer(prompt)
    term.answer("MCP servers file", "none")  # none is not written, so a rerun offers the starter again
    term.answer(f"Write {env_path}?")
    assert await asyncio.to_thread(term.finish) == 0, term.output
    assert read_env_file(env_path) == values


async def test_non_interactive_oauth_server_flags(tmp_path: Path) -> None:
    env_path = tmp_path / ".env"
    setup = run(
        tmp_path,
        "--non-interactive",
        "--output",
        str(env_path),
        "--oauth-server",
        "--public-url",
        "https://mcp.example.com:8443",
    )
    assert setup.returncode == 0, setup.stderr
    values = read_env_file(env_path)
    assert values["OAUTH_SERVER"] == "true" and values["PUBLIC_URL"] == "https://mcp.example.com:8443"
    assert "STATE_DIR" not in values
    assert "connector URL: https://mcp.example.com:8443/mcp" in setup.stdout
    assert "npx mcp-remote https://mcp.example.com:8443/mcp\n" in setup.stdout
    for secret in (values["AUTH_TOKEN"], values["SESSION_SECRET"]):
        assert secret not in setup.stdout + setup.stderr
    assert await oauth_issuer(env_path, tmp_path) == "https://mcp.example.com:8443"

    # A rerun without the flags keeps them; --no-oauth-server turns it off, and no connector is printed.
    again = run(tmp_path, "--non-interactive", "--output", str(env_path))
    assert again.returncode == 0, again.stderr
    assert read_env_file(env_path) == values
    off = run(tmp_path, "--non-interactive", "--output", str(env_path), "--no-oauth-server")
    assert off.returncode == 0, off.stderr
    assert "OAUTH_SERVER" not in read_env_file(env_path)
    assert "connector URL" not in off.stdout


def test_non_interactive_oauth_server_default_public_url(tmp_path: Path) -> None:
    # Bound to every interface: https on one of this host's own addresses, never the SSH client's.
    done = run(tmp_path, "--non-interactive", "--output", ".env", "--oauth-server", "--host", "0.0.0.0")
    assert done.returncode == 0, done.stderr
    url = read_env_file(tmp_path / ".env")["PUBLIC_URL"]
    assert url.startswith("https://") and url.endswith(":3001") and "203.0.113.7" not in url
    assert f"note: PUBLIC_URL={url} (the default" in done.stdout


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://mcp.example.com/mcp", "must be scheme://host[:port] only"),
        ("mcp.example.com", "must be an absolute https://"),
        ("https://mcp.example.com:99999", "has an invalid port"),
        ("https://user@mcp.example.com", "must not carry user info"),
    ],
)
def test_bad_public_url_is_refused(tmp_path: Path, url: str, reason: str) -> None:
    done = run(tmp_path, "--non-interactive", "--output", ".env", "--oauth-server", "--public-url", url)
    assert done.returncode == 2, done.stdout
    assert done.stderr.startswith(f"setup_secure.py: --public-url: PUBLIC_URL {url!r}"), done.stderr
    assert reason in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / ".env").exists()
