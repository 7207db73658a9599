"""Workers forked by the zygote: boot grace, reaping, exit codes, and dying with the coordinator."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from kumopy.benchpolicy import synthetic_policy
from kumopy.client import Client
from kumopy.config import EgressSource
from kumopy.coordinator.arbiter import Arbiter, WorkerSlot
from kumopy.coordinator.zygote import Zygote
from kumopy.harness import Proc, start_coordinator, wait_for
from kumopy.ipc.pipe import MAX_FRAME, read_frame, write_frame
from kumopy.parent import adopted_by
from tests.conftest_procs import Cluster
from tests.policies import wait_orphans_exit

# -- the arbiter's clock: boot timeout vs heartbeat staleness (no process) ---------------------


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _arbiter(kills: list[tuple[int, int]], clock: FakeClock) -> Arbiter:
    arb = Arbiter(
        [EgressSource("a", "127.0.0.2")],
        "ipc:///nowhere",
        lambda slot, reason: None,
        stale_after=15.0,
        kill_grace=5.0,
        boot_timeout=60.0,
    )
    arb.clock = clock

    def kill(slot: WorkerSlot, sig: int) -> None:
        assert slot.pid is not None
        kills.append((slot.pid, sig))

    arb._kill = kill  # type: ignore[method-assign]
    # As if the zygote had forked pid 4242: nothing is started.
    arb._started([arb.slots[0]], [], 4242)
    return arb


def test_a_worker_slow_to_boot_is_not_killed_before_the_boot_timeout() -> None:
    kills: list[tuple[int, int]] = []
    clock = FakeClock()
    arb = _arbiter(kills, clock)
    clock.now += 59.0  # far past the heartbeat timeout, still booting
    arb.tick()
    assert kills == []
    clock.now += 2.0
    arb.tick()
    assert kills == [(4242, signal.SIGTERM)]
    clock.now += 5.1  # then SIGKILL after the grace, as for a hung worker
    arb.tick()
    assert kills[-1] == (4242, signal.SIGKILL)


def test_once_ready_a_worker_is_judged_by_its_heartbeats() -> None:
    kills: list[tuple[int, int]] = []
    clock = FakeClock()
    arb = _arbiter(kills, clock)
    clock.now += 40.0
    arb.ready(0)
    clock.now += 14.0
    arb.tick()
    assert kills == []
    arb.seen(0)
    clock.now += 14.0
    arb.tick()
    assert kills == []
    clock.now += 2.0
    arb.tick()
    assert kills == [(4242, signal.SIGTERM)]


def test_a_zygote_never_started_forks_nothing_and_the_arbiter_would_exec() -> None:
    zygote = Zygote()
    assert zygote.pid is None
    assert zygote.spawn(["--endpoint", "x"]) is None
    assert zygote.spawn_many([["a"], ["b"]]) == [None, None]


def test_pipe_frames_round_trip_and_fail_clearly() -> None:
    r, w = os.pipe()
    try:
        write_frame(w, {"argv": ["--credit", "256"], "n": 1})
        assert read_frame(r, timeout=5) == {"argv": ["--credit", "256"], "n": 1}
        with pytest.raises(TimeoutError):
            read_frame(r, timeout=0.01)
        os.write(w, (MAX_FRAME + 1).to_bytes(4, "big"))
        with pytest.raises(ValueError, match="larger"):
            read_frame(r, timeout=5)
        os.write(w, (2).to_bytes(4, "big") + b"[]")
        with pytest.raises(ValueError, match="not a JSON object"):
            read_frame(r, timeout=5)
    finally:
        os.close(w)
    try:
        with pytest.raises(EOFError):
            read_frame(r)
    finally:
        os.close(r)


def test_adoption_wait_gives_up_at_its_deadline() -> None:
    assert adopted_by(os.getppid(), timeout=0.01)
    assert not adopted_by(os.getpid(), timeout=0.01)  # never our own parent


# -- real processes ----------------------------------------------------------------------------


def _children(pid: int) -> dict[int, str]:
    """Return the coordinator's children: pid -> "worker", "zygote" or "other"."""
    out: dict[int, str] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                comm = Path(f"/proc/{child}/comm").read_text().strip()
                cmd = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except FileNotFoundError:
                continue
            if comm == "kumopy-worker" or b"worker" in cmd:
                out[int(child)] = "worker"
            else:
                out[int(child)] = "zygote" if b"zygote" in cmd else "other"
    return out


def _zygote_of(coord: Proc) -> int | None:
    return next((p for p, role in _children(coord.pid).items() if role == "zygote"), None)


def _cmdline(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def _workers(coord: Proc) -> dict[str, int | None]:
    with Client(coord.info["endpoint"]) as client:
        workers: dict[str, int | None] = client.request("status")["workers"]
    return workers


def _boot(cluster: Cluster, sources: int, *extra: str) -> tuple[Proc, Path]:
    """Start a coordinator of `sources` synthetic sources; return it and its stderr file."""
    workdir = cluster.tmp / f"coord{len(cluster.procs)}"
    workdir.mkdir(parents=True)
    policy = workdir / "policy.py"
    policy.write_text(synthetic_policy([1] * sources))
    log = workdir / "stderr.log"
    with open(log, "wb") as err:
        coord = start_coordinator(
            workdir, str(policy), extra=["--log-level", "INFO", *extra], stderr=err, timeout=300
        )
    cluster.procs.append(coord)
    return coord, log


@pytest.mark.integration
def test_forked_workers_are_the_coordinators_children_and_restart_after_sigkill(
    cluster: Cluster,
) -> None:
    coord, log = _boot(cluster, 2)
    workers = _workers(coord)
    for pid in workers.values():
        assert pid is not None
        assert _ppid(pid) == coord.pid  # reparented: the coordinator reaps it
        assert b"zygote" in _cmdline(pid)  # forked, not exec'd
    victim = workers["bench2"]
    assert victim is not None
    os.kill(victim, signal.SIGKILL)

    def restarted() -> int | None:
        pid = _workers(coord)["bench2"]
        return pid if pid not in (None, victim) else None

    new = wait_for(restarted, 30, "bench2's worker to be restarted")
    assert _ppid(new) == coord.pid
    # The coordinator reaped the worker itself and saw how it ended.
    wait_for(
        lambda: "worker for bench2 died (signal SIGKILL)" in log.read_text(),
        10,
        "the coordinator to log the signal",
    )


@pytest.mark.integration
def test_a_forked_worker_exit_code_reaches_the_coordinator(cluster: Cluster) -> None:
    # 192.0.2.44 is not on this host: the worker exits with the boot-failure code (3), which
    # the coordinator must see through the double fork to stop restarting it.
    workdir = cluster.tmp / "unplumbed"
    workdir.mkdir()
    policy = workdir / "policy.py"
    policy.write_text(synthetic_policy([1, 1]).replace("127.0.0.3", "192.0.2.44"))
    coord = start_coordinator(workdir, str(policy), extra=["--log-level", "INFO"], timeout=120)
    cluster.procs.append(coord)
    with Client(coord.info["endpoint"]) as client:
        st = client.request("status")
    assert "failed at boot (exit code 3)" in st["failures"]["bench2"]
    assert st["workers"]["bench2"] is None


@pytest.mark.integration
def test_a_killed_coordinator_leaves_no_worker_and_no_zygote(cluster: Cluster) -> None:
    coord, _ = _boot(cluster, 3)
    zygote = _zygote_of(coord)
    assert zygote is not None
    workers = [p for p in _workers(coord).values() if p is not None]
    assert len(workers) == 4
    os.kill(coord.pid, signal.SIGKILL)
    coord.popen.wait(10)
    wait_orphans_exit([zygote, *workers])


@pytest.mark.integration
def test_the_zygote_dying_is_survived(cluster: Cluster) -> None:
    coord, log = _boot(cluster, 2)
    first = _zygote_of(coord)
    assert first is not None
    before = _workers(coord)
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: "the zygote exited (signal SIGKILL)" in log.read_text(), 30, "the reap")
    # Without a zygote (it restarts after a backoff) a dead worker is exec'd, not left dead.
    gone = before["bench2"]
    assert gone is not None
    os.kill(gone, signal.SIGKILL)
    wait_for(lambda: _workers(coord)["bench2"] not in (None, gone), 30, "bench2 without a zygote")
    before = _workers(coord)
    second = wait_for(
        lambda: (z := _zygote_of(coord)) not in (None, first) and z, 30, "a new zygote"
    )
    wait_for(lambda: f"zygote {second} ready" in log.read_text(), 60, "the new zygote's hello")
    assert _workers(coord) == before  # the workers never noticed
    assert all(_ppid(p) == coord.pid for p in before.values() if p is not None)
    victim = before["bench1"]
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    new = wait_for(
        lambda: (p := _workers(coord)["bench1"]) not in (None, victim) and p, 30, "a restart"
    )
    assert b"zygote" in _cmdline(new)  # forked by the new zygote


@pytest.mark.integration
def test_without_the_zygote_workers_are_execd(cluster: Cluster) -> None:
    coord, _ = _boot(cluster, 1, "--no-zygote")
    assert _zygote_of(coord) is None
    for pid in _workers(coord).values():
        assert pid is not None
        assert b"worker" in _cmdline(pid)
        assert _ppid(pid) == coord.pid


@pytest.mark.integration
def test_64_sources_become_ready(cluster: Cluster) -> None:
    coord, log = _boot(cluster, 64, "--log-level", "WARNING")
    workers = _workers(coord)
    assert len(workers) == 65  # and `unspecified`
    pids = [p for p in workers.values() if p is not None]
    assert len(pids) == 65
    assert all(b"zygote" in _cmdline(p) for p in pids)
    with Client(coord.info["endpoint"]) as client:
        assert client.request("status")["failures"] == {}
    assert "terminating" not in log.read_text()
