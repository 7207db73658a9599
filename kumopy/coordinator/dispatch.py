"""Dispatch: pick a source for each ready message by pool weights, among those that reach it."""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from kumopy._fast import SmoothSelector
from kumopy.config import Config
from kumopy.coordinator.gates import Gate, Gates, hold_reason
from kumopy.coordinator.holds import Holds
from kumopy.coordinator.queues import Msg, QueueBook, SchedQueue
from kumopy.coordinator.routes import Destination, PathRoute, Refusal, Routes
from kumopy.coordinator.sources import Assignment, Sources

__all__ = ["Dispatcher", "OnHold", "PoolRing", "Problem"]

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
OnHold = Callable[[SchedQueue, list[Msg], str, float], None]
"""Called when messages start waiting for a limit or a hold: (queue, messages, reason, now)."""


class Dispatcher:
    """Turn ready messages into assignments: one ring per (pool, eligible sources)."""

    def __init__(
        self,
        config: Config,
        book: QueueBook,
        sources: Sources,
        routes: Routes,
        on_problem: Problem,
        gates: Gates,
        holds: Holds,
        on_hold: OnHold,
        *,
        quantum: int,
    ) -> None:
        self.book = book
        self.sources = sources
        self.routes = routes
        self.on_problem = on_problem
        self.gates = gates
        self.holds = holds
        self.on_hold = on_hold
        self.quantum = quantum
        self._parked: list[tuple[float, int, SchedQueue]] = []
        """Queues held back by a limit, by the time it may admit again."""
        self._seq = 0
        self.index: dict[str, int] = {}
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
        self.index = {s.name: i for i, s in enumerate(self.sources.sources)}
        self.pools = {
            pool.name: {self.index[e.name]: e.weight for e in pool.entries}
            for pool in config.pools.values()
        }
        n = len(self.sources.sources)
        self.picks = {name: self.picks.get(name, []) for name in self.pools}
        for counts in self.picks.values():
            counts.extend([0] * (n - len(counts)))  # sources a reload added
        old, self.rings = self.rings, {}
        for ring in old.values():
            for q in ring.queues:
                q.in_ring = False
                q.dest = None
                if q.ready:
                    self.ready(q)
        self.wake_parked(0.0, everything=True)  # limits and holds may have changed too

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
            if self.holds.queue_kinds and (hold := self.holds.queue_hold(q, dest.site.name)):
                self._park(q, hold.until, f"kumopy: held: {hold.describe()}", now)
                continue
            qgate = self.gates.queue_gate(q.name, q.config)
            blocked: list[int] = []
            wait, why, queue_held = 0.0, "", False
            while q.ready and n < limit:
                if qgate is not None:
                    held = self.gates.limiter.rate(qgate[0], qgate[1], now)
                    if held > 0.0:
                        wait, why, queue_held = held, hold_reason(qgate[0]), True
                        break
                src = sel.pick()
                if src < 0:
                    if qgate is not None:
                        self.gates.limiter.give_back(*qgate)
                    break
                route = self.routes.path(src, dest, q.routing_domain)
                gates = self.gates.for_route(src, route)
                if gates or self.holds.paths:
                    held, key = self._admit(src, route, gates, now)
                    if held > 0.0:
                        # Throttled for this site: its share goes to the pool's other sources
                        # for the rest of this visit.
                        if qgate is not None:
                            self.gates.limiter.give_back(*qgate)
                        self.sources.mask.set(src, False)
                        blocked.append(src)
                        if not why or held < wait:
                            wait, why = held, key
                        continue
                msg = q.ready.popleft()
                if q.held:
                    q.held -= 1
                picks[src] += 1
                self.sources.assign(src, Assignment(msg, q, src, ring.pool, route))
                n += 1
            for b in blocked:
                self.sources.mask.set(b, True)  # picked a moment ago, so it was eligible
            moved += n
            if queue_held or (src < 0 and blocked and self._all_limited(ring, blocked)):
                # The queue's own rate, or every source that could take it, is held back:
                # it leaves the ring until the first limit admits again (no busy waiting).
                self._park(q, now + wait, why, now)
                continue
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

    # -- limits --------------------------------------------------------------------------------
    def _admit(
        self, src: int, route: PathRoute, gates: tuple[Gate, ...], now: float
    ) -> tuple[float, str]:
        """Pass a path hold (suspension) and the path's gates: (0, "") or (wait, reason)."""
        if self.holds.paths:
            name = self.sources.sources[src].name
            hold = self.holds.path_hold(name, route.site, route.config.provider_name)
            if hold is not None:
                return max(hold.until - now, 0.001), f"kumopy: held: {hold.describe()}"
        if not gates:
            return 0.0, ""
        wait, key = self.gates.admit(gates, now)
        return wait, hold_reason(key) if wait > 0.0 else ""

    def _all_limited(self, ring: PoolRing, blocked: list[int]) -> bool:
        """Return True when no source of the ring is merely busy: all are held by limits."""
        return all(s in blocked or not self.sources.can_send(s) for s in ring.eligible)

    def _park(self, q: SchedQueue, until: float, why: str, now: float) -> None:
        """Take a queue out of its ring until `until`; tell about newly held messages once."""
        q.in_ring = False
        self._seq += 1
        heapq.heappush(self._parked, (until, self._seq, q))
        if q.held < len(q.ready):
            fresh = list(itertools.islice(q.ready, q.held, None))
            q.held = len(q.ready)
            self.on_hold(q, fresh, why, now)

    def wake_parked(self, now: float, everything: bool = False) -> None:
        """Offer again the queues whose limits may admit now (all of them: `everything`)."""
        parked = self._parked
        while parked and (everything or parked[0][0] <= now):
            _, _, q = heapq.heappop(parked)
            if q.ready and not q.in_ring:
                self.ready(q)

    def parked_count(self) -> int:
        """Return how many queues wait for a limit."""
        return len({id(q) for _, _, q in self._parked if q.ready and not q.in_ring})

    def next_wake(self) -> float:
        """Return when the first parked queue may go again (inf when none is parked)."""
        return self._parked[0][0] if self._parked else float("inf")

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
        queues = {id(q): q for ring in self.rings.values() for q in ring.queues}
        queues.update((id(q), q) for q, _ in self._troubled.values())
        queues.update((id(q), q) for _, _, q in self._parked)
        return sum(len(q.ready) for q in queues.values())
