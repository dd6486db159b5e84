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

__all__ = ["ConfigError", "ServerSpec", "expand", "load_servers"]

log = logging.getLogger("mcp_sse.upstream")
SERVER_KEYS: Final = frozenset({"command", "args", "env", "cwd", "timeout"})
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(ValueError):
    """The servers file cannot be used; the message says where and why."""


@dataclass(frozen=True)
class ServerSpec:
    name: str
    command: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    timeout: float = 60.0


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
        if "command" not in entry:
            raise ConfigError(f'{where}: "command" is required')
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
            )
        )
    if not specs:
        raise ConfigError(f"{path}: mcpServers is empty")
    return specs
