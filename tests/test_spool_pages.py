"""The spool's page size: new spools take PAGE_SIZE, older ones keep theirs and work the same."""

from __future__ import annotations

import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest

from kumopy.coordinator.spool import PAGE_SIZE, SpooledMeta, SpoolStore


def _env(i: int) -> SpooledMeta:
    return SpooledMeta("s@src.test", [f"r{i}@dst.test"], {"n": i}, "", time.time())


def _page_size(directory: Path) -> int:
    with closing(sqlite3.connect(directory / "spool.db")) as db:
        return int(db.execute("PRAGMA page_size").fetchone()[0])


def _round_trip(store: SpoolStore) -> None:
    """Insert, reschedule (checksum recomputed in SQL), recover, delete."""
    body = b"Subject: p\r\n\r\n" + b"x" * 2100 + b"\r\n"
    store.insert_batch([(f"m{i:04d}", _env(i), 0.0, body) for i in range(50)])
    store.apply_outcomes(["m0000"], [(f"m{i:04d}", _env(i + 100), 99.0, 2) for i in range(1, 10)])
    store.apply_outcomes([], [("gone", _env(0), 1.0, 1)])  # already finished: nothing happens
    got = {r.msg_id: r for r in store.recover()}
    assert len(got) == 49 and not store.quarantine_dir.exists()  # every checksum still holds
    assert got["m0001"].due == 99.0 and got["m0001"].attempts == 2
    assert got["m0001"].env.meta == {"n": 101} and got["m0020"].env.meta == {"n": 20}
    assert store.load_data("m0005") == body
    store.apply_outcomes(sorted(got), [])
    assert store.count() == 0


def test_a_new_spool_takes_the_page_size(tmp_path: Path) -> None:
    store = SpoolStore(tmp_path, fsync=False)
    _round_trip(store)
    store.close()
    assert _page_size(tmp_path) == PAGE_SIZE > 4096


@pytest.mark.parametrize("old", [1024, 4096])
def test_an_existing_spool_keeps_its_page_size(tmp_path: Path, old: int) -> None:
    with closing(sqlite3.connect(tmp_path / "spool.db")) as db:
        db.execute(f"PRAGMA page_size={old}")
        db.execute("PRAGMA journal_mode=WAL")  # the file now exists with `old`-byte pages
    store = SpoolStore(tmp_path, fsync=False)
    _round_trip(store)
    store.close()
    assert _page_size(tmp_path) == old
