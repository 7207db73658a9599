"""Spool faults at start-up: a second run on one spool, a zero-length file, a corrupt page."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest

from kumopy.client import Client
from kumopy.coordinator.spool import SpooledMeta, SpoolStore
from kumopy.errors import SpoolError, SpoolLockedError, error_from_dict
from kumopy.harness import Proc, wait_for
from kumopy.inject import make_body
from tests.conftest_procs import Cluster, MakePolicy
from tests.policies import ONE_SOURCE, boot, delivered


def _fill(directory: Path, n: int, body: Callable[[int], bytes]) -> list[str]:
    """Write n messages (and their injection ids) straight into a spool; return their ids."""
    ids = [f"{i:016x}" for i in range(1, n + 1)]
    rows = [
        (
            msg_id,
            SpooledMeta("s@src.test", [f"salv{i}@dst.test"], {}, "dst.test", time.time()),
            0.0,
            body(i),
        )
        for i, msg_id in enumerate(ids)
    ]
    store = SpoolStore(directory, fsync=False)
    store.insert_batch(rows, [(f"cid-{m}", m, time.time()) for m in ids])
    store.close()
    return ids


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode an SQLite varint at pos; return it and the position after it."""
    value = 0
    for i in range(9):
        byte = buf[pos + i]
        if i == 8:
            return (value << 8) | byte, pos + 9
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value, pos + i + 1
    raise AssertionError("unreachable")


def _corrupt_msg_leaf(db_path: Path) -> list[int]:
    """Overwrite one whole leaf page from the middle of the msg table; return its rowids."""
    with closing(sqlite3.connect(db_path)) as db:
        page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
        page = int(
            db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'msg'").fetchone()[0]
        )
    data = db_path.read_bytes()
    while True:
        start = (page - 1) * page_size
        kind = data[start]  # never page 1, whose b-tree header follows the 100-byte file header
        if kind == 0x0D:  # a table leaf
            break
        assert kind == 0x05, f"page {page} is not a table b-tree page"
        cells = int.from_bytes(data[start + 3 : start + 5], "big")
        slot = start + 12 + 2 * (cells // 2)
        cell = start + int.from_bytes(data[slot : slot + 2], "big")
        page = int.from_bytes(data[cell : cell + 4], "big")  # the middle cell's left child
    assert page > 1
    cells = int.from_bytes(data[start + 3 : start + 5], "big")
    rowids = []
    for k in range(cells):
        slot = start + 8 + 2 * k
        _, pos = _varint(data, start + int.from_bytes(data[slot : slot + 2], "big"))
        rowids.append(_varint(data, pos)[0])  # a leaf cell: payload size, then rowid
    with open(db_path, "r+b") as fh:
        fh.seek(start)
        fh.write((b"garbage!" * page_size)[:page_size])
    return rowids


def _body(i: int) -> bytes:
    return f"Subject: m{i}\r\n\r\n".encode() + bytes([65 + i % 26]) * 2000 + b"\r\n"


# -- one spool, one run ------------------------------------------------------------------------
def test_a_second_store_on_the_same_directory_is_refused_until_the_first_closes(
    tmp_path: Path,
) -> None:
    first = SpoolStore(tmp_path, fsync=False)
    assert (tmp_path / "lock").read_text() == f"{os.getpid()}\n"
    assert not os.get_inheritable(first._lock_fd)  # workers must not keep the spool locked
    with pytest.raises(SpoolLockedError) as info:
        SpoolStore(tmp_path, fsync=False)
    assert f"spool {tmp_path} is in use by another kumopy run (pid {os.getpid()})" in str(
        info.value
    )
    assert info.value.code == "spool_locked" and not info.value.transient
    assert isinstance(error_from_dict(info.value.to_dict()), SpoolLockedError)
    first.close()
    second = SpoolStore(tmp_path, fsync=False)
    second.close()


# -- zero-length spool.db ----------------------------------------------------------------------
def test_a_zero_length_spool_is_refused_unless_start_empty(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "spool.db").write_bytes(b"")
    with pytest.raises(SpoolError, match=r"is empty \(0 bytes\).*lost.*--start-empty"):
        SpoolStore(tmp_path, fsync=False)
    assert (tmp_path / "spool.db").stat().st_size == 0  # left untouched
    with caplog.at_level(logging.WARNING, logger="kumopy.coordinator.spool"):
        store = SpoolStore(tmp_path, fsync=False, start_empty=True)  # the lock was released
    assert store.count() == 0
    store.close()
    moved = list((tmp_path / "quarantine").glob("spool-*-empty.db"))
    assert len(moved) == 1 and moved[0].stat().st_size == 0
    assert "was empty" in caplog.text
    SpoolStore(tmp_path, fsync=False).close()  # the new spool is a real one


# -- a corrupt page ----------------------------------------------------------------------------
def test_a_corrupt_page_loses_only_its_rows_and_the_rest_is_salvaged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n = 3000
    ids = _fill(tmp_path, n, _body)
    on_page = {ids[rowid - 1] for rowid in _corrupt_msg_leaf(tmp_path / "spool.db")}

    store = SpoolStore(tmp_path, fsync=False)
    with caplog.at_level(logging.ERROR):
        recovered = {r.msg_id: r for r in store.recover()}
    report = store.salvage
    assert report is not None
    lost = set(report["lost_ids"])
    assert lost == on_page and report["lost"] == len(lost) and report["lost_ids_complete"]
    assert 0 < len(lost) < 10 and report["lost_rowid_ranges"]
    assert report["salvaged"] == n - len(lost)
    assert set(recovered) == set(ids) - lost  # each readable message exactly once
    assert report["quick_check"] != ["ok"]
    assert f"salvaged {n - len(lost)} messages" in caplog.text
    assert f"lost {len(lost)} (rowid ranges" in caplog.text
    damaged = Path(report["damaged_file"])
    assert damaged.parent == tmp_path / "quarantine" and damaged.exists()
    assert json.loads(Path(report["report"]).read_text())["lost_ids"] == report["lost_ids"]
    some = sorted(recovered)[n // 3]
    assert store.load_data(some) == _body(ids.index(some))
    # A lost message's injection id is forgotten so that a retry is not taken for a duplicate.
    gone = next(iter(lost))
    assert store.lookup_client_ids([f"cid-{some}", f"cid-{gone}"]) == {f"cid-{some}": some}
    store.close()

    again = SpoolStore(tmp_path, fsync=False)
    assert again.salvage is None
    assert sorted(r.msg_id for r in again.recover()) == sorted(recovered)
    again.close()


def test_an_unreadable_spool_is_refused_unless_start_empty(tmp_path: Path) -> None:
    _fill(tmp_path, 5, _body)
    db = tmp_path / "spool.db"
    with open(db, "r+b") as fh:
        fh.write(b"not a database at all, just garbage")
    with pytest.raises(SpoolError, match=r"no message could be read.*--start-empty"):
        SpoolStore(tmp_path, fsync=False)
    assert db.read_bytes().startswith(b"not a database")  # left in place for the operator
    store = SpoolStore(tmp_path, fsync=False, start_empty=True)
    assert store.salvage is not None and store.salvage["salvaged"] == 0
    assert store.count() == 0 and Path(store.salvage["damaged_file"]).exists()
    store.close()


def test_a_salvage_interrupted_after_moving_the_damaged_file_is_finished(tmp_path: Path) -> None:
    src = tmp_path / "built"
    _fill(src, 3, _body)
    (src / "spool.db").rename(tmp_path / "spool.db.salvaged")
    (tmp_path / "spool.db-wal").write_bytes(b"stale journal of the damaged file")
    store = SpoolStore(tmp_path, fsync=False)
    assert store.count() == 3
    store.close()
    assert list((tmp_path / "quarantine").glob("spool-*-orphan.db-wal"))


# -- real processes ----------------------------------------------------------------------------
@pytest.mark.integration
def test_a_second_kumopy_run_on_one_spool_exits_naming_the_first(
    cluster: Cluster, make_policy: MakePolicy, tmp_path: Path
) -> None:
    sink, records = cluster.sink()
    env = {"TEST_SINK": f"127.0.0.1:{sink.info['port']}"}
    policy = make_policy(ONE_SOURCE)
    workdir = tmp_path / "first"
    first = cluster.coordinator(policy, workdir=workdir, env=env)
    other = tmp_path / "second"
    other.mkdir()
    # The arguments kumopy.harness.start_coordinator builds, on the first run's spool.
    cmd = [
        *(sys.executable, "-m", "kumopy", "run", policy),
        *("--listen", "tcp://127.0.0.1:*", "--ready-file", str(other / "coordinator.ready")),
        *("--spool", str(workdir / "spool"), "--log-dir", str(other / "log")),
        *("--log-level", "INFO"),
    ]
    err = tmp_path / "second.stderr"
    with open(err, "wb") as fh:
        popen = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=fh, stderr=fh)
    cluster.procs.append(Proc(popen, "coordinator"))  # stopped by PID if it did not exit
    wait_for(
        lambda: popen.poll() is not None or (other / "coordinator.ready").exists(),
        60,
        "the second run to exit",
    )
    assert popen.poll() == 1
    want = f"spool {workdir / 'spool'} is in use by another kumopy run (pid {first.pid})"
    assert want in err.read_text()
    assert first.alive()
    with Client(first.info["endpoint"]) as c:
        assert c.send("s@src.test", "still@dst.test", b"Subject: s\r\n\r\nx\r\n").ok
    wait_for(lambda: delivered(records)["still@dst.test"] == 1, 30, "the first run to deliver")


@pytest.mark.integration
def test_a_coordinator_on_a_spool_with_a_corrupt_page_delivers_what_was_salvaged(
    cluster: Cluster, make_policy: MakePolicy, tmp_path: Path
) -> None:
    workdir = tmp_path / "damaged"
    body = make_body("s@src.test", "x", 2000, 0)
    ids = _fill(workdir / "spool", 200, lambda i: body)
    on_page = _corrupt_msg_leaf(workdir / "spool" / "spool.db")
    coord, records = boot(cluster, make_policy, policy=make_policy(ONE_SOURCE), workdir=workdir)
    reports = list((workdir / "spool" / "quarantine").glob("spool-*.json"))
    assert len(reports) == 1
    report = json.loads(reports[0].read_text())
    lost = {ids.index(m) for m in report["lost_ids"]}
    assert lost == {rowid - 1 for rowid in on_page} and report["salvaged"] == 200 - len(lost)
    want = {f"salv{i}@dst.test" for i in range(200) if i not in lost}
    wait_for(lambda: set(delivered(records)) == want, 60, f"{len(want)} salvaged messages")
    with Client(coord.info["endpoint"]) as c:
        assert c.request("status")["recovered"] == len(want)
        wait_for(lambda: c.request("status")["messages"] == 0, 30, "the spool to empty")
    assert all(v == 1 for v in delivered(records).values())
