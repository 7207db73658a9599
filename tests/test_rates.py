"""Rates, token buckets and warm-up schedules: parsing and arithmetic, without processes."""

from __future__ import annotations

import datetime as dt

import pytest

from kumopy.rates import Rate, TokenBucket, WindowCount, parse_rate, parse_warmup


@pytest.mark.parametrize(
    ("text", "limit", "period", "burst", "local"),
    [
        ("100/s", 100, 1.0, 100, False),
        ("100/sec", 100, 1.0, 100, False),
        ("5000/h", 5000, 3600.0, 5000, False),
        ("5,000/hr", 5000, 3600.0, 5000, False),
        ("20000/day", 20000, 86400.0, 20000, False),
        ("50/10min", 50, 600.0, 50, False),
        ("100/day,max_burst=1", 100, 86400.0, 1, False),
        (" local:10 / m , max_burst = 2 ", 10, 60.0, 2, True),
    ],
)
def test_parse_rate(text: str, limit: int, period: float, burst: int, local: bool) -> None:
    rate = parse_rate(text)
    assert (rate.limit, rate.period, rate.burst, rate.local) == (limit, period, burst, local)
    assert str(rate) == text.strip()


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("100", "is not a rate such as"),
        ("0/s", "the count must be at least 1"),
        ("10/fortnight", "has an unknown unit 'fortnight'"),
        ("10/0s", "the period must be longer than zero"),
        ("10/s,max_burst=0", "max_burst must be at least 1"),
        (100, "must be a rate such as"),
        ("10/s,burst=3", "is not a rate such as"),
    ],
)
def test_bad_rates_say_why(value: object, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_rate(value)


def test_token_bucket_admits_the_burst_then_the_rate() -> None:
    bucket = TokenBucket(parse_rate("10/s,max_burst=3"), now=100.0)
    assert [bucket.take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(100.0) == pytest.approx(0.1)  # a refusal takes nothing
    assert bucket.take(100.05) == pytest.approx(0.05)
    assert bucket.take(100.1) == 0.0
    assert bucket.available(1000.0) == 3.0  # never more than the burst
    bucket.adopt(Rate(1, 1.0, 1), 1000.0)
    assert bucket.take(1000.0) == 0.0 and bucket.take(1000.0) == pytest.approx(1.0)


def test_token_bucket_holds_the_rate_over_time() -> None:
    bucket = TokenBucket(parse_rate("50/s,max_burst=1"), now=0.0)
    admitted = sum(bucket.take(t / 1000) == 0.0 for t in range(10_000))  # 10 s, every ms
    assert admitted == pytest.approx(500, abs=1)


def test_warmup_caps_by_day_then_lifts() -> None:
    warmup = parse_warmup({"start": dt.date(2026, 12, 1), "daily": [2, 3], "period": "10s"})
    start = dt.datetime(2026, 12, 1, tzinfo=dt.UTC).timestamp()
    assert warmup.start == start
    assert warmup.cap(start - 1) == 0  # not begun: held
    assert warmup.cap(start) == 2 and warmup.cap(start + 10) == 3 and warmup.cap(start + 20) is None
    count = WindowCount()
    assert count.take(warmup, start - 5) == pytest.approx(5.0)
    assert [count.take(warmup, start + 1) for _ in range(2)] == [0.0, 0.0]
    assert count.take(warmup, start + 4) == pytest.approx(6.0)  # until the next window
    assert count.used_now(warmup, start + 4) == 2 and count.used_now(warmup, start + 11) == 0
    assert [count.take(warmup, start + 11) for _ in range(4)][-1] > 0  # the day-1 cap is 3
    assert all(count.take(warmup, start + 25) == 0.0 for _ in range(100))
    assert "2, 3 per 10s" in warmup.describe()


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("500/day", "must be a table like"),
        ({"daily": [1]}, "needs both start and daily"),
        ({"start": "yesterday", "daily": [1]}, "start must be a date like"),
        ({"start": "2026-12-01", "daily": []}, "daily must be a non-empty list"),
        ({"start": "2026-12-01", "daily": [1, -2]}, "daily item 1 must be a whole number"),
        ({"start": "2026-12-01", "daily": [1], "period": 0}, "period must be longer than zero"),
        ({"start": "2026-12-01", "daily": [1], "every": "1d"}, "unknown key 'every'"),
    ],
)
def test_bad_warmups_say_why(value: object, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_warmup(value)


def test_warmup_start_forms() -> None:
    daily = [1]
    base = dt.datetime(2026, 12, 1, 9, tzinfo=dt.UTC).timestamp()
    assert parse_warmup({"start": "2026-12-01T09:00:00Z", "daily": daily}).start == base
    assert parse_warmup({"start": base, "daily": daily}).start == base
    naive = dt.datetime(2026, 12, 1, 9)  # TOML local date-time: taken as UTC
    assert parse_warmup({"start": naive, "daily": daily}).start == base
