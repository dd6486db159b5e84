"""The audit query engine over real rotated files: filters, pages whose cursor neither skips nor
repeats a line while files rotate, JSON-lines and CSV export (formula injection neutralised),
no secret in what it hands out, bad parameters refused by name."""

from __future__ import annotations

import csv
import io
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from multidict import MultiDict

from mcp_sse.ops.audit_query import (
    CSV_COLUMNS,
    AuditQuery,
    Cursor,
    export,
    iter_events,
    parse_query,
    search,
)
from mcp_sse.security.audit import AuditLog, rotated_files

EVENTS = ("auth.failed", "tool.invoked", "policy.denied", "tool.invoked")


def write(audit: AuditLog, first: int, count: int) -> None:
    for i in range(first, first + count):
        audit.event(
            EVENTS[i % 4],
            identity=f"key-{i % 3}",
            ip=f"10.0.{i % 2}.{i % 250}" if i % 5 else f"2001:db8::{i:x}",
            backend=f"b{i % 2}",
            tool=f"t{i % 4}",
            outcome="ok" if i % 7 else "error",
            seq=i,
        )


def logged(path: Path, first: int = 0, count: int = 500, max_bytes: int = 16 * 1024) -> AuditLog:
    """An audit log of `count` numbered events across several rotated files; left open."""
    audit = AuditLog(path, stream=None, rotate="size", max_bytes=max_bytes)
    write(audit, first, count)
    return audit


def pages(path: Path, **params: str) -> Iterator[list[dict[str, Any]]]:
    """Every page, following next_cursor until the end (oldest first: until a page is empty)."""
    cursor = params.pop("cursor", None)
    while True:
        page = search(path, parse_query(params | ({"cursor": cursor} if cursor else {})))
        if not page.events:
            return
        yield page.events
        cursor = page.next_cursor
        if cursor is None:
            return


def seqs(events: list[dict[str, Any]]) -> list[int]:
    return [e["seq"] for e in events]


def flat(pages: Iterator[list[dict[str, Any]]]) -> list[int]:
    return [e["seq"] for page in pages for e in page]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "audit.log"


def test_pages_newest_and_oldest_first_cover_every_line_once(path: Path) -> None:
    logged(path).close()
    assert len(rotated_files(path)) >= 5
    newest = [seqs(p) for p in pages(path, limit="37")]
    assert all(len(p) == 37 for p in newest[:-1])
    assert [n for page in newest for n in page] == list(range(499, -1, -1))
    oldest = flat(pages(path, limit="37", order="oldest"))
    assert oldest == list(range(500))
    # The default page: the newest 100.
    assert seqs(search(path, parse_query({})).events) == list(range(499, 399, -1))


@pytest.mark.parametrize("order", ["oldest", "newest"])
def test_a_cursor_neither_skips_nor_repeats_while_files_rotate(path: Path, order: str) -> None:
    audit = logged(path)
    live = len(path.read_text().splitlines())
    assert live >= 2
    # A first page that stops halfway through the live file, which the next lines then rotate.
    limit = live // 2 if order == "newest" else 500 - live // 2
    first = search(path, parse_query({"limit": str(limit), "order": order}))
    assert first.next_cursor is not None
    inode = Cursor.decode(first.next_cursor).ident[1]
    assert inode == path.stat().st_ino
    write(audit, 500, 400)  # more lines, more rotations: the file the cursor is in is renamed
    audit.close()
    assert path.stat().st_ino != inode
    rest = flat(pages(path, limit="90", order=order, cursor=first.next_cursor))
    if order == "oldest":
        assert seqs(first.events) + rest == list(range(900))
    else:  # newest first goes on to older lines: the new ones came after the first page
        assert seqs(first.events) + rest == list(range(499, -1, -1))


@pytest.mark.parametrize("order", ["oldest", "newest"])
def test_pages_read_while_a_writer_rotates_are_exact(path: Path, order: str) -> None:
    audit = AuditLog(path, stream=None, rotate="size", max_bytes=4 * 1024)
    write(audit, 0, 20)
    done = threading.Event()

    def writer() -> None:
        write(audit, 20, 1500)
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    got: list[int] = []
    cursor = None
    while True:  # pages while the writer writes and rotates, then to the end
        finished = done.is_set()
        params = {"limit": "25", "order": order} | ({"cursor": cursor} if cursor else {})
        page = search(path, parse_query(params))
        got += seqs(page.events)
        cursor = page.next_cursor
        if (finished and not page.events) or cursor is None:
            break
    thread.join()
    audit.close()
    assert len(rotated_files(path)) > 20
    if order == "oldest":
        assert got == list(range(1520))
    else:  # from the newest line there was at the first page, down to the first
        assert got == list(range(got[0], -1, -1))


def test_oldest_first_waits_at_the_end_for_lines_written_later(path: Path) -> None:
    audit = logged(path, count=50)
    page = search(path, parse_query({"order": "oldest"}))
    assert seqs(page.events) == list(range(50)) and page.next_cursor is not None
    write(audit, 50, 300)  # rotates
    audit.close()
    later = flat(pages(path, order="oldest", cursor=page.next_cursor))
    assert later == list(range(50, 350))

    # A last line without its newline is still being written: not read, not counted, until it ends.
    end = search(path, parse_query({"order": "oldest"} | {"limit": "1000"}))
    line = json.dumps({"ts": "2026-12-03T12:00:00.000Z", "event": "late", "seq": 350})
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    os.write(fd, line[:20].encode())
    assert end.next_cursor is not None
    half = search(path, parse_query({"order": "oldest", "cursor": end.next_cursor}))
    assert half.events == [] and half.skipped == 0
    assert search(path, parse_query({"limit": "1"})).events[0]["seq"] == 349  # newest first: not it
    os.write(fd, (line[20:] + "\n").encode())
    os.close(fd)
    assert half.next_cursor is not None
    whole = search(path, parse_query({"order": "oldest", "cursor": half.next_cursor}))
    assert seqs(whole.events) == [350]


def test_filters(path: Path) -> None:
    logged(path).close()
    all_lines = [e for p in pages(path, limit="1000", order="oldest") for e in p]
    assert len(all_lines) == 500

    def found(**params: str) -> list[int]:
        return flat(pages(path, order="oldest", **params))

    def expected(keep: Any) -> list[int]:
        return [e["seq"] for e in all_lines if keep(e)]

    assert found(event="auth.failed") == expected(lambda e: e["event"] == "auth.failed") != []
    assert found(action="policy.denied,auth.failed") == expected(lambda e: e["event"] != "tool.invoked")
    assert found(identity="key-2") == expected(lambda e: e["identity"] == "key-2")
    assert found(backend="b1", tool="t3") == expected(lambda e: e["backend"] == "b1" and e["tool"] == "t3")
    assert found(outcome="error") == expected(lambda e: e["outcome"] == "error") != []
    assert found(ip="10.0.1.7") == expected(lambda e: e["ip"] == "10.0.1.7") != []
    assert found(address="10.0.0.0/24") == expected(lambda e: e["ip"].startswith("10.0.0."))
    assert found(ip="2001:db8::/32") == expected(lambda e: ":" in e["ip"]) != []
    assert found(ip="2001:0db8:0000::a") == expected(lambda e: e["ip"] == "2001:db8::a") == [10]
    assert found(event="auth.failed", identity="key-0", outcome="ok") == expected(
        lambda e: e["event"] == "auth.failed" and e["identity"] == "key-0" and e["outcome"] == "ok"
    )
    assert found(event="nothing.like.it") == []


def synthetic(path: Path) -> list[dict[str, Any]]:
    """Three rotated files and the live one, a day apart, with lines at known times."""
    lines = []
    for day in range(1, 5):
        chunk = [
            {"ts": f"2026-11-0{day}T{hour:02d}:00:00.000Z", "event": "tool.invoked", "seq": day * 100 + hour}
            for hour in (0, 6, 12, 18)
        ]
        name = path.name if day == 4 else f"{path.name}.2026-11-0{day}T235959Z"
        path.with_name(name).write_text("".join(json.dumps(x) + "\n" for x in chunk))
        lines += chunk
    return lines


def test_from_and_to(path: Path) -> None:
    lines = synthetic(path)

    def found(**params: str) -> list[int]:
        return flat(pages(path, limit="3", **params))

    every = [x["seq"] for x in lines]
    middle = [x["seq"] for x in lines if "2026-11-02T06" <= x["ts"] < "2026-11-03T12"]
    assert found(**{"from": "2026-11-02T06:00:00Z", "to": "2026-11-03T12:00:00Z"}) == middle[::-1]
    assert found(order="oldest", **{"from": "2026-11-02T06:00:00+00:00", "to": "2026-11-03T12:00"}) == middle
    # An offset is honoured: 07:00+01:00 is 06:00Z (inclusive); a date alone is its midnight, UTC.
    assert found(order="oldest", **{"from": "2026-11-02T07:00:00+01:00"})[0] == 206
    assert found(order="oldest", to="2026-11-02") == every[:4]
    assert found(order="oldest", **{"from": "2026-11-04T18:00:00.001Z"}) == []


def test_lines_that_are_not_json_objects_are_skipped_and_counted(path: Path) -> None:
    logged(path, count=40, max_bytes=2048).close()
    rotated = rotated_files(path)[1].path
    with rotated.open("a") as f:
        f.write("not json\n[1, 2]\n\n" + '{"cut": "in half"\n')
    page = search(path, parse_query({"limit": "1000"}))
    assert seqs(page.events) == list(range(39, -1, -1))
    assert page.skipped == 4


def test_bad_values_raise_value_error_naming_the_parameter(path: Path) -> None:
    bad = {
        "limit": ["0", "1001", "ten", "-5"],
        "from": ["yesterday", "2026-13-01"],
        "to": ["2026-12-03 at noon"],
        "ip": ["10.0.0.300", "evil.example"],
        "event": ["", "a,,b", "x" * 600, "bad\nline"],
        "order": ["sideways"],
        "format": ["xlsx"],
        "cursor": ["garbage", "eyJhIjoxfQ", "", Cursor(True, (1, 2), "", 5, "x" * 23 + "Z").encode()],
    }
    for name, values in bad.items():
        for value in values:
            with pytest.raises(ValueError, match=name):
                parse_query({name: value})
    with pytest.raises(ValueError, match="colour"):
        parse_query({"colour": "red"})
    with pytest.raises(ValueError, match="from"):
        parse_query({"from": "2026-12-03", "to": "2026-12-02"})
    with pytest.raises(ValueError, match="action"):  # request.query: a key may come twice
        parse_query(MultiDict([("event", "a"), ("action", "b")]))
    with pytest.raises(ValueError, match="tool"):
        parse_query(MultiDict([("tool", "a"), ("tool", "b")]))
    logged(path, count=10).close()
    newest = search(path, parse_query({"limit": "2"})).next_cursor
    assert newest is not None
    with pytest.raises(ValueError, match="cursor"):
        parse_query({"cursor": newest, "order": "oldest"})
    assert parse_query({"limit": "5000"}, export=True).limit == 5000
    assert parse_query({}, export=True).limit is None


SECRETS = ("sk-live-123", "hunter2", "abc.def.ghi", "s3cr3t-client", "cookie-val")


def hostile(path: Path) -> None:
    """Lines a spreadsheet would run, and one written by something that did not mask its secrets."""
    audit = AuditLog(path, stream=None)
    audit.event("tool.invoked", identity="=cmd|' /C calc'!A0", tool="+SUM(1,2)", reason="-2+3", backend="@A1")
    audit.event("tool.invoked", identity="key", tool="fine", outcome="\r=1")  # the CR is stripped
    audit.close()
    raw = {
        "ts": "2026-12-03T12:00:00.000Z",
        "event": "odd.writer",
        "identity": "\tkey",  # AuditLog strips tabs; another writer might not
        "api_key": "sk-live-123",
        "nested": {"db": {"Password": "hunter2"}, "items": [{"client_secret": "s3cr3t-client"}]},
        "note": "sent Bearer abc.def.ghi by mistake",
        "Cookie": "cookie-val",
        "token_sha256": "0123456789abcdef",
    }
    with path.open("a") as f:
        f.write(json.dumps(raw) + "\n")


def test_export_csv_neutralises_formulas_and_holds_no_secret(path: Path) -> None:
    hostile(path)
    text = "".join(export(path, parse_query({"format": "csv", "order": "oldest"}, export=True)))
    rows = list(csv.reader(io.StringIO(text)))
    assert tuple(rows[0]) == CSV_COLUMNS
    first, second, third = (dict(zip(CSV_COLUMNS, row, strict=True)) for row in rows[1:])
    assert first["identity"] == "'=cmd|' /C calc'!A0" and first["tool"] == "'+SUM(1,2)"
    assert first["reason"] == "'-2+3" and first["backend"] == "'@A1" and first["msg"] == "'-2+3"
    assert second["outcome"] == "'=1" and third["identity"] == "'\tkey"
    for row in rows[1:]:
        assert not any(cell.startswith(("=", "+", "-", "@", "\t", "\r")) for cell in row)
    assert third["event"] == "odd.writer"
    details = json.loads(third["details"])
    assert details["token_sha256"] == "0123456789abcdef"  # a digest, made safe on purpose: kept
    assert not any(secret in text for secret in SECRETS)
    assert first["details"] == ""  # every field has its column


def test_export_jsonl_and_pages_hold_no_secret(path: Path) -> None:
    hostile(path)
    text = "".join(export(path, parse_query({}, export=True)))
    lines = [json.loads(x) for x in text.splitlines()]
    assert [x["event"] for x in lines] == ["odd.writer", "tool.invoked", "tool.invoked"]
    assert lines[0]["api_key"] == "[REDACTED]" and lines[0]["nested"]["db"]["Password"] == "[REDACTED]"
    assert not any(secret in text for secret in SECRETS)
    assert list(lines[1])[:2] == ["ts", "event"]  # the file's key order
    page = json.dumps(search(path, parse_query({})).events)
    assert not any(secret in page for secret in SECRETS)
    assert not any(
        secret in json.dumps(list(iter_events(path, AuditQuery(limit=None)))) for secret in SECRETS
    )


def test_export_streams_in_bounded_pieces(path: Path) -> None:
    logged(path, count=3000, max_bytes=256 * 1024).close()
    for fmt in ("jsonl", "csv"):
        chunks = export(path, parse_query({"format": fmt, "order": "oldest"}, export=True))
        first = next(chunks)  # a generator: the first piece comes before the rest is read
        rest = list(chunks)
        assert all(len(c) < 66 * 1024 for c in [first, *rest]) and len(rest) >= 3
        text = first + "".join(rest)
        count = len(text.splitlines()) - (1 if fmt == "csv" else 0)
        assert count == 3000
    limited = "".join(export(path, parse_query({"limit": "7"}, export=True)))
    assert [json.loads(x)["seq"] for x in limited.splitlines()] == list(range(2999, 2992, -1))


def test_a_cursor_whose_file_was_pruned_goes_on_from_its_time(path: Path) -> None:
    lines = synthetic(path)
    page = search(path, parse_query({"order": "oldest", "limit": "6"}))
    assert seqs(page.events) == [x["seq"] for x in lines[:6]]  # it stopped in the second file
    second = rotated_files(path)[1].path
    when = time.time() - 100 * 86_400
    os.utime(second, (when, when))
    AuditLog(path, stream=None).prune()  # rewritten (none of its events is a security one)
    assert page.next_cursor is not None
    rest = flat(pages(path, order="oldest", cursor=page.next_cursor))
    # The second file's lines after the cursor are gone with it; from its time on, nothing is skipped.
    assert rest == [x["seq"] for x in lines[8:]]
