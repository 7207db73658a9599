"""The coordinator's queueing core alone: selection under load, overflow, requeue, retries."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

from kumopy.config import QueueConfig, queue_name
from kumopy.coordinator.core import Core, CoreSettings
from kumopy.coordinator.ingress import Ingress
from kumopy.coordinator.logs import LogWriter
from kumopy.coordinator.queues import next_retry_delay
from kumopy.coordinator.spool import SpoolStore
from kumopy.errors import SpoolError
from kumopy.ipc.framing import decode_header, encode_header
from kumopy.ipc.inject import Limits
from kumopy.ipc.jobs import DELIVERED, Job, JobResult, RecipientResult
from kumopy.policy import load_policy

POLICY = """
from kumopy import kumo

@kumo.on("init")
def init():
    kumo.define_egress_source(name="a", source_address="127.0.0.2")
    kumo.define_egress_source(name="b", source_address="127.0.0.3")
    kumo.define_egress_pool(name="p", entries=[{"name": "a", "weight": 1},
                                               {"name": "b", "weight": 3}])

@kumo.on("get_queue_config")
def qc(domain, tenant, campaign, routing_domain):
    return kumo.make_queue_config(egress_pool="p", mx_list=["127.0.0.1:2525"])
"""


class Harness:
    """A Core with a real spool, fed through the real ingress code."""

    def __init__(self, tmp: Path, policy: str = POLICY, **settings: Any) -> None:
        (tmp / "policy.py").write_text(policy)
        self.spool = SpoolStore(tmp / "spool", fsync=False, min_free_bytes=0)
        self.sent: defaultdict[int, list[Job]] = defaultdict(list)
        self.core = Core(
            load_policy(tmp / "policy.py"),
            self.spool,
            LogWriter(None),
            lambda src, jobs: self.sent[src].extend(jobs),
            CoreSettings(**settings),
        )
        self.ingress = Ingress(self.core, Limits(), lambda request: {})
        self.a = self.core.source_index["a"]
        self.b = self.core.source_index["b"]

    def inject(self, n: int, domain: str = "y.test") -> None:
        msgs = [
            {"sender": "s@x.test", "recipients": [f"r{i}@{domain}"], "data": b"hi\r\n"}
            for i in range(n)
        ]
        replies = self.ingress.handle_batch(
            [[b"peer", encode_header("inject", req=1, messages=msgs)]]
        )
        assert all(m["ok"] for m in decode_header(replies[0][1])["result"]["messages"])

    def pump(self) -> None:
        """Dispatch until nothing moves (each call serves a queue at most `quantum`)."""
        while self.core.step(0.0):
            pass

    def deliver(self, src: int, count: int | None = None) -> int:
        jobs = self.sent[src][: count if count is not None else len(self.sent[src])]
        del self.sent[src][: len(jobs)]
        results = [
            JobResult(
                j.job_id,
                [RecipientResult(r, DELIVERED, 250, "2.0.0", "ok", ".") for r in j.recipients],
            )
            for j in jobs
        ]
        self.core.handle_results(src, results, 0.0)
        return len(jobs)


def test_weights_hold_while_every_worker_is_busy(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.core.desk.worker_ready(h.a, 1)
    h.core.desk.worker_ready(h.b, 1)
    h.inject(400)
    h.pump()
    # Each worker holds one job; the rest wait in the chosen source's backlog.
    assert len(h.sent[h.a]) == 1 and len(h.sent[h.b]) == 1
    assert Counter(
        {h.a: h.core.dispatcher.picks["p"][h.a], h.b: h.core.dispatcher.picks["p"][h.b]}
    ) == {
        h.a: 100,
        h.b: 300,
    }
    done = Counter[int]()
    while h.core.desk.dispatched:
        for src in (h.a, h.b):
            done[src] += h.deliver(src)
        h.pump()
    assert done == {h.a: 100, h.b: 300}


def test_a_full_backlog_overflows_to_the_other_sources(tmp_path: Path) -> None:
    h = Harness(tmp_path, max_ready=2)
    h.core.desk.worker_ready(h.a, 1)
    h.core.desk.worker_ready(h.b, 1000)
    h.inject(40)
    h.pump()
    # a never answers: it holds 1 job plus 2 in its backlog; b takes every other message.
    assert len(h.sent[h.a]) == 1 and len(h.core.desk.backlog[h.a]) == 2
    assert len(h.sent[h.b]) == 37
    assert not h.core.desk.mask.get(h.a) and h.core.desk.mask.get(h.b)


def test_a_dead_worker_gives_back_its_jobs_and_backlog(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.core.desk.worker_ready(h.a, 2)
    h.core.desk.worker_ready(h.b, 2)
    h.inject(20)
    h.pump()
    held = len(h.sent[h.a]) + len(h.core.desk.backlog[h.a])
    assert held == 5
    assert h.core.desk.worker_gone(h.a, "boot failure") == 5
    h.sent[h.a].clear()
    h.pump()
    assert len(h.core.desk.backlog[h.a]) == 0  # nothing is picked for a dead source
    while h.core.desk.dispatched:
        h.deliver(h.b)
        h.pump()
    assert h.core.desk.delivered[h.b] == 20 and h.core.desk.delivered[h.a] == 0
    h.core.outcomes.commit(force=True)
    assert h.spool.count() == 0


def test_retry_delay_doubles_is_capped_and_jittered() -> None:
    rng = random.Random(7)
    cfg = QueueConfig(retry_interval=60.0, max_retry_interval=600.0)
    delays = [next_retry_delay(cfg, n, rng) for n in range(6)]
    for n, d in enumerate(delays):
        base = min(600.0, 60.0 * 2**n)
        assert base <= d <= base * 1.05
    assert next_retry_delay(QueueConfig(retry_interval=1.0), 40, rng) >= 2**32


@pytest.mark.parametrize(
    ("args", "name"),
    [
        (("d.test", None, None), "d.test"),
        (("d.test", "t", None), "t@d.test"),
        (("d.test", None, "c"), "c:d.test"),
        (("d.test", "t", "c"), "c:t@d.test"),
    ],
)
def test_queue_names(args: tuple[str, str | None, str | None], name: str) -> None:
    assert queue_name(*args) == name


def test_ingress_refuses_transiently_while_stopping_and_keeps_nothing(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.ingress.refusing = "coordinator is shutting down; try again later"
    msgs = [{"sender": "s@x.test", "recipients": ["r@y.test"], "data": b"hi\r\n"}]
    (reply,) = h.ingress.handle_batch([[b"peer", encode_header("inject", req=9, messages=msgs)]])
    header = decode_header(reply[1])
    assert header["ok"] is False and header["req"] == 9
    assert header["error"]["code"] == "shutting_down" and header["error"]["transient"] is True
    assert h.spool.count() == 0 and not h.core.book.msgs


def test_outcomes_that_cannot_be_recorded_are_kept_and_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = Harness(tmp_path)
    h.core.desk.worker_ready(h.a, 10)
    h.core.desk.worker_ready(h.b, 10)
    h.inject(4)
    h.pump()
    real = h.spool.apply_outcomes
    calls: list[int] = []

    def failing(deletes: list[str], reschedules: list[object]) -> None:
        calls.append(len(deletes))
        raise SpoolError("disk I/O error")

    monkeypatch.setattr(h.spool, "apply_outcomes", failing)
    h.deliver(h.a)
    h.deliver(h.b)
    h.core.outcomes.commit(force=True)
    assert calls == [4] and h.core.outcomes.pending()
    h.core.outcomes.commit()  # within the back-off: not tried again
    assert calls == [4]
    monkeypatch.setattr(h.spool, "apply_outcomes", real)
    h.core.outcomes.commit(force=True)
    assert not h.core.outcomes.pending() and h.spool.count() == 0


def test_a_job_past_its_lease_goes_to_another_attempt(tmp_path: Path) -> None:
    h = Harness(tmp_path, lease=60.0)
    h.core.desk.worker_ready(h.a, 10)
    h.core.desk.worker_ready(h.b, 10)
    h.inject(4)
    h.pump()
    stale = list(h.sent[h.a]) + list(h.sent[h.b])
    assert len(stale) == 4 and h.core.desk.expire_leases(59.0, 60.0) == 0
    assert h.core.desk.expire_leases(61.0, 60.0) == 4 and h.core.desk.requeued == 4
    h.sent.clear()
    h.pump()
    assert sum(len(v) for v in h.sent.values()) == 4  # sent again, with new job ids
    # A late answer to the expired job is ignored; the new attempt's answer counts.
    late = [
        JobResult(
            j.job_id, [RecipientResult(r, DELIVERED, 250, None, "ok", ".") for r in j.recipients]
        )
        for j in stale
    ]
    h.core.handle_results(h.a, late, 0.0)
    assert h.core.desk.delivered == [0, 0, 0]
    h.deliver(h.a)
    h.deliver(h.b)
    assert sum(h.core.desk.delivered) == 4 and not h.core.desk.dispatched


def test_bodies_past_the_cache_budget_are_read_back_from_the_spool(tmp_path: Path) -> None:
    h = Harness(tmp_path, body_cache_bytes=10)  # room for two 4-byte bodies
    h.core.desk.worker_ready(h.a, 10)
    h.core.desk.worker_ready(h.b, 10)
    h.inject(5)
    assert h.core.book.cached_bytes == 8
    assert sum(m.data is None for m in h.core.book.msgs.values()) == 3
    h.pump()
    jobs = [j for v in h.sent.values() for j in v]
    assert len(jobs) == 5 and all(bytes(j.data) == b"hi\r\n" for j in jobs)


def test_a_small_queue_is_not_buried_behind_a_bulk_one(tmp_path: Path) -> None:
    h = Harness(tmp_path, max_ready=50)
    h.core.desk.worker_ready(h.a, 10)
    h.core.desk.worker_ready(h.b, 10)
    h.inject(5000, "bulk.test")
    h.inject(5, "small.test")
    h.core.step(0.0)  # one turn: each queue gets at most a quantum
    sent = [r for jobs in h.sent.values() for j in jobs for r in j.recipients]
    waiting = [i.msg.env.recipients[0] for b in h.core.desk.backlog for i in b]
    small = [r for r in sent + waiting if r.endswith("@small.test")]
    assert len(small) == 5  # all picked in the first turn, though 5000 bulk came first
    # The same turn went on serving the bulk queue until both sources were full
    # (credit 10 + max_ready 50 each), not one quantum and then a wait for the next event.
    assert len(h.core.book.queues["bulk.test"].ready) == 5000 - (2 * 60 - 5)


def test_one_turn_fills_the_sources_from_a_single_queue(tmp_path: Path) -> None:
    h = Harness(tmp_path, max_ready=500)
    h.core.desk.worker_ready(h.a, 100)
    h.core.desk.worker_ready(h.b, 100)
    h.inject(3000)
    moved = h.core.step(0.0)
    # Far more than one quantum (32): the loop sleeps after a turn that leaves the sources idle.
    assert moved == 2 * 600 + 200 and len(h.sent[h.a]) == 100 and len(h.sent[h.b]) == 100
    assert len(h.core.book.queues["y.test"].ready) == 3000 - 1200


def test_injection_ids_are_forgotten_after_the_dedup_window(tmp_path: Path) -> None:
    spool = SpoolStore(tmp_path / "spool", fsync=False, min_free_bytes=0)
    spool.insert_batch([], [("old", "m1", 1000.0), ("new", "m2", 5000.0)])
    assert spool.lookup_client_ids(["old", "new"]) == {"old": "m1", "new": "m2"}
    assert spool.prune_client_ids(2000.0) == 1
    assert spool.lookup_client_ids(["old", "new"]) == {"new": "m2"}


def test_a_busy_worker_gets_its_jobs_in_batches_not_one_by_one(tmp_path: Path) -> None:
    from kumopy.coordinator.sources import FEED_HOLD
    from kumopy.ipc.work import BATCH as FEED_BATCH

    h = Harness(tmp_path)
    desk = h.core.desk
    desk.worker_ready(h.a, 256)
    desk.worker_ready(h.b, 256)
    h.inject(400)
    while h.core.step(0.0):
        pass
    assert len(h.sent[h.b]) == 256 and len(desk.backlog[h.b]) == 44
    batches = desk.batches
    # Results for 10 jobs come back: the worker still holds 246, so 10 jobs do not go alone.
    h.deliver(h.b, 10)
    h.core.step(0.01)
    assert desk.batches == batches and len(desk.backlog[h.b]) == 44
    assert desk.next_feed() == pytest.approx(0.01 + FEED_HOLD)
    # ... unless they waited FEED_HOLD: then they go, in one message.
    h.core.step(0.01 + FEED_HOLD)
    assert desk.batches == batches + 1 and len(desk.backlog[h.b]) == 34
    assert desk.next_feed() == float("inf")
    # Room for a whole batch goes at once.
    h.inject(200)
    while h.core.step(1.0):
        pass
    assert len(h.sent[h.b]) == 256 and len(desk.backlog[h.b]) > FEED_BATCH
    h.deliver(h.b, FEED_BATCH)
    h.core.step(1.0)
    assert len(h.sent[h.b]) == 256 and desk.batches == batches + 2
    # A worker with little work left is fed at once, whatever the batch.
    h.deliver(h.b)
    h.core.step(1.0)
    assert h.sent[h.b] and desk.batches == batches + 3


def test_a_worker_of_small_credit_is_never_held(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.core.desk.worker_ready(h.a, 1)
    h.core.desk.worker_ready(h.b, 3)
    h.inject(40)
    done = Counter[int]()
    for _ in range(200):
        h.pump()
        if not h.core.desk.dispatched:
            break
        for src in (h.a, h.b):
            done[src] += h.deliver(src)
    assert done == {h.a: 10, h.b: 30}
