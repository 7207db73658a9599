"""The coordinator's state: queues, dispatch and outcomes wired together, with no sockets."""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kumopy.coordinator.automation import Automation
from kumopy.coordinator.dispatch import Dispatcher
from kumopy.coordinator.gates import Gates
from kumopy.coordinator.holds import Holds, Sharer
from kumopy.coordinator.limits import Limiter
from kumopy.coordinator.logs import LogWriter
from kumopy.coordinator.outcomes import Outcomes
from kumopy.coordinator.queues import Msg, QueueBook, SchedQueue
from kumopy.coordinator.reconfig import SourceChanges, diff_sources
from kumopy.coordinator.routes import Routes
from kumopy.coordinator.sources import Assignment, Sources
from kumopy.coordinator.spool import SpooledMeta, SpoolStore
from kumopy.dns_process import ResolverProcess
from kumopy.errors import PolicyError
from kumopy.ipc.jobs import DELIVERED, PERMANENT, Job, JobResult, SiteSpec
from kumopy.paths import EgressPath
from kumopy.policy_calls import Policy
from kumopy.smtp.wire import domain_of

__all__ = ["REBIND_KEY", "Core", "CoreSettings", "new_msg_id", "trim_heap"]

log = logging.getLogger(__name__)

_ids = itertools.count()
REBIND_KEY = "kumopy_pool"
"""Meta key an operator's rebind sets: the pool that replaces the policy's for the message."""
_TRIM_AFTER = 32 * 1024 * 1024

try:
    _malloc_trim: Callable[[int], int] | None = ctypes.CDLL(None).malloc_trim
except (OSError, AttributeError):  # not glibc
    _malloc_trim = None


def trim_heap() -> None:
    """Give freed heap memory back to the system (glibc's malloc_trim; a no-op elsewhere)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def new_msg_id() -> str:
    """Return a time-ordered, process-unique spool id."""
    return f"{time.time_ns():016x}{os.getpid() & 0xFFFF:04x}{next(_ids) & 0xFFFFFF:06x}"


@dataclass(frozen=True, slots=True)
class CoreSettings:
    """Tunables of the queueing core."""

    quantum: int = 32
    """Messages one queue may dispatch before the next queue gets a turn (fairness)."""
    dispatch_budget: int = 4096
    """Messages picked in one turn of the main loop, so that one turn stays short."""
    lease: float = 1800.0
    """Seconds a job may stay with a worker before it is handed to another attempt."""
    body_cache_bytes: int = 256 * 1024 * 1024
    """Bodies kept in memory up to this many bytes; beyond it they are read from the spool."""
    problem_retry: float | None = None
    """Retry delay for queue-level problems (tests); None: the queue's own schedule."""
    outcome_delay: float = 0.01
    """Outcomes are committed to the spool at most this long after they arrive (batching)."""
    max_pending_outcomes: int = 50_000
    """Outcomes waiting for the spool past which no new delivery starts (push-back)."""
    max_unwritten_log: int = 64 * 1024 * 1024
    """Bytes of log records kept in memory, while the log cannot be written, past which no
    new delivery starts."""
    suspend_unplumbed: float = 60.0
    """Seconds a source is suspended after its address could not be bound (0: never)."""
    max_ready: int = 1024
    """Messages picked for a source that may wait for its worker's credit (KumoMTA's
    max_ready); past it the source is not eligible and the pool's other sources take its
    share."""
    queue_idle: float = 600.0
    """Seconds an empty scheduled queue is kept before it is forgotten."""


class Core:
    """All queue bookkeeping of the coordinator; no sockets here, so it is testable alone."""

    def __init__(
        self,
        policy: Policy,
        spool: SpoolStore,
        logs: LogWriter,
        send_jobs: Callable[[int, list[Job]], None],
        settings: CoreSettings = CoreSettings(),
        *,
        send_site: Callable[[int, SiteSpec], None] | None = None,
        path_defaults: EgressPath | None = None,
        resolver: ResolverProcess | None = None,
        limiter: Limiter | None = None,
    ) -> None:
        self.policy = policy
        self.spool = spool
        self.logs = logs
        self.settings = settings
        self.sources = policy.config.used_sources()
        self.source_index = {s.name: i for i, s in enumerate(self.sources)}
        self.book = QueueBook(policy, self._on_ready)
        self.outcomes = Outcomes(
            self.book,
            spool,
            logs,
            outcome_delay=settings.outcome_delay,
            problem_retry=settings.problem_retry,
            max_pending=settings.max_pending_outcomes,
        )
        self.routes = Routes(policy, self.sources, path_defaults or EgressPath(), resolver)
        self.desk = Sources(
            self.sources,
            self.book,
            spool,
            send_jobs,
            send_site or (lambda src, spec: None),
            settings.max_ready,
        )
        self.limiter = limiter or Limiter()
        self.gates = Gates(self.limiter, self.sources)
        sharer = self.limiter if isinstance(self.limiter, Sharer) else None
        self.holds = Holds(spool, self._holds_changed, sharer)
        self.routes.holds = self.holds
        self.automation = Automation(self.holds, policy.automation_rules())
        self.dispatcher = Dispatcher(
            policy.config,
            self.book,
            self.desk,
            self.routes,
            self.outcomes.refuse_queue,
            self.gates,
            self.holds,
            self._on_hold,
            quantum=settings.quantum,
        )
        self.recovered = 0
        self.retired: set[int] = set()
        """Sources a reload took out of every pool (their index stays; their worker stops)."""
        self.holds.load(time.time())

    def _holds_changed(self) -> None:
        """Apply the holds in force: source suspensions, path configs, parked queues."""
        held = {h.target: h for h in self.holds.of_kind("source")}
        for src, source in enumerate(self.sources):
            hold = held.get(source.name)
            if hold is not None:
                self.desk.suspend(src, hold.until, f"suspended: {hold.describe()}", by_hold=True)
            else:
                self.desk.resume(src, by_hold=True)
        self.routes.refresh()
        self.gates.clear()
        if hasattr(self, "dispatcher"):  # a resumed queue or path goes at once
            self.dispatcher.wake_parked(0.0, everything=True)

    def _on_ready(self, q: SchedQueue) -> None:
        self.dispatcher.ready(q)

    def _on_hold(self, q: SchedQueue, msgs: list[Msg], reason: str, now: float) -> None:
        """Write one Delayed record per message that starts waiting for a limit or a hold."""
        for msg in msgs:
            self.outcomes.delayed(msg, reason, now)

    # -- spool to queue: the one entry point -------------------------------------------------
    def queue_name_for(self, domain: str, meta: dict[str, Any]) -> str:
        """Return the name of the queue a message goes to (creating the queue)."""
        return self._queue(domain, meta).name

    def _queue(self, domain: str, meta: dict[str, Any]) -> SchedQueue:
        routing = meta.get("routing_domain")
        pool = meta.get(REBIND_KEY)
        return self.book.queue_for(
            domain,
            meta.get("tenant"),
            meta.get("campaign"),
            routing.lower() if isinstance(routing, str) and routing else None,
            pool if isinstance(pool, str) and pool else None,
        )

    def requeue(self, msg: Msg, now: float) -> SchedQueue:
        """Track a message again under a new handle in the queue its meta names (rebind)."""
        q = self._queue(domain_of(msg.env.recipients[0]), msg.env.meta)
        msg.env.queue = q.name
        msg.handle = self.book.new_handle()
        self.book.track(msg, q, now)
        return q

    def enqueue(
        self,
        msg_id: str,
        env: SpooledMeta,
        size: int,
        now: float,
        *,
        attempts: int = 0,
        due: float | None = None,
        data: bytes | memoryview | None = None,
    ) -> Msg:
        """Put a spooled message in its scheduled queue (from ingress, or from the spool at start).

        A new message (data given) gets its Reception record and its body cached.
        """
        # All recipients of a spooled message share its domain (ingress splits by domain).
        q = self._queue(domain_of(env.recipients[0]), env.meta)
        env.queue = q.name
        msg = Msg(self.book.new_handle(), msg_id, env, size, attempts, now if due is None else due)
        if data is not None:
            self.book.cache_body(msg, data, self.settings.body_cache_bytes)
            self.outcomes.reception(msg, now)
        self.book.track(msg, q, now)
        return msg

    # -- the loop's work ---------------------------------------------------------------------
    def step(self, now: float) -> int:
        """Promote due messages, pick sources and feed the workers; return messages moved."""
        self.book.promote_due(now)
        self.dispatcher.offer_again(self.routes.collect())
        self.dispatcher.wake_parked(now, everything=self.limiter.collect())
        paused = self._pause_reason()
        self.dispatcher.paused = paused
        moved = self.dispatcher.dispatch(now, self.settings.dispatch_budget)
        if paused is None:  # push back on the workers too: no new delivery starts
            moved += self.desk.feed(now)
        return moved

    def _pause_reason(self) -> str | None:
        if self.outcomes.backlogged:
            return f"{self.outcomes.pending()} outcomes wait for the spool"
        if self.logs.failing is not None and self.logs.buffered >= self.settings.max_unwritten_log:
            # Deliveries go on while the records they make fit in memory; past that, wait.
            return f"{self.logs.buffered} bytes of log records wait: {self.logs.failing}"
        return None

    def tick(self, now: float) -> None:
        """Periodic work: leases, suspensions, the log, idle queues, the heap."""
        self.desk.expire_leases(now, self.settings.lease)
        self.desk.resume_suspended(now)
        self.holds.expire(now)
        self.holds.merge_shared(now)
        self.logs.check()
        self.book.drop_idle(now - self.settings.queue_idle)
        self.routes.forget_expired(time.monotonic())
        self.limiter.sweep(now)
        if self.book.released_bytes >= _TRIM_AFTER:
            # Cached bodies are small malloc blocks among long-lived metadata: freed, they
            # stay in the heap's holes unless handed back, and RSS would keep its peak.
            self.book.released_bytes = 0
            trim_heap()

    def handle_results(self, src: int, results: list[JobResult], now: float) -> None:
        """Apply a worker's results: log, then delete, reschedule or expire each message."""
        desk = self.desk
        for res in results:
            item = desk.answered(res.job_id)
            if item is None:
                log.warning(
                    "result for unknown job %d from %s ignored (lease passed?)",
                    res.job_id,
                    self.sources[src].name,
                )
                continue
            if res.extra.get("bind_failed") and self.settings.suspend_unplumbed > 0:
                reason = res.results[0].text if res.results else "cannot bind"
                desk.suspend(item.source, now + self.settings.suspend_unplumbed, reason)
            self._tally(item, res)
            desk.delivered[item.source] += self.outcomes.apply(
                item, self.sources[item.source], res, now, item.route.config.provider_name
            )
            if self.automation.rules_for is not None:
                self._observe(item, res, now)

    def _tally(self, item: Assignment, res: JobResult) -> None:
        """Count a result's recipients per scheduled queue and per source x site."""
        key = (item.source, item.route.site)
        per_path = self.desk.tally.get(key)
        if per_path is None:
            per_path = self.desk.tally[key] = [0, 0, 0]
            self.desk.providers[key] = item.route.config.provider_name
        per_queue = item.queue.tally
        for r in res.results:
            i = 0 if r.status == DELIVERED else 2 if r.status == PERMANENT else 1
            per_queue[i] += 1
            per_path[i] += 1

    def path_counts(self) -> list[dict[str, Any]]:
        """Return per source x site: provider, ready (picked, waiting for the worker) and the
        recipients delivered, deferred and bounced since start (for metrics)."""
        ready: dict[tuple[int, str], int] = {}
        for src, backlog in enumerate(self.desk.backlog):
            for item in backlog:
                key = (src, item.route.site)
                ready[key] = ready.get(key, 0) + 1
        rows = []
        for key in set(self.desk.tally) | set(ready):
            src, site = key
            delivered, deferred, bounced = self.desk.tally.get(key, (0, 0, 0))
            rows.append(
                {
                    "source": self.sources[src].name,
                    "site": site,
                    "provider": self.desk.providers.get(key),
                    "ready": ready.get(key, 0),
                    "delivered": delivered,
                    "deferred": deferred,
                    "bounced": bounced,
                }
            )
        return rows

    def _observe(self, item: Assignment, res: JobResult, now: float) -> None:
        """Show the automation every failure reply of a result."""
        route, q = item.route, item.queue
        source = self.sources[item.source].name
        for r in res.results:
            if r.status != DELIVERED:
                reply = f"{r.code} {r.enhanced_code or ''} {r.text}"
                self.automation.observe(
                    source,
                    route.site,
                    q.routing_domain,
                    route.config.provider_name,
                    q.key[1],
                    q.key[2],
                    reply,
                    now,
                    internal=r.command is None,
                )

    def reload(self, policy: Policy, path_defaults: EgressPath | None = None) -> SourceChanges:
        """Adopt a new policy: sources, pools, weights, queue and path configs.

        Return what changed in the sources; the caller starts and stops their workers.
        Nothing changes when this raises (PolicyError: more sources than this run can hold).
        """
        changes, after = diff_sources(self.sources, self.retired, policy.config.used_sources())
        if len(after) > self.desk.capacity:
            raise PolicyError(
                f"the reload would use {len(after)} sources; this run holds "
                f"{self.desk.capacity}: restart kumopy to go further"
            )
        # In place: routes, gates and the desk share this list.
        for i in changes.added:
            self.sources.append(after[i])
            self.source_index[after[i].name] = i
            self.desk.add_source()
        for i in (*changes.changed, *changes.revived):
            self.sources[i] = after[i]
        for i in changes.retired:
            self.retired.add(i)
            self.desk.drain(i)
        for i in changes.changed:
            self.desk.drain(i)  # its new worker starts once the old one has finished
        self.retired.difference_update(changes.revived)
        self.policy = policy
        self.routes.reload(policy, path_defaults or self.routes.defaults)
        self.gates.clear()
        self.book.reload(policy)
        self.dispatcher.build(policy.config)
        self.automation.reload(policy.automation_rules())
        return changes

    # -- status ------------------------------------------------------------------------------
    def status(
        self, queues_limit: int = 50, queues_offset: int = 0, now: float | None = None
    ) -> dict[str, Any]:
        """Return counters for the status command and the demo (the largest queues only)."""
        desk = self.desk
        book = self.book
        now = time.time() if now is None else now
        return {
            "messages": len(book.msgs),
            "dispatched": len(desk.dispatched),
            "backlog": desk.backlog_count(),
            "delayed": len(book.due),
            "requeued": desk.requeued,
            "feed": {"batches": desk.batches, "jobs": desk.jobs_sent},
            "recovered": self.recovered,
            "ready": self.dispatcher.ready_count(),
            "paused": self.dispatcher.paused,
            "records": dict(self.logs.counts),
            "log": self.logs.state(),
            "outcomes": {"pending": self.outcomes.pending(), "failing": self.outcomes.failing},
            "dns": {"lookups": self.routes.lookups, "destinations": len(self.routes.destinations)},
            "holds": self.holds.status(),
            "limits": {
                **self.limiter.status(),
                "held_queues": self.dispatcher.parked_count(),
                "refused_picks": dict(self.gates.refusals),
            },
            "sources": {
                s.name: {
                    "source_address": s.source_address,
                    "ehlo_domain": s.ehlo_domain,
                    "credit": desk.worker_credit(i),
                    "dispatched": len(desk.by_source[i]),
                    "backlog": len(desk.backlog[i]),
                    "suspended": desk.suspended[i][1] if i in desk.suspended else None,
                    "down": desk.down.get(i),
                    "delivered": desk.delivered[i],
                    "live": i not in desk.down,
                    "up": i not in desk.down and i not in desk.suspended and i not in self.retired,
                    "transient": sum(v[1] for k, v in desk.tally.items() if k[0] == i),
                    "bounced": sum(v[2] for k, v in desk.tally.items() if k[0] == i),
                    "retired": i in self.retired,
                    **self.gates.source_status(i, now),
                }
                for i, s in enumerate(self.sources)
            },
            "pools": {
                pool: {self.sources[i].name: n for i, n in enumerate(counts) if n}
                for pool, counts in self.dispatcher.picks.items()
            },
            "queue_count": len(book.queues),
            "queues": {
                q.name: {"ready": len(q.ready), "delayed": q.delayed, "error": q.error}
                for q in book.largest(queues_limit, queues_offset)
            },
        }
