"""The coordinator's state: queues, dispatch by weighted selection, outcomes and retries."""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kumopy._fast import DueQueue, Ledger, SmoothSelector, SourceMask
from kumopy.config import QueueConfig
from kumopy.coordinator.logs import LogWriter, response_dict
from kumopy.coordinator.queues import Msg, SchedQueue, next_retry_delay, queue_name, site_for
from kumopy.coordinator.spool import SpooledMeta, SpoolStore
from kumopy.errors import PolicyError, SpoolError
from kumopy.policy import Policy
from kumopy.worker.jobs import DELIVERED, PERMANENT, Job, JobResult

__all__ = ["CoreSettings", "QueueCore"]

log = logging.getLogger(__name__)

_ids = itertools.count()


def new_msg_id() -> str:
    """Return a time-ordered, process-unique spool id."""
    return f"{time.time_ns():016x}{os.getpid() & 0xFFFF:04x}{next(_ids) & 0xFFFFFF:06x}"


@dataclass(frozen=True, slots=True)
class CoreSettings:
    """Tunables of the queueing core."""

    quantum: int = 32
    """Messages one queue may dispatch before the next queue gets a turn (fairness)."""
    lease: float = 1800.0
    """Seconds a job may stay with a worker before it is handed to another attempt."""
    body_cache_bytes: int = 256 * 1024 * 1024
    """Bodies kept in memory up to this many bytes; beyond it they are read from the spool."""
    problem_retry: float | None = None
    """Override of the retry delay used for queue-level problems (tests)."""
    outcome_delay: float = 0.01
    """Outcomes are committed to the spool at most this long after they arrive (batching)."""
    suspend_unplumbed: float = 60.0
    """Seconds a source is suspended after its address could not be bound (0: never)."""
    max_ready: int = 1024
    """Messages picked for a source that may wait for its worker's credit (KumoMTA's
    max_ready); past it the source is not eligible and the pool's other sources take its
    share."""


@dataclass(slots=True, eq=False)
class _Inflight:
    msg: Msg
    source: int
    pool: str
    queue: SchedQueue
    since: float
    site: str
    hosts: list[tuple[str, int]]


class QueueCore:
    """All queue bookkeeping of the coordinator; no sockets here, so it is testable alone."""

    def __init__(
        self,
        policy: Policy,
        spool: SpoolStore,
        logs: LogWriter,
        send_jobs: Callable[[int, list[Job]], None],
        settings: CoreSettings = CoreSettings(),
    ) -> None:
        self.policy = policy
        self.spool = spool
        self.logs = logs
        self.send_jobs = send_jobs
        self.settings = settings
        cfg = policy.config
        self.sources = cfg.used_sources()
        self.source_index = {s.name: i for i, s in enumerate(self.sources)}
        self.mask = SourceMask(len(self.sources))
        self.ledger = Ledger(self.mask)
        self.live = [True] * len(self.sources)
        self.selectors: dict[str, SmoothSelector] = {}
        self.picks: dict[str, list[int]] = {}
        self._build_selectors()
        self.due = DueQueue()
        self.msgs: dict[int, Msg] = {}
        self.queues: dict[str, SchedQueue] = {}
        self.active: deque[SchedQueue] = deque()
        self._active_set: set[str] = set()
        self.inflight: dict[int, _Inflight] = {}
        self.by_source: list[set[int]] = [set() for _ in self.sources]
        # Picked for a source, waiting for its worker's credit: the weights hold under load
        # because a busy source keeps its share here instead of losing it to the others.
        self.backlog: list[deque[_Inflight]] = [deque() for _ in self.sources]
        self.worker_credit = [0] * len(self.sources)
        self.suspended: dict[int, tuple[float, str]] = {}
        """Source index -> (until, reason) while its address cannot be bound."""
        self.at_worker = [0] * len(self.sources)
        self._handles = itertools.count(1)
        self._jobs = itertools.count(1)
        self.cached_bytes = 0
        self.delivered = [0] * len(self.sources)
        self.requeued = 0
        """Jobs handed back from a dead worker or an expired lease (at-least-once)."""
        self.recovered = 0
        self._deletes: list[str] = []
        self._last_commit = 0.0
        self._retry_commit_at = 0.0
        self._reschedules: list[tuple[str, SpooledMeta, float, int]] = []

    # -- queues ------------------------------------------------------------------------------
    def queue_for(self, domain: str, tenant: str | None, campaign: str | None) -> SchedQueue:
        """Return (creating and configuring on first use) the scheduled queue for a message."""
        name = queue_name(domain, tenant, campaign)
        q = self.queues.get(name)
        if q is None:
            q = SchedQueue(name, (domain, tenant, campaign), None)
            self._configure(q)
            self.queues[name] = q
        return q

    def _configure(self, q: SchedQueue) -> None:
        try:
            q.config, q.error = self.policy.queue_config(*q.key), None
        except PolicyError as exc:
            q.config, q.error = None, exc.message
            log.error("queue %s: %s", q.name, q.error)

    def _build_selectors(self) -> None:
        old = self.picks
        self.selectors = {}
        for pool in self.policy.config.pools.values():
            idx = [self.source_index[e.name] for e in pool.entries]
            weights = [e.weight for e in pool.entries]
            self.selectors[pool.name] = SmoothSelector(idx, weights, self.mask)
        self.picks = {p: old.get(p, [0] * len(self.sources)) for p in self.selectors}

    def reload(self, policy: Policy) -> None:
        """Adopt a new policy: pools, weights and queue configs; the sources must not change."""
        if policy.config.used_sources() != self.sources:
            raise PolicyError(
                "the reloaded policy changes the egress sources in use; restart kumopy to "
                "start or stop workers (pools, weights and queue configs reload live)"
            )
        self.policy = policy
        self._build_selectors()
        for q in self.queues.values():
            self._configure(q)

    def add(self, msg: Msg, now: float) -> None:
        """Track a message: ready now if due, else in the due-time heap."""
        self.msgs[msg.handle] = msg
        q = self.queues[msg.env.queue]
        if msg.due <= now:
            self._make_ready(q, msg)
        else:
            q.delayed += 1
            self.due.push(msg.due, msg.handle)

    def new_handle(self) -> int:
        """Return a fresh in-memory handle."""
        return next(self._handles)

    def cache_body(self, msg: Msg, data: bytes | memoryview) -> None:
        """Keep a body in memory while the cache budget allows."""
        if self.cached_bytes + len(data) <= self.settings.body_cache_bytes:
            msg.data = data
            self.cached_bytes += len(data)

    def _drop_body(self, msg: Msg) -> None:
        if msg.data is not None:
            self.cached_bytes -= len(msg.data)
            msg.data = None

    def _make_ready(self, q: SchedQueue, msg: Msg, front: bool = False) -> None:
        if front:
            q.ready.appendleft(msg)
        else:
            q.ready.append(msg)
        if q.name not in self._active_set:
            self._active_set.add(q.name)
            self.active.append(q)

    def promote_due(self, now: float, limit: int = 10_000) -> int:
        """Move messages whose retry time has come into their queues' ready lists."""
        handles = self.due.pop_due(now, limit)
        for h in handles:
            msg = self.msgs.get(h)
            if msg is None:
                continue
            q = self.queues[msg.env.queue]
            q.delayed -= 1
            self._make_ready(q, msg)
        return len(handles)

    # -- dispatch ----------------------------------------------------------------------------
    def dispatch(self, now: float) -> int:
        """Pick sources for ready messages, queue by queue in turn, then feed the workers."""
        moved = 0
        for _ in range(len(self.active)):
            q = self.active[0]
            self.active.rotate(-1)
            moved += self._dispatch_queue(q, now)
        # Drop emptied queues from the rotation wherever they sit.
        if any(not q.ready for q in self.active):
            self.active = deque(q for q in self.active if q.ready)
            self._active_set = {q.name for q in self.active}
        return moved + self._feed_workers(now)

    def _feed_workers(self, now: float) -> int:
        """Send each source's picked messages to its worker while it has credit."""
        sent = 0
        for src, backlog in enumerate(self.backlog):
            room = self.worker_credit[src] - self.at_worker[src]
            if not backlog or room <= 0:
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
                    self.msgs.pop(msg.handle, None)
                    self.ledger.release(src)
                    continue
                job_id = next(self._jobs)
                item.since = now
                self.inflight[job_id] = item
                self.by_source[src].add(job_id)
                env = msg.env
                jobs.append(
                    Job(job_id, msg.msg_id, env.sender, env.recipients, data, item.hosts, item.site)
                )
            if jobs:
                self.at_worker[src] += len(jobs)
                sent += len(jobs)
                self.send_jobs(src, jobs)
        return sent

    def _dispatch_queue(self, q: SchedQueue, now: float) -> int:
        if not q.ready:
            return 0
        config = q.config
        if config is None:
            self._queue_problem(q, now, q.error or "queue has no configuration", "4.3.0")
            return 0
        site = site_for(config)
        if site is None:
            self._queue_problem(
                q,
                now,
                f"queue {q.name} has no mx_list and MX lookups are not available yet; "
                "set mx_list in get_queue_config",
                "4.4.3",
            )
            return 0
        pool = config.egress_pool
        sel = self.selectors.get(pool)
        if sel is None:  # cannot happen: the policy checks pool names, reload redoes configs
            self._queue_problem(q, now, f"egress pool {pool} does not exist", "4.3.0")
            return 0
        n = 0
        while q.ready and n < self.settings.quantum:
            src = sel.pick()
            if src < 0:
                if not any(self.live[s] and s not in self.suspended for s in sel.sources):
                    why = (
                        f"egress pool {pool} has no sources"
                        if not sel.sources
                        else f"no eligible source in egress pool {pool}: "
                        + ", ".join(self._source_state(s) for s in sel.sources)
                    )
                    self._queue_problem(q, now, why, "4.4.5")
                break
            msg = q.ready.popleft()
            self.ledger.take(src)
            self.picks[pool][src] += 1
            self.backlog[src].append(_Inflight(msg, src, pool, q, now, site[0], site[1]))
            n += 1
        return n

    def _source_state(self, src: int) -> str:
        name = self.sources[src].name
        if not self.live[src]:
            return f"{name} (down)"
        if src in self.suspended:
            return f"{name} (suspended: {self.suspended[src][1]})"
        return f"{name} (busy)"

    def suspend(self, src: int, now: float, reason: str) -> None:
        """Take a source out of selection for a while; its backlog picks another source."""
        until = now + self.settings.suspend_unplumbed
        if src not in self.suspended:
            log.error(
                "suspending source %s for %.0fs: %s",
                self.sources[src].name,
                self.settings.suspend_unplumbed,
                reason,
            )
        self.suspended[src] = (until, reason)
        self.ledger.set_suspended(src, True)
        backlog = self.backlog[src]
        while backlog:
            item = backlog.pop()
            self.ledger.release(src)
            self._make_ready(item.queue, item.msg, front=True)

    def resume_suspended(self, now: float) -> None:
        """Put sources whose suspension has passed back into selection."""
        for src, (until, _) in list(self.suspended.items()):
            if now >= until:
                del self.suspended[src]
                self.ledger.set_suspended(src, False)
                log.info("source %s is back in selection", self.sources[src].name)

    def _queue_problem(self, q: SchedQueue, now: float, why: str, enhanced: str) -> None:
        """Defer every ready message of a queue that cannot send now, with the reason."""
        while q.ready:
            msg = q.ready.popleft()
            for rcpt in msg.env.recipients:
                self._record("TransientFailure", msg, rcpt, now, 451, enhanced, why, None)
            self._retry_or_expire(q, msg, now, list(msg.env.recipients), problem=True)

    # -- outcomes ----------------------------------------------------------------------------
    def handle_results(self, src: int, results: list[JobResult], now: float) -> None:
        """Apply a worker's results: log, then delete, reschedule or expire each message."""
        for res in results:
            job = self.inflight.pop(res.job_id, None)
            if job is None:
                log.warning(
                    "result for unknown job %d from %s ignored (lease passed?)",
                    res.job_id,
                    self.sources[src].name,
                )
                continue
            self.by_source[job.source].discard(res.job_id)
            self.ledger.release(job.source)
            self.at_worker[job.source] -= 1
            if res.extra.get("bind_failed") and self.settings.suspend_unplumbed > 0:
                self.suspend(job.source, now, res.results[0].text if res.results else "")
            msg = job.msg
            pending: list[str] = []
            sa = res.source_address
            for r in res.results:
                if r.status == DELIVERED:
                    kind = "Delivery"
                    self.delivered[job.source] += 1
                elif r.status == PERMANENT:
                    kind = "Bounce"
                else:
                    kind = "TransientFailure"
                    pending.append(r.recipient)
                self._record(
                    kind,
                    msg,
                    r.recipient,
                    now,
                    r.code,
                    r.enhanced_code,
                    r.text,
                    r.command,
                    source=job.source,
                    pool=job.pool,
                    site=job.site,
                    src_addr=sa,
                    peer={"name": res.peer_name, "addr": res.peer_addr},
                    possible_duplicate=res.possible_duplicate and kind == "TransientFailure",
                )
            if pending:
                msg.env.recipients = pending
                self._retry_or_expire(job.queue, msg, now, pending)
            else:
                self._finish(msg)

    def _finish(self, msg: Msg) -> None:
        self._drop_body(msg)
        self.msgs.pop(msg.handle, None)
        self._deletes.append(msg.msg_id)

    def _retry_or_expire(
        self, q: SchedQueue, msg: Msg, now: float, pending: list[str], problem: bool = False
    ) -> None:
        config = q.config or QueueConfig()
        if problem and self.settings.problem_retry is not None:
            delay = self.settings.problem_retry
        else:
            delay = next_retry_delay(config, msg.attempts)
        msg.attempts += 1
        if now + delay > msg.env.created + config.max_age:
            for rcpt in pending:
                self._record(
                    "Expiration",
                    msg,
                    rcpt,
                    now,
                    551,
                    "5.4.7",
                    f"message expired: next attempt would pass max_age {config.max_age:.0f}s",
                    None,
                )
            self._finish(msg)
            return
        msg.due = now + delay
        self._drop_body(msg)
        q.delayed += 1
        self.due.push(msg.due, msg.handle)
        self._reschedules.append((msg.msg_id, msg.env, msg.due, msg.attempts))

    def _record(
        self,
        kind: str,
        msg: Msg,
        rcpt: str | list[str],
        now: float,
        code: int,
        enhanced: str | None,
        text: str,
        command: str | None,
        *,
        source: int | None = None,
        pool: str | None = None,
        site: str | None = None,
        src_addr: str | None = None,
        peer: dict[str, str | None] | None = None,
        possible_duplicate: bool = False,
    ) -> None:
        env = msg.env
        source_def = self.sources[source] if source is not None else None
        rec: dict[str, Any] = {
            "type": kind,
            "id": msg.msg_id,
            "sender": env.sender,
            "recipient": rcpt,
            "queue": env.queue,
            "site": site or "",
            "size": msg.size,
            "response": response_dict(code, enhanced, text, command),
            "peer_address": peer,
            "timestamp": int(now),
            "created": int(env.created),
            "num_attempts": msg.attempts + (0 if kind == "Reception" else 1),
            "egress_pool": pool,
            "egress_source": source_def.name if source_def else None,
            "source_address": (
                {"address": src_addr or source_def.source_address} if source_def else None
            ),
            "meta": env.meta,
        }
        if possible_duplicate:
            # The peer may have taken the message before the connection broke after the dot.
            rec["possible_duplicate"] = True
        self.logs.write(rec)

    def record_reception(self, msg: Msg, now: float) -> None:
        """Write the Reception record of a newly accepted message."""
        rcpts = msg.env.recipients
        self._record(
            "Reception",
            msg,
            rcpts[0] if len(rcpts) == 1 else rcpts,
            now,
            250,
            None,
            "accepted",
            None,
        )

    def outcomes_pending(self) -> bool:
        """Return True when outcomes wait for their spool commit."""
        return bool(self._deletes or self._reschedules)

    def commit_outcomes(self, force: bool = False) -> None:
        """Flush the log, then record deletions and reschedules in the spool in one commit."""
        if not self._deletes and not self._reschedules:
            return
        now = time.monotonic()
        pending = len(self._deletes) + len(self._reschedules)
        if not force and (
            now < self._retry_commit_at
            or (pending < 2000 and now - self._last_commit < self.settings.outcome_delay)
        ):
            return
        self._last_commit = now
        self.logs.flush()
        deletes, self._deletes = self._deletes, []
        reschedules, self._reschedules = self._reschedules, []
        try:
            self.spool.apply_outcomes(deletes, reschedules)
        except SpoolError as exc:
            # Keep them for the next try: until recorded, a crash would only resend them.
            self._deletes = deletes + self._deletes
            self._reschedules = reschedules + self._reschedules
            self._retry_commit_at = now + 1.0
            log.error("cannot record %d outcomes in the spool, retrying: %s", pending, exc)

    # -- workers -----------------------------------------------------------------------------
    def worker_ready(self, src: int, credit: int) -> None:
        """A worker (re)connected and can take `credit` jobs."""
        self.live[src] = True
        self.worker_credit[src] = credit
        self.ledger.set_credit(src, credit + self.settings.max_ready)

    def worker_stopping(self, src: int) -> None:
        """A worker said bye: send it nothing more and pick other sources meanwhile."""
        self.worker_credit[src] = 0
        self.ledger.set_credit(src, 0)

    def worker_gone(self, src: int, failed: bool) -> int:
        """Return a dead worker's jobs to their queues; they will pick a source again."""
        self.ledger.set_credit(src, 0)
        self.ledger.reset_inflight(src)
        self.worker_credit[src] = 0
        self.at_worker[src] = 0
        if failed:
            self.live[src] = False
        n = 0
        for job_id in sorted(self.by_source[src], reverse=True):
            job = self.inflight.pop(job_id, None)
            if job is not None:
                self._make_ready(job.queue, job.msg, front=True)
                n += 1
        self.by_source[src].clear()
        backlog = self.backlog[src]
        while backlog:
            item = backlog.pop()
            self._make_ready(item.queue, item.msg, front=True)
            n += 1
        self.requeued += n
        if n:
            log.warning(
                "returned %d in-flight messages of %s to their queues", n, self.sources[src].name
            )
        return n

    def expire_leases(self, now: float) -> int:
        """Hand jobs held past their lease to another attempt (at-least-once)."""
        lease = self.settings.lease
        stale = [j for j, x in self.inflight.items() if now - x.since > lease]
        for job_id in stale:
            job = self.inflight.pop(job_id)
            self.by_source[job.source].discard(job_id)
            self.ledger.release(job.source)
            self.at_worker[job.source] -= 1
            self._make_ready(job.queue, job.msg, front=True)
        self.requeued += len(stale)
        return len(stale)

    def status(self) -> dict[str, Any]:
        """Return counters for the status command and the demo."""
        return {
            "messages": len(self.msgs),
            "inflight": len(self.inflight),
            "backlog": sum(len(b) for b in self.backlog),
            "delayed": len(self.due),
            "requeued": self.requeued,
            "recovered": self.recovered,
            "ready": sum(len(q.ready) for q in self.queues.values()),
            "records": dict(self.logs.counts),
            "sources": {
                s.name: {
                    "source_address": s.source_address,
                    "ehlo_domain": s.ehlo_domain,
                    "credit": self.worker_credit[i],
                    "inflight": self.at_worker[i],
                    "backlog": len(self.backlog[i]),
                    "suspended": self.suspended[i][1] if i in self.suspended else None,
                    "delivered": self.delivered[i],
                    "live": self.live[i],
                }
                for i, s in enumerate(self.sources)
            },
            "pools": {
                p: {self.sources[i].name: n for i, n in enumerate(counts) if n}
                for p, counts in self.picks.items()
            },
            "queues": {
                q.name: {"ready": len(q.ready), "delayed": q.delayed, "error": q.error}
                for q in self.queues.values()
            },
        }
