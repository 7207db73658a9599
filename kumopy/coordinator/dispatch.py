"""Dispatch: pick a source for each ready message by its pool's weights, then feed the workers.

Words used here, one meaning each:
- *assigned*: picked for a source and not answered yet (the Ledger counts these per source);
- *backlog*: assigned, waiting in the coordinator for the worker's credit;
- *dispatched*: sent to the worker, waiting for its result.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from kumopy._fast import Ledger, SmoothSelector, SourceMask
from kumopy.config import Config, EgressSource
from kumopy.coordinator.queues import Msg, QueueBook, SchedQueue
from kumopy.coordinator.spool import SpoolStore
from kumopy.errors import SpoolError
from kumopy.ipc.jobs import Job

__all__ = ["Assignment", "Dispatcher", "PoolRing"]

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class Assignment:
    """A message picked for a source: in its backlog, then dispatched to its worker."""

    msg: Msg
    queue: SchedQueue
    source: int
    pool: str
    site: str
    hosts: list[tuple[str, int]]
    since: float = 0.0
    """When it was dispatched (its lease starts then)."""
    job_id: int = 0


@dataclass(slots=True, eq=False)
class PoolRing:
    """One egress pool: its selector and the queues with ready messages, served in turn."""

    name: str
    selector: SmoothSelector
    queues: deque[SchedQueue] = field(default_factory=deque)
    picks: list[int] = field(default_factory=list)
    """Picks per source index since start (status and the demo's report)."""


Problem = Callable[[SchedQueue, float, str, str], None]
"""Called to defer a queue's ready messages: (queue, now, reason, enhanced code)."""


class Dispatcher:
    """Own every source's eligibility, backlog and dispatched jobs; the Ledger keeps the counts."""

    def __init__(
        self,
        config: Config,
        book: QueueBook,
        spool: SpoolStore,
        send_jobs: Callable[[int, list[Job]], None],
        on_problem: Problem,
        *,
        quantum: int,
        max_ready: int,
    ) -> None:
        self.sources: list[EgressSource] = config.used_sources()
        self.source_index = {s.name: i for i, s in enumerate(self.sources)}
        self.book = book
        self.spool = spool
        self.send_jobs = send_jobs
        self.on_problem = on_problem
        self.quantum = quantum
        self.max_ready = max_ready
        n = len(self.sources)
        self.mask = SourceMask(n)
        self.ledger = Ledger(self.mask)
        self.rings: dict[str, PoolRing] = {}
        self._troubled: dict[str, SchedQueue] = {}
        self.backlog: list[deque[Assignment]] = [deque() for _ in range(n)]
        self.dispatched: dict[int, Assignment] = {}
        self.by_source: list[set[int]] = [set() for _ in range(n)]
        self.down: dict[int, str] = {}
        """Sources whose worker failed for good (boot failure, restart storm), with why."""
        self.suspended: dict[int, tuple[float, str]] = {}
        """Source -> (until, reason); the Ledger's suspended flag follows this."""
        self.paused: str | None = None
        """Why no new message is picked right now (outcomes or records cannot be written)."""
        self.delivered = [0] * n
        self.requeued = 0
        """Jobs handed back from a dead worker or an expired lease (at-least-once)."""
        self._jobs = itertools.count(1)
        self.build_rings(config)

    # -- pools -------------------------------------------------------------------------------
    def build_rings(self, config: Config) -> None:
        """(Re)build one ring per pool, keeping pick counts and the queues waiting in them."""
        old = self.rings
        self.rings = {}
        for pool in config.pools.values():
            idx = [self.source_index[e.name] for e in pool.entries]
            weights = [e.weight for e in pool.entries]
            ring = PoolRing(pool.name, SmoothSelector(idx, weights, self.mask))
            prev = old.get(pool.name)
            ring.picks = prev.picks if prev is not None else [0] * len(self.sources)
            self.rings[pool.name] = ring
        for prev in old.values():
            for q in prev.queues:
                q.in_ring = False
                if q.ready:
                    self.ready(q)

    def ready(self, q: SchedQueue) -> None:
        """Put a queue that has ready messages in its pool's turn (QueueBook's on_ready)."""
        pool = q.pool
        ring = self.rings.get(pool) if pool is not None else None
        if ring is None:
            self._troubled[q.name] = q  # the next dispatch asks the policy again, or defers
            return
        if not q.in_ring:
            q.in_ring = True
            ring.queues.append(q)

    def _settle_troubled(self, now: float) -> None:
        """Ask the policy again about queues it could not configure; defer what still fails."""
        troubled, self._troubled = self._troubled, {}
        for q in troubled.values():
            if not q.ready:
                continue
            self.book.configure(q)
            if q.pool is not None and q.pool in self.rings:
                self.ready(q)
            else:
                self.on_problem(q, now, q.error or "queue has no configuration", "4.3.0")

    # -- picking -----------------------------------------------------------------------------
    def dispatch(self, now: float, budget: int) -> int:
        """Pick sources for up to `budget` ready messages, pool by pool, queue by queue."""
        if self.paused is not None:
            return 0
        if self._troubled:
            self._settle_troubled(now)
        moved = 0
        for ring in self.rings.values():
            if ring.queues and moved < budget:
                moved += self._serve(ring, now, budget - moved)
        return moved

    def _serve(self, ring: PoolRing, now: float, budget: int) -> int:
        """Serve a pool's queues in turn, each up to the quantum, until its sources are busy."""
        queues = ring.queues
        sel = ring.selector
        moved = 0
        visits = len(queues)
        while visits > 0 and moved < budget:
            visits -= 1
            q = queues.popleft()
            if not q.ready or q.pool != ring.name:
                q.in_ring = False
                if q.ready:
                    self.ready(q)  # a reload moved it to another pool
                continue
            site = q.site
            if site is None:
                q.in_ring = False
                why = (
                    f"queue {q.name} has no mx_list and MX lookups are not available yet; "
                    "set mx_list in get_queue_config"
                )
                self.on_problem(q, now, why, "4.4.3")
                continue
            n = 0
            limit = min(self.quantum, budget - moved)
            src = 0
            while q.ready and n < limit:
                src = sel.pick()
                if src < 0:
                    break
                msg = q.ready.popleft()
                self.ledger.take(src)
                ring.picks[src] += 1
                self.backlog[src].append(Assignment(msg, q, src, ring.name, site[0], site[1]))
                n += 1
            moved += n
            if src < 0:
                queues.appendleft(q)  # first in line when a source has room again
                if not self._any_can_send(sel):
                    self._defer_ring(ring, now)
                break
            if q.ready:
                queues.append(q)
            else:
                q.in_ring = False
        return moved

    def _any_can_send(self, sel: SmoothSelector) -> bool:
        return any(s not in self.down and s not in self.suspended for s in sel.sources)

    def _defer_ring(self, ring: PoolRing, now: float) -> None:
        """No source of the pool can send at all: defer every waiting message with the reason."""
        if not ring.selector.sources:
            why = f"egress pool {ring.name} has no sources"
        else:
            states = ", ".join(self.source_state(s) for s in ring.selector.sources)
            why = f"no eligible source in egress pool {ring.name}: {states}"
        while ring.queues:
            q = ring.queues.popleft()
            q.in_ring = False
            self.on_problem(q, now, why, "4.4.5")

    def source_state(self, src: int) -> str:
        """Describe why a source is or is not picked, for reasons and status."""
        name = self.sources[src].name
        if src in self.down:
            return f"{name} (down)"
        if src in self.suspended:
            return f"{name} (suspended: {self.suspended[src][1]})"
        return f"{name} (busy)"

    # -- feeding the workers -----------------------------------------------------------------
    def worker_credit(self, src: int) -> int:
        """Return the credit the source's worker announced (0 while it has none)."""
        return max(0, self.ledger.credit(src) - self.max_ready)

    def feed(self, now: float) -> int:
        """Send each source's backlog to its worker while the worker has credit."""
        if self.paused is not None:
            return 0  # push back on the workers too: no new delivery starts
        sent = 0
        for src, backlog in enumerate(self.backlog):
            if not backlog:
                continue
            room = self.worker_credit(src) - len(self.by_source[src])
            if room <= 0:
                continue
            jobs: list[Job] = []
            while backlog and len(jobs) < room:
                item = backlog.popleft()
                msg = item.msg
                try:
                    data = msg.data if msg.data is not None else self.spool.load_data(msg.msg_id)
                except SpoolError as exc:
                    log.error("%s; trying again later", exc.message)
                    backlog.appendleft(item)
                    break
                if data is None:
                    log.error("message %s vanished from the spool; forgetting it", msg.msg_id)
                    self.ledger.release(src)
                    self.book.finish(msg, now)
                    continue
                item.job_id = next(self._jobs)
                item.since = now
                self.dispatched[item.job_id] = item
                self.by_source[src].add(item.job_id)
                env = msg.env
                jobs.append(
                    Job(
                        item.job_id,
                        msg.msg_id,
                        env.sender,
                        env.recipients,
                        data,
                        item.hosts,
                        item.site,
                    )
                )
            if jobs:
                sent += len(jobs)
                self.send_jobs(src, jobs)
        return sent

    def answered(self, job_id: int) -> Assignment | None:
        """Return and forget the assignment a result answers (None: unknown, lease passed)."""
        item = self.dispatched.pop(job_id, None)
        if item is not None:
            self.by_source[item.source].discard(job_id)
            self.ledger.release(item.source)
        return item

    def _give_back(self, item: Assignment) -> None:
        """Return an assignment's message to the front of its queue, to pick a source again."""
        self.book.make_ready(item.queue, item.msg, front=True)

    # -- workers -----------------------------------------------------------------------------
    def worker_ready(self, src: int, credit: int) -> None:
        """A worker (re)connected and can take `credit` jobs."""
        self.down.pop(src, None)
        self.ledger.set_credit(src, credit + self.max_ready)

    def worker_stopping(self, src: int) -> None:
        """A worker said bye: send it nothing more and pick other sources meanwhile."""
        self.ledger.set_credit(src, 0)

    def worker_gone(self, src: int, failed: str | None) -> int:
        """Return a dead worker's jobs and backlog to their queues; they pick a source again."""
        self.ledger.set_credit(src, 0)
        self.ledger.reset_assigned(src)
        if failed is not None:
            self.down[src] = failed
        n = 0
        for job_id in sorted(self.by_source[src], reverse=True):
            item = self.dispatched.pop(job_id, None)
            if item is not None:
                self._give_back(item)
                n += 1
        self.by_source[src].clear()
        backlog = self.backlog[src]
        while backlog:
            self._give_back(backlog.pop())
            n += 1
        self.requeued += n
        if n:
            log.warning(
                "returned %d in-flight messages of %s to their queues", n, self.sources[src].name
            )
        return n

    def suspend(self, src: int, until: float, reason: str) -> None:
        """Take a source out of selection until `until`; its backlog picks another source."""
        if src not in self.suspended:
            log.error("suspending source %s: %s", self.sources[src].name, reason)
        self.suspended[src] = (until, reason)
        self.ledger.set_suspended(src, True)
        backlog = self.backlog[src]
        while backlog:
            self.ledger.release(src)
            self._give_back(backlog.pop())

    def resume_suspended(self, now: float) -> None:
        """Put sources whose suspension has passed back into selection."""
        for src, (until, _) in list(self.suspended.items()):
            if now >= until:
                del self.suspended[src]
                self.ledger.set_suspended(src, False)
                log.info("source %s is back in selection", self.sources[src].name)

    def expire_leases(self, now: float, lease: float) -> int:
        """Hand jobs held past their lease to another attempt (at-least-once)."""
        stale = [j for j, x in self.dispatched.items() if now - x.since > lease]
        for job_id in stale:
            item = self.answered(job_id)
            assert item is not None
            self._give_back(item)
        self.requeued += len(stale)
        return len(stale)

    def ready_count(self) -> int:
        """Return how many messages are due now and wait for a source."""
        queues = [q for ring in self.rings.values() for q in ring.queues]
        return sum(len(q.ready) for q in (*queues, *self._troubled.values()))

    def backlog_count(self) -> int:
        """Return how many assigned messages wait for their worker's credit."""
        return sum(len(b) for b in self.backlog)
