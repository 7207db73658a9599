"""`kumopy run --sources-per-worker N`: several sources in one worker process, same truth."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from kumopy.config import EgressSource
from kumopy.coordinator.arbiter import Arbiter
from kumopy.coordinator.zygote import Zygote, _chunks
from kumopy.harness import Proc, SinkRecords, wait_for
from kumopy.opscli import ControlClient
from tests.conftest_procs import Cluster, MakePolicy
from tests.policies import delivered, outcomes, send

POLICY = """
import json
import os
SINK = os.environ["TEST_SINK"]
SETUP = json.load(open(os.environ["TEST_SETUP"]))

@kumo.on("init")
def init():
    for name, (address, ehlo, weight) in SETUP.items():
        kumo.define_egress_source(name=name, source_address=address, ehlo_domain=ehlo)
    kumo.define_egress_pool(
        name="p", entries=[{"name": n, "weight": w} for n, (_, _, w) in SETUP.items()]
    )

@kumo.on("get_queue_config")
def qc(domain, tenant, campaign, routing_domain):
    return kumo.make_queue_config(egress_pool="p", mx_list=[SINK], retry_interval="1s")
"""

SETUP: dict[str, tuple[str, str, int]] = {
    name: (f"127.0.0.{i + 2}", f"{name}.mta.test", weight)
    for i, (name, weight) in enumerate(zip("abcdef", (1, 2, 3, 1, 2, 3), strict=True))
}
"""Six sources; with `unspecified` first they make groups [unspecified a b c] and [d e f]."""
WEIGHTS = {name: weight for name, (_, _, weight) in SETUP.items()}
IP_OF = {name: address for name, (address, _, _) in SETUP.items()}
EHLO_OF = {address: ehlo for address, ehlo, _ in SETUP.values()}


def _start(
    cluster: Cluster, make_policy: MakePolicy, tmp_path: Path, *extra: str
) -> tuple[Proc, SinkRecords, Path]:
    setup = tmp_path / "setup.json"
    setup.write_text(json.dumps(SETUP))
    sink, records = cluster.sink()
    env = {"TEST_SINK": f"127.0.0.1:{sink.info['port']}", "TEST_SETUP": str(setup)}
    coord = cluster.coordinator(
        make_policy(POLICY),
        env=env,
        extra=("--sources-per-worker", "4", "--credit", "2000", *extra),
    )
    return coord, records, setup


def _status(coord: Proc) -> dict[str, Any]:
    with ControlClient(coord.info["control"]) as client:
        status: dict[str, Any] = client.request("status")
    return status


def _pids(coord: Proc) -> dict[str, int | None]:
    workers: dict[str, int | None] = _status(coord)["workers"]
    return workers


def _groups(pids: dict[str, int | None]) -> dict[int, set[str]]:
    groups: dict[int, set[str]] = {}
    for name, pid in pids.items():
        if pid is not None:
            groups.setdefault(pid, set()).add(name)
    return groups


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"


class FakeZygote(Zygote):
    """Hand out made-up pids and keep each request's arguments; fork nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[list[str]] = []

    def start(self) -> None:
        self.ready = True

    def wait_ready(self, timeout: float) -> bool:
        return True

    def spawn_many(self, argvs: list[list[str]]) -> list[int | None]:
        self.requests += argvs
        return [1000 + len(self.requests) - len(argvs) + i for i in range(len(argvs))]

    def tick(self, stopping: bool) -> None:
        pass


def _arbiter(exits: list[tuple[int, str]]) -> tuple[Arbiter, FakeZygote]:
    zygote = FakeZygote()
    arb = Arbiter(
        [EgressSource(n, f"127.0.0.{i + 2}") for i, n in enumerate("abcde")],
        "ipc:///nowhere",
        lambda slot, reason: exits.append((slot.index, reason)),
        zygote=zygote,
        sources_per_worker=2,
    )
    arb.start_all()
    return arb, zygote


def test_start_all_spawns_one_process_per_group_of_consecutive_sources() -> None:
    arb, zygote = _arbiter([])
    assert [r.count("--source-def") for r in zygote.requests] == [2, 2, 1]
    assert [s.pid for s in arb.slots] == [1000, 1000, 1001, 1001, 1002]
    assert {pid: [s.index for s in slots] for pid, slots in arb.by_pid.items()} == {
        1000: [0, 1],
        1001: [2, 3],
        1002: [4],
    }
    assert [s.index for s in arb.processes()] == [0, 2, 4]
    assert arb.shared(arb.slots[0]) and not arb.shared(arb.slots[4])


def test_a_reload_stop_detaches_only_that_source_from_its_group() -> None:
    exits: list[tuple[int, str]] = []
    arb, zygote = _arbiter(exits)
    arb.source_stopped(0)  # not asked to stop by a reload: nothing changes
    assert arb.slots[0].pid == 1000 and exits == []
    arb.retire(1)
    arb.source_stopped(1)
    assert arb.slots[1].pid is None and [s.index for s in arb.by_pid[1000]] == [0]
    assert [i for i, _ in exits] == [1] and "retired" in exits[0][1]
    arb.replace(2, EgressSource("c", "127.0.0.9"))
    arb.source_stopped(2)
    assert [i for i, _ in exits] == [1, 2]
    assert arb.slots[2].pid == 1003 and arb.slots[2].source.source_address == "127.0.0.9"
    assert zygote.requests[-1].count("--source-def") == 1  # the replacement runs alone
    assert [s.index for s in arb.by_pid[1001]] == [3] and [s.index for s in arb.by_pid[1003]] == [2]
    # A source alone in its process waits for the exit, as without groups.
    arb.retire(4)
    arb.source_stopped(4)
    assert arb.slots[4].pid == 1002 and len(exits) == 2
    # A group with one source left is no longer shared: that one waits for the exit too.
    arb.retire(3)
    arb.source_stopped(3)
    assert arb.slots[3].pid == 1001 and len(exits) == 2


def test_requests_to_the_zygote_are_chunked_by_size() -> None:
    small = [["x" * 100]] * 40
    assert [len(c) for c in _chunks(small)] == [16, 16, 8]
    big = [["y" * 12_000]] * 5  # a group's many definitions: a few per chunk
    assert [len(c) for c in _chunks(big)] == [2, 2, 1]
    assert [len(c) for c in _chunks([["z" * 50_000]] * 2)] == [1, 1]


@pytest.mark.integration
@pytest.mark.parametrize("spawn", ["zygote", "exec"])
def test_groups_keep_each_sources_address_ehlo_and_weight(
    cluster: Cluster, make_policy: MakePolicy, tmp_path: Path, spawn: str
) -> None:
    extra = ("--no-zygote",) if spawn == "exec" else ()
    coord, records, _ = _start(cluster, make_policy, tmp_path, *extra)
    groups = _groups(_pids(coord))
    assert sorted(map(sorted, groups.values())) == [
        ["a", "b", "c", "unspecified"],
        ["d", "e", "f"],
    ]
    for pid in groups:  # a worker process, not the coordinator's or the zygote's
        assert _alive(pid) and pid != coord.pid
    rcpts = send(coord.info["endpoint"], 240, "g-")
    recs = records.wait_count(240, 60)
    by_rcpt = {r["rcpt_to"][0]: r for r in recs}
    assert set(by_rcpt) == set(rcpts)
    for r in recs:
        assert r["helo"] == EHLO_OF[r["peer_ip"]], r
    wait_for(
        lambda: sum(r["type"] == "Delivery" for r in cluster.records(coord)) == 240,
        30,
        "240 Delivery records",
    )
    picks = {
        r["recipient"]: r["egress_source"]
        for r in cluster.records(coord)
        if r["type"] == "Delivery"
    }
    for rcpt in rcpts:  # the coordinator's record and the wire agree on the source
        assert by_rcpt[rcpt]["peer_ip"] == IP_OF[picks[rcpt]]
    # Weights 1:2:3:1:2:3 hold exactly in every window of twelve, as with one per process.
    order = [picks[r] for r in rcpts]
    for i in range(0, 240, 12):
        assert Counter(order[i : i + 12]) == WEIGHTS, (i, order[i : i + 12])
    assert _groups(_pids(coord)) == groups  # nothing restarted


@pytest.mark.integration
def test_a_killed_group_restarts_its_sources_alone_and_loses_nothing(
    cluster: Cluster, make_policy: MakePolicy, tmp_path: Path
) -> None:
    coord, records, _ = _start(cluster, make_policy, tmp_path)
    before = _pids(coord)
    groups = _groups(before)
    victim = next(pid for pid, names in groups.items() if "d" in names)
    other = next(pid for pid in groups if pid != victim)
    rcpts = send(coord.info["endpoint"], 600, "k-")
    os.kill(victim, signal.SIGKILL)
    # Duplicates are allowed (at-least-once), so wait for the set, not a count.
    wait_for(lambda: set(rcpts) <= set(delivered(records)), 90, "every recipient at the sink")

    def restarted() -> dict[str, int | None] | None:
        pids = _pids(coord)
        status = _status(coord)
        fresh = all(
            pids[n] not in (None, victim) and status["sources"][n]["credit"] > 0
            for n in ("d", "e", "f")
        )
        return pids if fresh else None

    after: dict[str, int | None] = wait_for(restarted, 30, "d, e and f restarted")
    assert len({after[n] for n in ("d", "e", "f")}) == 3  # each alone now
    assert {n: after[n] for n in groups[other]} == {n: other for n in groups[other]}
    kinds = outcomes(cluster, coord)
    assert all(kinds[r][-1] == "Delivery" for r in rcpts)
    more = send(coord.info["endpoint"], 120, "k2-")
    wait_for(lambda: set(more) <= set(delivered(records)), 60, "120 more")
    later = Counter(r["peer_ip"] for r in records.records if r["rcpt_to"][0] in set(more))
    # Requeued messages moved the pool's rotation by an unknown step: near the weights.
    _near(later, {IP_OF[n]: 10 * w for n, w in WEIGHTS.items()})


def _near(counts: Counter[str], expected: dict[str, int]) -> None:
    assert set(counts) == set(expected), counts
    assert all(abs(counts[k] - v) <= 3 for k, v in expected.items()), (counts, expected)


@pytest.mark.integration
def test_a_reload_retires_and_changes_sources_of_a_group(
    cluster: Cluster, make_policy: MakePolicy, tmp_path: Path
) -> None:
    coord, records, setup = _start(cluster, make_policy, tmp_path)
    before = _pids(coord)
    group = before["a"]
    assert group is not None and before["b"] == before["c"] == group
    n = 1200
    sent: list[str] = []
    injector = threading.Thread(
        target=lambda: sent.extend(send(coord.info["endpoint"], n, "r-", batch=25))
    )
    injector.start()
    try:
        wait_for(lambda: len(records.refresh()) >= 100, 60, "mail flowing")
        changed = {k: v for k, v in SETUP.items() if k != "b"}  # b retired
        changed["c"] = ("127.0.0.9", "c.mta.test", 3)  # c moves to another address
        setup.write_text(json.dumps(changed))
        with ControlClient(coord.info["control"]) as client:
            assert client.request("reload") == {"ok": True, "errors": []}

        def settled() -> dict[str, int | None] | None:
            status = _status(coord)
            pids: dict[str, int | None] = status["workers"]
            up = pids["c"] not in (None, group) and status["sources"]["c"]["credit"] > 0
            return pids if pids["b"] is None and up else None

        after: dict[str, int | None] = wait_for(settled, 60, "b retired and c replaced")
    finally:
        injector.join()
    # The rest of the group runs on in the same process; the new c runs alone.
    assert after["a"] == after["unspecified"] == group and _alive(group)
    assert {after[k] for k in "def"} == {before["d"]}
    assert list(after.values()).count(after["c"]) == 1
    wait_for(lambda: set(sent) <= set(delivered(records)), 60, "every message at the sink")
    more = set(send(coord.info["endpoint"], 100, "m-"))
    wait_for(lambda: more <= set(delivered(records)), 60, "100 more at the sink")
    copies = delivered(records)
    assert set(copies) == set(sent) | more and set(copies.values()) == {1}  # exactly once
    recs = records.refresh()
    later = Counter(r["peer_ip"] for r in recs if r["rcpt_to"][0] in more)
    # Weights a1 c3 d1 e2 f3 (b gone): c now leaves from its new address.
    _near(
        later, {"127.0.0.2": 10, "127.0.0.9": 30, "127.0.0.5": 10, "127.0.0.6": 20, "127.0.0.7": 30}
    )
    for r in recs:
        expected = "c.mta.test" if r["peer_ip"] == "127.0.0.9" else EHLO_OF[r["peer_ip"]]
        assert r["helo"] == expected, r
    kinds = outcomes(cluster, coord)
    assert all(kinds[r][-1] == "Delivery" for r in sent)
    assert _alive(group)


def test_a_group_that_fails_at_boot_restarts_its_sources_alone() -> None:
    from kumopy.ipc.work import WORKER_BOOT_ERROR

    exits: list[tuple[int, str]] = []
    arb, _ = _arbiter(exits)
    # One unbindable address fails the whole group's boot: its sources are not given up on,
    # each is started again alone, and only a source that fails alone is.
    for slot in arb.by_pid.pop(1000):
        slot.pid = None
        arb._after_exit(slot, WORKER_BOOT_ERROR)
    assert [(s.failed, s.next_start is not None) for s in arb.slots[:2]] == [(None, True)] * 2
    alone = arb.slots[4]
    arb.by_pid.pop(1002)
    alone.pid = None
    arb._after_exit(alone, WORKER_BOOT_ERROR)
    assert alone.failed is not None and "failed at boot" in alone.failed
