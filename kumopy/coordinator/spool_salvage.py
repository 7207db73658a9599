"""Salvage a damaged spool database: copy every readable row into a fresh file, report the rest."""

from __future__ import annotations

import bisect
import json
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from kumopy.errors import SpoolError

__all__ = ["finish_interrupted", "fsync_dir", "is_corrupt", "quarantine_file", "salvage"]

log = logging.getLogger(__name__)

_MAX_ROWID = 2**63 - 1
_SIDE_FILES = ("", "-wal", "-shm")
_NEXT_ROW = (
    "SELECT rowid, id, env, due, attempts, crc, data FROM msg "
    "WHERE rowid >= ? ORDER BY rowid LIMIT 1"
)
_INSERT = "INSERT OR IGNORE INTO msg (id, env, due, attempts, crc, data) VALUES (?,?,?,?,?,?)"
_Range = tuple[int, int | None]


def is_corrupt(exc: sqlite3.Error) -> bool:
    """Return True when SQLite says the file is damaged (not busy, locked or out of space)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        text = str(exc).lower()
        return "malformed" in text or "not a database" in text
    return code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries durable (after creating or renaming files in it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def quarantine_file(path: Path, quarantine_dir: Path, tag: str, *, fsync: bool) -> Path:
    """Move a database and its -wal/-shm files to a timestamped name in the quarantine."""
    quarantine_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = quarantine_dir / f"spool-{stamp}{tag}.db"
    n = 0
    while any(Path(f"{target}{s}").exists() for s in _SIDE_FILES):
        n += 1
        target = quarantine_dir / f"spool-{stamp}{tag}-{n}.db"
    # The database first: a stale -wal left next to a missing spool.db is moved by
    # finish_interrupted(), while one left next to a new spool.db would be replayed into it.
    for suffix in _SIDE_FILES:
        src = Path(f"{path}{suffix}")
        if src.exists():
            os.replace(src, f"{target}{suffix}")
    if fsync:
        fsync_dir(quarantine_dir)
        fsync_dir(path.parent)
    return target


def _salvage_names(path: Path) -> tuple[Path, Path]:
    return path.with_name(path.name + ".salvage"), path.with_name(path.name + ".salvaged")


def finish_interrupted(path: Path, quarantine_dir: Path, *, fsync: bool) -> None:
    """Complete a salvage that crashed between moving the damaged file aside and replacing it."""
    _, done = _salvage_names(path)
    if not done.exists():
        return
    if path.exists():
        # The damaged file is still in place: the salvage runs again from it if needed.
        done.unlink()
        return
    # The damaged file's -wal/-shm may still be here: they must not be replayed into the new one.
    if any(Path(f"{path}{s}").exists() for s in _SIDE_FILES):
        quarantine_file(path, quarantine_dir, "-orphan", fsync=fsync)
    os.replace(done, path)
    if fsync:
        fsync_dir(path.parent)
    log.warning("finished the salvage of %s that was interrupted by a crash", path)


def _next_row(src: sqlite3.Connection, start: int) -> tuple[Any, ...] | None:
    # `>=` not `>`: a seek lands on the page that holds its key, so probing just past a bad
    # page must name a key on the next page, not the bad page's last key.
    row: tuple[Any, ...] | None = src.execute(_NEXT_ROW, (start,)).fetchone()
    return row


def _skip_damage(src: sqlite3.Connection, start: int) -> tuple[int | None, tuple[Any, ...] | None]:
    """Skip a damaged range that begins at rowid `start`.

    Return the range's last rowid (None: it runs to the end) and the first readable row past it.
    """
    # Gallop forward to a seek that succeeds, then bisect back to the end of the damage,
    # so one bad page costs a few dozen seeks and only the rows stored on it.
    bad, step = start, 1
    while True:
        probe = min(start + step, _MAX_ROWID)
        try:
            row = _next_row(src, probe)
            break
        except sqlite3.DatabaseError:
            if probe == _MAX_ROWID:
                return None, None
            bad, step = probe, step * 2
    good = probe
    while good - bad > 1:
        mid = (bad + good) // 2
        try:
            found = _next_row(src, mid)
        except sqlite3.DatabaseError:
            bad = mid
        else:
            good, row = mid, found
    return bad, row


def _copy_msg(src: sqlite3.Connection, dst: sqlite3.Connection) -> tuple[int, list[_Range]]:
    """Copy readable msg rows by rowid; return the count and the rowid ranges left unread."""
    copied = 0
    lost: list[_Range] = []
    start = 1  # rowids SQLite assigns start at 1
    while True:
        try:
            row = _next_row(src, start)
        except sqlite3.DatabaseError:
            last, row = _skip_damage(src, start)
            lost.append((start, last))
        if row is None:
            return copied, lost
        rowid = int(row[0])
        if dst.execute(_INSERT, row[1:]).rowcount == 1:
            copied += 1
        else:
            lost.append((rowid, rowid))  # read but unusable (a null or duplicate id)
        start = rowid + 1


def _lost_ids(src: sqlite3.Connection, lost: list[_Range]) -> tuple[list[str], bool]:
    """Name the messages in the lost rowid ranges from the id index, which has its own pages."""
    if not lost:
        return [], True
    starts = [lo for lo, _ in lost]
    out: list[str] = []
    try:
        for rowid, msg_id in src.execute("SELECT rowid, id FROM msg ORDER BY id"):
            i = bisect.bisect_right(starts, rowid) - 1
            hi = lost[i][1] if i >= 0 else None
            if i >= 0 and (hi is None or rowid <= hi):
                out.append(str(msg_id))
    except sqlite3.DatabaseError:
        return out, False
    return out, True


def _copy_injid(
    src: sqlite3.Connection, dst: sqlite3.Connection, lost_ids: set[str]
) -> tuple[int, bool]:
    """Copy de-duplication ids, best effort: from each end of the key order up to the damage."""
    # A lost message's id is dropped so that a client retrying it is not told "duplicate".
    seen: set[str] = set()
    copied = 0
    complete = True
    insert = "INSERT OR IGNORE INTO injid (client_id, msg_id, ts) VALUES (?,?,?)"
    for order in ("ASC", "DESC"):
        try:
            q = f"SELECT client_id, msg_id, ts FROM injid ORDER BY client_id {order}"
            for client_id, msg_id, ts in src.execute(q):
                if client_id in seen:
                    return copied, complete
                seen.add(client_id)
                if str(msg_id) not in lost_ids:
                    copied += dst.execute(insert, (client_id, msg_id, ts)).rowcount
            if complete:
                break
        except sqlite3.DatabaseError:
            complete = False
    return copied, complete


def _quick_check(src: sqlite3.Connection) -> list[str]:
    try:
        return [str(r[0]) for r in src.execute("PRAGMA quick_check(20)")]
    except sqlite3.DatabaseError as exc:
        return [f"quick_check failed: {exc}"]


def salvage(
    path: Path,
    schema: str,
    *,
    reason: str,
    fsync: bool,
    start_empty: bool,
    page_size: int = 4096,
) -> dict[str, Any]:
    """Replace the damaged `path` with a fresh spool of its readable rows; return the report."""
    quarantine_dir = path.parent / "quarantine"
    building, done = _salvage_names(path)
    log.error("spool %s is damaged (%s); salvaging its readable messages", path, reason)
    for stale in (building, Path(f"{building}-journal"), done):
        stale.unlink(missing_ok=True)
    src = sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True)
    try:
        check = _quick_check(src)
        # One transaction in rollback-journal mode: the file is complete once renamed to `done`.
        dst = sqlite3.connect(building, isolation_level=None)
        try:
            dst.execute(f"PRAGMA page_size={int(page_size)}")  # the new file is empty yet
            dst.execute(f"PRAGMA synchronous={'FULL' if fsync else 'OFF'}")
            dst.executescript(schema)
            dst.execute("BEGIN")
            copied, lost = _copy_msg(src, dst)
            lost_ids, ids_complete = _lost_ids(src, lost)
            injid, injid_complete = _copy_injid(src, dst, set(lost_ids))
            dst.execute("COMMIT")
        finally:
            dst.close()
    finally:
        src.close()
    if copied == 0 and lost and not start_empty:
        building.unlink()
        raise SpoolError(
            f"spool {path} is damaged ({reason}) and no message could be read from it; it was "
            "left in place. Pass --start-empty to move it to quarantine and start with an "
            "empty spool"
        )
    os.replace(building, done)
    moved = quarantine_file(path, quarantine_dir, "", fsync=fsync)
    os.replace(done, path)
    if fsync:
        fsync_dir(path.parent)
    report: dict[str, Any] = {
        "reason": reason,
        "damaged_file": str(moved),
        "salvaged": copied,
        "lost_rowid_ranges": [list(r) for r in lost],
        "lost": len(lost_ids),
        "lost_ids": lost_ids,
        "lost_ids_complete": ids_complete,
        "injection_ids_copied": injid,
        "injection_ids_complete": injid_complete,
        "quick_check": check,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    report_path = moved.with_suffix(".json")
    report_path.write_text(json.dumps(report, indent=1))
    report["report"] = str(report_path)
    log.error(
        "salvaged %d messages from the damaged spool into a fresh %s; lost %s%d (rowid "
        "ranges %s); the damaged file is %s, the report %s",
        copied,
        path,
        "" if ids_complete else "at least ",
        len(lost_ids),
        report["lost_rowid_ranges"] or "none",
        moved,
        report_path,
    )
    return report
