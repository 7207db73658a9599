"""Units an operator writes: durations ("90s", "1h30m") and sizes ("2k", "50MB")."""

from __future__ import annotations

import math
import re

from kumopy.errors import ConfigError, ConfigIssue, kind_of

__all__ = ["DURATION_HELP", "duration_seconds", "parse_duration", "parse_size"]

_UNITS = {
    **dict.fromkeys(("ms", "msec", "msecs", "millisecond", "milliseconds"), 0.001),
    **dict.fromkeys(("", "s", "sec", "secs", "second", "seconds"), 1.0),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60.0),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 3600.0),
    **dict.fromkeys(("d", "day", "days"), 86400.0),
    **dict.fromkeys(("w", "week", "weeks"), 604800.0),
}
_DURATION_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)")
DURATION_HELP = 'a number of seconds or a string such as "90s", "20m", "1h30m" or "7d"'


def duration_seconds(value: object) -> float:
    """Return a duration in seconds; raise ValueError saying what is wrong."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"must be {DURATION_HELP}, not {kind_of(value)}")
    if isinstance(value, str):
        text = value.strip().lower()
        parts: list[re.Match[str]] = []
        while len(parts) == 0 or parts[-1].end() < len(text):
            match = _DURATION_PART.match(text, parts[-1].end() if parts else 0)
            if match is None:
                raise ValueError(f"{value!r} is not {DURATION_HELP}")
            parts.append(match)
        if len(parts) > 1 and any(not m.group(2) for m in parts):
            raise ValueError(f"{value!r} has a number without a unit")
        seconds = 0.0
        for match in parts:
            unit = match.group(2)
            if unit not in _UNITS:
                raise ValueError(f"{value!r} has an unknown unit {unit!r}; use s, m, h, d or w")
            seconds += float(match.group(1)) * _UNITS[unit]
    else:
        try:
            seconds = float(value)
        except OverflowError:
            raise ValueError(f"{value} is too large") from None
    if math.isnan(seconds) or math.isinf(seconds) or seconds < 0:
        raise ValueError(f"{value!r} must be a finite duration >= 0")
    return seconds


def parse_duration(value: object, where: str = "duration") -> float:
    """Return value as seconds; accept int/float seconds or "90s", "20m", "1h30m", "7d", ..."""
    try:
        return duration_seconds(value)
    except ValueError as exc:
        raise ConfigError([ConfigIssue(where, repr(value), "", str(exc))]) from None


_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2}
_SIZE_UNITS.update({"g": 1024**3, "gb": 1024**3})


def parse_size(text: str) -> int:
    """Parse "2048", "2k", "50MB" into bytes; raise ValueError saying what is wrong."""
    t = text.strip().lower()
    num = t.rstrip("kmgb")
    unit = t[len(num) :]
    if not num or unit not in _SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 2048, 2k, 50MB)")
    try:
        return int(float(num) * _SIZE_UNITS[unit])
    except ValueError:
        raise ValueError(f"not a size: {text!r}") from None
