"""Each source's side of dispatch: eligibility (the Ledger), backlog, jobs at its worker, holds.

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
from dataclasses import dataclass
from typing import Any

from kumopy._fast import Ledger, SourceMask
from kumopy.config import EgressSource
from kumopy.coordinator.queues import Msg, QueueBook, SchedQueue
from kumopy.coordinator.routes import PathRoute
from kumopy.coordinator.spool import SpoolStore
from kumopy.errors import PolicyError, SpoolError
from kumopy.ipc.jobs import Job, SiteSpec
from kumopy.ipc.work import feed_batch, worker_busy

__all__ = ["MIN_CAPACITY", "Assignment", "Sources"]

FEED_HOLD = 0.1
"""Seconds a smaller batch may wait for a busy worker before it goes anyway."""
MIN_CAPACITY = 1024
"""Source indexes a run holds at least (sources added by reloads included)."""

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class Assignment:
    """A message picked for a source: in its backlog, then dispatched to its worker."""

    msg: Msg
    queue: SchedQueue
    source: int
    pool: str
    route: PathRoute
    since: float = 0.0
    """When it was dispatched (its lease starts then)."""
    job_id: int = 0


class Sources:
    """Own every source's eligibility, backlog and dispatched jobs; the Ledger keeps counts."""

    def __init__(
        self,
        sources: list[EgressSource],
        book: QueueBook,
        spool: SpoolStore,
        send_jobs: Callable[[int, list[Job]], None],
        send_site: Callable[[int, SiteSpec], None],
        max_ready: int,
    ) -> None:
        self.sources = sources
        self.book = book
        self.spool = spool
        self.send_jobs = send_jobs
        self.send_site = send_site
        self.max_ready = max_ready
        n = len(sources)
        # Room for the sources a reload may add: the mask and the ledger cannot grow in place,
        # and an index past len(sources) is never eligible (no credit).
        self.capacity = max(MIN_CAPACITY, 2 * n)
        self.mask = SourceMask(self.capacity)
        self.ledger = Ledger(self.mask)
        self.backlog: list[deque[Assignment]] = [deque() for _ in range(n)]
        self.dispatched: dict[int, Assignment] = {}
        self.by_source: list[set[int]] = [set() for _ in range(n)]
        self.down: dict[int, str] = {}
        """Sources whose worker failed for good (boot failure, restart storm), with why."""
        self.suspended: dict[int, tuple[float, str]] = {}
        """Source -> (until, reason); the Ledger's suspended flag follows this."""
        self.tally: dict[tuple[int, str], list[int]] = {}
        """(source, site) -> recipients delivered, deferred, bounced since start."""
        self.providers: dict[tuple[int, str], str | None] = {}
        """(source, site) -> the site's provider (shaping), for metrics by provider."""
        self.worker_stats: dict[int, dict[str, Any]] = {}
        """Each worker's last heartbeat statistics (connections per site)."""
        self.held: set[int] = set()
        """Sources suspended by a hold (an operator or automation), not by a failed bind."""
        self.delivered = [0] * n
        self.requeued = 0
        """Jobs handed back from a dead worker or an expired lease (at-least-once)."""
        self.batches = 0
        """DELIVER messages sent to workers since start (jobs_sent / batches: batch size)."""
        self.jobs_sent = 0
        self._sites: list[dict[str, PathRoute]] = [{} for _ in range(n)]
        """The site each worker was last told about, by name (resent when it changes)."""
        self._jobs = itertools.count(1)
        self._waiting: dict[int, float] = {}
        """Since when each source's small batch waits for its busy worker (FEED_HOLD)."""

    def assign(self, src: int, item: Assignment) -> None:
        """Count a pick for a source and put it in the source's backlog."""
        self.ledger.take(src)
        self.backlog[src].append(item)

    def can_send(self, src: int) -> bool:
        """Return True unless the source is down for good or suspended."""
        return src not in self.down and src not in self.suspended

    def state(self, src: int) -> str:
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
        sent = 0
        before, waiting = self._waiting, dict[int, float]()
        self._waiting = waiting  # only the batches still held after this turn stay
        for src, backlog in enumerate(self.backlog):
            if not backlog:
                continue
            credit = self.worker_credit(src)
            busy = len(self.by_source[src])
            room = credit - busy
            if room <= 0:
                continue
            if worker_busy(busy, credit) and min(room, len(backlog)) < feed_batch(credit):
                # The worker still has a quarter of its credit in work: wait (briefly) until
                # a full batch can go. A message per job or two wakes it far more often, and
                # with many sources those wake-ups are most of the workers' CPU.
                since = waiting[src] = before.get(src, now)
                if now - since < FEED_HOLD:
                    continue
                del waiting[src]
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
                route = item.route
                if self._sites[src].get(route.key) is not route:
                    # The worker learns a site (or its change) before its first job there;
                    # ZeroMQ keeps the order. Jobs already batched go first.
                    if jobs:
                        self._send(src, jobs)
                        sent += len(jobs)
                        jobs = []
                    self._sites[src][route.key] = route
                    self.send_site(src, _spec(route))
                item.job_id = next(self._jobs)
                item.since = now
                self.dispatched[item.job_id] = item
                self.by_source[src].add(item.job_id)
                env = msg.env
                jobs.append(
                    Job(item.job_id, msg.msg_id, env.sender, env.recipients, data, route.key)
                )
            if jobs:
                sent += len(jobs)
                self._send(src, jobs)
        return sent

    def next_feed(self) -> float:
        """Return when the oldest held batch must go (inf when none waits)."""
        return min(self._waiting.values(), default=float("inf")) + FEED_HOLD

    def _send(self, src: int, jobs: list[Job]) -> None:
        """Send a batch of jobs to a worker, counting batches (jobs per message: status)."""
        self.batches += 1
        self.jobs_sent += len(jobs)
        self.send_jobs(src, jobs)

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

    # -- reloads ------------------------------------------------------------------------------
    def add_source(self) -> int:
        """Make room for the source just appended to `sources` (a reload); return its index."""
        src = len(self.backlog)
        if src >= self.capacity:
            raise PolicyError(
                f"the reload adds source {self.sources[src].name!r} past {self.capacity} sources "
                "this run can hold; restart kumopy to go further"
            )
        self.backlog.append(deque())
        self.by_source.append(set())
        self.delivered.append(0)
        self._sites.append({})
        return src

    def drain(self, src: int) -> None:
        """Pick nothing more for a source whose worker is leaving (a reload retired or
        changed it); what waits in its backlog picks another source."""
        self.ledger.set_credit(src, 0)
        backlog = self.backlog[src]
        while backlog:
            self.ledger.release(src)
            self._give_back(backlog.pop())

    # -- workers -----------------------------------------------------------------------------
    def worker_ready(self, src: int, credit: int) -> None:
        """A worker (re)connected and can take `credit` jobs; it knows no site yet."""
        self.down.pop(src, None)
        self._sites[src].clear()
        self.ledger.set_credit(src, credit + self.max_ready)

    def worker_stopping(self, src: int) -> None:
        """A worker said bye: send it nothing more and pick other sources meanwhile."""
        self.ledger.set_credit(src, 0)

    def worker_gone(self, src: int, failed: str | None) -> int:
        """Return a dead worker's jobs and backlog to their queues; they pick a source again."""
        self.ledger.set_credit(src, 0)
        self.ledger.reset_assigned(src)
        self._sites[src].clear()
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

    def suspend(self, src: int, until: float, reason: str, by_hold: bool = False) -> None:
        """Take a source out of selection until `until`; its backlog picks another source."""
        if src not in self.suspended and not by_hold:
            log.error("suspending source %s: %s", self.sources[src].name, reason)
        if by_hold:
            self.held.add(src)
        self.suspended[src] = (until, reason)
        self.ledger.set_suspended(src, True)
        backlog = self.backlog[src]
        while backlog:
            self.ledger.release(src)
            self._give_back(backlog.pop())

    def resume(self, src: int, by_hold: bool = False) -> None:
        """Put a source back into selection (an operator's resume, or its hold ended)."""
        if by_hold and src not in self.held:
            return  # suspended for another reason (unplumbed): that one ends by itself
        self.held.discard(src)
        if self.suspended.pop(src, None) is not None:
            self.ledger.set_suspended(src, False)
            log.info("source %s is back in selection", self.sources[src].name)

    def resume_suspended(self, now: float) -> None:
        """Put sources whose suspension has passed back into selection."""
        for src, (until, _) in list(self.suspended.items()):
            if now >= until:
                self.held.discard(src)
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

    def backlog_count(self) -> int:
        """Return how many assigned messages wait for their worker's credit."""
        return sum(len(b) for b in self.backlog)


def _spec(route: PathRoute) -> SiteSpec:
    return SiteSpec(route.key, list(route.hosts), route.config.to_wire(), route.sts_testing)
