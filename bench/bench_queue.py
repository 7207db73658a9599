"""Hot-path timings of queue bookkeeping, for both twins: a due-time heap and the credit ledger."""

from __future__ import annotations

import math
import random

from pytest_benchmark.fixture import BenchmarkFixture

from tests.conftest_fast import FastImpl

COUNT = 10_000


def test_due_queue_push_pop(benchmark: BenchmarkFixture, fast_impl: FastImpl) -> None:
    rng = random.Random(1)
    # Coarse due times, as retry schedules produce: many ties, so FIFO order matters.
    items = [(float(rng.randint(0, 600)), h) for h in range(COUNT)]

    def run() -> list[int]:
        q = fast_impl.DueQueue()
        push = q.push
        for due, handle in items:
            push(due, handle)
        return q.pop_due(math.inf, COUNT)

    out = benchmark(run)
    assert len(out) == COUNT
    assert out == [h for _, h in sorted(items)]


def test_ledger_take_release(benchmark: BenchmarkFixture, fast_impl: FastImpl) -> None:
    mask = fast_impl.SourceMask(10)
    ledger = fast_impl.Ledger(mask)
    for source in range(10):
        ledger.set_credit(source, 100)

    def run() -> int:
        take, release = ledger.take, ledger.release
        for source in range(10):
            for _ in range(100):
                take(source)
            release(source, 100)
        return ledger.total_assigned()

    assert benchmark(run) == 0
