"""Dispatch: pick a source for each ready message by pool weights, among those that reach it."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from kumopy._fast import SmoothSelector
from kumopy.config import Config
from kumopy.coordinator.queues import QueueBook, SchedQueue
from kumopy.coordinator.routes import Destination, Refusal, Routes
from kumopy.coordinator.sources import Assignment, Sources

__all__ = ["Dispatcher", "PoolRing", "Problem"]

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class PoolRing:
    """The queues of one pool whose destination the same sources can reach, served in turn."""

    pool: str
    eligible: tuple[int, ...]
    """The pool's sources with a route to these queues' destinations."""
    selector: SmoothSelector
    queues: deque[SchedQueue] = field(default_factory=deque)


Problem = Callable[[SchedQueue, float, Refusal], None]
"""Called to defer (4xx) or bounce (5xx) a queue's ready messages: (queue, now, refusal)."""


class Dispatcher:
    """Turn ready messages into assignments: one ring per (pool, eligible sources)."""

    def __init__(
        self,
        config: Config,
        book: QueueBook,
        sources: Sources,
        routes: Routes,
        on_problem: Problem,
        *,
        quantum: int,
    ) -> None:
        self.book = book
        self.sources = sources
        self.routes = routes
        self.on_problem = on_problem
        self.quantum = quantum
        self.index = {s.name: i for i, s in enumerate(sources.sources)}
        self.rings: dict[tuple[str, tuple[int, ...]], PoolRing] = {}
        self.pools: dict[str, dict[int, int]] = {}
        """Pool name -> {source index: weight}, weight-0 entries left out."""
        self.picks: dict[str, list[int]] = {}
        """Picks per pool and source index since start (status and the demo's report)."""
        self._troubled: dict[str, tuple[SchedQueue, Refusal | None]] = {}
        self.paused: str | None = None
        """Why no new message is picked right now (outcomes or records cannot be written)."""
        self.build(config)

    # -- pools -------------------------------------------------------------------------------
    def build(self, config: Config) -> None:
        """(Re)build the pools, keeping pick counts and offering the waiting queues again."""
        self.pools = {
            pool.name: {self.index[e.name]: e.weight for e in pool.entries}
            for pool in config.pools.values()
        }
        n = len(self.sources.sources)
        self.picks = {name: self.picks.get(name, [0] * n) for name in self.pools}
        old, self.rings = self.rings, {}
        for ring in old.values():
            for q in ring.queues:
                q.in_ring = False
                q.dest = None
                if q.ready:
                    self.ready(q)

    def _ring(self, pool: str, eligible: tuple[int, ...]) -> PoolRing:
        ring = self.rings.get((pool, eligible))
        if ring is None:
            weights = self.pools[pool]
            selector = SmoothSelector(eligible, [weights[s] for s in eligible], self.sources.mask)
            ring = self.rings[(pool, eligible)] = PoolRing(pool, eligible, selector)
        return ring

    def ready(self, q: SchedQueue) -> None:
        """Offer a queue with ready messages to its ring (QueueBook's on_ready)."""
        if q.in_ring:
            return
        pool = q.pool
        if pool is None or pool not in self.pools:
            self._troubled[q.name] = (q, None)  # the next dispatch asks the policy again
            return
        dest = self.routes.destination(q, time.monotonic())
        if dest is None:
            return  # parked until its DNS answer comes back (routes.collect)
        q.dest = dest
        if dest.refusal is not None:
            self._troubled[q.name] = (q, dest.refusal)
            return
        eligible, refusal = self._eligible(pool, dest, q.routing_domain)
        if refusal is not None:
            self._troubled[q.name] = (q, refusal)
            return
        q.in_ring = True
        self._ring(pool, eligible).queues.append(q)

    def _eligible(
        self, pool: str, dest: Destination, routing: str
    ) -> tuple[tuple[int, ...], Refusal | None]:
        """Return the pool's sources with a route to dest, or why none has one."""
        eligible = []
        refusals = []
        for src in self.pools[pool]:
            route = self.routes.path(src, dest, routing)
            if route.refusal is None:
                eligible.append(src)
            else:
                refusals.append(route.refusal)
        if eligible:
            return tuple(eligible), None
        if not refusals:
            return (), Refusal(451, "4.4.5", f"kumopy: egress pool {pool} has no sources")
        # A bounce only when every source's path says so (prohibited hosts); else retry.
        if all(not r.transient for r in refusals):
            return (), refusals[0]
        texts = "; ".join(dict.fromkeys(r.text.removeprefix("kumopy: ") for r in refusals))
        return (), Refusal(451, "4.4.4", f"kumopy: no source of pool {pool} can reach it: {texts}")

    def offer_again(self, queues: list[SchedQueue]) -> None:
        """Offer queues whose destination lookup came back."""
        for q in queues:
            if q.ready:
                self.ready(q)

    def _settle_troubled(self, now: float) -> None:
        """Ask the policy again about queues it could not configure; defer what still fails."""
        troubled, self._troubled = self._troubled, {}
        for q, refusal in troubled.values():
            if not q.ready:
                continue
            if refusal is None:
                self.book.configure(q)
                if q.pool is not None and q.pool in self.pools:
                    self.ready(q)
                    continue
                refusal = Refusal(451, "4.3.0", q.error or "queue has no configuration")
            self.on_problem(q, now, refusal)

    # -- picking -----------------------------------------------------------------------------
    def dispatch(self, now: float, budget: int) -> int:
        """Pick sources for up to `budget` ready messages, ring by ring, queue by queue."""
        if self.paused is not None:
            return 0
        if self._troubled:
            self._settle_troubled(now)
        moved = 0
        for ring in list(self.rings.values()):
            if ring.queues and moved < budget:
                moved += self._serve(ring, now, budget - moved)
        return moved

    def _serve(self, ring: PoolRing, now: float, budget: int) -> int:
        """Serve a ring's queues in turn, each up to the quantum, until its sources are busy."""
        queues = ring.queues
        sel = ring.selector
        picks = self.picks[ring.pool]
        mono = time.monotonic()
        moved = 0
        # Round after round until the budget is spent, the sources are busy or the queues are
        # empty: every visit moves a message, leaves the ring or ends the turn, so this ends.
        while queues and moved < budget:
            q = queues.popleft()
            dest = q.dest
            if not q.ready or q.pool != ring.pool or dest is None or dest.expires <= mono:
                # Emptied, moved to another pool by a reload, or its DNS answer expired.
                q.in_ring = False
                if q.ready:
                    self.ready(q)
                continue
            n = 0
            limit = min(self.quantum, budget - moved)
            src = 0
            while q.ready and n < limit:
                src = sel.pick()
                if src < 0:
                    break
                msg = q.ready.popleft()
                picks[src] += 1
                route = self.routes.path(src, dest, q.routing_domain)
                self.sources.assign(src, Assignment(msg, q, src, ring.pool, route))
                n += 1
            moved += n
            if src < 0:
                queues.appendleft(q)  # first in line when a source has room again
                if not any(self.sources.can_send(s) for s in ring.eligible):
                    self._defer_ring(ring, now)
                break
            if q.ready:
                queues.append(q)
            else:
                q.in_ring = False
        return moved

    def _defer_ring(self, ring: PoolRing, now: float) -> None:
        """No source of the ring can send at all: defer every waiting message with the reason."""
        states = ", ".join(self.sources.state(s) for s in ring.eligible)
        refusal = Refusal(451, "4.4.5", f"no eligible source in egress pool {ring.pool}: {states}")
        while ring.queues:
            q = ring.queues.popleft()
            q.in_ring = False
            self.on_problem(q, now, refusal)

    def ready_count(self) -> int:
        """Return how many messages are due now and wait for a source."""
        queues = [q for ring in self.rings.values() for q in ring.queues]
        waiting = [q for q, _ in self._troubled.values()]
        return sum(len(q.ready) for q in (*queues, *waiting))
