"""Pick-time gates: the rates and warm-up caps a source must pass to take a message to a site."""

from __future__ import annotations

import time
from typing import Any

from kumopy.config import EgressSource, QueueConfig
from kumopy.coordinator.limits import Limiter
from kumopy.coordinator.routes import PathRoute
from kumopy.rates import Rate, Warmup

__all__ = ["Gate", "Gates", "hold_reason"]

Gate = tuple[str, Rate | Warmup]
"""A limiter key and the limit it is held to (a Rate for buckets, a Warmup for daily caps)."""


_KINDS = {
    "rate": "max_message_rate",
    "select": "source_selection_rate",
    "provider": "provider_max_message_rate",
    "warmup": "warm-up cap",
    "queue": "the queue's max_message_rate",
}


def hold_reason(key: str) -> str:
    """Say which limit holds messages back, for Delayed records: "max_message_rate of a>b"."""
    kind, _, what = key.partition(":")
    return f"kumopy: waiting for {_KINDS.get(kind, kind)} ({what.replace('>', ' -> ')})"


class Gates:
    """Build each path's gates once, and admit a pick through all of them or none."""

    def __init__(self, limiter: Limiter, sources: list[EgressSource]) -> None:
        self.limiter = limiter
        self.sources = sources
        self._cache: dict[int, tuple[PathRoute, tuple[Gate, ...]]] = {}
        self.refusals: dict[str, int] = {}
        """Picks refused per gate kind since start (status)."""

    def for_route(self, src: int, route: PathRoute) -> tuple[Gate, ...]:
        """Return the gates of (source, route): empty when nothing limits it (the fast path)."""
        cached = self._cache.get(id(route))
        if cached is not None and cached[0] is route:
            return cached[1]
        source = self.sources[src]
        name, config = source.name, route.config
        gates: list[Gate] = []
        if (rate := config.message_rate) is not None:
            gates.append((f"rate:{name}>{route.site}", rate))
        if (rate := config.source_selection_rate) is not None:
            gates.append((f"select:{name}>{route.site}", rate))
        if config.provider_name and (rate := config.provider_max_message_rate) is not None:
            gates.append((f"provider:{name}>{config.provider_name}", rate))
        if (rate := source.source_selection_rate) is not None:
            gates.append((f"select:{name}", rate))
        if source.warmup is not None:
            gates.append((f"warmup:{name}", source.warmup))
        found = tuple(gates)
        # Keyed by id() with the route kept alive beside it: a rebuilt route never hits a
        # stale entry, and routes are few (sources x sites).
        self._cache[id(route)] = (route, found)
        return found

    def admit(self, gates: tuple[Gate, ...], now: float) -> tuple[float, str]:
        """Pass every gate (taking one from each) and return (0.0, ""), or take nothing and
        return the seconds until the first refusing gate may admit, and its key."""
        limiter = self.limiter
        for i, (key, limit) in enumerate(gates):
            if isinstance(limit, Rate):
                wait = limiter.rate(key, limit, now)
            else:
                wait = limiter.cap(key, limit, now)
            if wait > 0.0:
                for done_key, done in gates[:i]:
                    limiter.give_back(done_key, done)
                kind = key.split(":", 1)[0]
                self.refusals[kind] = self.refusals.get(kind, 0) + 1
                return wait, key
        return 0.0, ""

    def queue_gate(self, name: str, config: QueueConfig | None) -> tuple[str, Rate] | None:
        """Return the scheduled queue's own max_message_rate gate, if it has one."""
        if config is None or config.max_message_rate is None:
            return None
        return (f"queue:{name}", config.max_message_rate)

    def clear(self) -> None:
        """Forget built gates (a reload or an override changed path configs)."""
        self._cache.clear()

    def source_status(self, src: int, now: float | None = None) -> dict[str, Any]:
        """Return a source's selection rate and warm-up cap, used and reset time for status."""
        source = self.sources[src]
        now = time.time() if now is None else now
        out: dict[str, Any] = {}
        if source.source_selection_rate is not None:
            out["selection_rate"] = str(source.source_selection_rate)
        warmup = source.warmup
        if warmup is not None:
            index, _, end = warmup.window(now)
            cap = warmup.cap(now)
            out["warmup"] = {
                "day": index,
                "cap": cap,
                "used": self.limiter.used(f"warmup:{source.name}", warmup, now),
                "resets_at": warmup.start if index < 0 else end,
                "resets_in": round((warmup.start if index < 0 else end) - now, 3),
                "schedule": warmup.describe(),
            }
        return out
