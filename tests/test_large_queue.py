"""A large deferred spool (issue 12, scaled down): a prompt restart, then every message once."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from kumopy.client import Client
from kumopy.coordinator.spool import SpooledMeta, SpoolStore
from kumopy.harness import wait_for
from kumopy.inject import make_body
from tests.conftest_procs import Cluster, MakePolicy
from tests.policies import ONE_SOURCE, boot, delivered

pytestmark = pytest.mark.integration

N = 30_000
READY_WITHIN = 30.0
"""Seconds a restart may take on this spool (1M messages: about 8 s, bench/large_queue.py)."""


def _deferred_spool(spool: Path, n: int) -> None:
    """Write `n` messages as a 451 leaves them: one attempt made, the next one an hour away."""
    body = make_body("s@src.test", "x", 2048, 0)
    later = time.time() + 3600
    store = SpoolStore(spool, fsync=False)
    for k in range(0, n, 1000):
        rows = [
            (f"{i:026x}", SpooledMeta("s@src.test", [f"big{i}@dst.test"], {}, "", 0.0), later, body)
            for i in range(k, min(n, k + 1000))
        ]
        store.insert_batch(rows)
    store.db.execute("UPDATE msg SET attempts = 1")
    store.close()


def test_a_restart_on_a_large_deferred_spool_is_prompt_and_delivers_each_once(
    cluster: Cluster, make_policy: MakePolicy, tmp_path: Path
) -> None:
    workdir = tmp_path / "coord"
    _deferred_spool(workdir / "spool", N)
    policy = make_policy(ONE_SOURCE)
    t0 = time.monotonic()
    coord, records = boot(cluster, make_policy, policy=policy, workdir=workdir)
    with Client(coord.info["endpoint"]) as c:
        assert c.send("s@src.test", "probe@dst.test", b"Subject: p\r\n\r\nx\r\n").ok
        ready = time.monotonic() - t0
        st = c.request("status", queues_limit=0)
        assert st["recovered"] == N and st["delayed"] == N  # nothing due: all wait
    assert ready < READY_WITHIN, f"ready to inject after {ready:.1f} s"
    wait_for(lambda: delivered(records)["probe@dst.test"] == 1, 30, "the probe")
    assert coord.stop() == 0

    # Make the deferred messages due (what their retry time would do an hour later).
    db = sqlite3.connect(workdir / "spool" / "spool.db")
    db.execute("UPDATE msg SET due = 0")
    db.commit()
    db.close()
    coord = cluster.coordinator(
        policy, workdir=workdir, env={"TEST_SINK": f"127.0.0.1:{records_port(cluster)}"}
    )
    want = {f"big{i}@dst.test" for i in range(N)} | {"probe@dst.test"}
    wait_for(lambda: len(delivered(records)) == N + 1, 120, f"{N} messages at the sink")
    with Client(coord.info["endpoint"]) as c:
        wait_for(lambda: c.request("status")["messages"] == 0, 30, "the spool to empty")
    got = delivered(records)
    assert set(got) == want and all(v == 1 for v in got.values())
    assert coord.stop() == 0
    store = SpoolStore(workdir / "spool", fsync=False)
    assert store.count() == 0
    store.close()


def records_port(cluster: Cluster) -> int:
    """Return the port of the cluster's one sink."""
    sink = next(p for p in cluster.procs if p.name == "sink")
    return int(sink.info["port"])
