"""Queue bookkeeping: due-time ordering and the credit ledger that drives the source mask."""

from __future__ import annotations

import math
import random

import pytest

from tests.conftest_fast import FastImpl


def test_due_queue_orders_by_due_time(fast_impl: FastImpl) -> None:
    q = fast_impl.DueQueue()
    assert len(q) == 0
    assert q.next_due() == math.inf
    for due, handle in [(5.0, 50), (1.5, 15), (3.0, 30), (-2.0, 99), (4.0, 40)]:
        q.push(due, handle)
    assert len(q) == 5
    assert q.next_due() == -2.0
    assert q.pop_due(3.0, 100) == [99, 15, 30]
    assert q.next_due() == 4.0
    assert q.pop_due(3.999, 100) == []
    assert q.pop_due(10.0, 100) == [40, 50]
    assert len(q) == 0
    assert q.next_due() == math.inf


def test_due_queue_is_fifo_among_equal_due_times(fast_impl: FastImpl) -> None:
    q = fast_impl.DueQueue()
    for handle in range(200):
        q.push(7.0 if handle % 2 else 3.0, handle)
    evens = list(range(0, 200, 2))
    odds = list(range(1, 200, 2))
    assert q.pop_due(7.0, 1000) == evens + odds


def test_due_queue_limit(fast_impl: FastImpl) -> None:
    q = fast_impl.DueQueue()
    for handle in range(10):
        q.push(float(handle), handle)
    assert q.pop_due(100.0, 0) == []
    assert q.pop_due(100.0, 3) == [0, 1, 2]
    assert q.pop_due(4.0, 3) == [3, 4]
    assert len(q) == 5
    with pytest.raises(ValueError):
        q.pop_due(100.0, -1)


def test_due_queue_values(fast_impl: FastImpl) -> None:
    q = fast_impl.DueQueue()
    with pytest.raises(ValueError):
        q.push(math.nan, 1)
    with pytest.raises(OverflowError):
        q.push(1.0, 2**63)
    q.push(math.inf, -(2**63))
    q.push(0, 2**63 - 1)
    assert q.next_due() == 0.0
    assert q.pop_due(1e300, 10) == [2**63 - 1]
    assert q.pop_due(math.inf, 10) == [-(2**63)]


def test_due_queue_matches_sorted(fast_impl: FastImpl) -> None:
    rng = random.Random(4242)
    q = fast_impl.DueQueue()
    pending: list[tuple[float, int, int]] = []
    popped: list[int] = []
    expected: list[int] = []
    seq = 0
    now = 0.0
    for _ in range(40):
        for _ in range(rng.randint(0, 5000)):
            # Coarse times make many ties, so FIFO order is checked at scale too.
            due = now + rng.choice((rng.randint(0, 50) * 0.5, rng.random() * 30.0))
            q.push(due, seq)
            pending.append((due, seq, seq))
            seq += 1
        now += rng.random() * 20.0
        limit = rng.randint(0, 6000)
        pending.sort()
        ready = [p for p in pending if p[0] <= now][:limit]
        expected.extend(h for _, _, h in ready)
        pending = pending[len(ready) :]
        popped.extend(q.pop_due(now, limit))
        assert len(q) == len(pending)
        assert q.next_due() == (pending[0][0] if pending else math.inf)
    assert popped == expected
    assert len(popped) > 50_000
    assert q.pop_due(math.inf, 10**9) == [h for _, _, h in sorted(pending)]


def test_due_queue_grows_and_shrinks(fast_impl: FastImpl) -> None:
    q = fast_impl.DueQueue()
    for rnd in range(3):
        for handle in range(100_000, 0, -1):
            q.push(float(handle), handle + rnd)
        assert len(q) == 100_000
        popped: list[int] = []
        while len(q):
            popped.extend(q.pop_due(math.inf, 7919))
        assert popped == [h + rnd for h in range(1, 100_001)]


def test_ledger_starts_ineligible(fast_impl: FastImpl) -> None:
    mask = fast_impl.SourceMask(3)
    ledger = fast_impl.Ledger(mask)
    assert [mask.get(s) for s in range(3)] == [False, False, False]
    assert [ledger.credit(s) for s in range(3)] == [0, 0, 0]
    assert [ledger.available(s) for s in range(3)] == [0, 0, 0]
    assert ledger.total_assigned() == 0


def test_ledger_credit_take_release(fast_impl: FastImpl) -> None:
    mask = fast_impl.SourceMask(2)
    ledger = fast_impl.Ledger(mask)
    ledger.set_credit(1, 2)
    assert mask.get(1) is True
    assert mask.get(0) is False
    assert ledger.available(1) == 2
    ledger.take(1)
    assert mask.get(1) is True
    ledger.take(1)
    assert mask.get(1) is False
    assert ledger.available(1) == 0
    with pytest.raises(RuntimeError, match="no credit"):
        ledger.take(1)
    with pytest.raises(RuntimeError):
        ledger.take(0)
    assert ledger.assigned(1) == 2
    assert ledger.total_assigned() == 2
    ledger.release(1)
    assert mask.get(1) is True
    assert ledger.assigned(1) == 1
    with pytest.raises(ValueError):
        ledger.release(1, 2)
    with pytest.raises(ValueError):
        ledger.release(1, -1)
    ledger.release(1, 1)
    assert ledger.total_assigned() == 0
    with pytest.raises(ValueError):
        ledger.release(1)
    with pytest.raises(ValueError):
        ledger.set_credit(1, -1)


def test_ledger_suspend_and_lower_credit(fast_impl: FastImpl) -> None:
    mask = fast_impl.SourceMask(1)
    ledger = fast_impl.Ledger(mask)
    ledger.set_credit(0, 5)
    ledger.take(0)
    ledger.take(0)
    ledger.set_suspended(0, True)
    assert mask.get(0) is False
    assert ledger.available(0) == 0
    assert ledger.credit(0) == 5
    ledger.set_suspended(0, False)
    assert mask.get(0) is True
    assert ledger.available(0) == 3
    # The worker announced less credit than is assigned: nothing more until it drains.
    ledger.set_credit(0, 1)
    assert mask.get(0) is False
    assert ledger.available(0) == 0
    ledger.release(0)
    assert mask.get(0) is False
    ledger.release(0)
    assert mask.get(0) is True


def test_ledger_worker_death(fast_impl: FastImpl) -> None:
    mask = fast_impl.SourceMask(2)
    ledger = fast_impl.Ledger(mask)
    ledger.set_credit(0, 3)
    ledger.set_credit(1, 3)
    for _ in range(3):
        ledger.take(0)
    ledger.take(1)
    ledger.set_credit(0, 0)
    assert ledger.reset_assigned(0) == 3
    assert ledger.assigned(0) == 0
    assert ledger.total_assigned() == 1
    assert mask.get(0) is False
    assert ledger.reset_assigned(0) == 0


def test_ledger_index_errors(fast_impl: FastImpl) -> None:
    ledger = fast_impl.Ledger(fast_impl.SourceMask(2))
    for bad in (2, -1):
        with pytest.raises(IndexError):
            ledger.set_credit(bad, 1)
        with pytest.raises(IndexError):
            ledger.set_suspended(bad, True)
        with pytest.raises(IndexError):
            ledger.take(bad)
        with pytest.raises(IndexError):
            ledger.release(bad)
        with pytest.raises(IndexError):
            ledger.reset_assigned(bad)
        with pytest.raises(IndexError):
            ledger.assigned(bad)
        with pytest.raises(IndexError):
            ledger.credit(bad)
        with pytest.raises(IndexError):
            ledger.available(bad)


def test_ledger_keeps_mask_in_step_under_random_operations(fast_impl: FastImpl) -> None:
    rng = random.Random(777)
    size = 12
    mask = fast_impl.SourceMask(size)
    ledger = fast_impl.Ledger(mask)
    credit = [0] * size
    inflight = [0] * size
    suspended = [False] * size
    for _ in range(5000):
        s = rng.randrange(size)
        op = rng.randrange(6)
        if op == 0:
            credit[s] = rng.randint(0, 4)
            ledger.set_credit(s, credit[s])
        elif op == 1:
            suspended[s] = rng.random() < 0.3
            ledger.set_suspended(s, suspended[s])
        elif op == 2:
            if inflight[s] < credit[s]:
                ledger.take(s)
                inflight[s] += 1
            else:
                with pytest.raises(RuntimeError):
                    ledger.take(s)
        elif op == 3:
            n = rng.randint(0, 3)
            if n <= inflight[s]:
                ledger.release(s, n)
                inflight[s] -= n
            else:
                with pytest.raises(ValueError):
                    ledger.release(s, n)
        elif op == 4:
            assert ledger.reset_assigned(s) == inflight[s]
            inflight[s] = 0
        else:
            assert ledger.available(s) == (0 if suspended[s] else max(0, credit[s] - inflight[s]))
        for t in range(size):
            assert mask.get(t) == (not suspended[t] and inflight[t] < credit[t])
        assert ledger.total_assigned() == sum(inflight)
        assert ledger.assigned(s) == inflight[s]
        assert ledger.credit(s) == credit[s]


def test_selector_over_ledger_never_oversends(fast_impl: FastImpl) -> None:
    # The dispatcher's loop: pick among eligible sources, take a credit, release on results.
    rng = random.Random(31)
    mask = fast_impl.SourceMask(4)
    ledger = fast_impl.Ledger(mask)
    sel = fast_impl.SmoothSelector([0, 1, 2, 3], [3, 2, 1, 1], mask)
    for s, c in enumerate((6, 4, 2, 2)):
        ledger.set_credit(s, c)
    sent = [0] * 4
    for _ in range(20_000):
        source = sel.pick()
        if source < 0:
            assert ledger.total_assigned() == 14
        else:
            ledger.take(source)
            sent[source] += 1
        # Results come back for one source at a time.
        done = rng.randrange(4)
        if ledger.assigned(done) and rng.random() < 0.5:
            ledger.release(done, rng.randint(1, ledger.assigned(done)))
    assert all(n > 1000 for n in sent)
