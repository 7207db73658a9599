"""A bounded cache of values that expire, with one shared fetch per missing key."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["TTLCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TTLCache(Generic[K, V]):
    """Values kept until their own expiry time; concurrent misses of a key share one fetch."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, max_entries: int = 100_000
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, not {max_entries}")
        self._clock = clock
        self._max = max_entries
        # Insertion order is the eviction order: put() re-inserts, so the first key is the
        # one stored longest ago (a FIFO costs O(1) per put, unlike a scan for the soonest expiry).
        self._entries: dict[K, tuple[V, float]] = {}
        self._fetching: dict[K, asyncio.Task[tuple[V, float]]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> V | None:
        """Return the value stored for key if it has not expired, else None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            del self._entries[key]
            return None
        return entry[0]

    def put(self, key: K, value: V, expires: float) -> None:
        """Store value until `expires` (on the cache's clock); evict the oldest when full."""
        self._entries.pop(key, None)
        if expires <= self._clock():
            return  # a zero TTL means "do not cache"
        self._entries[key] = (value, expires)
        while len(self._entries) > self._max:
            del self._entries[next(iter(self._entries))]

    def clear(self) -> None:
        """Forget every stored value (fetches under way still complete)."""
        self._entries.clear()

    def fetching(self, key: K) -> bool:
        """Return True while a fetch of key is under way."""
        return key in self._fetching

    async def get_or_fetch(self, key: K, fetch: Callable[[], Awaitable[tuple[V, float]]]) -> V:
        """Return the stored value, or await one fetch shared by every caller missing key.

        fetch returns (value, expires). The fetch runs as its own task, so a caller that is
        cancelled does not cancel it for the others waiting on the same key.
        """
        value = self.get(key)
        if value is not None:
            return value
        task = self._fetching.get(key)
        if task is None:
            task = asyncio.ensure_future(self._fetch(key, fetch))
            self._fetching[key] = task
        result, _ = await asyncio.shield(task)
        return result

    async def _fetch(
        self, key: K, fetch: Callable[[], Awaitable[tuple[V, float]]]
    ) -> tuple[V, float]:
        try:
            value, expires = await fetch()
            self.put(key, value, expires)
            return value, expires
        finally:
            self._fetching.pop(key, None)
