"""Reading the audit log back, for the admin API: filter, page and export its events.

Events come from the live file and its rotated ones (security/audit.py names them), newest or
oldest first, one line at a time: memory stays bounded however large the log. A cursor names a
file by identity (st_dev, st_ino and a digest of its first line), not by name, plus a byte
offset in it: a rotation renames the live file, so the same bytes are found under the new name,
and a page starts exactly where the last one stopped, with no line skipped or repeated. Only if
that file is gone (pruned, or rewritten at AUDIT_RETENTION_DAYS) does the cursor fall back to its
timestamp, and then it may repeat lines of that same millisecond rather than skip any.

Everything here does blocking file I/O: the admin API calls it in a thread (asyncio.to_thread,
or next() of `export` in an executor).
"""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import io
import ipaddress
import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Final

from ..security.audit import redact, rotated_files

__all__ = [
    "CSV_COLUMNS",
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "AuditPage",
    "AuditQuery",
    "Cursor",
    "export",
    "iter_events",
    "parse_query",
    "search",
]

DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 1000
CSV_COLUMNS: Final = (
    "ts",
    "event",
    "identity",
    "ip",
    "backend",
    "tool",
    "outcome",
    "reason",
    "request_id",
    "method",
    "path",
    "msg",
    "details",  # every other field, as a JSON object
)
# Parameter name -> the line's field it filters on. `action` and `address` are aliases.
_FILTERS: Final = {
    "event": "event",
    "action": "event",
    "identity": "identity",
    "ip": "ip",
    "address": "ip",
    "backend": "backend",
    "tool": "tool",
    "outcome": "outcome",
}
_OTHER: Final = frozenset({"from", "to", "limit", "cursor", "order", "format"})
_MAX_VALUE: Final = 512  # audit.py's MAX_STRING: no field in a line is longer
_MAX_LINE: Final = 1 << 20  # longer than any line AuditLog writes: such a line is skipped unread
_BLOCK: Final = 64 * 1024
_CHUNK: Final = 64 * 1024  # export yields text in pieces about this size
# A line's ts is taken just before it is written, and a clock may step: a rotated file holds lines
# from (the previous rotation - _SKEW) to (its own rotation + _SKEW). Only used to skip whole files.
_SKEW: Final = 3600.0
# Spreadsheets run a cell starting with these as a formula (CWE-1236); OWASP's list, tab and CR too.
_FORMULA: Final = ("=", "+", "-", "@", "\t", "\r")
_JSON: Final = json.JSONEncoder(ensure_ascii=True, sort_keys=True, default=str).encode
_LINE: Final = json.JSONEncoder(ensure_ascii=True, default=str).encode  # the file's key order

_Ident = tuple[int, int]  # (st_dev, st_ino)


def _instant(name: str, text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{name} must be an ISO 8601 time, such as 2026-12-03T12:00:00Z") from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _ts(when: datetime) -> str:
    """A time as AuditLog writes `ts` (2026-11-21T09:10:50.123Z): such strings compare in time order."""
    return when.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


def _line_ts(value: Any) -> str | None:
    """A line's `ts`, in AuditLog's form; None when it has none that can be read."""
    if isinstance(value, str) and len(value) == 24 and value.endswith("Z"):
        return value
    try:
        return _ts(_instant("ts", value)) if isinstance(value, str) else None
    except ValueError:
        return None


def _epoch(ts: str) -> float:
    return datetime.fromisoformat(ts).timestamp()


@dataclass(frozen=True)
class Cursor:
    """Where a page stopped. Oldest first: the end of the last line given; newest first, its start."""

    newest_first: bool
    ident: _Ident
    head: str  # digest of the file's first line: an inode number can be used again by a new file
    offset: int
    ts: str  # the last line's ts: the fallback when the file is gone

    def encode(self) -> str:
        data = [int(self.newest_first), *self.ident, self.head, self.offset, self.ts]
        return base64.urlsafe_b64encode(json.dumps(data, separators=(",", ":")).encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        try:
            data = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
            newest, dev, ino, head, offset, ts = data
            if not (
                newest in (0, 1)
                and all(type(n) is int and n >= 0 for n in (dev, ino, offset))
                and isinstance(head, str)
                and isinstance(ts, str)
                and len(head) <= 64
                and (ts == "" or (_line_ts(ts) == ts and math.isfinite(_epoch(ts))))
            ):
                raise ValueError
        except (ValueError, TypeError, binascii.Error):
            raise ValueError("cursor is not one this server gave") from None
        return cls(bool(newest), (dev, ino), head, offset, ts)


@dataclass(frozen=True)
class AuditQuery:
    """Filters (each a set of accepted values; empty: any), the time range and the page."""

    event: frozenset[str] = frozenset()
    identity: frozenset[str] = frozenset()
    ip: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    backend: frozenset[str] = frozenset()
    tool: frozenset[str] = frozenset()
    outcome: frozenset[str] = frozenset()
    since: datetime | None = None  # `from`, inclusive
    until: datetime | None = None  # `to`, exclusive
    limit: int | None = DEFAULT_LIMIT  # None: every match (export only)
    newest_first: bool = True
    cursor: Cursor | None = None
    format: str = "jsonl"  # export: "jsonl" or "csv"
    _range: tuple[str | None, str | None] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        bounds = (
            None if self.since is None else _ts(self.since),
            None if self.until is None else _ts(self.until),
        )
        object.__setattr__(self, "_range", bounds)

    def matches(self, line: Mapping[str, Any]) -> bool:
        for wanted, name in (
            (self.event, "event"),
            (self.identity, "identity"),
            (self.backend, "backend"),
            (self.tool, "tool"),
            (self.outcome, "outcome"),
        ):
            if wanted:
                value = line.get(name)
                if not isinstance(value, str) or value not in wanted:
                    return False
        if self.ip:
            ip = line.get("ip")
            try:
                address = ipaddress.ip_address(ip if isinstance(ip, str) else "")
            except ValueError:
                return False
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
                address = address.ipv4_mapped
            if not any(address in network for network in self.ip):
                return False
        low, high = self._range
        if low is not None or high is not None:
            ts = _line_ts(line.get("ts"))
            if ts is None or (low is not None and ts < low) or (high is not None and ts >= high):
                return False
        return True


def _values(name: str, text: str) -> frozenset[str]:
    """A comma-separated list of exact values (none of the filtered fields holds a comma)."""
    values = frozenset(v.strip() for v in text.split(","))
    if not values or "" in values:
        raise ValueError(f"{name} must not be empty")
    for value in values:
        if len(value) > _MAX_VALUE or not value.isprintable():
            raise ValueError(f"{name} must be printable text of at most {_MAX_VALUE} characters")
    return values


def _networks(name: str, text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    try:  # an address, or a network: ip=10.0.0.0/8
        return tuple(ipaddress.ip_network(v, strict=False) for v in _values(name, text))
    except ValueError:
        raise ValueError(f"{name} must be IP addresses or networks, comma-separated") from None


def parse_query(params: Mapping[str, str], *, export: bool = False) -> AuditQuery:
    """An AuditQuery from request parameters (request.query). Raises ValueError naming the bad one.

    event (or action), identity, ip (or address: addresses or CIDR networks), backend, tool and
    outcome take comma-separated exact values; from and to ISO 8601 times (UTC when no offset
    is given; from inclusive, to exclusive); order newest (default) or oldest; limit 1 to 1000
    (default 100; with `export`, optional and unbounded); cursor the `next_cursor` of a page;
    format jsonl (default) or csv.
    """
    given: dict[str, str] = {}
    for key, value in params.items():  # a MultiDict yields a repeated key more than once
        name = _FILTERS.get(key, key)
        if name not in _FILTERS.values() and name not in _OTHER:
            raise ValueError(f"unknown parameter {key[:64]!r}")
        if name in given:
            raise ValueError(f"{key[:64]} is given twice (event/action and ip/address are one)")
        given[name] = value
    filters: dict[str, Any] = {}
    for name in ("event", "identity", "backend", "tool", "outcome"):
        if name in given:
            filters[name] = _values(name, given[name])
    if "ip" in given:
        filters["ip"] = _networks("ip", given["ip"])
    since = None if "from" not in given else _instant("from", given["from"])
    until = None if "to" not in given else _instant("to", given["to"])
    if since is not None and until is not None and since >= until:
        raise ValueError("from must be before to")
    limit: int | None = None if export else DEFAULT_LIMIT
    if "limit" in given:
        top = math.inf if export else MAX_LIMIT
        try:
            limit = int(given["limit"])
        except ValueError:
            limit = 0
        if not 1 <= limit <= top:
            raise ValueError(
                "limit must be a whole number " + ("of 1 or more" if export else f"from 1 to {MAX_LIMIT}")
            )
    order = given.get("order", "newest").strip().lower()
    if order not in ("newest", "oldest"):
        raise ValueError("order must be newest or oldest")
    fmt = given.get("format", "jsonl").strip().lower()
    if fmt not in ("jsonl", "csv"):
        raise ValueError("format must be jsonl or csv")
    cursor = None if "cursor" not in given else Cursor.decode(given["cursor"].strip())
    if cursor is not None and cursor.newest_first != (order == "newest"):
        raise ValueError(f"cursor was made for order={'newest' if cursor.newest_first else 'oldest'}")
    return AuditQuery(
        **filters,
        since=since,
        until=until,
        limit=limit,
        newest_first=order == "newest",
        cursor=cursor,
        format=fmt,
    )


# -- reading files ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    path: Path
    ident: _Ident
    low: float  # no line in it has a ts before this (seconds since the epoch)...
    high: float  # ...nor after this


def _snapshot(path: Path) -> list[_Source]:
    """The audit files, oldest first: the rotated ones, then the live one."""
    # The live file first, then the listing: a rotation in between shows the file under its new
    # name as well (then it counts as rotated, and what is live now comes later). The other way
    # round, a file renamed in between would be in neither, and its lines skipped.
    try:
        st = os.stat(path)
        live = [(path, math.inf, (st.st_dev, st.st_ino))]
    except OSError:
        live = []
    entries: list[tuple[Path, float, _Ident | None]] = [(r.path, r.stamp, None) for r in rotated_files(path)]
    sources: list[_Source] = []
    seen: set[_Ident] = set()
    previous = -math.inf
    for name, stamp, ident in entries + live:
        if ident is None:
            try:
                st = os.stat(name)
            except OSError:
                previous = stamp
                continue
            ident = (st.st_dev, st.st_ino)
        if ident not in seen:
            seen.add(ident)
            sources.append(_Source(name, ident, previous - _SKEW, stamp + _SKEW))
        previous = stamp
    return sources


def _digest(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()[:16]


def _head(f: BinaryIO) -> str:
    """The digest of the file's first line; "" while it has no whole line (a new live file)."""
    f.seek(0)
    line = f.readline(_MAX_LINE)
    return _digest(line) if line.endswith(b"\n") else ""


def _open(path: Path, source: _Source, anew: bool) -> tuple[BinaryIO, _Ident] | None:
    """The file `source` is, found by identity: since the snapshot its path may name another file
    (the live file rotated: it is under its dated name now). `anew`: nothing of it was read yet,
    so the same file rewritten at AUDIT_RETENTION_DAYS (<name>.security) will do as well."""

    def candidates() -> Iterator[Path]:
        yield source.path
        yield from (s.path for s in _snapshot(path) if s.ident == source.ident)

    for name in candidates():
        try:
            f = open(name, "rb")  # noqa: SIM115 - handed to the caller, who closes it
        except OSError:
            continue
        st = os.fstat(f.fileno())
        if (st.st_dev, st.st_ino) == source.ident:
            return f, source.ident
        f.close()
    if anew and not source.path.name.endswith(".security"):
        try:
            f = open(f"{source.path}.security", "rb")  # noqa: SIM115
        except OSError:
            return None
        st = os.fstat(f.fileno())
        return f, (st.st_dev, st.st_ino)
    return None


def _forward(f: BinaryIO, offset: int) -> Iterator[tuple[int, int, bytes]]:
    """(start, end, line) of each whole line from `offset` on. A last line without its newline is
    still being written: left for the next read."""
    f.seek(offset)
    while True:
        raw = f.readline(_MAX_LINE)
        if raw.endswith(b"\n"):
            yield offset, offset + len(raw), raw
            offset += len(raw)
            continue
        if len(raw) < _MAX_LINE:
            return
        length = len(raw)  # too long to be ours: skipped to its end, never held whole
        while raw and not raw.endswith(b"\n"):
            raw = f.readline(_MAX_LINE)
            length += len(raw)
        if not raw:
            return
        yield offset, offset + length, b""
        offset += length


def _backward(f: BinaryIO, end: int) -> Iterator[tuple[int, int, bytes]]:
    """(start, end, line) of each whole line that ends at or before `end`, last first."""
    pos, buf = end, b""  # buf is always the file's bytes [pos, pos + len(buf))

    def more() -> bool:
        nonlocal pos, buf
        if pos == 0:
            return False
        size = min(_BLOCK, pos)
        pos -= size
        f.seek(pos)
        buf = f.read(size) + buf
        return True

    while (cut := buf.rfind(b"\n")) < 0:  # what follows the last newline is still being written
        if len(buf) > _MAX_LINE:
            buf = b""
        if not more():
            return
    buf = buf[: cut + 1]
    high = pos + len(buf)
    while high > 0:
        cut = buf.rfind(b"\n", 0, len(buf) - 1)
        if cut < 0 and pos > 0:
            if len(buf) <= _MAX_LINE:
                more()
                continue
            while pos > 0:  # too long to be ours: find its start without holding it
                size = min(_BLOCK, pos)
                pos -= size
                f.seek(pos)
                buf = f.read(size)
                if (cut := buf.rfind(b"\n")) >= 0:
                    break
            else:
                buf, cut = b"", -1
            start = pos + cut + 1
            yield start, high, b""
            buf, high = buf[: cut + 1], start
            continue
        start = pos + cut + 1
        yield start, high, buf[cut + 1 :]
        buf, high = buf[: cut + 1], start


class _Scan:
    """The lines of the audit files matching a query, with the cursor after each."""

    def __init__(self, path: Path, query: AuditQuery) -> None:
        self.path, self.query = path, query
        self.skipped = 0  # lines that are not JSON objects
        self.end: Cursor | None = None  # oldest first, once all is read: where new lines will be
        self._low = -math.inf if query.since is None else query.since.timestamp()
        self._high = math.inf if query.until is None else query.until.timestamp()
        self._after: str | None = None  # fallback bounds from a cursor whose file is gone
        self._before: str | None = None
        self._stopped = 0  # oldest first: the offset after the last whole line of the file read last

    def _wanted(self, source: _Source) -> bool:
        return source.high >= self._low and source.low < self._high

    def _start(self, sources: list[_Source]) -> tuple[int, int | None]:
        """Index and offset to start at (offset None: the file's start or end)."""
        newest = self.query.newest_first
        cursor = self.query.cursor
        if cursor is None:
            return (len(sources) - 1 if newest else 0), None
        for index, source in enumerate(sources):
            if source.ident != cursor.ident:
                continue
            opened = _open(self.path, source, anew=False)
            if opened is not None:
                with opened[0] as f:
                    size = os.fstat(f.fileno()).st_size
                    if cursor.offset == 0 or (cursor.offset <= size and _head(f) == cursor.head):
                        return index, cursor.offset
            break
        # The file is gone: from its ts on, repeating lines of that millisecond rather than skipping.
        if cursor.ts:
            if newest:
                self._before = cursor.ts
                self._high = min(self._high, _epoch(cursor.ts) + 0.001)
            else:
                self._after = cursor.ts
                self._low = max(self._low, _epoch(cursor.ts))
        return (len(sources) - 1 if newest else 0), None

    def _lines(self, source: _Source, offset: int | None) -> Iterator[tuple[dict[str, Any], Cursor]]:
        newest = self.query.newest_first
        opened = _open(self.path, source, anew=offset is None)
        if opened is None:
            return
        f, ident = opened
        with f:
            end = os.fstat(f.fileno()).st_size if offset is None else offset
            head = _head(f)  # after the size: the lines before `end` are whole, the first one too
            lines = _backward(f, end) if newest else _forward(f, offset or 0)
            last = offset or 0
            ts = self.query.cursor.ts if self.query.cursor is not None else ""
            for start, stop, raw in lines:
                last = stop
                if start == 0 and raw:  # written since _head looked, when the file was empty
                    head = _digest(raw)
                try:
                    line = json.loads(raw)
                except ValueError:
                    line = None
                if not isinstance(line, dict):
                    self.skipped += 1
                    continue
                ts = line_ts = _line_ts(line.get("ts")) or ts
                if (self._after is not None and line_ts < self._after) or (
                    self._before is not None and line_ts > self._before
                ):
                    continue
                if self.query.matches(line):
                    yield line, Cursor(newest, ident, head, start if newest else stop, line_ts)
            if not newest:
                self.end = Cursor(False, ident, head, last, ts)
                self._stopped = last

    def __iter__(self) -> Iterator[tuple[dict[str, Any], Cursor]]:
        sources = _snapshot(self.path)
        if not sources:
            return
        index, offset = self._start(sources)
        if self.query.newest_first:
            # Nothing is ever added to an older file: the snapshot holds, whatever rotates meanwhile.
            for source in reversed(sources[: index + 1]):
                if self._wanted(source):
                    yield from self._lines(source, offset)
                offset = None
            return
        while index < len(sources):
            source, live = sources[index], index == len(sources) - 1
            if not self._wanted(source):
                if live:
                    self.end = None  # `to` is past: no later line can match, no cursor to wait with
                    return
                index, offset = index + 1, None
                continue
            self._stopped = offset or 0
            yield from self._lines(source, offset)
            if not live:
                index, offset = index + 1, None
                continue
            # That was the live file. Rotated while we read it? Then finish it, and go on with the
            # files after it; else this is the end, for now.
            fresh = _snapshot(self.path)
            moved = [i for i, s in enumerate(fresh) if s.ident == source.ident]
            if not moved or moved[0] == len(fresh) - 1:
                return
            sources, index, offset = fresh, moved[0], self._stopped


# -- what the admin API calls --------------------------------------------------------------------


@dataclass(frozen=True)
class AuditPage:
    events: list[dict[str, Any]]
    # Give it back as `cursor` for the next page. None: newest first, nothing older is left.
    # Oldest first it is set even when the page is short: lines written later come with it.
    next_cursor: str | None
    skipped: int  # lines read that were not JSON objects


def iter_events(path: Path, query: AuditQuery) -> Iterator[dict[str, Any]]:
    """Every event matching `query` (up to its limit, if it has one), secrets redacted."""
    scan = _Scan(path, query)
    for count, (line, _) in enumerate(scan, 1):
        yield redact(line)
        if query.limit is not None and count >= query.limit:
            return


def search(path: Path, query: AuditQuery) -> AuditPage:
    """One page of events matching `query`: at most query.limit (default 100)."""
    limit = min(query.limit or DEFAULT_LIMIT, MAX_LIMIT)
    scan = _Scan(path, query)
    events: list[dict[str, Any]] = []
    cursor: Cursor | None = None
    for line, after in scan:
        events.append(redact(line))
        if len(events) >= limit:
            cursor = after  # the page is full: the next one starts after its last line
            break
    else:
        cursor = None if query.newest_first else scan.end
    return AuditPage(events, None if cursor is None else cursor.encode(), scan.skipped)


def _cell(value: Any) -> str:
    text = "" if value is None else value if isinstance(value, str) else _JSON(value)
    return "'" + text if text.startswith(_FORMULA) else text  # shown as text, never run


def export(path: Path, query: AuditQuery) -> Iterator[str]:
    """The events matching `query` as text (query.format: JSON lines, or CSV with CSV_COLUMNS and a
    header row), in pieces of about 64 KiB: stream them; the log is never held in memory."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    if query.format == "csv":
        writer.writerow(CSV_COLUMNS)
    for event in iter_events(path, query):
        if query.format == "csv":
            details = {k: v for k, v in event.items() if k not in CSV_COLUMNS}
            row = [event.get(c) for c in CSV_COLUMNS[:-1]]
            writer.writerow([_cell(v) for v in row] + [_cell(details) if details else ""])
        else:
            buffer.write(_LINE(event) + "\n")
        if buffer.tell() >= _CHUNK:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    if buffer.tell():
        yield buffer.getvalue()
