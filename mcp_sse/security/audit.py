"""The audit log: one JSON object per line, about who did what, from where, and what we refused.

Lines go to a file (append-only, created 0600: it names addresses and key ids) and to a
stream (stderr by default, so the journal has them too). Every string is capped and
stripped of control characters, and the line is `json.dumps`'d with ASCII escapes, so a
value sent by a client cannot start a line of its own (CWE-117, log injection). Field
names that look like secrets are redacted wherever they appear.

Retention: the file rotates (daily or by size) into dated files beside it, which `prune` keeps
AUDIT_RETENTION_DAYS whole, then only their security events until AUDIT_SECURITY_RETENTION_DAYS.
An external logrotate works too: a file moved away is reopened at the next line.
"""

from __future__ import annotations

import calendar
import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TextIO

from aiohttp import web

# AUDIT, the app's AuditLog, lives in state.py with the other keys; it is re-exported from here.
from ..protocol.jsonrpc import encoder
from ..state import AUDIT, CLIENT_IP, IDENTITY, REQUEST_ID

__all__ = [
    "AUDIT",
    "MESSAGES",
    "REDACTED",
    "ROTATE_MODES",
    "SECURITY_EVENTS",
    "AuditLog",
    "RotatedFile",
    "digest",
    "fingerprint",
    "is_security_event",
    "redact",
    "rotated_files",
    "sanitize",
]

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

# Kept AUDIT_SECURITY_RETENTION_DAYS (a year), not AUDIT_RETENTION_DAYS: what an incident review
# asks months later. Who failed to get in or was locked out, what was refused and from where
# (addresses, origins, hosts, rate limits, the policy), and every change to who may get in or what
# runs (keys and servers reloaded, sign-ins and sign-outs, sessions ended because their key went,
# OAuth clients registered, grants revoked, codes and refresh tokens replayed). Not auth.success
# (one per request) nor tool.invoked: the bulk of the log, and the 90-day kind.
SECURITY_EVENTS: Final = frozenset(
    {
        "auth.failed",
        "auth.locked",  # the lockout
        "ip.denied",
        "origin.denied",
        "host.denied",
        "rate_limited",
        "connection.refused",
        "policy.denied",
        "keys.reload",
        "servers.reload",
        "session.login",
        "session.logout",
        "session.expired",  # sessions closed because their key was removed (revoked)
        "session.revoked",  # sessions closed because the OAuth grant of their token was revoked
        "oauth.register",
        "oauth.revoke",
        "oauth.code_reuse",
        "oauth.refresh_reuse",
        # Credentials changed through the admin API (seed 004 keeps who revoked what for a year).
        "admin.key.create",
        "admin.key.delete",
        "admin.key.rotate",
        "admin.session.delete",
        "admin.oauth.grant.revoke",
    }
)
# ...and any other event whose outcome is a refusal (oauth.authorize, oauth.token, ...).
_REFUSALS: Final = frozenset({"refused", "denied", "failed"})

ROTATE_MODES: Final = ("daily", "size", "off")
_STAMP: Final = "%Y-%m-%dT%H%M%SZ"  # audit.log.2026-12-03T120000Z: UTC, sortable, no ':' (scp, Windows)
_SECURITY_SUFFIX: Final = ".security"  # a rotated file past AUDIT_RETENTION_DAYS, security events only
_DAY: Final = 86_400.0

# Substrings of field names whose values are secrets. Over-matching ("keyboard") only hides a value.
_SECRET_NAME: Final = re.compile(r"pass(word|wd)?|token|secret|key|authorization|cookie|credential", re.I)
# ...unless the name says the value was made safe on purpose: an id, or a digest of the secret.
_SAFE_SUFFIX: Final = re.compile(r"(_id|_ids|_sha256|_digest)$", re.I)
_BEARER: Final = re.compile(r"\b(bearer|basic)\s+\S+", re.I)
# C0/C1 controls, DEL, and the Unicode line/paragraph separators and bidi overrides that make a
# log viewer show something other than what was logged ("Trojan Source", CVE-2021-42574).
_CONTROL: Final = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_FIXED: Final = frozenset({"ts", "event"})  # when and what: never taken from a caller's fields
# Built once, the C encoder called directly (protocol/jsonrpc.encoder): the stdlib rebuilds it per call.
_CANONICAL: Final = encoder(separators=(", ", ": "), ensure_ascii=True, sort_keys=True, default=str)
_LINE: Final = encoder(separators=(", ", ": "), ensure_ascii=True, default=str)


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


@functools.lru_cache(maxsize=512)
def _fixed_text(value: str) -> str:
    """`_text` of one of the event names the code passes: a small fixed set, so cached."""
    return _text(value)


@functools.lru_cache(maxsize=512)
def _phrase(name: str) -> str:
    """An event's line message when its caller gave none: its fixed phrase, or its name."""
    return _text(MESSAGES.get(name) or "") or _fixed_text(name)


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


def redact(value: Any) -> Any:
    """`value` read back from the file with every secret-looking field's value replaced, at any
    depth, and "Bearer <token>" masked; nothing else changed. Lines were sanitized when written:
    this is the second lock, for what the audit query hands out (another writer, an older version)."""
    if isinstance(value, str):
        return _BEARER.sub(_mask, value) if " " in value or not value.isprintable() else value
    if isinstance(value, dict):
        return {k: REDACTED if _secret_name(str(k)) else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def is_security_event(line: Mapping[str, Any]) -> bool:
    """Is this line kept AUDIT_SECURITY_RETENTION_DAYS (see SECURITY_EVENTS)?"""
    return line.get("event") in SECURITY_EVENTS or line.get("outcome") in _REFUSALS


@dataclass(frozen=True)
class RotatedFile:
    path: Path
    stamp: float  # when it was rotated (seconds since the epoch, from its name): no line is later
    serial: int  # the -N of a second rotation in the same second
    security_only: bool  # rewritten past AUDIT_RETENTION_DAYS: its name ends in .security


def rotated_files(path: Path) -> list[RotatedFile]:
    """The rotated files of the audit log at `path`, oldest first. The live file is not one."""
    pattern = re.compile(
        re.escape(path.name) + r"\.(\d{4}-\d\d-\d\dT\d{6}Z)(?:-(\d+))?(" + re.escape(_SECURITY_SUFFIX) + ")?"
    )
    found = []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    for name in names:
        match = pattern.fullmatch(name)
        if match is None:
            continue
        try:
            stamp = calendar.timegm(time.strptime(match[1], _STAMP))
        except ValueError:  # digits, but no date (month 13): not one of ours
            continue
        found.append(RotatedFile(path.parent / name, stamp, int(match[2] or 0), bool(match[3])))
    return sorted(found, key=lambda f: (f.stamp, f.serial))


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

    `rotate` (AUDIT_ROTATE): "daily" renames the file to `<name>.<UTC stamp>` at the first line of
    a new UTC day, and sooner when it would pass `max_bytes`; "size" only at `max_bytes`; "off"
    (the default here, so a bare AuditLog never renames files; Settings defaults to daily) never,
    and prunes nothing either: for an external logrotate. With rotation on, `prune` runs at start
    and after each rotation, in a thread of its own (a rewrite must not stall the event loop).

    Not logging.handlers: FileHandler opens with the umask (we create 0600, with no window), writes
    through a buffered stream (we make one os.write per line on O_APPEND: whole, at once, even
    with another process on the file), and its rotating classes do size or time, not both, and
    do not follow a move. From WatchedFileHandler we take its check: st_dev and st_ino of the
    path against the open file's, before each line.
    """

    def __init__(
        self,
        path: str | Path | None,
        *,
        stream: TextIO | None = sys.stderr,
        log_values: bool = False,
        rotate: str = "off",
        max_bytes: int = 100 * 1024 * 1024,
        retention_days: float = 90.0,
        security_retention_days: float = 365.0,
    ) -> None:
        if rotate not in ROTATE_MODES:
            raise ValueError(f"rotate must be one of {', '.join(ROTATE_MODES)}, not {rotate!r}")
        self.path = Path(path) if path is not None else None
        self.stream = stream
        self.log_values = log_values
        self.rotate = rotate
        self.max_bytes = max_bytes
        self.retention = retention_days * _DAY
        # Security events are kept at least as long as the rest: a shorter setting cannot mean less.
        self.security_retention = max(security_retention_days, retention_days) * _DAY
        self._lock = threading.Lock()  # one writer at a time: rotation and the write it precedes
        self._fd: int | None = None
        self._id: tuple[int, int] | None = None  # (st_dev, st_ino) of the file _fd is
        self._day = 0  # the UTC day (days since the epoch) the open file's lines are from
        self._retry_at = 0.0  # after a failed rotation, the monotonic time to try again
        self._closed = self.path is None
        self._pruner: threading.Thread | None = None
        self._warned: set[str] = set()
        self.observer: Callable[[str, Mapping[str, Any]], None] | None = None
        """Told of every event (its name and the caller's fields) before it is written: the
        metrics count from here (ops/metrics.py). It must not raise, nor keep the fields."""
        if self.path is not None:
            with self._lock:
                self._open()
            self._start_prune()

    def _warn(self, sink: str, message: str) -> None:
        if sink not in self._warned:
            self._warned.add(sink)
            log.warning("%s", message)

    # -- the file ---------------------------------------------------------------------------------

    def _open(self) -> int | None:
        """Open (or create) the file at the path; its size, or None when it cannot be opened."""
        assert self.path is not None
        try:
            # 0600 at creation (no window where it is world-readable). No buffering: each line is
            # one os.write on an O_APPEND fd, so it is on disk at once, and whole even if two
            # processes share the file.
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            st = os.fstat(fd)
        except OSError as exc:
            self._warn("file", f"cannot open audit log {self.path}: {exc}; auditing to the stream only")
            return None
        self._fd, self._id = fd, (st.st_dev, st.st_ino)
        # A file left from an earlier day is rotated at its first new line (in daily mode).
        self._day = int((st.st_mtime if st.st_size else time.time()) // _DAY)
        mode = st.st_mode & 0o777
        if mode & 0o077:
            log.warning("audit log %s is readable by others (mode %o): chmod 600 it", self.path, mode)
        return st.st_size

    def _reopen(self) -> int | None:
        fd, self._fd, self._id = self._fd, None, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError as exc:
                self._warn("close", f"cannot close audit log {self.path}: {exc}")
        return self._open()

    def _follow(self) -> int | None:
        """The size of the file at the path; reopened first if it is not the one we hold (moved
        away by logrotate or an operator, or never opened). None: there is no file to write."""
        assert self.path is not None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return self._reopen()
        except OSError:  # cannot tell (a directory we may not search): keep the file we have
            return None if self._fd is None else 0
        if self._fd is not None and (st.st_dev, st.st_ino) == self._id:
            return st.st_size  # copytruncate: the same file, shorter; O_APPEND writes at its new end
        return self._reopen()

    def _due(self, size: int, more: int) -> bool:
        if self.rotate == "off" or size == 0 or time.monotonic() < self._retry_at:
            return False
        if size + more > self.max_bytes:
            return True
        return self.rotate == "daily" and int(time.time() // _DAY) != self._day

    def _rotate(self) -> int | None:
        """Rename the file to `<name>.<stamp>` and open a new one; under self._lock, so every line
        is written before the rename (it is in the rotated file) or after the reopen (the new one)."""
        assert self.path is not None and self._fd is not None
        try:
            # Another process appending to the same file rotates it once, not twice: whoever holds
            # the lock renames; the other finds the path is another file now and just reopens.
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                try:
                    st: os.stat_result | None = os.stat(self.path)
                except FileNotFoundError:  # renamed by the other process, not yet made again
                    st = None
                if st is not None and (st.st_dev, st.st_ino) == self._id:
                    target = self._target()
                    os.rename(self.path, target)
                    os.chmod(target, 0o600)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        except OSError as exc:
            self._warn("rotate", f"cannot rotate audit log {self.path}: {exc}; trying again in a minute")
            self._retry_at = time.monotonic() + 60
            return 0
        size = self._reopen()
        self._start_prune()
        return size

    def _target(self) -> Path:
        assert self.path is not None
        base = f"{self.path.name}.{time.strftime(_STAMP, time.gmtime())}"
        target, serial = self.path.with_name(base), 0
        while os.path.lexists(target):  # rename() would replace it: a second rotation this second
            serial += 1
            target = self.path.with_name(f"{base}-{serial}")
        return target

    def _write(self, data: bytes) -> None:
        with self._lock:
            if self._closed:
                return
            size = self._follow()
            if size is not None and self._due(size, len(data)):
                size = self._rotate()
            if size is None or self._fd is None:
                return
            try:
                os.write(self._fd, data)
            except OSError as exc:
                self._warn("write", f"cannot write audit log {self.path}: {exc}")

    # -- retention --------------------------------------------------------------------------------

    def _start_prune(self) -> None:
        if self.rotate == "off" or (self._pruner is not None and self._pruner.is_alive()):
            return  # one at a time; the next rotation prunes what this one started after
        # A daemon: a rewrite cut short at exit leaves a temporary file, which the next prune removes.
        self._pruner = threading.Thread(target=self.prune, name="audit-prune", daemon=True)
        self._pruner.start()

    def wait_pruned(self, timeout: float | None = None) -> bool:
        """Wait for the prune started at start or by the last rotation; True when none is running."""
        pruner = self._pruner
        if pruner is not None:
            pruner.join(timeout)
        return pruner is None or not pruner.is_alive()

    def prune(self, now: float | None = None) -> None:
        """Apply the retentions to the rotated files, by age (mtime: when its last line was written).

        One file mixes both kinds of event, so a file older than AUDIT_RETENTION_DAYS is rewritten
        (atomically, 0600, mtime kept) with its security events only and renamed `<name>.security`,
        which says it is done; it is deleted after AUDIT_SECURITY_RETENTION_DAYS. Chosen over
        splitting every file at rotation: that reads and writes each file at once, on the hot path,
        and doubles the files; this reads a file once, 90 days on, in a thread. Never raises.
        """
        if self.path is None:
            return
        now = time.time() if now is None else now
        for rotated in rotated_files(self.path):
            try:
                st = rotated.path.stat()
                age = now - st.st_mtime
                if age > self.security_retention:
                    rotated.path.unlink()
                elif age > self.retention and not rotated.security_only:
                    self._keep_security(rotated.path, st)
            except FileNotFoundError:
                continue  # another process pruned it first
            except OSError as exc:
                self._warn("prune", f"cannot prune audit log {rotated.path}: {exc}")
        try:  # temporary files of a rewrite cut short (the process was killed)
            for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
                if now - stale.stat().st_mtime > _DAY:
                    stale.unlink()
        except OSError as exc:
            self._warn("prune", f"cannot prune audit log {self.path}: {exc}")

    @staticmethod
    def _keep_security(path: Path, st: os.stat_result) -> None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # 0600
        try:
            with open(path, "rb") as source, os.fdopen(fd, "wb") as out:
                for raw in source:  # a line at a time: memory bounded
                    try:
                        line = json.loads(raw)
                    except ValueError:
                        line = None
                    # A line that is not an object cannot be classified: kept, to go with the file.
                    if not isinstance(line, dict) or is_security_event(line):
                        out.write(raw)
                out.flush()
                os.fsync(out.fileno())
            os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))  # its age is its lines' age
            os.replace(tmp, path)  # atomic: a reader has the whole old file or the whole new one
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        # Cut short here, the next prune rewrites it again (the same lines) and renames it then.
        os.replace(path, path.with_name(path.name + _SECURITY_SUFFIX))

    # -- events -----------------------------------------------------------------------------------

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
        line: dict[str, Any] = {"ts": _now(), "event": _fixed_text(name)}
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
            kind = type(value)  # exact str and int first: most fields are, and need no more
            if secret:
                value = REDACTED
            elif kind is str:
                value = _text(value)
            elif kind is not int and value is not None:
                value = self._payload(value)
            line[name_in_line] = value
        if extra is None:
            line["msg"] = _phrase(name)
        else:
            parts = [p for p in (MESSAGES.get(name), str(extra)) if p]
            line["msg"] = _text(": ".join(parts)) if parts else line["event"]
        return line

    def event(self, name: str, request: web.Request | None = None, **fields: Any) -> None:
        """Write one line about `name`. Never raises: auditing must not take the server down."""
        if self.observer is not None:
            try:
                self.observer(name, fields)
            except Exception as exc:
                self._warn("observer", f"audit observer failed on {name!r}: {exc!r}")
        try:
            text = _LINE(self.record(name, request, **fields)) + "\n"
        except Exception as exc:  # a field that cannot be serialised must not fail the request
            self._warn("encode", f"cannot encode audit event {name!r}: {exc!r}")
            return
        if self.path is not None:
            self._write(text.encode())
        if self.stream is not None:
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError) as exc:  # ValueError: the stream was closed
                self._warn("stream", f"cannot write audit events to the stream: {exc}")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError as exc:
                self._warn("close", f"cannot close audit log {self.path}: {exc}")
