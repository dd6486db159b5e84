"""One frozen Settings object, built from the command line, then the environment, then `.env`.

Names are the ones the product's security guide gave users (AUTH_TOKEN, ALLOWED_IPS, ...);
every setting is listed in the README. Secrets are `Secret`s, whose repr is masked so
they cannot reach a log by accident.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final

__all__ = [
    "DEFAULT_PORT",
    "GATEWAY_SECRETS",
    "Secret",
    "Settings",
    "SettingsError",
    "is_loopback",
    "read_env_file",
]

DEFAULT_PORT: Final = 3001
GATEWAY_SECRETS: Final = frozenset({"AUTH_TOKEN", "SESSION_SECRET"})
"""Never passed on to backend children: a compromised MCP server must not learn them."""
_ENV_LINE = re.compile(r"\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*")


class SettingsError(ValueError):
    """A setting has a value the server cannot run with; the message names it."""


class Secret:
    """A string that never shows itself in a repr, a log line or a traceback."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)


def read_env_file(path: str | Path) -> dict[str, str]:
    """Parse KEY=value lines (optional quotes, `export`, # comments), as systemd and dotenv read them."""
    values: dict[str, str] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _ENV_LINE.fullmatch(line)
        if match is None:
            raise SettingsError(f"{path}:{number}: expected KEY=value")
        key, value = match.groups()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
            if line.strip().endswith('"'):
                value = value.replace('\\"', '"').replace("\\\\", "\\")
        else:
            value = value.split(" #", 1)[0].rstrip()
        values[key] = value
    return values


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise ValueError("must be positive")
        return value

    return parse


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be 0-65535")
    return value


@dataclass(frozen=True)
class Settings:
    host: str = field(default="127.0.0.1", metadata={"env": "HOST", "parse": str})
    port: int = field(default=DEFAULT_PORT, metadata={"env": "PORT", "parse": _port})
    auth_token: Secret | None = field(default=None, metadata={"env": "AUTH_TOKEN", "parse": Secret})
    servers_file: Path | None = field(default=None, metadata={"env": "MCP_SERVERS_FILE", "parse": Path})
    keepalive: float = field(
        default=15.0, metadata={"env": "SSE_KEEPALIVE_SECONDS", "parse": _positive(float)}
    )
    max_body: int = field(
        default=4 * 1024 * 1024, metadata={"env": "MAX_BODY_BYTES", "parse": _positive(int)}
    )
    max_line: int = field(
        default=16 * 1024 * 1024, metadata={"env": "MAX_MESSAGE_BYTES", "parse": _positive(int)}
    )
    max_sessions: int = field(default=1000, metadata={"env": "MAX_SESSIONS", "parse": _positive(int)})
    session_idle: float = field(
        default=3600.0, metadata={"env": "SESSION_IDLE_TIMEOUT", "parse": _positive(float)}
    )
    event_buffer: int = field(default=512, metadata={"env": "EVENT_BUFFER", "parse": _positive(int)})
    shutdown_grace: float = field(
        default=10.0, metadata={"env": "SHUTDOWN_GRACE_SECONDS", "parse": _positive(float)}
    )
    log_level: str = field(default="INFO", metadata={"env": "LOG_LEVEL", "parse": str.upper})
    token_generated: bool = False

    def __post_init__(self) -> None:
        if self.keepalive > 25:
            # Clients and proxies commonly drop a silent stream after 30-60 s.
            raise SettingsError("SSE_KEEPALIVE_SECONDS must be at most 25")
        if self.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise SettingsError("LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR")

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    @classmethod
    def load(
        cls,
        overrides: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
        env_file: str | Path | None = None,
    ) -> Settings:
        """Command-line `overrides` (field names) win over the environment, which wins over `.env`."""
        environ = os.environ if environ is None else environ
        file_values: dict[str, str] = {}
        if env_file is not None:
            try:
                file_values = read_env_file(env_file)
            except OSError as exc:
                raise SettingsError(f"cannot read env file {env_file}: {exc.strerror}") from None
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = f.metadata.get("env")
            if name is None:
                continue
            if overrides and overrides.get(f.name) is not None:
                values[f.name] = overrides[f.name]
                continue
            raw = environ.get(name, file_values.get(name))
            if raw is None or (raw == "" and f.default is None):
                continue
            try:
                values[f.name] = f.metadata["parse"](raw)
            except ValueError as exc:
                shown = "(hidden)" if f.metadata["parse"] is Secret else repr(raw[:80])
                raise SettingsError(f"{name}={shown} is not valid: {exc}") from None
        return cls(**values)
