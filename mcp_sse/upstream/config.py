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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ..settings import GATEWAY_SECRETS

__all__ = ["ConfigError", "ServerSpec", "expand", "load_servers"]

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
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


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
