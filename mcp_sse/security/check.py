"""`server_secure.py --check`: a production audit of the settings, before anyone else finds the hole."""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..settings import Settings
from .cookies import fernet_key
from .keys import KeysFileError, load_keys

__all__ = ["Finding", "audit_settings", "weak_secret"]

Level = Literal["CRITICAL", "WARNING", "OK"]
ANY_ADDRESS = frozenset({"*", "0.0.0.0", "0.0.0.0/0", "::", "::/0"})


@dataclass(frozen=True)
class Finding:
    level: Level
    message: str


def weak_secret(secret: str) -> str | None:
    """Why a token is too weak for a network, or None."""
    if len(secret) < 32:
        return f"only {len(secret)} characters (use 32 or more; setup_secure.py makes 43)"
    if len(set(secret)) < 12:
        return "too few distinct characters: it looks typed, not generated"
    return None


def _loose_mode(path: Path) -> bool:
    return bool(path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO))


def audit_settings(settings: Settings, env_file: Path | None) -> list[Finding]:
    findings: list[Finding] = []
    public = not settings.loopback

    def add(level: Level, message: str) -> None:
        findings.append(Finding(level, message))

    if settings.auth_token is None and settings.keys_file is None:
        add("CRITICAL" if public else "WARNING", "no AUTH_TOKEN and no KEYS_FILE: nobody can authenticate")
    if settings.auth_token is not None and (why := weak_secret(settings.auth_token.reveal())):
        add("CRITICAL", f"AUTH_TOKEN is weak: {why}")
    if settings.session_secret is None:
        add("CRITICAL" if public else "WARNING", "no SESSION_SECRET: cookie sessions cannot be signed")
    else:
        try:
            fernet_key(settings.session_secret)
        except ValueError as exc:
            add("CRITICAL", str(exc))
    for path, what in ((env_file, ".env"), (settings.keys_file, "KEYS_FILE")):
        if path is not None and path.exists() and _loose_mode(path):
            add("CRITICAL", f"{what} {path} is readable by others: chmod 600 {path}")
    if settings.keys_file is not None:
        try:
            keys = load_keys(settings.keys_file)
            expired = [k.id for k in keys if k.expired()]
            if expired:
                add("WARNING", f"expired keys still listed: {', '.join(expired)}")
        except KeysFileError as exc:
            add("CRITICAL", str(exc))
    if public and ANY_ADDRESS & set(settings.allowed_ips):
        add("CRITICAL", f"ALLOWED_IPS lets any address in while bound to {settings.host}")
    if public and not settings.tls and not settings.trusted_proxies:
        add("CRITICAL", "no TLS and no TRUSTED_PROXIES on a network bind: tokens travel in clear text")
    if public and not settings.allowed_hosts:
        add(
            "WARNING",
            f"no ALLOWED_HOSTS while bound to {settings.host}: any Host header is answered; list the"
            " names clients use (DNS-rebinding defence)",
        )
    wide = [
        o
        for o in settings.allowed_origins
        if o.startswith("http://") and "localhost" not in o and "127.0.0.1" not in o
    ]
    if wide:
        add("WARNING", f"ALLOWED_ORIGINS has plain-http origins: {', '.join(wide)}")
    if settings.url_auth:
        add("WARNING", "URL_AUTH=true: tokens in URLs end up in proxy logs and browser history")
    if settings.log_level == "DEBUG":
        add("WARNING", "LOG_LEVEL=DEBUG: debug logging on")
    if settings.audit_arguments:
        add(
            "WARNING", "AUDIT_TOOL_ARGUMENTS=true: tool argument values are logged (redacted fields excepted)"
        )
    if not any(f.level != "OK" for f in findings):
        add("OK", "no problems found")
    return findings
