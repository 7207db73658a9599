"""Hot-path timings of weighted selection, for both twins, on pools of 2, 10 and 100 sources.

The coordinator calls pick() once per message, so that call is what is timed: alone (comparable
with earlier runs), and 1000 in a Python loop as dispatch makes them (ns_per_pick in extra_info).
"""

from __future__ import annotations

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from kumopy._fast import _select_py
from tests.conftest_fast import FastImpl

LOOP = 1000
SIZES = [2, 10, 100]


def pool(impl: FastImpl, size: int) -> _select_py.SmoothSelector:
    """Return a selector over `size` sources weighted 1 .. 5 in turn."""
    mask = impl.SourceMask(size)
    return impl.SmoothSelector(range(size), [1 + i % 5 for i in range(size)], mask)


@pytest.mark.parametrize("size", SIZES)
def test_pick(benchmark: BenchmarkFixture, fast_impl: FastImpl, size: int) -> None:
    sel = pool(fast_impl, size)
    assert 0 <= benchmark(sel.pick) < size


@pytest.mark.parametrize("size", SIZES)
def test_pick_loop(benchmark: BenchmarkFixture, fast_impl: FastImpl, size: int) -> None:
    sel = pool(fast_impl, size)

    def run() -> int:
        pick = sel.pick
        last = -1
        for _ in range(LOOP):
            last = pick()
        return last

    assert 0 <= benchmark(run) < size
    # Only a timed run has stats; the default run executes once, as a test.
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["ns_per_pick"] = round(stats.stats.mean / LOOP * 1e9, 2)
