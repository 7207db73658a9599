"""Hot-path timings of weighted selection, for both twins, on pools of 2, 10 and 100 sources.

Weights 1..5 give a weight sum the compiled twin replays as a cycle once seen (the usual case);
weights 40000..40004 give a sum above its replay limit, so every pick is computed.
"""

from __future__ import annotations

import array

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from kumopy._fast import _select_py
from tests.conftest_fast import FastImpl

BATCH = 1000
SIZES = [2, 10, 100]
SMALL, LARGE = 1, 40_000


def pool(impl: FastImpl, size: int, base: int) -> _select_py.SmoothSelector:
    """Return a selector over `size` sources weighted base+0 .. base+4 in turn."""
    mask = impl.SourceMask(size)
    return impl.SmoothSelector(range(size), [base + i % 5 for i in range(size)], mask)


def note_per_pick(benchmark: BenchmarkFixture, picks: int) -> None:
    """Record the mean time per pick, when the run was timed."""
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["ns_per_pick"] = round(stats.stats.mean / picks * 1e9, 2)


def pick_one(benchmark: BenchmarkFixture, impl: FastImpl, size: int, base: int) -> None:
    """Time one pick() call from Python."""
    sel = pool(impl, size, base)
    assert 0 <= benchmark(sel.pick) < size


def pick_batch(benchmark: BenchmarkFixture, impl: FastImpl, size: int, base: int) -> None:
    """Time pick_into() of a batch of BATCH picks."""
    sel = pool(impl, size, base)
    buf = array.array("i", bytes(4 * BATCH))
    assert benchmark(sel.pick_into, buf, BATCH) == BATCH
    assert min(buf) >= 0 and max(buf) < size
    note_per_pick(benchmark, BATCH)


@pytest.mark.parametrize("size", SIZES)
def test_pick(benchmark: BenchmarkFixture, fast_impl: FastImpl, size: int) -> None:
    pick_one(benchmark, fast_impl, size, SMALL)


@pytest.mark.parametrize("size", SIZES)
def test_pick_computed(benchmark: BenchmarkFixture, fast_impl: FastImpl, size: int) -> None:
    pick_one(benchmark, fast_impl, size, LARGE)


@pytest.mark.parametrize("size", SIZES)
def test_pick_into(benchmark: BenchmarkFixture, fast_impl: FastImpl, size: int) -> None:
    pick_batch(benchmark, fast_impl, size, SMALL)


@pytest.mark.parametrize("size", SIZES)
def test_pick_into_computed(benchmark: BenchmarkFixture, fast_impl: FastImpl, size: int) -> None:
    pick_batch(benchmark, fast_impl, size, LARGE)
