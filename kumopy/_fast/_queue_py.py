"""Due-time ordering and per-source credit accounting: the specification twin of _queue_c."""

from __future__ import annotations

import heapq
import math
import operator

from kumopy._fast._select_py import SourceMask

__all__ = ["DueQueue", "Ledger"]

# Handles are stored as C long long by the compiled twin; both twins refuse anything wider.
_HANDLE_MIN = -(2**63)
_HANDLE_MAX = 2**63 - 1


class DueQueue:
    """Handles ordered by due time (min-heap), FIFO among equal due times."""

    __slots__ = ("_heap", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int]] = []
        # The sequence number breaks ties between equal due times in push order.
        self._seq = 0

    def push(self, due: float, handle: int) -> None:
        """Queue `handle` to become due at `due`."""
        if math.isnan(due):
            raise ValueError("due time must not be NaN")
        due = float(due)
        handle = operator.index(handle)
        if handle < _HANDLE_MIN or handle > _HANDLE_MAX:
            raise OverflowError(f"handle {handle} does not fit a signed 64-bit integer")
        heapq.heappush(self._heap, (due, self._seq, handle))
        self._seq += 1

    def pop_due(self, now: float, limit: int) -> list[int]:
        """Remove and return at most `limit` handles with due <= `now`, earliest first."""
        limit = operator.index(limit)
        if limit < 0:
            raise ValueError(f"limit must be >= 0, not {limit}")
        heap = self._heap
        out: list[int] = []
        while heap and len(out) < limit and heap[0][0] <= now:
            out.append(heapq.heappop(heap)[2])
        return out

    def next_due(self) -> float:
        """Return the earliest due time, or math.inf when the queue is empty."""
        return self._heap[0][0] if self._heap else math.inf

    def __len__(self) -> int:
        """Return the number of queued handles."""
        return len(self._heap)

    def __repr__(self) -> str:
        return f"<DueQueue size={len(self._heap)} next_due={self.next_due()}>"


class Ledger:
    """Per-source credit and assigned-job accounting that keeps a SourceMask in step."""

    __slots__ = ("_assigned", "_credit", "_mask", "_suspended", "_total")

    def __init__(self, mask: SourceMask) -> None:
        size = len(mask)
        self._mask = mask
        self._credit = [0] * size
        self._assigned = [0] * size
        self._suspended = [False] * size
        self._total = 0
        for source in range(size):
            mask.set(source, False)

    def _check(self, source: int) -> None:
        size = len(self._credit)
        if source < 0 or source >= size:
            raise IndexError(f"source index {source} out of range 0..{size - 1}")

    def _update(self, source: int) -> None:
        self._mask.set(
            source,
            not self._suspended[source] and self._assigned[source] < self._credit[source],
        )

    def set_credit(self, source: int, credit: int) -> None:
        """Record the credit the worker of `source` announced (0 when the worker is gone)."""
        self._check(source)
        credit = operator.index(credit)
        if credit < 0:
            raise ValueError(f"credit must be >= 0, not {credit}")
        self._credit[source] = credit
        self._update(source)

    def set_suspended(self, source: int, suspended: bool) -> None:
        """Suspend `source` or resume it."""
        self._check(source)
        self._suspended[source] = bool(suspended)
        self._update(source)

    def take(self, source: int) -> None:
        """Count one job dispatched to `source`."""
        self._check(source)
        count = self._assigned[source]
        if count >= self._credit[source]:
            raise RuntimeError(
                f"source {source} has no credit left "
                f"({count} assigned, credit {self._credit[source]})"
            )
        self._assigned[source] = count + 1
        self._total += 1
        self._update(source)

    def release(self, source: int, n: int = 1) -> None:
        """Count `n` jobs of `source` as finished."""
        self._check(source)
        n = operator.index(n)
        count = self._assigned[source]
        if n < 0 or n > count:
            raise ValueError(f"cannot release {n} jobs of source {source}: {count} assigned")
        self._assigned[source] = count - n
        self._total -= n
        self._update(source)

    def reset_assigned(self, source: int) -> int:
        """Forget the jobs assigned to `source` (its worker died); return how many there were."""
        self._check(source)
        count = self._assigned[source]
        self._assigned[source] = 0
        self._total -= count
        self._update(source)
        return count

    def assigned(self, source: int) -> int:
        """Return the number of jobs of `source` assigned."""
        self._check(source)
        return self._assigned[source]

    def credit(self, source: int) -> int:
        """Return the credit last announced for `source`."""
        self._check(source)
        return self._credit[source]

    def available(self, source: int) -> int:
        """Return how many more jobs `source` may take now (0 when suspended)."""
        self._check(source)
        if self._suspended[source]:
            return 0
        return max(0, self._credit[source] - self._assigned[source])

    def total_assigned(self) -> int:
        """Return the number of jobs assigned over all sources."""
        return self._total

    def __repr__(self) -> str:
        return f"<Ledger sources={len(self._credit)} assigned={self._total}>"
