"""Write the secure profile's `.env`: `python setup_secure.py` asks, `--non-interactive` takes flags.

The file is written atomically with mode 0600 (never readable by others, whatever the umask), the
previous one kept as a 0600 `.bak`. Rerunning shows the current values as defaults, secrets masked;
Enter keeps them. A new AUTH_TOKEN is printed once, labelled, and only to a terminal (or with
--show-token): stdout of `--non-interactive` ends up in CI logs. No other secret is ever printed.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import getpass
import ipaddress
import json
import os
import re
import secrets
import shlex
import socket
import ssl
import string
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography.fernet import Fernet

from .settings import (
    DEFAULT_PORT,
    GATEWAY_SECRETS,
    SettingsError,
    _public_url,
    attach_option_values,
    is_loopback,
    read_env_file,
)
from .upstream.config import ServerSpec, launch_problem, resolve_command

__all__ = ["Invalid", "detect_addresses", "format_env", "main", "mask", "write_private"]

# The keys the server reads, in the order they are written.
CORE_KEYS = (
    "HOST",
    "PORT",
    "AUTH_TOKEN",
    "SESSION_SECRET",
    "ALLOWED_IPS",
    "ALLOWED_ORIGINS",
    "RATE_LIMIT_WINDOW_MS",
    "RATE_LIMIT_MAX_REQUESTS",
    "TLS_CERT",
    "TLS_KEY",
    "MCP_SERVERS_FILE",
    "AUDIT_LOG",
    "OAUTH_SERVER",
    "PUBLIC_URL",
    "STATE_DIR",
)
DEFAULTS = {
    "HOST": "127.0.0.1",
    "PORT": str(DEFAULT_PORT),
    "RATE_LIMIT_WINDOW_MS": "900000",
    "RATE_LIMIT_MAX_REQUESTS": "100",
}
KNOWN_API_KEYS = ("ANTHROPIC_API_KEY", "PERPLEXITY_API_KEY")
STARTER_MODULE = "mcp_server_time"  # `pip install mcp-server-time`: a test extra, not a dependency
BUILTIN_TOOLS = "the built-in tools (echo, server_time, gateway_status)"
NONE_WORDS = ("none", "-", "off")
MIN_TOKEN_LENGTH = 32
DEFAULT_STATE_DIR = "state"  # Settings' own default: ./state where the server starts


class Invalid(ValueError):
    """An answer or flag that cannot be used; the message says why, for the user."""


class Abort(Exception):
    """Stop without writing anything; the message is printed to stderr."""


# -- checks: each returns the value as it goes in the file, or raises Invalid ----------------------


def check_host(text: str) -> str:
    text = text.strip().removeprefix("[").removesuffix("]")
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(text))
    labels = text.rstrip(".").split(".")
    if text and all(re.fullmatch(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)", label) for label in labels):
        return text
    raise Invalid(f"{text!r} is neither an IP address nor a host name")


def _whole(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.isascii() and text.isdigit() else None


def check_port(text: str) -> str:
    port = _whole(text)
    if port is None or not 1 <= port <= 65535:
        raise Invalid(f"{text!r} is not a port number: use 1-65535")
    return str(port)


def check_positive(text: str) -> str:
    number = _whole(text)
    if number is None or number <= 0:
        raise Invalid(f"{text!r} is not a positive whole number")
    return str(number)


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def check_ips(text: str) -> str:
    entries = _split(text)
    if not entries:
        raise Invalid("list at least one address; 127.0.0.1 and ::1 allow this machine only")
    for entry in entries:
        try:
            network = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise Invalid(f"{entry!r} is not an IP address or CIDR network (like 192.0.2.0/24)") from None
        if network.network_address != ipaddress.ip_interface(entry).ip and "/" in entry:
            raise Invalid(f"{entry!r} has host bits set: did you mean {network}?")
        if network.prefixlen == 0:
            raise Invalid(f"{entry!r} allows the whole Internet; list your clients' networks instead")
    return ",".join(entries)


def _covered(address: str, allowlist: str) -> bool:
    with contextlib.suppress(ValueError):
        ip = ipaddress.ip_address(address)
        return any(ip in ipaddress.ip_network(entry, strict=False) for entry in _split(allowlist))
    return False


def check_origins(text: str) -> str:
    origins = []
    for entry in _split(text):
        if entry == "*":
            raise Invalid("'*' would let any web page use your token: list the exact origins")
        try:
            parts = urlsplit(entry)
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            raise Invalid(f"{entry!r} is not a valid origin") from None
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or parts.username is not None
            or parts.path not in ("", "/")
            or parts.query
            or parts.fragment
        ):
            raise Invalid(f"{entry!r} is not an origin: use scheme://host[:port], no path")
        origins.append(f"{parts.scheme}://{parts.netloc}")  # browsers send no trailing slash
    return ",".join(origins)


_CHAR_CLASSES = (string.ascii_lowercase, string.ascii_uppercase, string.digits, string.punctuation)


def check_token(text: str) -> str:
    """A bearer token someone typed: long, varied, and safe in an HTTP header."""
    if len(text) < MIN_TOKEN_LENGTH:
        raise Invalid(f"too short ({len(text)} characters): use at least {MIN_TOKEN_LENGTH}")
    if not all("!" <= char <= "~" for char in text):
        raise Invalid("use printable ASCII without spaces, as an HTTP header needs")
    classes = sum(any(char in group for char in text) for group in _CHAR_CLASSES)
    if len(set(text)) < 10 or classes < 2:
        raise Invalid("too little variety: mix letters and digits, or press Enter to generate one")
    return text


def check_public_url(text: str) -> str:
    """PUBLIC_URL as the server will parse it (settings' own parser): scheme://host[:port]."""
    try:
        return _public_url(text)
    except ValueError as exc:
        raise Invalid(str(exc)) from None  # the message names PUBLIC_URL and the value


def _on(text: str | None) -> bool:
    return (text or "").strip().lower() in ("1", "true", "yes", "on")


def default_public_url(values: Mapping[str, str]) -> str:
    """https://<the host clients reach>:<PORT>; plain http only for a loopback bind without TLS,
    where https could not answer (and --check accepts http on loopback)."""
    # This host's own addresses only: the SSH client's (first in detect_addresses) is not ours.
    host = _client_host(values.get("HOST", DEFAULTS["HOST"]), {})
    port = values.get("PORT", DEFAULTS["PORT"])
    plain = not values.get("TLS_CERT") and is_loopback(host.strip("[]"))
    return check_public_url(f"{'http' if plain else 'https'}://{host}:{port}")


def check_fernet(text: str) -> str:
    try:
        Fernet(text.encode())
    except (ValueError, TypeError):
        raise Invalid("not a Fernet key (32 url-safe base64-encoded bytes)") from None
    return text


def check_value(text: str) -> str:
    if any(char in text for char in "\r\n\0"):
        raise Invalid("values must be a single line")
    return text


def check_api_name(text: str) -> str:
    name = text.strip()
    if not re.fullmatch(r"[A-Z][A-Z0-9_]*", name):
        raise Invalid(f"{name!r} is not an environment variable name (like FOO_API_KEY)")
    if name in CORE_KEYS:
        raise Invalid(f"{name} is a server setting, not a backend key")
    return name


def check_tls(cert: str, key: str) -> tuple[str, str]:
    """Both files exist and hold a certificate and its key (checked as the server will load them)."""
    paths = []
    for label, text in (("certificate", cert), ("key", key)):
        path = Path(text).expanduser()
        if not path.is_file():
            raise Invalid(f"TLS {label} {text!r}: no such file")
        paths.append(path.resolve())
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # An encrypted key would make the server prompt for a password at start: refuse it here.
        context.load_cert_chain(paths[0], paths[1], password=lambda: b"")
    except (ssl.SSLError, OSError) as exc:
        raise Invalid(f"the certificate and key do not load together: {exc}") from None
    return str(paths[0]), str(paths[1])


def starter_servers(environ: Mapping[str, str]) -> dict[str, Any]:
    """The starter servers file: mcp-server-time, run by `python` from PATH (as under systemd,
    whose PATH starts with the service's venv), else by this interpreter; checked as the server
    will start it. Raises Invalid, saying how to get it, when neither can import it."""
    env = {key: value for key, value in environ.items() if key not in GATEWAY_SECRETS}
    for python in dict.fromkeys(("python", sys.executable)):
        spec = ServerSpec(name="time", command=python, args=("-m", STARTER_MODULE))
        if launch_problem(spec, env) is None:
            return {"mcpServers": {"time": {"command": python, "args": list(spec.args)}}}
    tried = dict.fromkeys(filter(None, (resolve_command("python", env, None), sys.executable)))
    raise Invalid(
        f"it runs `python -m {STARTER_MODULE}`, which {' and '.join(tried)} cannot import: "
        f"pip install mcp-server-time, or serve {BUILTIN_TOOLS} with no servers file"
    )


def check_servers_file(path: Path) -> None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise Invalid(f"cannot read {path} as JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("mcpServers"), dict):
        raise Invalid(f'{path} is not a servers file: expected {{"mcpServers": {{...}}}}')


# -- the file --------------------------------------------------------------------------------------

_BARE = re.compile(r"[A-Za-z0-9_.,:/@%+=~\[\]-]*")


def quote(value: str) -> str:
    """A value as python-dotenv, systemd's EnvironmentFile= and settings.read_env_file all read it back."""
    check_value(value)
    if _BARE.fullmatch(value):
        return value
    if "$" in value or "`" in value:
        # dotenv expands ${...} inside double quotes; single quotes are literal everywhere.
        if "'" in value or "\\" in value:
            raise Invalid("a value cannot hold both '$' and a quote or backslash")
        return f"'{value}'"
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _ordered(values: Mapping[str, str]) -> list[str]:
    return [key for key in CORE_KEYS if key in values] + [key for key in values if key not in CORE_KEYS]


def format_env(values: Mapping[str, str]) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    lines = [
        f"# mcp-sse secure profile, written by setup_secure.py on {stamp}.",
        "# Mode 0600: it holds secrets. Rerun setup_secure.py to change it (comments are not kept).",
    ]
    lines += [f"{key}={quote(values[key])}" for key in _ordered(values) if values[key] != ""]
    return "\n".join(lines) + "\n"


def write_private(path: Path, data: bytes) -> None:
    """Replace `path` atomically by a 0600 file holding `data`: no moment where it is partial or readable."""
    old_umask = os.umask(0o077)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)  # in case a default ACL widened it
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)  # the rename itself survives a crash
        finally:
            os.close(directory)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    finally:
        os.umask(old_umask)


def save(path: Path, values: Mapping[str, str]) -> Path | None:
    """Back up the current file (0600 too), then write the new one. Returns the backup's path."""
    text = format_env(values)
    backup = None
    if path.exists():
        backup = path.with_name(path.name + ".bak")
        write_private(backup, path.read_bytes())
    write_private(path, text.encode())
    return backup


# -- what this machine is --------------------------------------------------------------------------


def _interface_addresses() -> list[str]:
    """This host's own addresses, read locally: `ip -o addr`, else ioctl and /proc. No network traffic."""
    try:
        out = subprocess.run(
            ["ip", "-o", "addr", "show"], capture_output=True, text=True, timeout=5, check=True
        ).stdout
        return re.findall(r"\binet6?\s+([0-9A-Fa-f.:]+)/", out)
    except (OSError, subprocess.SubprocessError):
        pass
    found = []
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            with contextlib.suppress(OSError):
                request = struct.pack("256s", name.encode()[:15])
                reply = fcntl.ioctl(sock.fileno(), 0x8915, request)  # SIOCGIFADDR
                found.append(socket.inet_ntoa(reply[20:24]))
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            found.append(str(ipaddress.IPv6Address(int(line.split()[0], 16))))
    return found


def detect_addresses(environ: Mapping[str, str]) -> list[str]:
    """Allowlist suggestions: this SSH session's client, this host's addresses, then loopback."""
    candidates = [environ.get(var, "").split(" ")[0] for var in ("SSH_CLIENT", "SSH_CONNECTION")]
    candidates += [*_interface_addresses(), "127.0.0.1", "::1"]
    found: list[str] = []
    for text in candidates:
        try:
            address = ipaddress.ip_address(text.split("%")[0])
        except ValueError:
            continue
        # Link-local addresses need a zone to mean anything; unspecified ones are not clients.
        if not (address.is_link_local or address.is_unspecified) and str(address) not in found:
            found.append(str(address))
    return sorted(found, key=lambda text: ipaddress.ip_address(text).is_loopback)  # loopback last


# -- talking to the user ---------------------------------------------------------------------------


def is_secret(key: str) -> bool:
    return re.search(r"TOKEN|SECRET|PASSWORD|API_KEY", key) is not None


def summary(values: Mapping[str, str]) -> str:
    shown = {key: mask(values[key]) if is_secret(key) else values[key] for key in _ordered(values)}
    return "\n".join(f"  {key}={value}" for key, value in shown.items() if value)


def mask(secret: str) -> str:
    """Enough of a secret to recognise it, never enough to use it."""
    return f"{secret[:4]}…{secret[-4:]}" if len(secret) >= 20 else "*" * 8


def ask(question: str, check: Callable[[str], str], default: str = "", *, shown: str | None = None) -> str:
    """Prompt until `check` accepts the answer; Enter takes `default` (displayed as `shown`)."""
    shown = default if shown is None else shown
    while True:
        answer = input(f"{question} [{shown}]: " if shown else f"{question}: ").strip()
        try:
            return check(answer or default)
        except Invalid as exc:
            print(f"  ! {exc}")


def ask_secret(question: str, check: Callable[[str], str]) -> str:
    """Hidden input; an empty answer is returned as is (the caller decides what Enter means)."""
    while True:
        answer = getpass.getpass(f"{question}: ").strip()
        try:
            return check(answer) if answer else ""
        except Invalid as exc:
            print(f"  ! {exc}")


def confirm(question: str, default: bool = True) -> bool:
    while True:
        answer = input(f"{question} [{'Y/n' if default else 'y/N'}]: ").strip().lower()
        if not answer:
            return default
        if answer in ("y", "yes", "n", "no"):
            return answer.startswith("y")
        print("  ! answer y or n")


def _none_or(check: Callable[[str], str]) -> Callable[[str], str]:
    return lambda text: "" if text.strip().lower() in ("", *NONE_WORDS) else check(text)


# -- the two ways to fill in the values ------------------------------------------------------------


def _flag_values(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, str]:
    """The flags that were given, checked, by .env key; raises Invalid naming the flag."""
    plain = {
        "HOST": ("--host", args.host, check_host),
        "PORT": ("--port", args.port, check_port),
        "ALLOWED_IPS": ("--allowed-ips", args.allowed_ips, check_ips),
        "ALLOWED_ORIGINS": ("--origins", args.origins, _none_or(check_origins)),
        "RATE_LIMIT_WINDOW_MS": ("--rate-limit-window-ms", args.rate_limit_window_ms, check_positive),
        "RATE_LIMIT_MAX_REQUESTS": ("--rate-limit-max", args.rate_limit_max, check_positive),
        "TLS_CERT": ("--tls-cert", args.tls_cert, _none_or(check_value)),
        "TLS_KEY": ("--tls-key", args.tls_key, _none_or(check_value)),
        "MCP_SERVERS_FILE": ("--servers-file", args.servers_file, _none_or(check_value)),
        "AUDIT_LOG": ("--audit-log", args.audit_log, check_value),
    }
    values = {}
    for key, (flag, raw, check) in plain.items():
        if raw is not None:
            try:
                values[key] = check(raw)
            except Invalid as exc:
                raise Invalid(f"{flag}: {exc}") from None
    if args.oauth_server is not None:
        values["OAUTH_SERVER"] = "true" if args.oauth_server else ""
    if args.public_url is not None:
        try:
            values["PUBLIC_URL"] = _none_or(check_public_url)(args.public_url)
        except Invalid as exc:
            raise Invalid(f"--public-url: {exc}") from None
    if args.token is not None:
        token = sys.stdin.readline().strip() if args.token == "-" else args.token  # noqa: S105
        try:
            values["AUTH_TOKEN"] = check_token(token)
        except Invalid as exc:
            raise Invalid(f"--token: {exc}") from None
    for item in args.api_key:
        name, has_value, value = item.partition("=")
        try:
            name = check_api_name(name)
            if not has_value:  # --api-key NAME: take it from the environment, out of `ps` and shell history
                if name not in environ:
                    raise Invalid(f"{name} is not set in the environment")
                value = environ[name]
            values[name] = check_value(value.strip())
        except Invalid as exc:
            raise Invalid(f"--api-key: {exc}") from None
    return values


def _finish_paths(values: dict[str, str], *, create_servers: bool) -> list[str]:
    """Check TLS and servers-file paths (made absolute: the service runs elsewhere). Returns notes."""
    notes = []
    cert, key = values.get("TLS_CERT", ""), values.get("TLS_KEY", "")
    if cert or key:
        if not (cert and key):
            raise Invalid("TLS needs both a certificate (--tls-cert) and a key (--tls-key)")
        values["TLS_CERT"], values["TLS_KEY"] = check_tls(cert, key)
    if servers := values.get("MCP_SERVERS_FILE", ""):
        path = Path(servers).expanduser().resolve()
        if not path.exists() and create_servers:
            try:
                starter = starter_servers(os.environ)
            except Invalid as exc:  # a file the server cannot use is worse than none
                raise Invalid(f"{path} does not exist, and no starter file was made: {exc}") from None
            write_private(path, (json.dumps(starter, indent=2) + "\n").encode())
            notes.append(f"created a starter servers file: {path}")
        if path.exists():
            check_servers_file(path)
        else:
            notes.append(f"warning: {path} does not exist yet; the server needs it to start")
        values["MCP_SERVERS_FILE"] = str(path)
    return notes


def non_interactive(values: dict[str, str]) -> tuple[dict[str, str], bool, list[str]]:
    """Defaults < current file < flags, all checked. Returns (values, token_is_new, notes)."""
    for key, default in DEFAULTS.items():
        values.setdefault(key, default)
    new_token = False
    if values.get("AUTH_TOKEN"):
        try:
            check_token(values["AUTH_TOKEN"])
        except Invalid as exc:
            raise Invalid(f"the current AUTH_TOKEN is weak ({exc}): pass --rotate-token or --token") from None
    else:
        values["AUTH_TOKEN"], new_token = secrets.token_urlsafe(32), True
    _session_secret(values)
    for key, check in (
        ("HOST", check_host),
        ("PORT", check_port),
        ("RATE_LIMIT_WINDOW_MS", check_positive),
        ("RATE_LIMIT_MAX_REQUESTS", check_positive),
    ):
        values[key] = check(values[key])
    values["ALLOWED_IPS"] = check_ips(values.get("ALLOWED_IPS") or "127.0.0.1,::1")
    values["ALLOWED_ORIGINS"] = check_origins(values.get("ALLOWED_ORIGINS", ""))
    notes = _finish_paths(values, create_servers=True)
    notes += _finish_oauth(values)
    return values, new_token, notes


def _finish_oauth(values: dict[str, str]) -> list[str]:
    """--oauth-server: PUBLIC_URL checked (its default when neither flag nor file gave one)."""
    if not _on(values.get("OAUTH_SERVER")):
        values.pop("OAUTH_SERVER", None)  # off is the server's default: nothing to write
        return []
    values["OAUTH_SERVER"] = "true"
    if values.get("PUBLIC_URL"):
        values["PUBLIC_URL"] = check_public_url(values["PUBLIC_URL"])
        return []
    values["PUBLIC_URL"] = default_public_url(values)
    return [f"note: PUBLIC_URL={values['PUBLIC_URL']} (the default; --public-url sets the URL clients reach)"]


def _session_secret(values: dict[str, str]) -> str:
    """Keep a valid SESSION_SECRET (rotating it logs every browser session out); else make one."""
    try:
        check_fernet(values.get("SESSION_SECRET", ""))
        return "kept"
    except Invalid:
        values["SESSION_SECRET"] = Fernet.generate_key().decode()
        return "generated"


def interactive(
    values: dict[str, str], env_dir: Path, environ: Mapping[str, str], given: set[str]
) -> tuple[dict[str, str], bool, list[str]]:
    """Ask for each setting, the current value (or flag) as the default. Returns like non_interactive."""
    print("Enter keeps the value in [brackets]; 'none' clears an optional one.\n")
    host = ask("Bind address", check_host, values.get("HOST", DEFAULTS["HOST"]))
    values["HOST"] = host
    if host in ("0.0.0.0", "::"):
        print("  note: every interface; the IP allowlist and the token are what keep strangers out")
    values["PORT"] = ask("Port", check_port, values.get("PORT", DEFAULTS["PORT"]))

    detected = detect_addresses(environ)
    current_ips = values.get("ALLOWED_IPS") or ",".join(detected)
    if client := environ.get("SSH_CLIENT", "").split(" ")[0]:
        print(f"  you are connected over SSH from {client}")
        if not _covered(client, current_ips):
            print(f"  note: {client} is not in the current list; add it to connect from there")
    values["ALLOWED_IPS"] = ask(
        "Client IPs/CIDRs allowed to connect, comma-separated", check_ips, current_ips.replace(",", ", ")
    )

    new_token = False
    current = values.get("AUTH_TOKEN", "")
    try:
        check_token(current)
        prompt = f"Auth token, hidden (Enter keeps {mask(current)}, 'new' makes a new one, or paste yours)"
    except Invalid:
        if current:
            print("  the current AUTH_TOKEN is too weak and will be replaced")
        current = ""
        prompt = "Auth token, hidden (Enter generates a 256-bit one, or paste your own)"
    answer = ask_secret(prompt, lambda text: text if text == "new" else check_token(text))
    if answer and answer != "new":
        values["AUTH_TOKEN"], new_token = answer, True
    elif answer == "new" or not current:
        values["AUTH_TOKEN"], new_token = secrets.token_urlsafe(32), True
    if "AUTH_TOKEN" in given and not answer:
        new_token = True  # came from --token: still to be copied to the clients
    print(f"  SESSION_SECRET: {_session_secret(values)} ({mask(values['SESSION_SECRET'])})")

    values["ALLOWED_ORIGINS"] = ask(
        "Browser origins allowed by CORS, comma-separated (scheme://host[:port])",
        _none_or(check_origins),
        values.get("ALLOWED_ORIGINS", ""),
        shown=values.get("ALLOWED_ORIGINS") or "none",
    )
    values["RATE_LIMIT_WINDOW_MS"] = ask(
        "Rate-limit window in milliseconds",
        check_positive,
        values.get("RATE_LIMIT_WINDOW_MS", DEFAULTS["RATE_LIMIT_WINDOW_MS"]),
    )
    values["RATE_LIMIT_MAX_REQUESTS"] = ask(
        "Requests allowed per window per client",
        check_positive,
        values.get("RATE_LIMIT_MAX_REQUESTS", DEFAULTS["RATE_LIMIT_MAX_REQUESTS"]),
    )
    _ask_tls(values)
    _ask_oauth(values, env_dir)
    _ask_api_keys(values)
    notes = _ask_servers_file(values, env_dir)
    return values, new_token, notes


def _ask_tls(values: dict[str, str]) -> None:
    while True:
        cert = ask(
            "TLS certificate file (PEM), or 'none' for plain HTTP",
            _none_or(check_value),
            values.get("TLS_CERT", ""),
            shown=values.get("TLS_CERT") or "none",
        )
        if not cert:
            values["TLS_CERT"] = values["TLS_KEY"] = ""
            if values["HOST"] not in ("127.0.0.1", "::1", "localhost"):
                print("  note: plain HTTP off this machine sends the token in clear; use TLS or a TLS proxy")
            return
        key = ask("TLS private key file (PEM, unencrypted)", check_value, values.get("TLS_KEY", ""))
        try:
            values["TLS_CERT"], values["TLS_KEY"] = check_tls(cert, key)
            return
        except Invalid as exc:
            print(f"  ! {exc}")


def _ask_oauth(values: dict[str, str], env_dir: Path) -> None:
    """The built-in OAuth server, for clients that cannot send a header (claude.ai, ChatGPT...)."""
    on = confirm(
        "Enable the built-in OAuth server (sign-in for claude.ai, ChatGPT, Claude Code without a key)?",
        default=_on(values.get("OAUTH_SERVER")),
    )
    if not on:
        values.pop("OAUTH_SERVER", None)
        return
    values["OAUTH_SERVER"] = "true"
    current = values.get("PUBLIC_URL", "")
    try:
        default = check_public_url(current)
    except Invalid:
        default = default_public_url(values)
    values["PUBLIC_URL"] = ask(
        "Public URL clients reach the gateway at (scheme://host[:port])", check_public_url, default
    )
    if urlsplit(values["PUBLIC_URL"]).scheme == "http" and not is_loopback(
        urlsplit(values["PUBLIC_URL"]).hostname or ""
    ):
        print("  note: plain http sends tokens and sign-in keys in clear; server_secure.py --check flags it")
    state = ask(
        "OAuth state directory (signing key, clients, grants)",
        _none_or(check_value),
        values.get("STATE_DIR") or DEFAULT_STATE_DIR,
    )
    if state and state != values.get("STATE_DIR", DEFAULT_STATE_DIR):
        # Made absolute, as the servers file is: the service may start in another directory.
        values["STATE_DIR"] = str((env_dir / Path(state).expanduser()).resolve())
    elif not state:
        values.pop("STATE_DIR", None)


def _ask_api_keys(values: dict[str, str]) -> None:
    print("Backend API keys, passed to the MCP servers that need them (hidden input).")
    names = list(KNOWN_API_KEYS) + [key for key in values if key.endswith("_API_KEY")]
    for name in dict.fromkeys(names):
        _ask_api_key(values, name)
    while name := ask("Another API key's variable name (Enter when done)", _none_or(check_api_name)):
        _ask_api_key(values, name)


def _ask_api_key(values: dict[str, str], name: str) -> None:
    current = values.get(name, "")
    hint = f"Enter keeps {mask(current)}, '-' removes it" if current else "Enter skips"
    answer = ask_secret(f"  {name} ({hint})", check_value)
    if answer in NONE_WORDS:
        values.pop(name, None)
    elif answer:
        values[name] = answer


def _ask_servers_file(values: dict[str, str], env_dir: Path) -> list[str]:
    default = values.get("MCP_SERVERS_FILE")
    if default is None:
        try:
            starter_servers(os.environ)
            default = str(env_dir / "servers.json")
        except Invalid as exc:
            print(f"  note: no starter servers file is offered, {exc}")
            default = ""
    while True:
        text = ask(
            "MCP servers file (Claude Desktop format), or 'none' for the built-in one",
            _none_or(check_value),
            default,
            shown=default or "none",
        )
        if not text:
            values["MCP_SERVERS_FILE"] = ""
            return []
        path = Path(text).expanduser().resolve()
        create = not path.exists() and confirm(f"  {path} does not exist. Create a starter file?")
        values["MCP_SERVERS_FILE"] = str(path)
        try:
            return _finish_paths(values, create_servers=create)
        except Invalid as exc:
            print(f"  ! {exc}")


# -- what to do next -------------------------------------------------------------------------------


def _client_host(host: str, environ: Mapping[str, str]) -> str:
    if host in ("0.0.0.0", "::"):
        outside = [a for a in detect_addresses(environ) if not ipaddress.ip_address(a).is_loopback]
        host = outside[0] if outside else "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def token_notice(token: str, env_path: Path, *, new: bool, show: bool) -> str:
    """The one place a token is printed: new, and to a terminal or asked for with --show-token."""
    if not new:
        return f"AUTH_TOKEN: kept, in {env_path}."
    if show:
        return f"New AUTH_TOKEN (shown once, copy it to your clients now):\n\n    {token}\n"
    return (
        f"New AUTH_TOKEN: in {env_path}, not printed as stdout is not a terminal "
        "(--show-token prints it; the commands below read it from the file)."
    )


def next_steps(
    values: Mapping[str, str],
    env_path: Path,
    token_is_new: bool,
    environ: Mapping[str, str],
    *,
    show_token: bool = False,
) -> str:
    scheme = "https" if values.get("TLS_CERT") else "http"
    url = f"{scheme}://{_client_host(values['HOST'], environ)}:{values['PORT']}"
    env_arg = shlex.quote(str(env_path))
    # The snippets name the token and never hold it: they are copied into notes, tickets and CI logs.
    # Sourced in a subshell, so only AUTH_TOKEN reaches the shell; absolute, as `.` searches PATH.
    load = f'export AUTH_TOKEN="$(. {shlex.quote(str(env_path.resolve()))} && printf %s "$AUTH_TOKEN")"'
    args = ["mcp-remote", f"{url}/sse", "--header", "Authorization: Bearer ${AUTH_TOKEN}"]
    if scheme == "http":
        args.append("--allow-http")  # mcp-remote wants https unless told otherwise
    env = {"AUTH_TOKEN": f"<AUTH_TOKEN from {env_path}>"}
    desktop = {"mcpServers": {"mcp-sse": {"command": "npx", "args": args, "env": env}}}
    oauth = ""
    if _on(values.get("OAUTH_SERVER")) and values.get("PUBLIC_URL"):
        connector = f"{values['PUBLIC_URL']}/mcp"
        remote = f"npx mcp-remote {connector}" + (" --allow-http" if connector.startswith("http:") else "")
        oauth = f"""
Clients that sign in with OAuth (no header, no token to paste; the person signs in with a key):
    connector URL: {connector}
    claude.ai / Claude Desktop: Settings, Connectors, Add custom connector, URL {connector}
    ChatGPT: a connector with URL {connector} and OAuth authentication
    Claude Code: claude mcp add --transport http mcp-sse {connector}   (then /mcp to sign in)
    mcp-remote: {remote}
"""
    python = f"""\
import asyncio
import os

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client


async def main() -> None:
    headers = {{"Authorization": f"Bearer {{os.environ['AUTH_TOKEN']}}"}}
    timeout = httpx2.Timeout(30, read=300)  # a tool call may take minutes; httpx2's default is 5 s
    async with httpx2.AsyncClient(headers=headers, timeout=timeout) as http:
        async with Client(streamable_http_client("{url}/mcp", http_client=http)) as client:
            print([tool.name for tool in (await client.list_tools()).tools])


asyncio.run(main())"""
    return f"""
{token_notice(values["AUTH_TOKEN"], env_path, new=token_is_new, show=show_token)}

Next steps
==========
Check the settings and the backends, then start the server:
    python server_secure.py --check-config --env-file {env_arg}
    python server_secure.py --env-file {env_arg}

Or run it under systemd (hardened unit, restarts on failure):
    sudo systemd/install.sh --env-file {env_arg}
    sudo systemctl enable --now mcp-sse
    journalctl -u mcp-sse -f

Load the token into your shell, and check it (curl):
    {load}
    curl -H "Authorization: Bearer $AUTH_TOKEN" {url}/health
{oauth}
Claude Desktop (claude_desktop_config.json), through mcp-remote:
{textwrap.indent(json.dumps(desktop, indent=2), "    ")}

MCP Python SDK (pip install mcp; AUTH_TOKEN loaded as above):
{textwrap.indent(python, "    ")}
"""


# -- the command -----------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="setup_secure.py",
        description="Write the .env of mcp-sse's secure profile (mode 0600). Asks by default; "
        "--non-interactive takes every answer from flags (unset ones keep the current file's "
        "value or the default) and never reads stdin.",
        epilog="Rerun at any time: current values are the defaults and Enter keeps them.",
    )
    add = parser.add_argument
    add("--output", type=Path, default=Path(".env"), help="the file to write (default: .env)")
    add("--non-interactive", action="store_true", help="no prompts: for CI, Ansible, Docker")
    add("--rotate-token", action="store_true", help="replace AUTH_TOKEN in --output, keep the rest")
    add(
        "--show-token",
        action="store_true",
        help="print a new AUTH_TOKEN even when stdout is not a terminal (it is then in your logs)",
    )
    add("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 for every interface)")
    add("--port", help=f"port to bind (default {DEFAULT_PORT})")
    add("--allowed-ips", metavar="LIST", help="client IPs/CIDRs, comma-separated (default loopback)")
    add("--origins", metavar="LIST", help="CORS origins scheme://host[:port], comma-separated, or none")
    add("--token", help="AUTH_TOKEN to use (>= 32 varied characters; '-' reads it from stdin)")
    add("--rate-limit-window-ms", metavar="MS", help="rate-limit window (default 900000)")
    add("--rate-limit-max", metavar="N", help="requests per window per client (default 100)")
    add("--tls-cert", metavar="PEM", help="TLS certificate file, or none")
    add("--tls-key", metavar="PEM", help="TLS private key file (unencrypted), or none")
    add("--servers-file", metavar="JSON", help="MCP_SERVERS_FILE; a starter file is made if missing")
    add("--audit-log", metavar="PATH", help="AUDIT_LOG file, or off for stderr only")
    add(
        "--oauth-server",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="turn the built-in OAuth server on (OAUTH_SERVER=true) or off",
    )
    add(
        "--public-url",
        metavar="URL",
        help="PUBLIC_URL, scheme://host[:port] clients reach (default with --oauth-server: https://<host>:<port>)",
    )
    add(
        "--api-key",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a backend's key, repeatable; NAME alone copies $NAME, NAME= removes it",
    )
    return parser


def _read_current(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    try:
        values = read_env_file(path)
    except (SettingsError, OSError, UnicodeDecodeError) as exc:
        raise Abort(f"cannot read {path}: {exc}") from None
    if path.stat().st_mode & 0o077:
        print(f"warning: {path} was readable by others; consider --rotate-token after this run")
    return values


def rotate_token(path: Path, values: dict[str, str], token: str | None, *, show: bool) -> int:
    if not values.get("AUTH_TOKEN"):
        raise Abort(f"{path} has no AUTH_TOKEN to rotate: run setup_secure.py first")
    values["AUTH_TOKEN"] = token or secrets.token_urlsafe(32)
    backup = save(path, values)
    print(f"Wrote {path} (previous version: {backup}). Nothing else changed.\n")
    print(token_notice(values["AUTH_TOKEN"], path, new=True, show=show))
    print("Restart the server to use it (under systemd: sudo systemctl restart mcp-sse).")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(attach_option_values(parser, sys.argv[1:] if argv is None else argv, "--token"))
    environ = os.environ
    path: Path = args.output
    show_token = args.show_token or sys.stdout.isatty()
    try:
        if not path.parent.is_dir():
            raise Abort(f"{path.parent} is not a directory")
        flags = _flag_values(args, environ)
        values = _read_current(path)
        if args.rotate_token:
            return rotate_token(path, values, flags.get("AUTH_TOKEN"), show=show_token)
        values.update(flags)  # empty values (--api-key NAME=, --tls-cert none) are left out of the file
        env_dir = path.parent.resolve()
        if args.non_interactive:
            values, new_token, notes = non_interactive(values)
            new_token = new_token or "AUTH_TOKEN" in flags
        else:
            if not sys.stdin.isatty():
                raise Abort("stdin is not a terminal: pass --non-interactive and flags (see --help)")
            print(f"mcp-sse secure setup: writing {path}" + (" (current values shown)" if values else ""))
            values, new_token, notes = interactive(values, env_dir, environ, set(flags))
            print("\n" + summary(values))
            if not confirm(f"Write {path}?"):
                print("Nothing written.")
                return 1
        backup = save(path, values)
    except Invalid as exc:
        print(f"setup_secure.py: {exc}", file=sys.stderr)
        return 2
    except Abort as exc:
        print(f"setup_secure.py: {exc}", file=sys.stderr)
        return 2
    except (EOFError, KeyboardInterrupt):
        print("\nAborted: nothing written.", file=sys.stderr)
        return 130
    for note in notes:
        print(note)
    print(f"Wrote {path} (mode 0600)" + (f"; previous version kept as {backup}" if backup else "") + ".")
    print(next_steps(values, path, new_token, environ, show_token=show_token))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
