"""Log and spool file systems that fill up or vanish: kumopy carries on and sends nothing twice."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from kumopy.client import Client, Message
from kumopy.harness import Proc, read_log_records, wait_for
from tests.conftest_procs import Cluster, MakePolicy, fill
from tests.policies import boot, delivered

pytestmark = pytest.mark.integration


def _send(c: Client, prefix: str, n: int) -> list[str]:
    """Inject n one-recipient messages; return the recipients acknowledged."""
    msgs = [
        Message("s@src.test", [f"{prefix}{i}@dst.test"], b"Subject: l\r\n\r\nx\r\n")
        for i in range(n)
    ]
    return [m.recipients[0] for m, r in zip(msgs, c.send_batch(msgs), strict=True) if r.ok]


def _status(coord: Proc) -> dict[str, object]:
    with Client(coord.info["endpoint"]) as c:
        result: dict[str, object] = c.request("status")
        return result


def _log(coord: Proc) -> dict[str, object]:
    state = _status(coord)["log"]
    assert isinstance(state, dict)
    return state


def _logged(log_dir: Path, kind: str) -> set[str]:
    return {r["recipient"] for r in read_log_records(log_dir) if r["type"] == kind}


@pytest.mark.parametrize("shared", [False, True], ids=["log-fs", "log-and-spool-fs"])
def test_a_full_log_file_system_pauses_injection_and_loses_or_doubles_nothing(
    cluster: Cluster,
    make_policy: MakePolicy,
    tmpfs: Callable[[str], Path],
    tmp_path: Path,
    shared: bool,
) -> None:
    fs = tmpfs("4m")
    log_dir = fs / "log"
    workdir = fs / "w" if shared else tmp_path / "w"
    coord, records = boot(
        cluster,
        make_policy,
        workdir=workdir,
        extra=("--log-dir", str(log_dir), "--min-free-space", "0"),
    )
    assert records is not None
    with Client(coord.info["endpoint"]) as c:
        first = _send(c, "before", 50)
        assert len(first) == 50
        wait_for(lambda: set(first) <= set(delivered(records)), 30, "the first messages")
        wait_for(lambda: first[-1] in _logged(log_dir, "Delivery"), 30, "their records")
        filler = fill(fs)
        during = _send(c, "during", 50)
        if not shared:
            # Accepted before the failure shows: their records cannot be written.
            assert len(during) == 50
            wait_for(lambda: _log(coord)["failing"] is not None, 30, "the log failure to show")
        wait_for(lambda: set(during) <= set(delivered(records)), 30, "the accepted messages")
        refused = c.send_batch([Message("s@src.test", ["refused@dst.test"], b"x\r\n")])[0]
        assert not refused.ok and refused.transient and refused.error is not None
        assert refused.error.code in ("log_unavailable", "spool_full")
        if not shared:
            state = _log(coord)
            assert isinstance(state["unwritten_records"], int) and state["unwritten_records"] > 0
        assert coord.alive()
        filler.unlink()
        wait_for(lambda: _log(coord)["failing"] is None, 30, "the log to recover")
        after = _send(c, "after", 20)
        assert len(after) == 20
        everyone = set(first + during + after)
        wait_for(lambda: everyone <= _logged(log_dir, "Delivery"), 30, "every Delivery record")
        wait_for(lambda: everyone <= set(delivered(records)), 30, "every message at the sink")
        wait_for(lambda: c.request("status")["messages"] == 0, 30, "the spool to empty")
    copies = delivered(records)
    assert set(copies) == everyone and max(copies.values()) == 1
    assert coord.stop() == 0
    # A restart on the same spool sends nothing again.
    again, _ = boot(
        cluster,
        make_policy,
        sink_port=int(records.path.parent.joinpath("sink.port").read_text()),
        workdir=workdir,
        extra=("--log-dir", str(log_dir)),
    )
    assert _status(again)["recovered"] == 0
    assert max(delivered(records).values()) == 1


def test_log_directory_removed_while_segments_rotate(
    cluster: Cluster, make_policy: MakePolicy
) -> None:
    coord, records = boot(cluster, make_policy, extra=("--log-max-size", "2k"))
    assert records is not None
    log_dir = coord.info["log_dir"]
    acked: list[str] = []
    with Client(coord.info["endpoint"], timeout=10) as c:
        for round_ in range(6):
            shutil.rmtree(log_dir, ignore_errors=True)
            got = _send(c, f"r{round_}-", 20)
            assert len(got) == 20  # every injection answered ok, none timed out
            acked += got
        wait_for(lambda: set(acked) <= set(delivered(records)), 30, "every message")
        wait_for(lambda: c.request("status")["messages"] == 0, 30, "the spool to empty")
    # Records of the last round are in the recreated directory.
    wait_for(lambda: set(acked[-20:]) <= _logged(log_dir, "Delivery"), 30, "the last records")
    assert max(delivered(records).values()) == 1
    assert coord.stop() == 0


def test_log_directory_removed_without_rotation_gets_a_new_segment(
    cluster: Cluster, make_policy: MakePolicy
) -> None:
    coord, records = boot(cluster, make_policy)
    assert records is not None
    log_dir = coord.info["log_dir"]
    with Client(coord.info["endpoint"]) as c:
        first = _send(c, "one", 5)
        wait_for(lambda: set(first) <= _logged(log_dir, "Delivery"), 30, "the first records")
        shutil.rmtree(log_dir)
        second = _send(c, "two", 5)
        wait_for(lambda: set(second) <= set(delivered(records)), 30, "the second messages")
    # Not lost in an unlinked file: a new segment in a new directory holds them.
    wait_for(lambda: set(second) <= _logged(log_dir, "Delivery"), 30, "the second records")
    assert coord.stop() == 0


def test_outcomes_the_spool_cannot_take_are_bounded_and_push_back(
    cluster: Cluster, make_policy: MakePolicy, tmpfs: Callable[[str], Path], tmp_path: Path
) -> None:
    fs = tmpfs("8m")
    # Slow final replies and tiny credits: deliveries trickle, so the push-back shows.
    coord, records = boot(
        cluster,
        make_policy,
        workdir=fs / "w",
        sink_extra=("--slow-delay", "0.05"),
        extra=(
            "--max-pending-outcomes", "10", "--credit", "2", "--max-ready", "2",
            "--min-free-space", "0", "--log-dir", str(tmp_path / "log"),
        ),
    )  # fmt: skip
    assert records is not None
    with Client(coord.info["endpoint"]) as c:
        acked = _send(c, "slow-o", 200)
        assert len(acked) == 200
        filler = fill(fs)  # outcomes of these deliveries cannot be recorded now
        wait_for(lambda: c.request("status")["paused"] is not None, 30, "the push-back")
        st = c.request("status")
        # The bound, plus what the workers already held (two sources, credit 2 each).
        assert st["outcomes"]["pending"] <= 10 + 4
        held = len(delivered(records))
        assert held < 200
        filler.unlink()
        wait_for(lambda: set(acked) <= set(delivered(records)), 60, "every message")
        wait_for(lambda: c.request("status")["messages"] == 0, 30, "the spool to empty")
    assert max(delivered(records).values()) == 1
