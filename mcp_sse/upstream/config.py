"""The servers file, in Claude Desktop's format, accepted unchanged.

    {"mcpServers": {"time": {"command": "uvx", "args": ["mcp-server-time"], "env": {"TZ": "${TZ:-UTC}"}}}}

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

from ..settings import GATEWAY_SECRETS

__all__ = ["ConfigError", "ServerSpec", "expand", "launch_problem", "load_servers", "resolve_command"]

log = logging.getLogger("mcp_sse.upstream")
SERVER_KEYS: Final = frozenset(
    {
        "command",
        "args",
        "env",
        "cwd",
        "timeout",
        "module",
        "isolation",
        "max_sessions",
        "idle_timeout",
        "env_from_headers",
    }
)
_HEADER = re.compile(r"[A-Za-z0-9-]{1,64}")
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


def _isolation(entry: dict[str, Any], where: str) -> dict[str, Any]:
    isolation = entry.get("isolation", "shared")
    if isolation not in ("shared", "per-session"):
        raise ConfigError(f'{where}.isolation must be "shared" or "per-session"')
    per_session = {"max_sessions", "idle_timeout", "env_from_headers"} & set(entry)
    if isolation == "shared" and per_session:
        # A shared child serves every caller: a per-caller value given to it would leak to all of them.
        raise ConfigError(f'{where}: {sorted(per_session)[0]!r} needs "isolation": "per-session"')
    limit = entry.get("max_sessions", 10)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"{where}.max_sessions must be a positive integer")
    idle = entry.get("idle_timeout")
    if idle is not None and (isinstance(idle, bool) or not isinstance(idle, int | float) or idle <= 0):
        raise ConfigError(f"{where}.idle_timeout must be a positive number of seconds")
    mapping = entry.get("env_from_headers", {})
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}.env_from_headers must map header names to environment variable names")
    for header, variable in mapping.items():
        if not _HEADER.fullmatch(header) or header.lower() in FORBIDDEN_FROM_HEADERS:
            raise ConfigError(
                f"{where}.env_from_headers: {header[:64]!r} is not a header that may be passed on"
            )
        if not isinstance(variable, str) or not _ENV_NAME.fullmatch(variable) or variable in GATEWAY_SECRETS:
            raise ConfigError(f"{where}.env_from_headers.{header}: not an environment variable name")
        upper = variable.upper()
        if upper in RUNTIME_VARIABLES or upper.endswith("_PROXY") or upper.startswith(RUNTIME_PREFIXES):
            raise ConfigError(
                f"{where}.env_from_headers.{header}: {variable} decides what the child runs or trusts;"
                " a caller's header may not set it"
            )
    return {
        "isolation": isolation,
        "max_sessions": limit,
        "idle_timeout": None if idle is None else float(idle),
        "env_from_headers": {h.lower(): v for h, v in mapping.items()},
    }


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
        unknown = set(entry) - SERVER_KEYS
        if unknown:
            raise ConfigError(
                f"{where}: unknown key {sorted(unknown)[0]!r} (allowed: {', '.join(sorted(SERVER_KEYS))})"
            )
        if ("command" in entry) == ("module" in entry):
            raise ConfigError(
                f'{where}: give exactly one of "command" (a child) or "module" (in-process tools)'
            )
        if "module" in entry:
            module = _string(entry["module"], f"{where}.module")
            if not _MODULE.fullmatch(module) or set(entry) - {"module", "timeout"}:
                raise ConfigError(
                    f'{where}: "module" is "package.module:toolset", with no other key but "timeout"'
                )
            specs.append(ServerSpec(name=name, module=module, timeout=float(entry.get("timeout", 60.0))))
            continue
        command = expand(_string(entry["command"], f"{where}.command"), environ, f"{where}.command")
        args = entry.get("args", [])
        if not isinstance(args, list):
            raise ConfigError(f"{where}.args must be a list of strings")
        env = entry.get("env", {})
        if not isinstance(env, dict):
            raise ConfigError(f"{where}.env must be an object of strings")
        cwd = entry.get("cwd")
        timeout = entry.get("timeout", 60.0)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise ConfigError(f"{where}.timeout must be a positive number of seconds")
        specs.append(
            ServerSpec(
                name=name,
                command=command,
                args=tuple(
                    expand(_string(a, f"{where}.args[{i}]"), environ, f"{where}.args[{i}]")
                    for i, a in enumerate(args)
                ),
                env={
                    k: expand(_string(v, f"{where}.env.{k}"), environ, f"{where}.env.{k}")
                    for k, v in env.items()
                },
                cwd=None if cwd is None else expand(_string(cwd, f"{where}.cwd"), environ, f"{where}.cwd"),
                timeout=float(timeout),
                **_isolation(entry, where),
            )
        )
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
