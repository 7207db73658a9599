"""Nothing lost: retries, bounces, expiry, de-duplication, crashes, corrupt entries, full disks."""

from __future__ import annotations

import os
import random
import shutil
import signal
import sqlite3
import subprocess
import threading
from pathlib import Path

import pytest

from kumopy.client import Client, Message
from kumopy.errors import KumoError
from kumopy.harness import wait_for
from kumopy.inject import make_body
from tests.conftest_procs import Cluster, MakePolicy
from tests.policies import (
    SLOW_RETRY,
    TWO_SOURCES,
    boot,
    closed_port,
    delivered,
    outcomes,
    send,
    wait_orphans_exit,
)

pytestmark = pytest.mark.integration


def test_451_then_250_gives_transient_then_delivery(
    cluster: Cluster, make_policy: MakePolicy
) -> None:
    coord, records = boot(cluster, make_policy)
    assert records is not None
    with Client(coord.info["endpoint"]) as c:
        assert c.send("s@src.test", "tempfail-once-1@dst.test", b"Subject: t\r\n\r\nx\r\n").ok
    wait_for(
        lambda: (
            outcomes(cluster, coord).get("tempfail-once-1@dst.test")
            == ["TransientFailure", "Delivery"]
        ),
        30,
        "TransientFailure then Delivery",
    )
    recs = [
        r
        for r in cluster.records(coord)
        if r["recipient"] == "tempfail-once-1@dst.test" and r["type"] != "Reception"
    ]
    assert recs[0]["response"]["code"] == 451 and recs[0]["num_attempts"] == 1
    assert recs[1]["response"]["code"] == 250 and recs[1]["num_attempts"] == 2


def test_mixed_recipients_get_their_own_outcomes_and_only_deferred_ones_retry(
    cluster: Cluster, make_policy: MakePolicy
) -> None:
    coord, records = boot(cluster, make_policy)
    assert records is not None
    rcpts = ["ok1@dst.test", "tempfail-once-2@dst.test", "reject-3@dst.test", "ok4@dst.test"]
    with Client(coord.info["endpoint"]) as c:
        assert c.send("s@src.test", rcpts, b"Subject: mixed\r\n\r\nx\r\n").ok
    want = {
        "ok1@dst.test": ["Delivery"],
        "tempfail-once-2@dst.test": ["TransientFailure", "Delivery"],
        "reject-3@dst.test": ["Bounce"],
        "ok4@dst.test": ["Delivery"],
    }
    wait_for(lambda: outcomes(cluster, coord) == want, 30, f"outcomes {want}")
    bounce = next(r for r in cluster.records(coord) if r["type"] == "Bounce")
    assert bounce["response"]["code"] == 550
    assert bounce["response"]["enhanced_code"] == {"class": 5, "subject": 1, "detail": 1}
    # The delivered recipients were sent once; the retry carried only the deferred one.
    got = wait_for(
        lambda: (d := delivered(records)) and sum(d.values()) == 3 and d,
        10,
        "three deliveries at the sink",
    )
    assert got["ok1@dst.test"] == 1 and got["ok4@dst.test"] == 1
    assert got["tempfail-once-2@dst.test"] == 1
    with Client(coord.info["endpoint"]) as c:
        wait_for(lambda: c.request("status")["messages"] == 0, 10, "the spool to empty")


def test_a_message_expires_after_max_age(cluster: Cluster, make_policy: MakePolicy) -> None:
    coord, _ = boot(cluster, make_policy, env={"TEST_RETRY": "0.2", "TEST_MAX_AGE": "1.5"})
    with Client(coord.info["endpoint"]) as c:
        assert c.send("s@src.test", "tempfail-x@dst.test", b"Subject: e\r\n\r\nx\r\n").ok
    kinds = wait_for(
        lambda: (
            (k := outcomes(cluster, coord).get("tempfail-x@dst.test", []))
            and k[-1] == "Expiration"
            and k
        ),
        30,
        "an Expiration record",
    )
    assert set(kinds[:-1]) == {"TransientFailure"} and len(kinds) >= 2
    with Client(coord.info["endpoint"]) as c:
        assert c.request("status")["messages"] == 0


def test_retried_injection_with_the_same_id_is_delivered_once(
    cluster: Cluster, make_policy: MakePolicy
) -> None:
    coord, records = boot(cluster, make_policy)
    assert records is not None
    with Client(coord.info["endpoint"]) as c:
        first = c.send("s@src.test", "dedup@dst.test", b"Subject: d\r\n\r\nx\r\n", id="inj-1")
        again = c.send("s@src.test", "dedup@dst.test", b"Subject: d\r\n\r\nx\r\n", id="inj-1")
        batch = c.send_batch(
            [Message("s@src.test", ["dedup2@dst.test"], b"x\r\n", id="inj-2") for _ in range(3)]
        )
        other = c.send("s@src.test", "dedup3@dst.test", b"Subject: d\r\n\r\nx\r\n", id="inj-3")
    assert first.ok and again.ok and again.duplicate and again.id == first.id
    assert [b.duplicate for b in batch] == [False, True, True]
    assert other.ok and not other.duplicate
    records.wait_count(3, 30)
    with Client(coord.info["endpoint"]) as c:
        wait_for(lambda: c.request("status")["messages"] == 0, 10, "the spool to empty")
    got = delivered(records)
    assert got == {"dedup@dst.test": 1, "dedup2@dst.test": 1, "dedup3@dst.test": 1}


def test_sigkill_of_a_worker_in_a_stream_of_thousands_loses_nothing(
    cluster: Cluster, make_policy: MakePolicy
) -> None:
    coord, records = boot(cluster, make_policy)
    assert records is not None
    with Client(coord.info["endpoint"]) as c:
        victim = c.request("status")["workers"]["a"]
    rcpts = send(coord.info["endpoint"], 3000, "wk-", size=1500, batch=100)
    wait_for(lambda: len(records.refresh()) >= 300, 60, "the stream to be under way")
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: set(rcpts) <= set(delivered(records)), 120, "all 3000 recipients")
    lost = set(rcpts) - set(delivered(records))
    assert not lost
    with Client(coord.info["endpoint"]) as c:
        # The kill landed mid-stream: jobs came back from the dead worker, which is restarted.
        assert c.request("status")["requeued"] > 0
        wait_for(
            lambda: c.request("status")["workers"]["a"] not in (None, victim),
            30,
            "worker a to be restarted",
        )


def test_sigkill_of_the_coordinator_after_acks_loses_nothing(
    cluster: Cluster, make_policy: MakePolicy, tmp_path: Path
) -> None:
    sink, records = cluster.sink()
    policy = make_policy(TWO_SOURCES)
    workdir = tmp_path / "crashy"
    coord, _ = boot(
        cluster, make_policy, sink_port=sink.info["port"], workdir=workdir, policy=policy
    )
    with Client(coord.info["endpoint"]) as c:
        workers = c.request("status")["workers"]
    rcpts = send(coord.info["endpoint"], 2000, "ck-", size=1500, batch=100)
    os.kill(coord.pid, signal.SIGKILL)  # right after the last acknowledgement
    coord.popen.wait(10)
    # Workers notice their parent is gone and exit by themselves.
    wait_orphans_exit(workers.values())
    coord2, _ = boot(
        cluster, make_policy, sink_port=sink.info["port"], workdir=workdir, policy=policy
    )
    wait_for(lambda: set(rcpts) <= set(delivered(records)), 120, "all 2000 recipients")
    assert not set(rcpts) - set(delivered(records))
    with Client(coord2.info["endpoint"]) as c:
        assert c.request("status")["recovered"] > 0  # the kill left acknowledged work behind
        wait_for(lambda: c.request("status")["messages"] == 0, 30, "the spool to empty")


def test_corrupt_spool_entry_is_moved_aside_and_the_rest_loads(
    cluster: Cluster, make_policy: MakePolicy, tmp_path: Path
) -> None:
    workdir = tmp_path / "corrupt"
    policy = make_policy(TWO_SOURCES)
    env = SLOW_RETRY
    coord, _ = boot(
        cluster, make_policy, sink_port=closed_port(), env=env, workdir=workdir, policy=policy
    )
    with Client(coord.info["endpoint"]) as c:
        ids = [
            c.send("s@src.test", f"c{i}@dst.test", b"Subject: c\r\n\r\nx\r\n").id for i in range(3)
        ]
    wait_for(lambda: len(outcomes(cluster, coord)) == 3, 30, "three deferrals")
    assert coord.stop() == 0
    db = sqlite3.connect(workdir / "spool" / "spool.db")
    db.execute("UPDATE msg SET data = ? WHERE id = ?", (b"flipped bits", ids[1]))
    db.commit()
    db.close()
    coord2, _ = boot(
        cluster, make_policy, sink_port=closed_port(), env=env, workdir=workdir, policy=policy
    )
    with Client(coord2.info["endpoint"]) as c:
        assert c.request("status")["messages"] == 2
    moved = workdir / "spool" / "quarantine"
    assert (moved / f"{ids[1]}.eml").read_bytes() == b"flipped bits"
    assert "checksum" in (moved / f"{ids[1]}.json").read_text()


def test_injection_refused_below_the_free_space_minimum(
    cluster: Cluster, make_policy: MakePolicy
) -> None:
    coord, _ = boot(cluster, make_policy, extra=("--min-free-space", "100000000g"))
    with Client(coord.info["endpoint"]) as c:
        r = c.send("s@src.test", "full@dst.test", b"Subject: f\r\n\r\nx\r\n")
        assert not r.ok and r.transient
        assert r.error is not None and "minimum" in str(r.error)
        assert c.request("status")["messages"] == 0


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="needs root")
def test_full_tmpfs_spool_refuses_then_recovers(
    cluster: Cluster, make_policy: MakePolicy, tmp_path: Path
) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], check=True)
    try:
        coord, records = boot(
            cluster, make_policy, workdir=mnt / "w", extra=("--min-free-space", "2m")
        )
        assert records is not None
        with Client(coord.info["endpoint"]) as c:
            assert c.send("s@src.test", "before@dst.test", b"Subject: a\r\n\r\nx\r\n").ok
            filler = mnt / "filler"
            free = shutil.disk_usage(mnt).free
            filler.write_bytes(b"\0" * (free - 1024 * 1024))
            r = c.send("s@src.test", "during@dst.test", b"Subject: b\r\n\r\nx\r\n")
            assert not r.ok and r.transient and "minimum" in str(r.error)
            filler.unlink()
            assert c.send("s@src.test", "after@dst.test", b"Subject: c\r\n\r\nx\r\n").ok
        records.wait_count(2, 30)
        assert set(delivered(records)) == {"before@dst.test", "after@dst.test"}
        cluster.stop_all()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_sigterm_drains_in_flight_deliveries(cluster: Cluster, make_policy: MakePolicy) -> None:
    coord, records = boot(cluster, make_policy)
    assert records is not None
    with Client(coord.info["endpoint"]) as c:
        assert c.send("s@src.test", "slow-1@dst.test", b"Subject: s\r\n\r\nx\r\n").ok
        wait_for(lambda: c.request("status")["dispatched"] == 1, 10, "the slow delivery to start")
    assert coord.stop(timeout=30) == 0
    assert outcomes(cluster, coord).get("slow-1@dst.test") == ["Delivery"]
    assert delivered(records)["slow-1@dst.test"] == 1


def test_repeated_coordinator_kills_during_injection_lose_no_acknowledged_message(
    cluster: Cluster, make_policy: MakePolicy, tmp_path: Path
) -> None:
    sink, records = cluster.sink()
    policy = make_policy(TWO_SOURCES)
    workdir = tmp_path / "killed-often"
    rng = random.Random(99)
    acked: set[str] = set()
    body = make_body("s@src.test", "x", 1200, 0)
    serial = 0
    for _round in range(3):
        coord, _ = boot(
            cluster, make_policy, sink_port=sink.info["port"], workdir=workdir, policy=policy
        )
        killer = threading.Timer(rng.uniform(0.2, 0.6), os.kill, (coord.pid, signal.SIGKILL))
        killer.start()
        try:
            with Client(coord.info["endpoint"], timeout=2) as c:
                while coord.alive():
                    batch = [
                        Message("s@src.test", [f"kk{serial + i}@dst.test"], body) for i in range(50)
                    ]
                    serial += 50
                    try:
                        results = c.send_batch(batch)
                    except KumoError:
                        break  # no answer: the coordinator died with this batch unacknowledged
                    acked.update(
                        m.recipients[0] for m, r in zip(batch, results, strict=True) if r.ok
                    )
        finally:
            killer.join()
        coord.popen.wait(10)
    assert len(acked) >= 150
    final, _ = boot(
        cluster, make_policy, sink_port=sink.info["port"], workdir=workdir, policy=policy
    )
    wait_for(lambda: acked <= set(delivered(records)), 120, f"all {len(acked)} acked messages")
    assert not acked - set(delivered(records))
    with Client(final.info["endpoint"]) as c:
        wait_for(lambda: c.request("status")["messages"] == 0, 30, "the spool to empty")


def test_a_timeout_after_the_final_dot_is_transient_and_flagged_as_a_possible_duplicate(
    cluster: Cluster, make_policy: MakePolicy
) -> None:
    # The sink answers slow- recipients 2 s after the dot; the worker waits 0.5 s.
    coord, records = boot(
        cluster, make_policy, env=SLOW_RETRY, extra=("--smtp-timeout", "data_dot=0.5")
    )
    assert records is not None
    with Client(coord.info["endpoint"]) as c:
        assert c.send("s@src.test", "slow-dup@dst.test", b"Subject: d\r\n\r\nx\r\n").ok
    rec = wait_for(
        lambda: next((r for r in cluster.records(coord) if r["type"] == "TransientFailure"), None),
        30,
        "the TransientFailure record",
    )
    assert rec["recipient"] == "slow-dup@dst.test" and rec["possible_duplicate"] is True
    assert rec["response"]["code"] == 451
    # The peer did take the message: exactly the duplicate window the flag warns about.
    wait_for(lambda: delivered(records)["slow-dup@dst.test"] == 1, 30, "the sink's copy")
    with Client(coord.info["endpoint"]) as c:
        assert c.request("status")["messages"] == 1  # kept for its retry
