"""Audit retention: rotation by size and by day, losing and repeating no line under concurrent
writers; pruning by age with two retentions; external rotation (moved away, copytruncate)."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from mcp_sse.security.audit import SECURITY_EVENTS, AuditLog, is_security_event, rotated_files
from mcp_sse.settings import Settings, SettingsError

DAY = 86_400


def every_file(path: Path) -> list[Path]:
    return [r.path for r in rotated_files(path)] + ([path] if path.exists() else [])


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for f in every_file(path) for line in f.read_text().splitlines()]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def hammer(logs: list[AuditLog], threads: int, per_thread: int) -> None:
    """`threads` threads at once, each writing `per_thread` numbered lines through logs[n % len]."""
    start = threading.Barrier(threads)

    def write(n: int) -> None:
        start.wait()  # all at once, so rotations happen while the others write
        for i in range(per_thread):
            logs[n % len(logs)].event("tool.invoked", identity=f"key-{n}", seq=f"{n}:{i}", tool="search")

    workers = [threading.Thread(target=write, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    for log in logs:
        log.close()


def assert_each_line_once(path: Path, threads: int, per_thread: int) -> list[Path]:
    files = every_file(path)
    assert len(files) > 20  # it did rotate, many times
    assert all(mode(f) == 0o600 for f in files)
    lines = lines_of(path)
    seen = Counter(line["seq"] for line in lines)
    assert set(seen) == {f"{n}:{i}" for n in range(threads) for i in range(per_thread)}
    assert set(seen.values()) == {1}
    # Each writer's lines are in its order across the files: no rotation reordered them.
    for n in range(threads):
        mine = [x["seq"] for x in lines if x["identity"] == f"key-{n}"]
        assert mine == [f"{n}:{i}" for i in range(per_thread)]
    return files


def test_rotation_under_load_loses_and_repeats_no_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    stream = io.StringIO()
    audit = AuditLog(path, stream=stream, rotate="size", max_bytes=8 * 1024)
    hammer([audit], threads=8, per_thread=400)
    files = assert_each_line_once(path, 8, 400)
    for f in files[:-1]:
        assert f.stat().st_size <= 8 * 1024  # each rotated file stopped before the size
    # The stream is unchanged by rotation: every line, once.
    assert Counter(json.loads(x)["seq"] for x in stream.getvalue().splitlines()) == Counter(
        x["seq"] for x in lines_of(path)
    )


def test_two_writers_on_one_file_rotate_it_once_each_time(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Two AuditLogs with a lock and an fd each: what two processes sharing the file would do.
    path = tmp_path / "audit.log"
    logs = [AuditLog(path, stream=None, rotate="size", max_bytes=8 * 1024) for _ in range(2)]
    hammer(logs, threads=8, per_thread=400)
    assert_each_line_once(path, 8, 400)
    assert not [r for r in caplog.records if r.name == "mcp_sse.audit"]  # no rotation failed


def test_a_file_from_an_earlier_day_rotates_at_its_first_new_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    path.write_text('{"ts": "2026-01-01T00:00:00.000Z", "event": "yesterday"}\n')
    path.chmod(0o600)
    yesterday = time.time() - DAY
    os.utime(path, (yesterday, yesterday))

    sized = AuditLog(path, stream=None, rotate="size")  # size only: the day does not matter
    sized.event("today.1")
    sized.close()
    assert rotated_files(path) == []

    os.utime(path, (yesterday, yesterday))
    daily = AuditLog(path, stream=None, rotate="daily")
    daily.event("today.2")
    daily.event("today.3")  # the same day now: no second rotation
    daily.close()
    (rotated,) = rotated_files(path)
    assert rotated.path.name.startswith("audit.log.") and rotated.path.name.endswith("Z")
    assert [json.loads(x)["event"] for x in rotated.path.read_text().splitlines()] == ["yesterday", "today.1"]
    assert [json.loads(x)["event"] for x in path.read_text().splitlines()] == ["today.2", "today.3"]
    assert mode(rotated.path) == 0o600 and mode(path) == 0o600


def write_rotated(path: Path, name: str, events: list[dict[str, Any]], days_old: float) -> Path:
    rotated = path.with_name(name)
    text = "".join(json.dumps(e) + "\n" for e in events)
    rotated.write_text(text + "not json at all\n")
    rotated.chmod(0o600)
    when = time.time() - days_old * DAY
    os.utime(rotated, (when, when))
    return rotated


MIXED = [
    {"ts": "2026-01-01T00:00:00.000Z", "event": "auth.failed", "ip": "192.0.2.1"},
    {"ts": "2026-01-01T00:00:01.000Z", "event": "tool.invoked", "tool": "search"},
    {"ts": "2026-01-01T00:00:02.000Z", "event": "auth.success"},
    {"ts": "2026-01-01T00:00:03.000Z", "event": "policy.denied", "tool": "rm"},
    {"ts": "2026-01-01T00:00:04.000Z", "event": "oauth.token", "outcome": "refused"},
    {"ts": "2026-01-01T00:00:05.000Z", "event": "keys.reload", "outcome": "ok"},
]


@pytest.mark.parametrize("trigger", ["start", "rotation"])
def test_pruning_keeps_security_events_a_year_and_the_rest_90_days(tmp_path: Path, trigger: str) -> None:
    path = tmp_path / "audit.log"
    if trigger == "rotation":  # started before the old files are there: its start prunes nothing
        audit = AuditLog(path, stream=None, rotate="size", max_bytes=600)
        assert audit.wait_pruned(30)
    old = write_rotated(path, "audit.log.2025-01-01T000000Z", MIXED, 400)
    middle = write_rotated(path, "audit.log.2025-10-01T000000Z", MIXED, 100)
    recent = write_rotated(path, "audit.log.2026-01-01T000000Z-1", MIXED, 10)
    middle_mtime = middle.stat().st_mtime_ns
    other = tmp_path / "audit.log.notes"  # not a name we rotate to: never touched
    other.write_text("keep me\n")
    os.utime(other, (0, 0))
    no_date = tmp_path / "audit.log.2025-13-45T999999Z"  # looks like one, is no date: left alone
    no_date.write_text("keep me\n")
    os.utime(no_date, (0, 0))

    if trigger == "start":
        audit = AuditLog(path, stream=None, rotate="daily")
    else:
        assert old.exists()
        # A tiny max_bytes and a big line: the second line rotates the file, which prunes.
        audit.event("filler", pad="x" * 500)
        audit.event("filler", pad="x" * 500)
    assert audit.wait_pruned(30)
    audit.close()

    assert not old.exists()  # 400 days: gone
    assert not middle.exists()
    kept = middle.with_name(middle.name + ".security")
    assert [json.loads(x)["event"] for x in kept.read_text().splitlines()[:-1]] == [
        "auth.failed",
        "policy.denied",
        "oauth.token",
        "keys.reload",
    ]
    assert kept.read_text().splitlines()[-1] == "not json at all"  # cannot be classified: kept
    assert mode(kept) == 0o600
    assert kept.stat().st_mtime_ns == middle_mtime  # its age is still its lines' age
    assert len(recent.read_text().splitlines()) == len(MIXED) + 1  # 10 days: whole
    assert other.read_text() == no_date.read_text() == "keep me\n"
    assert not list(tmp_path.glob(".audit.log.*.tmp"))
    names = [r.path.name for r in rotated_files(path)]
    assert names[:2] == [kept.name, recent.name]  # still in time order, the .security one included

    # Pruning again reads the .security file no more, and deletes it after a year.
    before = kept.read_text()
    AuditLog(path, stream=None, rotate="daily", retention_days=90, security_retention_days=365).prune()
    assert kept.read_text() == before
    AuditLog(path, stream=None).prune(now=time.time() + 300 * DAY)
    assert not kept.exists() and not recent.exists()


def test_rotation_off_prunes_nothing_and_audit_log_off_writes_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.log"
    old = write_rotated(path, "audit.log.2025-01-01T000000Z", MIXED, 400)
    audit = AuditLog(path, stream=None, rotate="off")
    assert audit.wait_pruned(30)
    audit.event("x", pad="x" * 200)
    audit.close()
    assert old.exists() and rotated_files(path)[0].path == old

    monkeypatch.chdir(tmp_path)  # where a relative AUDIT_LOG would go
    settings = Settings.load(environ={"AUDIT_LOG": "off", "AUDIT_ROTATE": "daily"})
    assert settings.audit_log is None
    stream = io.StringIO()
    off = AuditLog(settings.audit_log, stream=stream, rotate=settings.audit_rotate)
    off.event("auth.failed")
    off.close()
    assert json.loads(stream.getvalue())["event"] == "auth.failed"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["audit.log", old.name])


def test_a_file_moved_away_is_reopened_at_the_next_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    audit = AuditLog(path, stream=None)  # rotate=off: logrotate's job
    audit.event("before.move")
    moved = tmp_path / "audit.log.1"
    os.rename(path, moved)  # logrotate without copytruncate (then SIGHUP, which we do not need)
    audit.event("after.move")
    assert [json.loads(x)["event"] for x in moved.read_text().splitlines()] == ["before.move"]
    assert [json.loads(x)["event"] for x in path.read_text().splitlines()] == ["after.move"]
    assert mode(path) == 0o600

    shutil.copyfile(path, tmp_path / "audit.log.2")  # copytruncate: same file, emptied
    os.truncate(path, 0)
    audit.event("after.truncate")
    audit.close()
    assert path.read_bytes().startswith(b'{"ts"')  # written at the new end: no hole of NULs
    assert [json.loads(x)["event"] for x in path.read_text().splitlines()] == ["after.truncate"]


def test_settings_for_retention() -> None:
    defaults = Settings.load(environ={})
    assert defaults.audit_rotate == "daily" and defaults.audit_max_bytes == 100 * 1024 * 1024
    assert defaults.audit_retention_days == 90 and defaults.audit_security_retention_days == 365
    loaded = Settings.load(
        environ={
            "AUDIT_ROTATE": " Size ",
            "AUDIT_MAX_BYTES": "1048576",
            "AUDIT_RETENTION_DAYS": "30",
            "AUDIT_SECURITY_RETENTION_DAYS": "730",
        }
    )
    assert (loaded.audit_rotate, loaded.audit_max_bytes) == ("size", 1048576)
    assert (loaded.audit_retention_days, loaded.audit_security_retention_days) == (30, 730)
    for name, value in [
        ("AUDIT_ROTATE", "weekly"),
        ("AUDIT_MAX_BYTES", "0"),
        ("AUDIT_RETENTION_DAYS", "-1"),
        ("AUDIT_SECURITY_RETENTION_DAYS", "a year"),
    ]:
        with pytest.raises(SettingsError, match=name):
            Settings.load(environ={name: value})
    with pytest.raises(ValueError, match="rotate"):
        AuditLog(None, rotate="weekly")
    # A security retention shorter than the other: security events are still kept as long as the rest.
    assert AuditLog(None, retention_days=90, security_retention_days=30).security_retention == 90 * DAY


def test_security_events_are_defined_once() -> None:
    assert {"auth.failed", "auth.locked", "policy.denied", "rate_limited", "keys.reload"} <= SECURITY_EVENTS
    assert {"ip.denied", "origin.denied", "host.denied", "session.expired"} <= SECURITY_EVENTS
    assert {"admin.key.create", "admin.key.delete", "admin.key.rotate"} <= SECURITY_EVENTS
    assert not is_security_event({"event": "admin.audit.query", "outcome": "ok"})
    assert is_security_event({"event": "auth.failed"})
    assert is_security_event({"event": "oauth.authorize", "outcome": "refused"})
    assert not is_security_event({"event": "oauth.authorize", "outcome": "approved"})
    assert not is_security_event({"event": "tool.invoked", "outcome": "ok"})
    assert not is_security_event({"event": "auth.success"})
