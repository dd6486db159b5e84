"""The audit log: one JSON object per line, about who did what, from where, and what we refused.

Lines go to a file (append-only, created 0600: it names addresses and key ids) and to a
stream (stderr by default, so the journal has them too). Every string is capped and
stripped of control characters, and the line is `json.dumps`'d with ASCII escapes, so a
value sent by a client cannot start a line of its own (CWE-117, log injection). Field
names that look like secrets are redacted wherever they appear.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Final, TextIO

from aiohttp import web

# AUDIT, the app's AuditLog, lives in state.py with the other keys; it is re-exported from here.
from ..state import AUDIT, CLIENT_IP, IDENTITY, REQUEST_ID

__all__ = ["AUDIT", "MESSAGES", "REDACTED", "AuditLog", "digest", "fingerprint", "sanitize"]

log = logging.getLogger("mcp_sse.audit")

REDACTED: Final = "[REDACTED]"
MAX_STRING: Final = 512
MAX_ITEMS: Final = 50
MAX_DEPTH: Final = 6

MESSAGES: Final[dict[str, str]] = {
    # Operators grep for these phrases (they were the original server's log lines); keep them verbatim.
    "auth.failed": "Invalid token",
    "auth.locked": "Too many failed attempts",
    "ip.denied": "Access denied",
    "origin.denied": "Access denied",
    "host.denied": "Access denied",
    "rate_limited": "Too many requests",
}

# Substrings of field names whose values are secrets. Over-matching ("keyboard") only hides a value.
_SECRET_NAME: Final = re.compile(r"pass(word|wd)?|token|secret|key|authorization|cookie|credential", re.I)
# ...unless the name says the value was made safe on purpose: an id, or a digest of the secret.
_SAFE_SUFFIX: Final = re.compile(r"(_id|_ids|_sha256|_digest)$", re.I)
_BEARER: Final = re.compile(r"\b(bearer|basic)\s+\S+", re.I)
# C0/C1 controls, DEL, and the Unicode line/paragraph separators and bidi overrides that make a
# log viewer show something other than what was logged ("Trojan Source", CVE-2021-42574).
_CONTROL: Final = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_FIXED: Final = frozenset({"ts", "event"})  # when and what: never taken from a caller's fields
# Made once: json.dumps with any option builds a new encoder on every call.
_CANONICAL: Final = json.JSONEncoder(sort_keys=True, default=str).encode
_LINE: Final = json.JSONEncoder(ensure_ascii=True, default=str).encode


def digest(data: bytes) -> str:
    """A short sha256 fingerprint: enough to correlate lines about one token without storing it."""
    return hashlib.sha256(data).hexdigest()[:16]


@functools.lru_cache(maxsize=4096)
def _secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name)) and not _SAFE_SUFFIX.search(name)


def _mask(match: re.Match[str]) -> str:
    # A function, not a template: re parses a template with a group reference again on every call.
    return f"{match.group(1)} {REDACTED}"


@functools.lru_cache(maxsize=1024)
def _line_name(key: str) -> tuple[str, bool]:
    """The name a caller's field takes in the line, and whether its value is a secret."""
    # A caller may say who (identity=...) when there is no request; it can never rewrite when/what.
    name = f"field_{key}" if key in _FIXED else key
    return _CONTROL.sub("", name)[:MAX_STRING], _secret_name(key)


def _text(value: str) -> str:
    """`value` printable and capped, with any "Bearer <token>" masked."""
    # isprintable() is False for every whitespace character but the space, and for every character
    # _CONTROL matches: a printable string without a space needs neither expression (most values).
    if " " in value or not value.isprintable():
        # Masked before stripping: the space between "Bearer" and a token may be a control character.
        value = _CONTROL.sub("", _BEARER.sub(_mask, value))
    return value if len(value) <= MAX_STRING else value[:MAX_STRING] + "...[truncated]"


def sanitize(value: Any, depth: int = 0) -> Any:
    """A copy of `value` fit for the line, in one pass: values of secret-looking keys replaced (in
    nested dicts and lists too), strings capped and printable, no NaN, bounded depth and length."""
    # Tuples, not `X | Y`: isinstance would build a union object on every call.
    if isinstance(value, str):  # first: most values are
        return _text(value)
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if depth >= MAX_DEPTH:
        return "[too deep]"
    if isinstance(value, dict):
        return {
            _text(str(k)): REDACTED if _secret_name(str(k)) else sanitize(v, depth + 1)
            for k, v in list(value.items())[:MAX_ITEMS]
        }
    if isinstance(value, (list, tuple, set, frozenset)):
        return [sanitize(v, depth + 1) for v in list(value)[:MAX_ITEMS]]
    return _text(str(value))  # anything else as its text


def fingerprint(value: Any) -> tuple[str, int]:
    """(sha256 prefix, size) of a payload's canonical JSON: what is logged instead of the payload."""
    data = _CANONICAL(value).encode()
    return digest(data), len(data)


def _now() -> str:
    """UTC, to the millisecond: 2026-11-21T09:10:50.123Z."""
    now = time.time()
    second = int(now)
    return f"{_second(second)}.{int((now - second) * 1000):03d}Z"


@functools.lru_cache(maxsize=1)
def _second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


class AuditLog:
    """Append-only JSON-lines audit log. I/O errors are logged once and never raised.

    `log_values=False` (the default, AUDIT_TOOL_ARGUMENTS unset): fields whose value is a dict
    or list (payloads such as tool arguments) are logged as `{"sha256": ..., "bytes": ...}`;
    scalars (names, counts, reasons) are always logged. With `log_values=True` payloads are
    logged, still redacted. Secret-looking names are redacted either way.
    """

    def __init__(
        self, path: str | Path | None, *, stream: TextIO | None = sys.stderr, log_values: bool = False
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.stream = stream
        self.log_values = log_values
        self._fd: int | None = None
        self._warned: set[str] = set()
        if self.path is not None:
            try:
                # 0600 at creation (no window where it is world-readable). No buffering: each line is
                # one os.write on an O_APPEND fd, so it is on disk at once, and whole even if two
                # processes share the file.
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                mode = os.fstat(self._fd).st_mode & 0o777
                if mode & 0o077:
                    log.warning("audit log %s is readable by others (mode %o): chmod 600 it", self.path, mode)
            except OSError as exc:
                self._warn("file", f"cannot open audit log {self.path}: {exc}; auditing to the stream only")

    def _warn(self, sink: str, message: str) -> None:
        if sink not in self._warned:
            self._warned.add(sink)
            log.warning("%s", message)

    def _payload(self, value: Any) -> Any:
        """A caller's field value as it goes in the line: sanitized, payloads digested."""
        if isinstance(value, str):  # most are: straight to what sanitize() would do with it
            return _text(value)
        if self.log_values or not isinstance(value, (dict, list, tuple)):
            return sanitize(value, 1)
        sha256, size = fingerprint(value)
        return {"sha256": sha256, "bytes": size}

    def record(self, name: str, request: web.Request | None = None, **fields: Any) -> dict[str, Any]:
        """The dict `event()` would write: useful to tests and to callers that forward it elsewhere."""
        line: dict[str, Any] = {"ts": _now(), "event": _text(name)}
        if request is None:
            line.update(request_id=None, ip=None, identity=None)
        else:
            ip, identity = request.get(CLIENT_IP), request.get(IDENTITY)
            line["request_id"] = sanitize(request.get(REQUEST_ID))
            line["ip"] = None if ip is None else str(ip)
            line["identity"] = sanitize(identity)
            # The path without the query string: a URL token (URL_AUTH) must not reach the log.
            line["method"] = _text(request.method)
            line["path"] = _text(request.path)
        # The human phrase: the event's fixed phrase, then the caller's msg (or its reason).
        extra = fields.pop("msg", None) or fields.get("reason")
        for key, value in fields.items():
            if value is None and line.get(key) is not None:
                continue  # identity=None from a caller does not erase what the request knows
            name_in_line, secret = _line_name(key)
            line[name_in_line] = REDACTED if secret else self._payload(value)
        phrase = MESSAGES.get(name)
        parts = [p for p in (phrase, None if extra is None else str(extra)) if p]
        line["msg"] = _text(": ".join(parts)) if parts else line["event"]
        return line

    def event(self, name: str, request: web.Request | None = None, **fields: Any) -> None:
        """Write one line about `name`. Never raises: auditing must not take the server down."""
        try:
            text = _LINE(self.record(name, request, **fields)) + "\n"
        except Exception as exc:  # a field that cannot be serialised must not fail the request
            self._warn("encode", f"cannot encode audit event {name!r}: {exc!r}")
            return
        if self._fd is not None:
            try:
                os.write(self._fd, text.encode())
            except OSError as exc:
                self._warn("write", f"cannot write audit log {self.path}: {exc}")
        if self.stream is not None:
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError) as exc:  # ValueError: the stream was closed
                self._warn("stream", f"cannot write audit events to the stream: {exc}")

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError as exc:
                self._warn("close", f"cannot close audit log {self.path}: {exc}")
