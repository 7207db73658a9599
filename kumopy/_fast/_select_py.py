"""Smooth weighted round robin over egress sources: the specification twin of _select_c."""

from __future__ import annotations

import operator
from collections.abc import Sequence

__all__ = ["SmoothSelector", "SourceMask"]

# Weights are unsigned 32-bit in the reference; the cap also keeps every score inside int64.
_MAX_WEIGHT = 0xFFFFFFFF


def _check_index(index: int, size: int) -> None:
    if index < 0 or index >= size:
        raise IndexError(f"source index {index} out of range 0..{size - 1}")


class SourceMask:
    """Eligibility of every source by global index, shared by all selectors."""

    __slots__ = ("_flags",)

    def __init__(self, size: int) -> None:
        size = operator.index(size)
        if size < 0:
            raise ValueError(f"mask size must be >= 0, not {size}")
        self._flags = bytearray(b"\x01" * size)

    def set(self, index: int, eligible: bool) -> None:
        """Mark source `index` eligible or not."""
        _check_index(index, len(self._flags))
        self._flags[index] = 1 if eligible else 0

    def get(self, index: int) -> bool:
        """Return whether source `index` is eligible."""
        _check_index(index, len(self._flags))
        return self._flags[index] != 0

    def __len__(self) -> int:
        """Return the number of sources the mask covers."""
        return len(self._flags)

    def __repr__(self) -> str:
        on = sum(1 for f in self._flags if f)
        return f"<SourceMask size={len(self._flags)} eligible={on}>"


class SmoothSelector:
    """Smooth weighted round robin over some sources of a SourceMask (one per pool)."""

    __slots__ = ("_live", "_mask", "_scores", "_sources", "_weights")

    def __init__(self, sources: Sequence[int], weights: Sequence[int], mask: SourceMask) -> None:
        if not isinstance(mask, SourceMask):
            raise TypeError(f"mask must be a SourceMask, not {type(mask).__name__}")
        srcs = tuple(operator.index(s) for s in sources)
        wts = tuple(operator.index(w) for w in weights)
        if len(srcs) != len(wts):
            raise ValueError(f"{len(srcs)} sources but {len(wts)} weights")
        size = len(mask)
        seen: set[int] = set()
        for s in srcs:
            _check_index(s, size)
            if s in seen:
                raise ValueError(f"source index {s} appears twice")
            seen.add(s)
        for w in wts:
            if w < 0 or w > _MAX_WEIGHT:
                raise ValueError(f"weight must be in 0..{_MAX_WEIGHT}, not {w}")
        self._sources = srcs
        self._weights = wts
        self._mask = mask
        self._scores = [0] * len(srcs)
        # Weight-0 entries can never win, so the pick loop skips them up front.
        pairs = enumerate(zip(srcs, wts, strict=True))
        self._live = tuple((i, s, w) for i, (s, w) in pairs if w > 0)

    def pick(self) -> int:
        """Return the next source index, or -1 (state unchanged) when none is eligible."""
        flags = self._mask._flags
        scores = self._scores
        best = -1
        best_score = 0
        total = 0
        for i, src, w in self._live:
            if flags[src]:
                score = scores[i] + w
                scores[i] = score
                total += w
                # Strictly greater: on a tie the earliest entry keeps the win.
                if best < 0 or score > best_score:
                    best = i
                    best_score = score
        if best < 0:
            return -1
        scores[best] -= total
        return self._sources[best]

    @property
    def sources(self) -> tuple[int, ...]:
        """Return the global source indices, in entry order."""
        return self._sources

    @property
    def weights(self) -> tuple[int, ...]:
        """Return the weights, in entry order."""
        return self._weights

    def __repr__(self) -> str:
        return f"<SmoothSelector sources={self._sources} weights={self._weights}>"
