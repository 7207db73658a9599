"""Scheduled queues: the messages in memory, the queue each belongs to, and their due times."""

from __future__ import annotations

import heapq
import logging
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from kumopy._fast import DueQueue
from kumopy.config import MxHost, QueueConfig, queue_name
from kumopy.coordinator.spool import SpooledMeta
from kumopy.errors import PolicyError
from kumopy.policy import Policy

__all__ = ["Msg", "QueueBook", "SchedQueue", "next_retry_delay"]

log = logging.getLogger(__name__)

_DEFAULT_CONFIG = QueueConfig()


def next_retry_delay(config: QueueConfig, attempt: int, rng: random.Random | None = None) -> float:
    """Return the delay before retry `attempt` (from 0): interval x 2^n, capped, with jitter."""
    delay = config.retry_interval * (2 ** min(attempt, 32))
    if config.max_retry_interval is not None:
        delay = min(delay, config.max_retry_interval)
    # A little jitter keeps a burst of deferrals from coming back as one burst.
    jitter: float = (rng or random).uniform(0.0, 0.05)
    return float(delay * (1.0 + jitter))


@dataclass(slots=True, eq=False)
class Msg:
    """A spooled message as the coordinator tracks it in memory."""

    handle: int
    msg_id: str
    env: SpooledMeta
    size: int
    attempts: int = 0
    due: float = 0.0
    data: bytes | None = None
    """The body while cached in memory; None means read it from the spool when dispatched."""


@dataclass(slots=True, eq=False)
class SchedQueue:
    """One scheduled queue: its config from the policy and its messages that are due now."""

    name: str
    key: tuple[str, str | None, str | None, str | None]
    """(domain, tenant, campaign, routing_domain): what the policy is asked about this queue."""
    config: QueueConfig | None = None
    """The policy's answer; None when it gave none (it raised, or returned something else)."""
    error: str | None = None
    """Why the queue cannot send (a policy error); its messages retry on their schedule."""
    dest: Any = None
    """Where its mail goes now (a routes.Destination, set by dispatch)."""
    ready: deque[Msg] = field(default_factory=deque)
    delayed: int = 0
    """How many of this queue's messages wait in the due-time heap."""
    count: int = 0
    """Messages of this queue not finished yet: ready, delayed or with a source."""
    in_ring: bool = False
    """True while the queue waits for its turn in its pool's ring (dispatch)."""
    held: int = 0
    """Ready messages at the front already told they wait for a limit (one Delayed each)."""
    tally: list[int] = field(default_factory=lambda: [0, 0, 0])
    """Recipients delivered, deferred and bounced since start (kumopy queues)."""
    pool_override: str | None = None
    """The pool an operator's rebind moved this queue's messages to (instead of the policy's)."""

    @property
    def pool(self) -> str | None:
        """Return the egress pool this queue sends through, or None while it cannot send."""
        if self.config is None or self.error is not None:
            return None
        return self.config.egress_pool

    @property
    def routing_domain(self) -> str:
        """Return the domain whose MX records route this queue (KumoMTA's routing_domain)."""
        return self.key[3] or self.key[0]

    @property
    def schedule(self) -> QueueConfig:
        """Return the config whose retry schedule and max_age apply to this queue's messages."""
        return self.config if self.config is not None else _DEFAULT_CONFIG


class QueueBook:
    """Every scheduled queue and message in memory, and the heap of retry times."""

    def __init__(self, policy: Policy, on_ready: Callable[[SchedQueue], None]) -> None:
        self.policy = policy
        self.on_ready = on_ready
        """Called when a queue gets ready messages while it had none (dispatch takes it)."""
        self.queues: dict[str, SchedQueue] = {}
        self.msgs: dict[int, Msg] = {}
        self.due = DueQueue()
        self.cached_bytes = 0
        self.released_bytes = 0
        """Body bytes dropped from the cache since the heap was last trimmed."""
        self._handles = 0
        # Queues without messages, oldest first, so that idle ones are dropped in O(dropped).
        self._empty: OrderedDict[str, float] = OrderedDict()
        self.route_all_to: tuple[MxHost, ...] | None = None
        """`kumopy run --route-all-to` (kumopy bench): every queue's mx_list, whatever it says."""

    # -- queues ------------------------------------------------------------------------------
    def queue_for(
        self,
        domain: str,
        tenant: str | None,
        campaign: str | None,
        routing_domain: str | None = None,
        pool: str | None = None,
    ) -> SchedQueue:
        """Return (creating and configuring on first use) the scheduled queue for a message.

        `pool` (an operator's rebind) overrides the pool the policy names for it.
        """
        name = queue_name(domain, tenant, campaign, routing_domain)
        if pool:
            name = f"{name}#{pool}"
        q = self.queues.get(name)
        if q is None:
            q = self.queues[name] = SchedQueue(name, (domain, tenant, campaign, routing_domain))
            q.pool_override = pool
            self.configure(q)
            # Empty from birth: forgotten when idle even if no message ever joins (a refused
            # batch names queues before its commit fails).
            self._empty[name] = time.time()
        return q

    def configure(self, q: SchedQueue) -> None:
        """Ask the policy for a queue's config (on first use, on reload, when it failed)."""
        q.dest = None  # the config may name other smart hosts: route it again
        try:
            q.config, q.error = self.policy.queue_config(*q.key), None
            if self.route_all_to:
                q.config = replace(q.config, mx_list=self.route_all_to)
            if q.pool_override:
                if q.pool_override not in self.policy.config.pools:
                    raise PolicyError(
                        f"queue {q.name!r} was rebound to unknown pool {q.pool_override!r}",
                        q.config,
                    )
                q.config = replace(q.config, egress_pool=q.pool_override)
        except PolicyError as exc:
            if q.error != exc.message:
                log.error("queue %s: %s", q.name, exc.message)
            answer = exc.answer
            # A config naming an unknown pool still carries the queue's own retry schedule.
            q.config = answer if isinstance(answer, QueueConfig) else None
            q.error = exc.message
            return

    def reload(self, policy: Policy) -> None:
        """Adopt a new policy and configure every queue again."""
        self.policy = policy
        for q in self.queues.values():
            self.configure(q)
            if q.ready:
                self.on_ready(q)

    def drop_idle(self, older_than: float) -> int:
        """Forget queues that have had no message since `older_than`; return how many."""
        dropped = 0
        while self._empty:
            name, since = next(iter(self._empty.items()))
            if since > older_than:
                break
            del self._empty[name]
            q = self.queues.get(name)
            if q is not None and q.count == 0:
                del self.queues[name]
                dropped += 1
        return dropped

    # -- messages ----------------------------------------------------------------------------
    def new_handle(self) -> int:
        """Return a fresh in-memory handle."""
        self._handles += 1
        return self._handles

    def track(self, msg: Msg, q: SchedQueue, now: float) -> None:
        """Take a message into its queue: ready now if due, else in the due-time heap."""
        self.msgs[msg.handle] = msg
        if q.count == 0:
            self._empty.pop(q.name, None)
        q.count += 1
        if msg.due <= now:
            self.make_ready(q, msg)
        else:
            self.delay(q, msg)

    def finish(self, msg: Msg, now: float) -> None:
        """Forget a message whose every recipient has its final outcome."""
        self.drop_body(msg)
        if self.msgs.pop(msg.handle, None) is None:
            return
        q = self.queues.get(msg.env.queue)
        if q is not None:
            q.count -= 1
            if q.count == 0:
                self._empty[q.name] = now

    def delay(self, q: SchedQueue, msg: Msg) -> None:
        """Put a message in the heap until its due time."""
        q.delayed += 1
        self.due.push(msg.due, msg.handle)

    def make_ready(self, q: SchedQueue, msg: Msg, front: bool = False) -> None:
        """Put a message in its queue's ready list (at the front when it was already due)."""
        was_idle = not q.ready
        if front:
            q.ready.appendleft(msg)
        else:
            q.ready.append(msg)
        if was_idle:
            self.on_ready(q)

    def promote_due(self, now: float, limit: int = 10_000) -> int:
        """Move messages whose retry time has come into their queues' ready lists."""
        handles = self.due.pop_due(now, limit)
        for h in handles:
            msg = self.msgs.get(h)
            if msg is None:
                continue
            q = self.queues[msg.env.queue]
            q.delayed -= 1
            self.make_ready(q, msg)
        return len(handles)

    def queue_of(self, msg: Msg) -> SchedQueue:
        """Return the queue a tracked message belongs to."""
        return self.queues[msg.env.queue]

    # -- bodies ------------------------------------------------------------------------------
    def cache_body(self, msg: Msg, data: bytes | memoryview, budget: int) -> None:
        """Keep a body in memory while the cache budget allows."""
        if self.cached_bytes + len(data) <= budget:
            # A copy, never a view: a view would pin the whole ZeroMQ frame it came from.
            msg.data = bytes(data)
            self.cached_bytes += len(data)

    def drop_body(self, msg: Msg) -> None:
        """Forget a cached body (the spool keeps it)."""
        if msg.data is not None:
            self.cached_bytes -= len(msg.data)
            self.released_bytes += len(msg.data)
            msg.data = None

    def largest(self, limit: int, offset: int = 0) -> list[SchedQueue]:
        """Return queues by their number of messages, largest first (for status)."""
        if limit <= 0:
            return []
        ranked = heapq.nsmallest(
            offset + limit, self.queues.values(), key=lambda q: (-q.count, q.name)
        )
        return ranked[offset:]
