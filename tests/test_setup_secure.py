"""setup_secure.py driven as a person would: through a real pseudo-terminal, then with flags only."""

from __future__ import annotations

import codecs
import datetime
import json
import os
import pty
import re
import select
import subprocess
import sys
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
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "SSH_CLIENT": SSH_CLIENT,
    } | extra


class Terminal:
    """setup_secure.py on a real pty: `expect` text, `send` a line as if typed."""

    def __init__(self, tmp_path: Path, *args: str, umask: int = 0o022) -> None:
        master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CTTY, str(SETUP), *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=tmp_path,
            env=child_env(tmp_path),
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


def run(tmp_path: Path, *args: str, umask: int = 0o022, **env: str) -> subprocess.CompletedProcess[str]:
    """Non-interactive, as CI or Ansible would: no terminal, stdin at EOF."""
    return subprocess.run(
        [sys.executable, str(SETUP), *args],
        cwd=tmp_path,
        env=child_env(tmp_path, **env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        umask=umask,
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

    # The new token is shown where it has to be copied: curl, Claude Desktop, the SDK snippet.
    out, token = term.output, values["AUTH_TOKEN"]
    assert f'curl -H "Authorization: Bearer {token}" http://127.0.0.1:3001/health' in out
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
    assert remote["env"] == {"AUTH_TOKEN": token}
    snippet = out[out.index("    import asyncio") : out.index("asyncio.run(main())") + 19]
    compile(textwrap.dedent(snippet), "snippet", "exec")


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
    for prompt in ("Rate-limit window", "per window per client", "TLS certificate file", "ANTHROPIC_API_KEY"):
        term.answer(prompt)
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
    assert result.stdout.count(new) == 1  # printed once
    assert before["AUTH_TOKEN"] not in result.stdout and before["SESSION_SECRET"] not in result.stdout
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
