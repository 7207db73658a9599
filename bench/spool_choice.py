"""Measure the candidate spool layouts with group commit, the way the coordinator uses them.

Run: .venv/bin/python -m bench.spool_choice [--count 20000] [--batch 100] [--size 2048]
Each layout stores `count` messages in batches with one durability barrier per batch, then
removes them all (also batched), and prints messages per second for both phases.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import struct
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from kumopy.coordinator.spool import fsync_dir


def sqlite_wal(d: Path, batches: list[list[tuple[str, bytes]]]) -> tuple[float, float]:
    """SQLite in WAL mode as kumopy's spool uses it: a rowid table; each batch of new messages
    is one transaction at synchronous=FULL (a WAL fsync), removals are batched at NORMAL."""
    db = sqlite3.connect(d / "spool.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE msg (id TEXT PRIMARY KEY, crc INT, data BLOB)")
    t0 = time.perf_counter()
    db.execute("PRAGMA synchronous=FULL")
    for batch in batches:
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO msg (id, crc, data) VALUES (?,?,?)",
            [(i, zlib.crc32(b), b) for i, b in batch],
        )
        db.execute("COMMIT")
    t1 = time.perf_counter()
    db.execute("PRAGMA synchronous=NORMAL")
    for batch in batches:
        db.execute("BEGIN")
        db.executemany("DELETE FROM msg WHERE id = ?", [(i,) for i, _ in batch])
        db.execute("COMMIT")
    t2 = time.perf_counter()
    db.close()
    return t1 - t0, t2 - t1


def file_per_message(d: Path, batches: list[list[tuple[str, bytes]]]) -> tuple[float, float]:
    """One file per message: write, fsync each file, rename, then one directory fsync."""
    t0 = time.perf_counter()
    for batch in batches:
        for i, b in batch:
            tmp = d / f"{i}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, b)
            os.fsync(fd)
            os.close(fd)
            os.rename(tmp, d / i)
        fsync_dir(d)
    t1 = time.perf_counter()
    for batch in batches:
        for i, _ in batch:
            os.unlink(d / i)
        fsync_dir(d)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def append_log(d: Path, batches: list[list[tuple[str, bytes]]]) -> tuple[float, float]:
    """Append-only segment: length+crc framed records, one fsync per batch; removals are
    tombstone records (compaction not counted, so this is its best case)."""
    fd = os.open(d / "segment", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    t0 = time.perf_counter()
    for batch in batches:
        buf = bytearray()
        for i, b in batch:
            key = i.encode()
            buf += struct.pack("<IIH", len(b), zlib.crc32(b), len(key)) + key + b
        os.write(fd, buf)
        os.fsync(fd)
    t1 = time.perf_counter()
    for batch in batches:
        buf = bytearray()
        for i, _ in batch:
            key = i.encode()
            buf += struct.pack("<IIH", 0, 0, len(key)) + key
        os.write(fd, buf)
        os.fsync(fd)
    t2 = time.perf_counter()
    os.close(fd)
    return t1 - t0, t2 - t1


def main(argv: list[str] | None = None) -> int:
    """Run each layout once in a fresh directory on the spool's file system."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--count", type=int, default=20000)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--dir", default=None, help="where to test (default: a temp dir)")
    args = p.parse_args(argv)
    body = os.urandom(args.size)
    ids = [f"{n:016x}" for n in range(args.count)]
    batches = [
        [(i, body) for i in ids[k : k + args.batch]] for k in range(0, args.count, args.batch)
    ]
    layouts: list[
        tuple[str, Callable[[Path, list[list[tuple[str, bytes]]]], tuple[float, float]]]
    ] = [
        ("sqlite WAL (kumopy's spool)", sqlite_wal),
        ("file per message + dir fsync", file_per_message),
        ("append-only segment log", append_log),
    ]
    print(f"{args.count} messages of {args.size} B, {args.batch} per commit")
    print(f"{'layout':32} {'store msg/s':>12} {'remove msg/s':>13}")
    for name, fn in layouts:
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            store, remove = fn(Path(tmp), batches)
        print(f"{name:32} {args.count / store:>12,.0f} {args.count / remove:>13,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
