"""The servers file, in Claude Desktop's format, accepted unchanged, and remote servers as Claude
Code, VS Code and Cursor write them.

    {"mcpServers": {
      "time": {"command": "uvx", "args": ["mcp-server-time"], "env": {"TZ": "${TZ:-UTC}"}},
      "docs": {"type": "http", "url": "https://mcp.example.com/mcp",
               "headers": {"Authorization": "Bearer ${DOCS_TOKEN}"}}}}

`${VAR}` and `${VAR:-default}` are expanded from the environment so secrets stay out of
the file. Anything unexpected is an error that names the key and the file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from ..protocol.versions import ALL_VERSIONS, MODERN_VERSIONS
from ..settings import GATEWAY_SECRETS

__all__ = [
    "BreakerSpec",
    "ConfigError",
    "OAuth2Spec",
    "ServerSpec",
    "TlsSpec",
    "expand",
    "launch_problem",
    "load_servers",
    "resolve_command",
]

log = logging.getLogger("mcp_sse.upstream")
_COMMON_KEYS: Final = frozenset({"timeout", "circuit_breaker"})
_PER_SESSION_KEYS: Final = frozenset({"isolation", "max_sessions", "idle_timeout"})
CHILD_KEYS: Final = _COMMON_KEYS | _PER_SESSION_KEYS | {"command", "args", "env", "cwd", "env_from_headers"}
MODULE_KEYS: Final = _COMMON_KEYS | {"module"}
REMOTE_KEYS: Final = (
    _COMMON_KEYS
    | _PER_SESSION_KEYS
    | {"type", "url", "headers", "headers_from_request", "tls", "auth", "protocol"}
)
SERVER_KEYS: Final = CHILD_KEYS | MODULE_KEYS | REMOTE_KEYS
REMOTE_TYPES: Final = ("http", "sse", "ws")
BREAKER_KEYS: Final = frozenset({"failureThreshold", "volumeThreshold", "timeout", "successThreshold"})
_HEADER = re.compile(r"[A-Za-z0-9-]{1,64}")
# Headers an upstream request sets itself; one named in "headers" would be ambiguous or unsafe.
RESERVED_UPSTREAM_HEADERS: Final = frozenset(
    {"host", "content-length", "content-type", "accept", "connection", "transfer-encoding", "upgrade"}
    | {"mcp-session-id", "mcp-protocol-version", "last-event-id"}
)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_MODULE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
FORBIDDEN_FROM_HEADERS: Final = frozenset({"authorization", "cookie", "proxy-authorization"})
# A caller's header must never choose what the child runs, loads or trusts: the loader's and the
# interpreters' search paths and option variables, the shell's start-up files, proxies and CA bundles.
RUNTIME_VARIABLES: Final = frozenset(
    {"PATH", "HOME", "SHELL", "IFS", "ENV", "BASH_ENV", "TMPDIR", "GCONV_PATH", "JAVA_TOOL_OPTIONS"}
    | {"_JAVA_OPTIONS", "JDK_JAVA_OPTIONS", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE"}
)
RUNTIME_PREFIXES: Final = ("LD_", "DYLD_", "PYTHON", "NODE_", "NPM_CONFIG_", "PERL", "RUBY", "GIT_")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_PYTHON = re.compile(r"(python|pypy)[0-9.]*")  # python, python3, python3.12, pypy3
PROBE_TIMEOUT: Final = 15.0
"""How long `launch_problem` waits for an interpreter to say whether it can import a module."""
# Exits 0 if `python -m <argv[1]>` would find what to run, 3 if there is no such module, 4 if it
# is a package without the __main__ that -m runs. Looked for by path first, importing nothing
# (find_spec of a submodule imports its packages: seconds for an MCP server, with their side
# effects); only what is not found so is looked for again as import would.
_PROBE: Final = """\
import importlib.machinery as m, importlib.util as u, sys
def find(name):
    top, *parts = name.split(".")
    spec = u.find_spec(top)
    for part in parts:
        where = spec.submodule_search_locations if spec else None
        spec = m.PathFinder.find_spec(part, where) if where else None
    return spec or u.find_spec(name)
try:
    spec = find(sys.argv[1])
    runs = spec and (spec.submodule_search_locations is None or find(sys.argv[1] + ".__main__"))
except (ImportError, ValueError):
    spec = runs = None
sys.exit(0 if runs else 4 if spec else 3)
"""


class ConfigError(ValueError):
    """The servers file cannot be used; the message says where and why."""


@dataclass(frozen=True)
class BreakerSpec:
    """The circuit breaker of one backend (seed 004's model and defaults): it opens after
    `failure_threshold` failures among the last `volume_threshold` requests, fails fast while
    open, lets one request through after `open_seconds`, and closes after `success_threshold`
    successes in a row."""

    enabled: bool = True
    failure_threshold: int = 5
    volume_threshold: int = 10
    open_seconds: float = 60.0
    success_threshold: int = 3


@dataclass(frozen=True)
class TlsSpec:
    verify: bool = True
    ca_file: str | None = None
    cert: str | None = None
    key: str | None = None


@dataclass(frozen=True)
class OAuth2Spec:
    """OAuth 2.0 client credentials (RFC 6749 4.4) for a remote backend; the token stays in memory."""

    client_id: str
    client_secret: str = field(repr=False)
    token_url: str
    scopes: tuple[str, ...] = ()
    resource: str | None = None
    """RFC 8707 `resource`: the upstream the token is for, when its issuer wants it said."""


@dataclass(frozen=True)
class ServerSpec:
    name: str
    command: str = ""
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    timeout: float = 60.0
    module: str | None = None
    """`package.module:attribute`, a ToolSet served in-process instead of a child."""
    isolation: str = "shared"
    """"shared": one child for every session; "per-session": a child of its own for each session."""
    max_sessions: int = 10
    idle_timeout: float | None = None
    env_from_headers: Mapping[str, str] = field(default_factory=dict)
    """Request header -> child environment variable; per-session backends only."""
    breaker: BreakerSpec = field(default_factory=BreakerSpec)
    url: str | None = None
    """A remote MCP server instead of a child."""
    transport: str | None = None
    """"http" (Streamable HTTP), "sse" (the 2024-11-05 transport) or "ws"; None: http, else sse."""
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    """Sent upstream with every request (may hold credentials: never shown)."""
    headers_from_request: Mapping[str, str] = field(default_factory=dict)
    """Inbound request header -> upstream header; per-session remote backends only."""
    tls: TlsSpec = field(default_factory=TlsSpec)
    auth: OAuth2Spec | None = None
    protocol: str | None = None
    """The MCP revision to speak to a remote: None asks it (server/discover) and prefers 2026-07-28."""

    @property
    def kind(self) -> str:
        return "module" if self.module else "remote" if self.url else "child"


def expand(value: str, environ: Mapping[str, str], where: str) -> str:
    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        raise ConfigError(f"{where}: ${{{name}}} is not set in the environment (use ${{{name}:-default}})")

    return _VAR.sub(substitute, value)


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string")
    return value


def _number(entry: dict[str, Any], key: str, default: float, where: str, *, integer: bool = False) -> float:
    value = entry.get(key, default)
    kind = int if integer else int | float
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        noun = "a positive integer" if integer else "a positive number of seconds"
        raise ConfigError(f"{where}.{key} must be {noun}")
    return float(value)


def _isolation(entry: dict[str, Any], where: str) -> dict[str, Any]:
    isolation = entry.get("isolation", "shared")
    if isolation not in ("shared", "per-session"):
        raise ConfigError(f'{where}.isolation must be "shared" or "per-session"')
    per_session = {"max_sessions", "idle_timeout", "env_from_headers", "headers_from_request"} & set(entry)
    if isolation == "shared" and per_session:
        # A shared backend serves every caller: a per-caller value given to it would leak to all of them.
        raise ConfigError(f'{where}: {sorted(per_session)[0]!r} needs "isolation": "per-session"')
    limit = int(_number(entry, "max_sessions", 10, where, integer=True))
    idle = None if entry.get("idle_timeout") is None else _number(entry, "idle_timeout", 0, where)
    return {"isolation": isolation, "max_sessions": limit, "idle_timeout": idle}


def _header_map(entry: dict[str, Any], key: str, where: str) -> dict[str, str]:
    """A caller's header names, lower-cased, to what they become; never a credential of the caller's."""
    mapping = entry.get(key, {})
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}.{key} must map request header names to names")
    for header in mapping:
        if not _HEADER.fullmatch(header) or header.lower() in FORBIDDEN_FROM_HEADERS:
            raise ConfigError(f"{where}.{key}: {header[:64]!r} is not a header that may be passed on")
    return {h.lower(): v for h, v in mapping.items()}


def _env_from_headers(entry: dict[str, Any], where: str) -> dict[str, str]:
    mapping = _header_map(entry, "env_from_headers", where)
    for header, variable in mapping.items():
        if not isinstance(variable, str) or not _ENV_NAME.fullmatch(variable) or variable in GATEWAY_SECRETS:
            raise ConfigError(f"{where}.env_from_headers.{header}: not an environment variable name")
        upper = variable.upper()
        if upper in RUNTIME_VARIABLES or upper.endswith("_PROXY") or upper.startswith(RUNTIME_PREFIXES):
            raise ConfigError(
                f"{where}.env_from_headers.{header}: {variable} decides what the child runs or trusts;"
                " a caller's header may not set it"
            )
    return mapping


def _breaker(entry: dict[str, Any], where: str) -> BreakerSpec:
    value = entry.get("circuit_breaker", True)
    if isinstance(value, bool):
        return BreakerSpec(enabled=value)
    where = f"{where}.circuit_breaker"
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be false or an object of {', '.join(sorted(BREAKER_KEYS))}")
    if unknown := set(value) - BREAKER_KEYS:
        raise ConfigError(
            f"{where}: unknown key {sorted(unknown)[0]!r} (allowed: {', '.join(sorted(BREAKER_KEYS))})"
        )
    spec = BreakerSpec(
        failure_threshold=int(_number(value, "failureThreshold", 5, where, integer=True)),
        volume_threshold=int(_number(value, "volumeThreshold", 10, where, integer=True)),
        open_seconds=_number(value, "timeout", 60.0, where),
        success_threshold=int(_number(value, "successThreshold", 3, where, integer=True)),
    )
    if spec.failure_threshold > spec.volume_threshold:
        raise ConfigError(f"{where}: failureThreshold cannot exceed volumeThreshold")
    return spec


def _strings(value: Any, where: str, environ: Mapping[str, str]) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be an object of strings")
    return {str(k): expand(_string(v, f"{where}.{k}"), environ, f"{where}.{k}") for k, v in value.items()}


def _file(value: Any, where: str, environ: Mapping[str, str]) -> str:
    path = expand(_string(value, where), environ, where)
    if not Path(path).is_file():
        raise ConfigError(f"{where}: {path!r} is not a readable file")
    return path


def _url(value: Any, where: str, environ: Mapping[str, str]) -> str:
    url = expand(_string(value, where), environ, where)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https", "ws", "wss") or not parts.hostname:
        raise ConfigError(f"{where}: {url[:200]!r} is not an http(s):// or ws(s):// URL")
    if parts.username or parts.password:
        raise ConfigError(f'{where}: put credentials in "headers" or "auth", not in the URL')
    return url


def _remote(entry: dict[str, Any], where: str, environ: Mapping[str, str]) -> dict[str, Any]:
    url = _url(entry["url"], f"{where}.url", environ)
    scheme = urlsplit(url).scheme
    transport = entry.get("type")
    if transport is not None and transport not in REMOTE_TYPES:
        raise ConfigError(f'{where}.type must be one of "http", "sse" or "ws" for a "url" entry')
    if scheme in ("ws", "wss"):
        if transport not in (None, "ws"):
            raise ConfigError(f'{where}: a ws(s):// URL needs "type": "ws"')
        transport = "ws"
    elif transport == "ws":
        raise ConfigError(f'{where}: "type": "ws" needs a ws:// or wss:// URL')
    headers = _strings(entry.get("headers", {}), f"{where}.headers", environ)
    for name in headers:
        if not _HEADER.fullmatch(name) or name.lower() in RESERVED_UPSTREAM_HEADERS:
            raise ConfigError(f"{where}.headers: {name[:64]!r} is set by the gateway itself")
    if "auth" in entry and any(name.lower() == "authorization" for name in headers):
        raise ConfigError(f'{where}: give the credential in "auth" or as an Authorization header, not both')
    forwarded = _header_map(entry, "headers_from_request", where)
    for header, target in forwarded.items():
        if (
            not isinstance(target, str)
            or not _HEADER.fullmatch(target)
            or target.lower() in (RESERVED_UPSTREAM_HEADERS | {h.lower() for h in headers})
        ):
            raise ConfigError(
                f"{where}.headers_from_request.{header}: {str(target)[:64]!r} is not a header to set"
            )
    tls = entry.get("tls", {})
    if not isinstance(tls, dict) or set(tls) - {"verify", "ca_file", "cert", "key"}:
        raise ConfigError(f'{where}.tls is an object of "verify", "ca_file", "cert" and "key"')
    if not isinstance(tls.get("verify", True), bool):
        raise ConfigError(f"{where}.tls.verify must be true or false")
    if "key" in tls and "cert" not in tls:
        raise ConfigError(f'{where}.tls: "key" needs "cert"')
    tls_spec = TlsSpec(
        verify=tls.get("verify", True),
        **{k: _file(tls[k], f"{where}.tls.{k}", environ) for k in ("ca_file", "cert", "key") if k in tls},
    )
    protocol = entry.get("protocol")
    if protocol is not None and protocol not in ALL_VERSIONS:
        raise ConfigError(f"{where}.protocol must be one of {', '.join(ALL_VERSIONS)}")
    if protocol in MODERN_VERSIONS and transport in ("sse", "ws"):
        raise ConfigError(f'{where}: protocol {protocol} is spoken over "type": "http" only')
    return {
        "protocol": protocol,
        "url": url,
        "transport": transport,
        "headers": headers,
        "headers_from_request": forwarded,
        "tls": tls_spec,
        "auth": _oauth2(entry["auth"], f"{where}.auth", environ) if "auth" in entry else None,
    }


def _oauth2(value: Any, where: str, environ: Mapping[str, str]) -> OAuth2Spec:
    allowed = {"type", "clientId", "clientSecret", "tokenUrl", "scopes", "resource"}
    if not isinstance(value, dict) or value.get("type") != "oauth2":
        raise ConfigError(
            f'{where} must be {{"type": "oauth2", "clientId", "clientSecret", "tokenUrl", "scopes"}}'
        )
    if unknown := set(value) - allowed:
        raise ConfigError(
            f"{where}: unknown key {sorted(unknown)[0]!r} (allowed: {', '.join(sorted(allowed))})"
        )
    for key in ("clientId", "clientSecret", "tokenUrl"):
        if key not in value:
            raise ConfigError(f"{where}.{key} is required")
    token_url = _url(value["tokenUrl"], f"{where}.tokenUrl", environ)
    if urlsplit(token_url).scheme not in ("http", "https"):
        raise ConfigError(f"{where}.tokenUrl must be an http(s):// URL")
    scopes = value.get("scopes", [])
    if not isinstance(scopes, list) or not all(isinstance(x, str) and x and " " not in x for x in scopes):
        raise ConfigError(f"{where}.scopes must be a list of scope names")
    return OAuth2Spec(
        client_id=expand(_string(value["clientId"], f"{where}.clientId"), environ, f"{where}.clientId"),
        client_secret=expand(
            _string(value["clientSecret"], f"{where}.clientSecret"), environ, f"{where}.clientSecret"
        ),
        token_url=token_url,
        scopes=tuple(scopes),
        resource=None if "resource" not in value else _url(value["resource"], f"{where}.resource", environ),
    )


def _child(entry: dict[str, Any], where: str, environ: Mapping[str, str]) -> dict[str, Any]:
    command = expand(_string(entry["command"], f"{where}.command"), environ, f"{where}.command")
    args = entry.get("args", [])
    if not isinstance(args, list):
        raise ConfigError(f"{where}.args must be a list of strings")
    cwd = entry.get("cwd")
    return {
        "command": command,
        "args": tuple(
            expand(_string(a, f"{where}.args[{i}]"), environ, f"{where}.args[{i}]")
            for i, a in enumerate(args)
        ),
        "env": _strings(entry.get("env", {}), f"{where}.env", environ),
        "cwd": None if cwd is None else expand(_string(cwd, f"{where}.cwd"), environ, f"{where}.cwd"),
        "env_from_headers": _env_from_headers(entry, where),
    }


def _spec(name: str, entry: dict[str, Any], where: str, environ: Mapping[str, str]) -> ServerSpec:
    kinds = [k for k in ("command", "module", "url") if k in entry]
    if len(kinds) != 1:
        raise ConfigError(
            f'{where}: give exactly one of "command" (a child), "module" (in-process tools)'
            ' or "url" (a remote server)'
        )
    allowed = {"command": CHILD_KEYS, "module": MODULE_KEYS, "url": REMOTE_KEYS}[kinds[0]]
    if unknown := set(entry) - allowed:
        raise ConfigError(
            f"{where}: unknown key {sorted(unknown)[0]!r} (allowed: {', '.join(sorted(allowed))})"
        )
    common: dict[str, Any] = {
        "name": name,
        "timeout": _number(entry, "timeout", 60.0, where),
        "breaker": _breaker(entry, where),
    }
    if "module" in entry:
        module = _string(entry["module"], f"{where}.module")
        if not _MODULE.fullmatch(module):
            raise ConfigError(f'{where}: "module" is "package.module:toolset"')
        return ServerSpec(module=module, **common)
    isolation = _isolation(entry, where)
    if "url" in entry:
        return ServerSpec(**common, **isolation, **_remote(entry, where, environ))
    return ServerSpec(**common, **isolation, **_child(entry, where, environ))


def load_servers(path: str | Path, environ: Mapping[str, str] | None = None) -> list[ServerSpec]:
    environ = os.environ if environ is None else environ
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8-sig"))  # -sig: Notepad writes a BOM
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the servers file ({exc.strerror})") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(document, dict) or not isinstance(document.get("mcpServers"), dict):
        raise ConfigError(f'{path}: expected an object with a "mcpServers" object')
    # A real claude_desktop_config.json has other top-level keys (preferences, shortcuts): not ours.
    for key in sorted(set(document) - {"mcpServers"}):
        log.warning("%s: top-level key %r ignored (only 'mcpServers' is read)", path, key)
    specs = []
    for name, entry in document["mcpServers"].items():
        where = f"{path}: mcpServers.{name}"
        if not _NAME.fullmatch(name):
            raise ConfigError(f"{where}: a server name is 1-64 letters, digits, '_', '-' or '.'")
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be an object")
        specs.append(_spec(name, entry, where, environ))
    if not specs:
        raise ConfigError(f"{path}: mcpServers is empty")
    return specs


# -- would the child start? ------------------------------------------------------------------------


def resolve_command(command: str, env: Mapping[str, str], cwd: str | None) -> str | None:
    """The file a child started with `env` in `cwd` would execute as `command`, or None.

    As subprocess does it: a name without "/" is searched on the PATH of the child's own
    environment (os.defpath without one), and anything relative, a PATH entry included, is
    taken from the child's working directory, not ours."""
    base = Path(cwd) if cwd else Path.cwd()
    if "/" in command:
        candidates = [base / command]
    else:
        candidates = [base / entry / command for entry in os.get_exec_path(dict(env))]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _python_module(command: str, args: Sequence[str]) -> tuple[list[str], str] | None:
    """For `python [options] -m module ...`: the options (some change sys.path: -I, -S, -E) and
    the module. None for anything else: another program, a script, `-c`."""
    if not _PYTHON.fullmatch(Path(command).name):
        return None
    options: list[str] = []
    rest = iter(args)
    for arg in rest:
        if arg.startswith("--") or not arg.startswith("-") or arg == "-":
            return None  # a script, stdin, or a long option
        letters = arg[1:]  # a cluster of short options, like -Im name
        for i, letter in enumerate(letters):
            if letter not in "cmWX":
                continue
            value = letters[i + 1 :] or next(rest, "")  # these take a value: the rest, or the next argument
            if letter == "c" or not value:
                return None
            if letter == "m":
                return options + ([f"-{letters[:i]}"] if i else []), value
            options += [f"-{letters[: i + 1]}", value]
            break
        else:
            options.append(arg)
    return None


def launch_problem(spec: ServerSpec, env: Mapping[str, str], *, timeout: float = PROBE_TIMEOUT) -> str | None:
    """Why the child of `spec` would not start with `env`, or None if it would.

    Checked the way the child starts: its command resolved on its own PATH from its cwd, and
    for a Python interpreter run with `-m module`, that interpreter asked (in the child's
    environment and cwd, within `timeout` seconds) whether it can import the module."""
    where = f"backend {spec.name!r}"
    if spec.cwd is not None and not Path(spec.cwd).is_dir():
        return f'{where}: "cwd" {spec.cwd!r} is not a directory'
    path = resolve_command(spec.command, env, spec.cwd)
    if path is None:
        if "/" in spec.command:
            return (
                f"{where}: command {spec.command!r} is not an executable file"
                + (f" (relative to its cwd {spec.cwd!r})" if spec.cwd and spec.command[0] != "/" else "")
                + ': fix "command" in the servers file'
            )
        return (
            f"{where}: command {spec.command!r} not found on the child's PATH "
            f"({os.pathsep.join(os.get_exec_path(dict(env)))}): install it, put its directory on PATH, "
            'or give its absolute path as "command" in the servers file'
        )
    if (probe := _python_module(spec.command, spec.args)) is None:
        return None
    options, module = probe
    try:
        # A session of its own, so a hung interpreter and anything it started are killed together.
        with subprocess.Popen(
            [path, *options, "-c", _PROBE, module],
            env=dict(env),
            cwd=spec.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        ) as probe_process:
            try:
                _, stderr = probe_process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(probe_process.pid, signal.SIGKILL)
                probe_process.wait()
                return f"{where}: {path} did not say within {timeout:g} s whether it can import {module!r}"
    except OSError as exc:
        return f"{where}: cannot run {path}: {exc.strerror or exc}"
    if probe_process.returncode == 3:
        package = module.split(".")[0].replace("_", "-")
        return (
            f"{where}: {spec.command!r} ({path}) cannot import {module!r}, which it runs with -m: "
            f"install it into that interpreter (`{path} -m pip install {package}`, if that is the "
            'package\'s name), or point "command" at a Python that has it'
        )
    if probe_process.returncode == 4:
        return f"{where}: {module!r} is a package without __main__: `{spec.command} -m {module}` cannot run"
    if probe_process.returncode != 0:
        last = stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        return f"{where}: {path} failed ({last[0][:200]}) when asked whether it can import {module!r}"
    return None
