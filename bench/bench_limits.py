"""Cost of one throttle check, made once per pick: the local Limiter, and Redis leases spent here.

The target is under 1 µs a check. Each case times 1000 checks in a Python loop, as dispatch
makes them (ns_per_check in extra_info). The Redis case never reaches Redis: its stash is warm,
which is the state the hot path is in between two leases.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from kumopy.coordinator.limits import Limiter
from kumopy.coordinator.redis_limits import RedisLimiter
from kumopy.rates import parse_rate, parse_warmup

LOOP = 1000
KEY = "path:ip-1>gmail.com"
NOW = 1_800_000_000.0
RATE = parse_rate("1000000000/s")
"""Never refuses: the case times an admission, the common outcome."""
WARMUP = parse_warmup({"start": NOW - 10, "daily": [10**15]})


@pytest.fixture
def shared() -> Iterator[RedisLimiter]:
    """Return a RedisLimiter with warm leases for KEY (its Redis is never reached)."""
    lim = RedisLimiter("redis://127.0.0.1:9")  # the discard port: the thread just retries
    # Answers as the Redis thread would hand them over: far more tokens than the run spends.
    lim._apply(("rate", KEY, 10**12, 0.0, NOW))
    lim.cap(KEY, WARMUP, NOW)
    lim._apply(("cap", KEY, 0, 10**12, 10**12, NOW, math.inf))
    yield lim
    lim.close()


def timed(
    benchmark: BenchmarkFixture,
    check: Callable[[str, Any, float], float],
    limit: Any,
    key: str = KEY,
) -> None:
    """Time LOOP checks as the dispatcher makes them, and record the cost of one."""

    def run() -> float:
        last = 0.0
        for _ in range(LOOP):
            last = check(key, limit, NOW)
        return last

    assert benchmark(run) == 0.0
    # Only a timed run has stats; the default run executes once, as a test.
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["ns_per_check"] = round(stats.stats.mean / LOOP * 1e9, 1)


def test_local_rate(benchmark: BenchmarkFixture) -> None:
    timed(benchmark, Limiter().rate, RATE)


def test_local_cap(benchmark: BenchmarkFixture) -> None:
    timed(benchmark, Limiter().cap, WARMUP)


def test_redis_rate_warm_lease(benchmark: BenchmarkFixture, shared: RedisLimiter) -> None:
    timed(benchmark, shared.rate, RATE)
    assert shared.status()["leases"]["rate"] == 1  # spent from the lease, never locally


def test_redis_cap_warm_lease(benchmark: BenchmarkFixture, shared: RedisLimiter) -> None:
    timed(benchmark, shared.cap, WARMUP)
    assert shared.status()["leases"]["cap"] == 1


def test_redis_local_rate(benchmark: BenchmarkFixture, shared: RedisLimiter) -> None:
    local = parse_rate("local:1000000000/s")  # never leased: the local bucket, through the miss
    assert shared.rate("path:local", local, NOW) == 0.0
    timed(benchmark, shared.rate, local, key="path:local")


def test_redis_cap_past_warmup(benchmark: BenchmarkFixture, shared: RedisLimiter) -> None:
    done = parse_warmup({"start": NOW - 86400 * 30, "daily": [50, 100]})  # over: no cap now
    timed(benchmark, shared.cap, done, key="source:warm")
