"""Keyed rate buckets and warm-up counts, checked at pick time; local to this coordinator."""

from __future__ import annotations

from typing import Any

from kumopy.rates import Rate, TokenBucket, Warmup, WindowCount

__all__ = ["Limiter"]

_IDLE_DROP = 3600.0
"""Seconds after which a full, unused bucket is forgotten (bounded memory with many sites)."""


class Limiter:
    """Rates and caps by key ("path:src>site", "queue:name", ...), kept in this process.

    rate() and cap() either admit one event (return 0.0) or return the seconds to wait; a
    refusal consumes nothing. A shared implementation (Redis) overrides both and may ask the
    loop to poll fileno() and call collect() for its answers.
    """

    mode = "local"

    def __init__(self) -> None:
        self._buckets: dict[str, TokenBucket] = {}
        self._counts: dict[str, WindowCount] = {}
        self._swept = 0.0

    def rate(self, key: str, rate: Rate, now: float) -> float:
        """Admit one event under `rate` for key, or return the seconds until one fits."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(rate, now)
        elif bucket.rate is not rate:
            bucket.adopt(rate, now)  # a reload or an automation override changed it
        return bucket.take(now)

    def cap(self, key: str, warmup: Warmup, now: float) -> float:
        """Admit one event under warmup's cap for key, or return the seconds until it resets."""
        count = self._counts.get(key)
        if count is None:
            count = self._counts[key] = WindowCount()
        return count.take(warmup, now)

    def give_back(self, key: str, limit: Rate | Warmup) -> None:
        """Return what rate() or cap() took for key: the event did not happen after all."""
        if isinstance(limit, Rate):
            bucket = self._buckets.get(key)
            if bucket is not None:
                bucket.give_back()
        else:
            count = self._counts.get(key)
            if count is not None:
                count.give_back()

    def used(self, key: str, warmup: Warmup, now: float) -> int:
        """Return the events counted for key in the current window of warmup."""
        count = self._counts.get(key)
        return count.used_now(warmup, now) if count is not None else 0

    def fileno(self) -> int | None:
        """Return a descriptor that becomes readable with answers to collect (None: never)."""
        return None

    def collect(self) -> bool:
        """Take answers that arrived; return True when some limit may admit again."""
        return False

    def sweep(self, now: float) -> None:
        """Forget buckets that are full and idle, so that memory follows the active keys."""
        if now - self._swept < 60.0:
            return
        self._swept = now
        stale = [
            key
            for key, bucket in self._buckets.items()
            if now - bucket.used_at > _IDLE_DROP and bucket.available(now) >= bucket.rate.burst
        ]
        for key in stale:
            del self._buckets[key]

    def status(self) -> dict[str, Any]:
        """Return what status shows about the limiter."""
        return {"mode": self.mode, "buckets": len(self._buckets), "caps": len(self._counts)}

    def close(self) -> None:
        """Release what the limiter holds (a shared one closes its connection)."""
