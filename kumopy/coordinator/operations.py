"""Operator actions on the coordinator's state: suspend, resume, bounce, rebind, queue summary."""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from kumopy.coordinator.core import REBIND_KEY, Core
from kumopy.coordinator.holds import Hold
from kumopy.coordinator.queues import Msg, SchedQueue
from kumopy.errors import ProtocolError
from kumopy.ipc.control import Selection

__all__ = ["Operations"]

log = logging.getLogger(__name__)


class Operations:
    """What the control channel's verbs do to a Core (no sockets here)."""

    def __init__(self, core: Core) -> None:
        self.core = core

    # -- selections ----------------------------------------------------------------------------
    def _check(self, sel: Selection) -> None:
        """Refuse a source or pool that does not exist (a typo must not hold nothing)."""
        if sel.selector == "source" and sel.value not in self.core.source_index:
            known = ", ".join(self.core.source_index)
            raise ProtocolError(f"unknown source {sel.value!r}; sources: {known}")
        pools = self.core.policy.config.pools
        if sel.selector == "pool" and sel.value not in pools:
            raise ProtocolError(f"unknown pool {sel.value!r}; pools: {', '.join(pools)}")

    def _queue_matches(self, sel: Selection) -> Callable[[SchedQueue], bool]:
        value = sel.value
        if sel.selector == "queue":
            return lambda q: q.name == value
        if sel.selector == "pool":
            return lambda q: q.pool == value
        if sel.selector == "tenant":
            return lambda q: q.key[1] == value
        if sel.selector == "campaign":
            return lambda q: q.key[2] == value
        if sel.selector == "domain":
            return lambda q: value in (q.key[0], q.key[3])
        return lambda q: False

    # -- suspend / resume ----------------------------------------------------------------------
    def suspend(self, sel: Selection, now: float) -> dict[str, Any]:
        """Hold a selection for a while (or until resumed); return the hold."""
        self._check(sel)
        until = now + sel.until_seconds if not math.isinf(sel.until_seconds) else math.inf
        hold = self.core.holds.add(Hold(sel.selector, sel.value, until, sel.reason, since=now))
        return {"hold": hold.to_dict(), "text": hold.describe()}

    def resume(self, sel: Selection) -> dict[str, Any]:
        """End every hold on the selection (a source's path holds too); return them."""
        kind, value = sel.selector, sel.value

        def match(h: Hold) -> bool:
            if h.kind == kind and h.target == value:
                return True
            return (
                kind == "source"
                and h.kind in ("path", "config")
                and (h.target.split(">", 1)[0] == value)
            )

        ended = self.core.holds.remove(match, "resumed by an operator")
        return {"resumed": [h.describe() for h in ended], "count": len(ended)}

    # -- bounce --------------------------------------------------------------------------------
    def _selected(self, sel: Selection) -> tuple[list[Msg], set[int]]:
        """Return the selected messages and the handles of those with a worker right now."""
        core = self.core
        desk = core.desk
        flying = {item.msg.handle for item in desk.dispatched.values()}
        if sel.selector == "source":
            src = core.source_index[sel.value]
            picked = [item.msg for item in desk.backlog[src]]
            picked += [desk.dispatched[j].msg for j in desk.by_source[src] if j in desk.dispatched]
            return picked, flying
        match = self._queue_matches(sel)
        queues = {q.name for q in core.book.queues.values() if match(q)}
        return [m for m in core.book.msgs.values() if m.env.queue in queues], flying

    def bounce(self, sel: Selection, now: float, dry_run: bool = False) -> dict[str, Any]:
        """Remove the selected messages with an AdminBounce record each; return counts."""
        self._check(sel)
        msgs, flying = self._selected(sel)
        if dry_run:
            return {"messages": len(msgs), "in_flight": sum(m.handle in flying for m in msgs)}
        core = self.core
        now_here = [m for m in msgs if m.handle not in flying]
        later = [m for m in msgs if m.handle in flying]
        self._take_out(now_here)
        outcomes = core.outcomes
        for msg in now_here:
            outcomes.admin_bounce(msg, sel.reason, now)
            outcomes.finish(msg, now)
        for msg in later:
            # Its attempt is under way: bounced when its result comes back, unless delivered.
            outcomes.doomed[msg.msg_id] = sel.reason
        outcomes.commit(force=True)
        log.warning(
            "bounced %d messages (%d more when their attempt ends) selected by %s %s: %s",
            len(now_here),
            len(later),
            sel.selector,
            sel.value,
            sel.reason,
        )
        return {"bounced": len(now_here), "after_attempt": len(later)}

    def _take_out(self, msgs: list[Msg]) -> None:
        """Take messages (none with a worker) out of ready lists, backlogs and retry counts."""
        core, desk = self.core, self.core.desk
        gone = {m.handle for m in msgs}
        if not gone:
            return
        found: set[int] = set()
        for q in core.book.queues.values():
            if q.ready and any(m.handle in gone for m in q.ready):
                kept = [m for m in q.ready if m.handle not in gone]
                found.update(m.handle for m in q.ready if m.handle in gone)
                q.held = min(q.held, len(kept))
                q.ready.clear()
                q.ready.extend(kept)
        for src, backlog in enumerate(desk.backlog):
            kept_items = [item for item in backlog if item.msg.handle not in gone]
            removed = len(backlog) - len(kept_items)
            if removed:
                found.update(i.msg.handle for i in backlog if i.msg.handle in gone)
                backlog.clear()
                backlog.extend(kept_items)
                desk.ledger.release(src, removed)
        for msg in msgs:
            if msg.handle not in found:
                # Waiting for its retry: the heap entry stays and is skipped once the message
                # is forgotten (or has a new handle).
                waiting = core.book.queues.get(msg.env.queue)
                if waiting is not None and waiting.delayed > 0:
                    waiting.delayed -= 1

    # -- rebind --------------------------------------------------------------------------------
    def rebind(self, sel: Selection, pool: str, now: float) -> dict[str, Any]:
        """Move the selected queued messages (not those with a worker) to another pool."""
        if sel.selector == "source":
            raise ProtocolError("rebind takes --queue, --tenant, --campaign, --domain or --pool")
        self._check(sel)
        core = self.core
        if pool not in core.policy.config.pools:
            known = ", ".join(core.policy.config.pools)
            raise ProtocolError(f"unknown pool {pool!r}; pools: {known}")
        msgs, flying = self._selected(sel)
        moving = [m for m in msgs if m.handle not in flying]
        self._take_out(moving)
        moved: dict[str, int] = defaultdict(int)
        for msg in moving:
            old = msg.env.queue
            msg.env.meta = {**msg.env.meta, REBIND_KEY: pool}
            core.book.finish(msg, now)
            q = core.requeue(msg, now)
            core.outcomes.admin_rebind(msg, old, q.name, sel.reason, now)
            core.outcomes.rewrite(msg)
            moved[q.name] += 1
        core.outcomes.commit(force=True)
        log.warning(
            "rebound %d messages selected by %s %s to pool %s: %s",
            len(moving),
            sel.selector,
            sel.value,
            pool,
            sel.reason,
        )
        return {"rebound": len(moving), "in_flight": len(msgs) - len(moving), "queues": moved}

    # -- queues summary ------------------------------------------------------------------------
    def queues(self, now: float, limit: int = 200) -> dict[str, Any]:
        """Summarise each scheduled queue and each source x site, like kcli queue-summary."""
        core, desk = self.core, self.core.desk
        flying: dict[str, int] = defaultdict(int)
        path_flying: dict[tuple[int, str], int] = defaultdict(int)
        path_ready: dict[tuple[int, str], int] = defaultdict(int)
        for item in desk.dispatched.values():
            flying[item.queue.name] += 1
            path_flying[(item.source, item.route.site)] += 1
        for src, backlog in enumerate(desk.backlog):
            for item in backlog:
                flying[item.queue.name] += 1
                path_ready[(src, item.route.site)] += 1
        # One pass over the messages for the next retry time of each queue (an operator's
        # command: O(messages), never on the delivery path).
        ready_handles = {m.handle for q in core.book.queues.values() for m in q.ready}
        next_due: dict[str, float] = {}
        for msg in core.book.msgs.values():
            if msg.due > now and msg.handle not in ready_handles:
                name = msg.env.queue
                if msg.due < next_due.get(name, math.inf):
                    next_due[name] = msg.due
        queues = []
        for q in core.book.largest(limit):
            delivered, deferred, bounced = q.tally
            queues.append(
                {
                    "queue": q.name,
                    "pool": q.pool,
                    "ready": len(q.ready),
                    "delayed": q.delayed,
                    "in_flight": flying.get(q.name, 0),
                    "delivered": delivered,
                    "deferred": deferred,
                    "bounced": bounced,
                    "next_due": next_due.get(q.name),
                    "error": q.error,
                }
            )
        connections: dict[tuple[int, str], int] = {}
        for src, stats in desk.worker_stats.items():
            for site, counts in (stats.get("sites") or {}).items():
                if isinstance(counts, dict):
                    site_name = str(site).split("|mta-sts", 1)[0]
                    key = (src, site_name)
                    connections[key] = connections.get(key, 0) + int(counts.get("connections", 0))
        keys = set(desk.tally) | set(path_flying) | set(path_ready) | set(connections)
        paths = []
        for src, site in sorted(keys, key=lambda k: (core.sources[k[0]].name, k[1])):
            delivered, deferred, bounced = desk.tally.get((src, site), (0, 0, 0))
            paths.append(
                {
                    "source": core.sources[src].name,
                    "site": site,
                    "ready": path_ready.get((src, site), 0),
                    "in_flight": path_flying.get((src, site), 0),
                    "connections": connections.get((src, site), 0),
                    "delivered": delivered,
                    "deferred": deferred,
                    "bounced": bounced,
                    "held": self._path_held(src, site),
                }
            )
        return {"queues": queues, "queue_count": len(core.book.queues), "paths": paths}

    def _path_held(self, src: int, site: str) -> str | None:
        """Say why a source does not send to a site now (suspended, path hold), or None."""
        desk = self.core.desk
        if src in desk.suspended:
            return desk.suspended[src][1]
        hold = self.core.holds.path_hold(self.core.sources[src].name, site, None)
        return hold.describe() if hold is not None else None
