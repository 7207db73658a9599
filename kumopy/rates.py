"""Rates ("100/s", "5000/h", "20000/day,max_burst=10"), token buckets and warm-up schedules."""

from __future__ import annotations

import datetime as dt
import math
import re
from dataclasses import dataclass

from kumopy.errors import kind_of
from kumopy.units import duration_seconds

__all__ = [
    "RATE_HELP",
    "Rate",
    "TokenBucket",
    "Warmup",
    "WindowCount",
    "parse_rate",
    "parse_warmup",
]

RATE_HELP = 'a rate such as "100/s", "5000/h", "20000/day" or "50/10min,max_burst=5"'
_RATE = re.compile(r"^\s*(local:)?\s*([\d,_]+)\s*/\s*([^,]+?)\s*(?:,\s*max_burst\s*=\s*(\d+))?\s*$")


@dataclass(frozen=True, slots=True)
class Rate:
    """At most `limit` events per `period` seconds, with bursts of up to `burst` at once."""

    limit: int
    period: float
    burst: int
    """Tokens a full bucket holds (KumoMTA's max_burst; the limit when not given)."""
    local: bool = False
    """Written "local:...": never shared through Redis, even when Redis throttles are on."""
    text: str = ""
    """As the operator wrote it, for status and reasons."""

    @property
    def per_second(self) -> float:
        """Return the sustained rate in events per second."""
        return self.limit / self.period

    def __str__(self) -> str:
        return self.text or f"{self.limit}/{self.period:g}s"


def parse_rate(value: object) -> Rate:
    """Parse a rate; raise ValueError saying what is wrong."""
    if not isinstance(value, str):
        raise ValueError(f"must be {RATE_HELP}, not {kind_of(value)}")
    match = _RATE.match(value)
    if match is None:
        raise ValueError(f"{value!r} is not {RATE_HELP}")
    local, count, per, burst = match.groups()
    limit = int(count.replace(",", "").replace("_", ""))
    if limit < 1:
        raise ValueError(f"{value!r}: the count must be at least 1")
    unit = per.strip()
    try:
        # "/s" and "/day" name one unit; "/10min" a duration of its own.
        period = duration_seconds(unit if unit[:1].isdigit() else "1" + unit)
    except ValueError as exc:
        raise ValueError(f"{value!r}: the period {unit!r}: {exc}") from None
    if period <= 0:
        raise ValueError(f"{value!r}: the period must be longer than zero")
    size = int(burst) if burst is not None else limit
    if size < 1:
        raise ValueError(f"{value!r}: max_burst must be at least 1")
    return Rate(limit, period, size, bool(local), value.strip())


class TokenBucket:
    """A token bucket for one Rate: take() admits an event or says how long to wait."""

    __slots__ = ("_last", "_tokens", "rate", "used_at")

    def __init__(self, rate: Rate, now: float) -> None:
        self.rate = rate
        self._tokens = float(rate.burst)
        self._last = now
        self.used_at = now
        """When take() was last called (idle buckets can be forgotten)."""

    def _refill(self, now: float) -> float:
        rate = self.rate
        if now > self._last:
            self._tokens = min(
                float(rate.burst), self._tokens + (now - self._last) * rate.limit / rate.period
            )
            self._last = now
        return self._tokens

    def take(self, now: float, n: int = 1) -> float:
        """Take n tokens and return 0.0, or take none and return the seconds until there are."""
        self.used_at = now
        tokens = self._refill(now)
        if tokens >= n - 1e-9:  # float sums of refills land a hair below whole tokens
            self._tokens = tokens - n
            return 0.0
        return (n - tokens) * self.rate.period / self.rate.limit

    def give_back(self, n: int = 1) -> None:
        """Return n tokens taken for an event that did not happen after all."""
        self._tokens = min(float(self.rate.burst), self._tokens + n)

    def available(self, now: float) -> float:
        """Return the tokens the bucket holds now."""
        return self._refill(now)

    def adopt(self, rate: Rate, now: float) -> None:
        """Switch to a new rate (a reload or an override), keeping the tokens left."""
        self._refill(now)
        self.rate = rate
        self._tokens = min(self._tokens, float(rate.burst))


@dataclass(frozen=True, slots=True)
class Warmup:
    """Daily caps by day since `start` (one "day" is `period` seconds), then no cap."""

    start: float
    """Unix time the schedule starts (UTC midnight for a date)."""
    daily: tuple[int, ...]
    period: float = 86400.0

    def window(self, now: float) -> tuple[int, float, float]:
        """Return (day index, window start, window end) for time now (index < 0: not begun)."""
        index = math.floor((now - self.start) / self.period)
        begin = self.start + index * self.period
        return index, begin, begin + self.period

    def cap(self, now: float) -> int | None:
        """Return the cap of the day now falls in: 0 before the start, None past the schedule."""
        index = self.window(now)[0]
        if index < 0:
            return 0
        return self.daily[index] if index < len(self.daily) else None

    def describe(self) -> str:
        """Return a one-line summary for status and check-config."""
        start = dt.datetime.fromtimestamp(self.start, dt.UTC).isoformat().replace("+00:00", "Z")
        return f"warm-up from {start}: {', '.join(map(str, self.daily))} per {self.period:g}s"


class WindowCount:
    """Events counted in the current window of a Warmup; take() admits up to the cap."""

    __slots__ = ("index", "used")

    def __init__(self) -> None:
        self.index = -(2**62)
        self.used = 0

    def take(self, warmup: Warmup, now: float) -> float:
        """Count one event and return 0.0, or return the seconds until the cap resets."""
        index, _, end = warmup.window(now)
        if index != self.index:
            self.index, self.used = index, 0
        cap = warmup.cap(now)
        if cap is None or self.used < cap:
            self.used += 1
            return 0.0
        if index < 0:
            return max(warmup.start - now, 0.001)
        return max(end - now, 0.001)

    def give_back(self) -> None:
        """Uncount one event that did not happen after all."""
        self.used = max(0, self.used - 1)

    def used_now(self, warmup: Warmup, now: float) -> int:
        """Return the events counted in the window now falls in."""
        return self.used if warmup.window(now)[0] == self.index else 0


def _start(value: object) -> float:
    if isinstance(value, dt.datetime):
        stamp = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
        return stamp.timestamp()
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC).timestamp()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return _start(dt.datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            pass
    raise ValueError(
        f'start must be a date like "2026-12-01", a time like "2026-12-01T09:00:00Z" '
        f"or unix seconds, not {value!r}"
    )


def parse_warmup(value: object) -> Warmup:
    """Parse {start, daily, period?}; raise ValueError saying what is wrong."""
    if isinstance(value, Warmup):
        return value
    if not isinstance(value, dict):
        raise ValueError(
            f'must be a table like {{ start = "2026-12-01", daily = [50, 100] }}, '
            f"not {kind_of(value)}"
        )
    unknown = sorted(set(value) - {"start", "daily", "period"})
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r}; use start, daily and period")
    if "start" not in value or "daily" not in value:
        raise ValueError("needs both start and daily")
    start = _start(value["start"])
    daily = value["daily"]
    if isinstance(daily, str) or not isinstance(daily, list | tuple) or not daily:
        raise ValueError(f"daily must be a non-empty list of whole numbers, not {daily!r}")
    for i, cap in enumerate(daily):
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
            raise ValueError(f"daily item {i} must be a whole number >= 0, not {cap!r}")
    period = duration_seconds(value.get("period", 86400))
    if period <= 0:
        raise ValueError("period must be longer than zero")
    return Warmup(start, tuple(daily), period)
