"""One frozen Settings object, built from the command line, then the environment, then `.env`.

Names are the ones the product's security guide gave users (AUTH_TOKEN, ALLOWED_IPS, ...);
every setting is listed in the README. Secrets are `Secret`s, whose repr is masked so
they cannot reach a log by accident.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

__all__ = [
    "DEFAULT_PORT",
    "GATEWAY_SECRETS",
    "KEY_RATE_LIMIT_DEFAULT",
    "Secret",
    "Settings",
    "SettingsError",
    "attach_option_values",
    "is_loopback",
    "read_env_file",
]

DEFAULT_PORT: Final = 3001
KEY_RATE_LIMIT_DEFAULT: Final = 9000
"""Requests per key per rate-limit window: 10 a second, sustained over the default 15 minutes."""
GATEWAY_SECRETS: Final = frozenset({"AUTH_TOKEN", "SESSION_SECRET", "METRICS_TOKEN", "CLUSTER_SECRET"})
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


def attach_option_values(parser: argparse.ArgumentParser, argv: Sequence[str], *options: str) -> list[str]:
    """`--token -Xy…` as `--token=-Xy…`: argparse refuses a value that starts with "-", and a random
    token does one time in 64. A lone "-" (read stdin) is attached too; another option is not."""
    known = parser._option_string_actions  # argparse has no public list of its options
    out: list[str] = []
    args = iter(argv)
    for arg in args:
        value = next(args, None) if arg in options else None
        if value is None or value.partition("=")[0] in known:
            out.extend(a for a in (arg, value) if a is not None)
        else:
            out.append(f"{arg}={value}")
    return out


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


def is_loopback(host: str | None) -> bool:
    """Is `host` (a name or an address, as urlsplit gives it) loopback? localhost counts (RFC 6761)."""
    if host is None:
        return False
    if host.lower() == "localhost":
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


def _list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _optional_path(text: str) -> Path | None:
    # AUDIT_LOG=off (or empty) keeps the audit on stderr only, for journald.
    return None if text.strip().lower() in ("", "off", "none", "-") else Path(text)


def _audit_rotate(text: str) -> str:
    value = text.strip().lower()
    if value not in ("daily", "size", "off"):  # security/audit.py's ROTATE_MODES
        raise ValueError("expected daily, size or off")
    return value


def _metrics_listen(text: str) -> tuple[str, int]:
    """METRICS_LISTEN: host:port ([::1]:port for IPv6) of the metrics listener, loopback only."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host:
        raise ValueError("expected host:port, e.g. 127.0.0.1:9464")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not is_loopback(host):
        # SECURITY: this listener serves /metrics with no token at all.
        raise ValueError(
            f"{host!r} is not a loopback address; the metrics listener has no token, so it binds "
            "127.0.0.1, ::1 or localhost only (scrape from elsewhere through /metrics on the main "
            "port with METRICS_TOKEN or an admin key)"
        )
    return host, _port(port)


def _host_port(text: str) -> tuple[str, int]:
    """CLUSTER_LISTEN / CLUSTER_ADVERTISE: host:port, [::1]:port for IPv6."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host:
        raise ValueError("expected host:port, e.g. 10.0.0.5:3101")
    return (host[1:-1] if host.startswith("[") and host.endswith("]") else host), _port(port)


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        # nan slips through `value <= 0`, and nan or inf would make a timeout or a window never end.
        if not 0 < value < math.inf:
            raise ValueError("must be a positive, finite number")
        return value

    return parse


def _public_url(text: str) -> str:
    """PUBLIC_URL: scheme://host[:port], the origin clients reach the gateway at. Issuer and
    resource identifiers are made from it, so it holds no path, query, fragment or user info."""
    from urllib.parse import urlsplit

    text = text.strip()
    parts = urlsplit(text)
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is no number in range
    except ValueError:
        raise ValueError(f"PUBLIC_URL {text!r} has an invalid port") from None
    if parts.scheme not in ("https", "http") or not parts.hostname or "//" not in text:
        raise ValueError(f"PUBLIC_URL {text!r} must be an absolute https:// (or http://) URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment or text.endswith(("?", "#")):
        raise ValueError(f"PUBLIC_URL {text!r} must be scheme://host[:port] only, no path, query or fragment")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"PUBLIC_URL {text!r} must not carry user info")
    if not text.isascii() or any(c in text for c in ' "\\'):
        raise ValueError(f"PUBLIC_URL {text!r} must be visible ASCII without quotes or backslashes")
    host = parts.netloc.lower()
    if parts.port is not None and parts.port == {"http": 80, "https": 443}[parts.scheme]:
        host = host.rpartition(":")[0]  # the default port, as browsers leave it out of an Origin
    return f"{parts.scheme}://{host}"


def _issuer_url(text: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(text)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"issuer {text!r} must be an absolute https:// URL")
    if parts.query or parts.fragment or parts.username is not None or parts.password is not None:
        raise ValueError(f"issuer {text!r} must have no query, fragment or user info (RFC 8414 section 2)")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise ValueError(f"issuer {text!r} must use https (plain http only on a loopback address)")
    return text


def _issuers(text: str) -> tuple[str, ...]:
    return tuple(_issuer_url(item) for item in _list(text))


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
    write_timeout: float = field(
        default=30.0, metadata={"env": "SSE_WRITE_TIMEOUT_SECONDS", "parse": _positive(float)}
    )
    body_timeout: float = field(
        default=30.0, metadata={"env": "REQUEST_BODY_TIMEOUT_SECONDS", "parse": _positive(float)}
    )
    header_timeout: float = field(
        default=30.0, metadata={"env": "REQUEST_HEADER_TIMEOUT_SECONDS", "parse": _positive(float)}
    )
    max_body: int = field(
        default=4 * 1024 * 1024, metadata={"env": "MAX_BODY_BYTES", "parse": _positive(int)}
    )
    max_line: int = field(
        default=16 * 1024 * 1024, metadata={"env": "MAX_MESSAGE_BYTES", "parse": _positive(int)}
    )
    max_sessions: int = field(default=1000, metadata={"env": "MAX_SESSIONS", "parse": _positive(int)})
    # None: two per session (its stream and the connection its POSTs come on), plus 64.
    max_connections: int | None = field(
        default=None, metadata={"env": "MAX_CONNECTIONS", "parse": _positive(int)}
    )
    session_idle: float = field(
        default=3600.0, metadata={"env": "MCP_SESSION_IDLE_SECONDS", "parse": _positive(float)}
    )
    event_buffer: int = field(default=512, metadata={"env": "EVENT_BUFFER", "parse": _positive(int)})
    shutdown_grace: float = field(
        default=10.0, metadata={"env": "SHUTDOWN_GRACE_SECONDS", "parse": _positive(float)}
    )
    log_level: str = field(default="INFO", metadata={"env": "LOG_LEVEL", "parse": str.upper})
    # auto: uvloop when installed (pip install 'mcp-sse[fast]'), else asyncio's own loop.
    event_loop: str = field(default="auto", metadata={"env": "EVENT_LOOP", "parse": str.lower})
    tool_separator: str = field(default="__", metadata={"env": "TOOL_SEPARATOR", "parse": str})
    # -- the secure profile -----------------------------------------------------------------
    allowed_ips: tuple[str, ...] = field(
        default=("127.0.0.1", "::1"), metadata={"env": "ALLOWED_IPS", "parse": _list}
    )
    allowed_origins: tuple[str, ...] = field(default=(), metadata={"env": "ALLOWED_ORIGINS", "parse": _list})
    allowed_hosts: tuple[str, ...] = field(default=(), metadata={"env": "ALLOWED_HOSTS", "parse": _list})
    trusted_proxies: tuple[str, ...] = field(default=(), metadata={"env": "TRUSTED_PROXIES", "parse": _list})
    rate_limit_window_ms: int = field(
        default=900_000, metadata={"env": "RATE_LIMIT_WINDOW_MS", "parse": _positive(int)}
    )
    # The security guide's limit (100 per 15 minutes), per client address: what arrives without
    # credentials and every failed credential pays it.
    rate_limit_max_requests: int = field(
        default=100, metadata={"env": "RATE_LIMIT_MAX_REQUESTS", "parse": _positive(int)}
    )
    # Authenticated requests are counted per key on the same window. None: KEY_RATE_LIMIT_DEFAULT,
    # or RATE_LIMIT_MAX_REQUESTS when that is higher (see `key_rate_limit`).
    key_rate_limit_max_requests: int | None = field(
        default=None, metadata={"env": "KEY_RATE_LIMIT_MAX_REQUESTS", "parse": _positive(int)}
    )
    lockout_failures: int = field(
        default=10, metadata={"env": "AUTH_LOCKOUT_FAILURES", "parse": _positive(int)}
    )
    lockout_seconds: float = field(
        default=900.0, metadata={"env": "AUTH_LOCKOUT_SECONDS", "parse": _positive(float)}
    )
    max_streams_per_key: int = field(
        default=32, metadata={"env": "MAX_STREAMS_PER_KEY", "parse": _positive(int)}
    )
    keys_file: Path | None = field(default=None, metadata={"env": "KEYS_FILE", "parse": Path})
    session_secret: Secret | None = field(default=None, metadata={"env": "SESSION_SECRET", "parse": Secret})
    cookie_lifetime: float = field(
        default=86_400.0, metadata={"env": "COOKIE_LIFETIME_SECONDS", "parse": _positive(float)}
    )
    cookie_idle: float = field(
        default=3600.0, metadata={"env": "COOKIE_IDLE_SECONDS", "parse": _positive(float)}
    )
    audit_log: Path | None = field(
        default=Path("secure-server.log"), metadata={"env": "AUDIT_LOG", "parse": _optional_path}
    )
    audit_arguments: bool = field(default=False, metadata={"env": "AUDIT_TOOL_ARGUMENTS", "parse": _bool})
    # daily: at the first line of each UTC day, and sooner at AUDIT_MAX_BYTES; size: at AUDIT_MAX_BYTES
    # only; off: never (an external logrotate), and no pruning either.
    audit_rotate: str = field(default="daily", metadata={"env": "AUDIT_ROTATE", "parse": _audit_rotate})
    audit_max_bytes: int = field(
        default=100 * 1024 * 1024, metadata={"env": "AUDIT_MAX_BYTES", "parse": _positive(int)}
    )
    # Rotated files are kept whole this long, then only their security events (security/audit.py's
    # SECURITY_EVENTS) until AUDIT_SECURITY_RETENTION_DAYS, which is at least AUDIT_RETENTION_DAYS.
    audit_retention_days: float = field(
        default=90.0, metadata={"env": "AUDIT_RETENTION_DAYS", "parse": _positive(float)}
    )
    audit_security_retention_days: float = field(
        default=365.0, metadata={"env": "AUDIT_SECURITY_RETENTION_DAYS", "parse": _positive(float)}
    )
    tls_cert: Path | None = field(default=None, metadata={"env": "TLS_CERT", "parse": Path})
    tls_key: Path | None = field(default=None, metadata={"env": "TLS_KEY", "parse": Path})
    health_public: bool = field(default=False, metadata={"env": "HEALTH_PUBLIC", "parse": _bool})
    url_auth: bool = field(default=False, metadata={"env": "URL_AUTH", "parse": _bool})
    # -- metrics (ops/metrics.py): GET /metrics for admin keys, METRICS_TOKEN, or METRICS_LISTEN --
    metrics: bool = field(default=True, metadata={"env": "METRICS", "parse": _bool})
    # A bearer token that grants GET /metrics and nothing else (a scraper's credential).
    metrics_token: Secret | None = field(default=None, metadata={"env": "METRICS_TOKEN", "parse": Secret})
    # host:port of a second listener serving /metrics with no token; loopback addresses only.
    metrics_listen: tuple[str, int] | None = field(
        default=None, metadata={"env": "METRICS_LISTEN", "parse": _metrics_listen}
    )
    # -- OAuth (all off by default) ------------------------------------------------------------
    public_url: str | None = field(default=None, metadata={"env": "PUBLIC_URL", "parse": _public_url})
    oauth_server: bool = field(default=False, metadata={"env": "OAUTH_SERVER", "parse": _bool})
    oauth_issuers: tuple[str, ...] = field(default=(), metadata={"env": "OAUTH_ISSUERS", "parse": _issuers})
    # Empty: the built-in server's defaults (claude.ai, claude.com, ChatGPT, loopback on any port).
    oauth_redirect_uris: tuple[str, ...] = field(
        default=(), metadata={"env": "OAUTH_REDIRECT_URIS", "parse": _list}
    )
    oauth_token_ttl: float = field(
        default=3600.0, metadata={"env": "OAUTH_TOKEN_TTL_SECONDS", "parse": _positive(float)}
    )
    oauth_refresh_ttl: float = field(
        default=30 * 86400.0, metadata={"env": "OAUTH_REFRESH_TTL_SECONDS", "parse": _positive(float)}
    )
    oauth_fetch_timeout: float = field(
        default=5.0, metadata={"env": "OAUTH_FETCH_TIMEOUT_SECONDS", "parse": _positive(float)}
    )
    # -- more than one process or host (store/redis.py, cluster/) -------------------------------
    # redis://[:password@]host:port/db or rediss:// (TLS); the password makes it a secret.
    redis_url: Secret | None = field(default=None, metadata={"env": "REDIS_URL", "parse": Secret})
    workers: int = field(default=1, metadata={"env": "WORKERS", "parse": _positive(int)})
    # The internal listener other instances forward 2025-era sessions to (cluster/): where it binds,
    # and the host:port the others reach it at (default: what it bound). Only with REDIS_URL.
    cluster_listen: tuple[str, int] = field(
        default=("127.0.0.1", 0), metadata={"env": "CLUSTER_LISTEN", "parse": _host_port}
    )
    cluster_advertise: tuple[str, int] | None = field(
        default=None, metadata={"env": "CLUSTER_ADVERTISE", "parse": _host_port}
    )
    # Signs every hop between instances; default: derived from SESSION_SECRET (the same everywhere).
    cluster_secret: Secret | None = field(default=None, metadata={"env": "CLUSTER_SECRET", "parse": Secret})
    # STATE_DIR, else systemd's $STATE_DIRECTORY (see `load`), else ./state.
    state_dir: Path = field(default=Path("state"), metadata={"env": "STATE_DIR", "parse": Path})
    token_generated: bool = False

    def __post_init__(self) -> None:
        if self.keepalive > 25:
            # Clients and proxies commonly drop a silent stream after 30-60 s.
            raise SettingsError("SSE_KEEPALIVE_SECONDS must be at most 25")
        if self.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise SettingsError("LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR")
        if self.event_loop not in ("auto", "asyncio", "uvloop"):
            raise SettingsError("EVENT_LOOP must be auto, asyncio or uvloop")
        if not self.tool_separator or any(c.isspace() for c in self.tool_separator):
            raise SettingsError("TOOL_SEPARATOR must be non-empty and without spaces")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SettingsError("TLS_CERT and TLS_KEY go together: set both or neither")
        if self.metrics_listen is not None:
            try:
                _metrics_listen(f"[{self.metrics_listen[0]}]:{self.metrics_listen[1]}")
            except ValueError as exc:
                raise SettingsError(f"METRICS_LISTEN: {exc}") from None
        if not self.metrics and (self.metrics_token or self.metrics_listen):
            raise SettingsError("METRICS_TOKEN and METRICS_LISTEN need METRICS on: unset METRICS=off or them")
        if self.metrics_token is not None:
            if len(self.metrics_token.reveal()) < 32:
                raise SettingsError(
                    "METRICS_TOKEN must be at least 32 characters (e.g. python server_secure.py generate-key)"
                )
            if self.auth_token is not None and self.metrics_token.reveal() == self.auth_token.reveal():
                raise SettingsError("METRICS_TOKEN must differ from AUTH_TOKEN: it grants /metrics only")
        if self.redis_url is not None:
            scheme = self.redis_url.reveal().partition("://")[0].lower()
            if scheme not in ("redis", "rediss", "unix"):
                raise SettingsError("REDIS_URL must be a redis://, rediss:// or unix:// URL")
        if self.workers > 1 and self.redis_url is None:
            # N processes with N private copies of the limits, logins and revocations would be N gateways.
            raise SettingsError(f"WORKERS={self.workers} needs REDIS_URL: workers share their state there")
        if self.cluster_secret is not None and len(self.cluster_secret.reveal()) < 32:
            raise SettingsError("CLUSTER_SECRET must be at least 32 characters (e.g. openssl rand -hex 32)")
        if "*" in self.allowed_origins:
            # With credentials allowed, "*" would let any web page read the answers.
            raise SettingsError("ALLOWED_ORIGINS cannot be '*': list the exact origins")
        if isinstance(self.oauth_issuers, str):
            raise SettingsError("OAUTH_ISSUERS must be a list of issuer URLs, not one string")
        try:
            if self.public_url is not None:
                object.__setattr__(self, "public_url", _public_url(self.public_url))
            for issuer in self.oauth_issuers:
                _issuer_url(issuer)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        if self.oauth_redirect_uris:
            from .oauth.clients import RedirectPolicy  # here: settings.py imports nothing else of ours

            try:
                RedirectPolicy(self.oauth_redirect_uris)
            except ValueError as exc:
                raise SettingsError(str(exc)) from None  # names OAUTH_REDIRECT_URIS and the entry
        if self.oauth_refresh_ttl < self.oauth_token_ttl:
            raise SettingsError(
                f"OAUTH_REFRESH_TTL_SECONDS={self.oauth_refresh_ttl:g} must be at least "
                f"OAUTH_TOKEN_TTL_SECONDS={self.oauth_token_ttl:g}"
            )
        if self.oauth and self.public_url is None:
            if not self.loopback:
                raise SettingsError(
                    f"PUBLIC_URL is required with OAuth on a non-loopback bind (HOST={self.host}): "
                    "the URL clients use, e.g. https://mcp.example.com"
                )
            if self.port == 0:
                raise SettingsError("PUBLIC_URL is required with OAuth on PORT=0 (the port is not known yet)")

    @property
    def key_rate_limit(self) -> int:
        """Requests per window for a key without its own `rate_limit` in the keys file.

        Not RATE_LIMIT_MAX_REQUESTS: one agent session (Claude Code, Claude Desktop through
        mcp-remote) makes more than 100 requests in 15 minutes, each legacy-SSE answer and
        notification being a POST of its own. Never below the per-address limit either: a key
        is not held tighter than a caller without one.
        """
        if self.key_rate_limit_max_requests is not None:
            return self.key_rate_limit_max_requests
        return max(KEY_RATE_LIMIT_DEFAULT, self.rate_limit_max_requests)

    @property
    def oauth(self) -> bool:
        """Is any OAuth mode on (the built-in server, or external issuers)?"""
        return self.oauth_server or bool(self.oauth_issuers)

    @property
    def public_origin(self) -> str:
        """PUBLIC_URL, or on loopback http://<HOST>:<PORT>: what issuer and resource URLs start with."""
        if self.public_url is not None:
            return self.public_url
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    @property
    def host_names(self) -> tuple[str, ...]:
        """The Host names requests may carry: ALLOWED_HOSTS, or on a loopback bind the loopback
        names and PUBLIC_URL's host (SECURITY: a DNS-rebound page names its own host, and a
        same-origin request of its own carries no Origin to refuse it by). Empty: any."""
        if self.allowed_hosts:
            return self.allowed_hosts
        if not self.loopback:
            return ()  # its public names are not knowable here; --check says to set ALLOWED_HOSTS
        public = urlsplit(self.public_url).hostname if self.public_url else None
        return tuple(dict.fromkeys(["localhost", "127.0.0.1", "[::1]", *([public] if public else [])]))

    @property
    def connection_limit(self) -> int:
        return self.max_connections or 2 * self.max_sessions + 64

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

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
            if raw is None and name == "STATE_DIR" and environ.get("STATE_DIRECTORY"):
                # systemd's StateDirectory=: a colon-separated list, the first is ours.
                raw = environ["STATE_DIRECTORY"].split(":")[0]
            if raw is None or (raw == "" and f.default is None and f.name != "audit_log"):
                continue
            try:
                values[f.name] = f.metadata["parse"](raw)
            except ValueError as exc:
                shown = "(hidden)" if f.metadata["parse"] is Secret else repr(raw[:80])
                raise SettingsError(f"{name}={shown} is not valid: {exc}") from None
        return cls(**values)
