"""The benchmark's arithmetic: log records to per-source rates and latencies, CPU, percentiles."""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from kumopy.benchsink import cpu_seconds

__all__ = [
    "Samples",
    "children_of",
    "cpu_per_message",
    "cpu_snapshot",
    "log_figures",
    "percentile",
    "record_time",
]


def percentile(values: Sequence[float], q: float) -> float | None:
    """Return the q-th percentile (0-100) of values, interpolated linearly; None when empty."""
    if not values:
        return None
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} is not within 0..100")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def record_time(record: Mapping[str, Any]) -> tuple[float, str]:
    """Return a log record's time and the field it came from.

    `event_time` (RFC 3339, microseconds) when present, else `timestamp` (whole seconds in
    the records of today's coordinator).
    """
    text = record.get("event_time")
    if isinstance(text, str):
        return datetime.fromisoformat(text).timestamp(), "event_time"
    return float(record["timestamp"]), "timestamp"


def log_figures(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Count deliveries per source, their time spans and latencies from the coordinator's log.

    A latency runs from a message's Reception record to its Delivery record.
    """
    received: dict[str, float] = {}
    times: dict[str, list[float]] = {}
    delivered: list[tuple[str, float]] = []
    other: dict[str, int] = {}
    clocks: set[str] = set()
    for rec in records:
        kind = rec.get("type")
        if kind not in ("Reception", "Delivery"):
            other[str(kind)] = other.get(str(kind), 0) + 1
            continue
        t, clock = record_time(rec)
        clocks.add(clock)
        if kind == "Reception":
            received[rec["id"]] = t
        else:
            times.setdefault(str(rec.get("egress_source")), []).append(t)
            delivered.append((rec["id"], t))
    latencies = [t - received[i] for i, t in delivered if i in received]
    per_source = {
        name: {"delivered": len(ts), "first": min(ts), "last": max(ts)}
        for name, ts in sorted(times.items())
    }
    all_times = [t for ts in times.values() for t in ts]
    return {
        "clock": "event_time" if clocks == {"event_time"} else "timestamp",
        "delivered": len(delivered),
        "per_source": per_source,
        "first_delivery": min(all_times, default=None),
        "last_delivery": max(all_times, default=None),
        "latency": {
            "messages": len(latencies),
            "p50": percentile(latencies, 50),
            "p99": percentile(latencies, 99),
            "max": max(latencies, default=None),
        },
        "other_records": other,
    }


class Samples:
    """Per-source delivered counters polled from `status`, for time spans without event_time.

    Their precision is the poll interval, finer than the log's whole-second `timestamp`.
    """

    def __init__(self) -> None:
        self.points: list[tuple[float, dict[str, int]]] = []

    def add(self, t: float, sources: Mapping[str, Mapping[str, Any]]) -> None:
        """Record one poll's delivered count per source."""
        self.points.append((t, {n: int(s.get("delivered") or 0) for n, s in sources.items()}))

    def span(self, name: str) -> float | None:
        """Return seconds from a source's first to its last delivery, or None if unknown.

        Each end is the midpoint of the two polls around it, so it is good to one interval.
        """
        counts = [(t, c.get(name, 0)) for t, c in self.points]
        if not counts or counts[-1][1] == 0:
            return None
        final = counts[-1][1]
        start = end = None
        for (t0, c0), (t1, c1) in itertools.pairwise(counts):
            if start is None and c0 == 0 < c1:
                start = (t0 + t1) / 2
            if c0 < final <= c1:
                end = (t0 + t1) / 2
        if start is None:
            start = counts[0][0]  # already delivering at the first poll
        if end is None:
            end = counts[-1][0]
        return end - start if end > start else None


def children_of(pid: int) -> list[int]:
    """Return the process ids whose parent is `pid` (from /proc)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_bytes()
        except OSError:
            continue
        if int(text[text.rindex(b")") + 2 :].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def cpu_snapshot(pids: Mapping[str, Sequence[int]]) -> dict[str, dict[int, float]]:
    """Read every process's CPU seconds, by kind (coordinator, workers, sink, resolver)."""
    out: dict[str, dict[int, float]] = {}
    for kind, ids in pids.items():
        out[kind] = {}
        for pid in ids:
            secs = cpu_seconds(pid)
            if secs is not None:
                out[kind][pid] = secs
    return out


def cpu_per_message(
    before: Mapping[str, Mapping[int, float]],
    after: Mapping[str, Mapping[int, float]],
    delivered: int,
    extra: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Return µs of CPU per delivered message for each kind of process, and their total.

    A process gone before the second reading (a restarted worker) is counted as missing.
    `extra` adds kinds measured elsewhere (the injectors report their own), in seconds.
    """
    per: dict[str, float | None] = {}
    missing: list[int] = []
    for kind, start in before.items():
        end = after.get(kind, {})
        missing += [pid for pid in start if pid not in end]
        secs = sum(end[pid] - start[pid] for pid in start if pid in end)
        per[kind] = 1e6 * secs / delivered if delivered and start else None
    for kind, secs in (extra or {}).items():
        per[kind] = 1e6 * secs / delivered if delivered else None
    total = sum(v for v in per.values() if v is not None)
    return {"us_per_msg": per, "total_us_per_msg": total, "processes_missing": missing}
