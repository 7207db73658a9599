"""Smooth weighted round robin: exact ratios, interleaving, eligibility and twin agreement."""

from __future__ import annotations

import array
import math
import random
from collections import Counter

import pytest

from kumopy._fast import _select_py
from tests.conftest_fast import FastImpl

RATIO_WEIGHTS = [(1, 2), (5, 2, 3), (1, 1, 1), (1, 0, 3)]


def make(
    impl: FastImpl, weights: tuple[int, ...]
) -> tuple[_select_py.SourceMask, _select_py.SmoothSelector]:
    """Build a mask and a selector over sources 0..n-1 with `weights`."""
    mask = impl.SourceMask(len(weights))
    return mask, impl.SmoothSelector(range(len(weights)), weights, mask)


def window_errors(picks: list[int], weights: dict[int, int]) -> list[int]:
    """Return, for each window of sum(weights) picks, the largest miss of any count."""
    width = sum(weights.values())
    errors = []
    counts = Counter(picks[:width])
    for start in range(len(picks) - width + 1):
        if start:
            counts[picks[start - 1]] -= 1
            counts[picks[start + width - 1]] += 1
        errors.append(max(abs(counts[s] - w) for s, w in weights.items()))
    return errors


def longest_runs(picks: list[int]) -> dict[int, int]:
    """Return the longest run of consecutive equal picks, per source."""
    runs: dict[int, int] = {}
    current, length = -1, 0
    for p in picks:
        length = length + 1 if p == current else 1
        current = p
        runs[p] = max(runs.get(p, 0), length)
    return runs


@pytest.mark.parametrize("weights", RATIO_WEIGHTS, ids=str)
def test_every_window_holds_the_exact_ratio(fast_impl: FastImpl, weights: tuple[int, ...]) -> None:
    _, sel = make(fast_impl, weights)
    total = sum(weights)
    picks = sel.pick_many(6 * total)
    assert len(picks) == 6 * total
    assert window_errors(picks, dict(enumerate(weights))) == [0] * (5 * total + 1)
    # Periodic with period sum(weights).
    assert picks[total:] == picks[:-total]
    for source, w in enumerate(weights):
        if w == 0:
            assert source not in picks


@pytest.mark.parametrize("weights", RATIO_WEIGHTS, ids=str)
def test_picks_are_interleaved(fast_impl: FastImpl, weights: tuple[int, ...]) -> None:
    _, sel = make(fast_impl, weights)
    picks = sel.pick_many(4 * sum(weights))
    runs = longest_runs(picks)
    total = sum(weights)
    for source, w in enumerate(weights):
        if 0 < w < total:
            # Checked on thousands of weight sets: never more than ceil(W / (W - w)) in a row.
            assert runs[source] <= math.ceil(total / (total - w))
    if weights == (5, 2, 3):
        assert runs[0] == 2
        assert picks[:10] == [0, 2, 1, 0, 0, 2, 0, 1, 2, 0]


def test_run_bound_on_random_weights(fast_impl: FastImpl) -> None:
    rng = random.Random(20240501)
    for _ in range(200):
        weights = tuple(rng.randint(1, 12) for _ in range(rng.randint(2, 6)))
        total = sum(weights)
        _, sel = make(fast_impl, weights)
        picks = sel.pick_many(3 * total)
        assert window_errors(picks, dict(enumerate(weights))) == [0] * (2 * total + 1)
        runs = longest_runs(picks)
        for source, w in enumerate(weights):
            assert runs[source] <= math.ceil(total / (total - w))


def test_weights_5_1_1_spread_the_heavy_source(fast_impl: FastImpl) -> None:
    _, sel = make(fast_impl, (5, 1, 1))
    assert sel.pick_many(7) == [0, 0, 1, 0, 2, 0, 0]


# For each weight set, how many picks after the change pass before every window of the weight
# sum is exact: (while one source is out, once it is back). Measured exhaustively over every
# source, phase and time away; these are the exact maxima, and before that point each window is
# off by at most one.
SETTLE = {(5, 2, 3): (1, 1), (4, 3, 2, 1): (3, 2), (3, 1, 1, 1): (2, 3), (1, 2): (0, 0)}


@pytest.mark.parametrize("weights", list(SETTLE), ids=str)
def test_source_made_ineligible_then_eligible(
    fast_impl: FastImpl, weights: tuple[int, ...]
) -> None:
    settle_off, settle_on = SETTLE[weights]
    total = sum(weights)
    worst_off = worst_on = 0
    for off in range(len(weights)):
        rest = {s: w for s, w in enumerate(weights) if s != off}
        rest_total = sum(rest.values())
        for phase in range(total):
            for away in range(2 * rest_total + 1):
                mask, sel = make(fast_impl, weights)
                sel.pick_many(phase)
                mask.set(off, False)
                picks = sel.pick_many(away + rest_total)
                assert off not in picks
                errors = window_errors(picks, rest)
                assert max(errors) <= 1
                assert not any(errors[settle_off:]), (off, phase, away)
                worst_off = max([worst_off] + [i + 1 for i, e in enumerate(errors) if e])
                mask.set(off, True)
                picks = sel.pick_many(4 * total)
                errors = window_errors(picks, dict(enumerate(weights)))
                assert max(errors) <= 1
                assert not any(errors[settle_on:]), (off, phase, away)
                worst_on = max([worst_on] + [i + 1 for i, e in enumerate(errors) if e])
    # The bounds are tight: some case needs every one of those picks.
    assert (worst_off, worst_on) == (settle_off, settle_on)


def test_frozen_score_is_kept(fast_impl: FastImpl) -> None:
    mask, sel = make(fast_impl, (1, 1))
    assert sel.pick() == 0
    mask.set(1, False)
    assert sel.pick_many(3) == [0, 0, 0]
    mask.set(1, True)
    # Source 1 kept its score from the first pick, so it now leads.
    assert sel.pick() == 1


def test_none_eligible(fast_impl: FastImpl) -> None:
    mask, sel = make(fast_impl, (2, 1))
    _, ref = make(fast_impl, (2, 1))
    assert sel.pick_many(2) == ref.pick_many(2)
    mask.set(0, False)
    mask.set(1, False)
    assert sel.pick() == -1
    assert sel.pick_many(5) == []
    buf = array.array("i", [7] * 4)
    assert sel.pick_into(buf, 4) == 0
    assert list(buf) == [7] * 4
    # Nothing moved while none was eligible.
    mask.set(0, True)
    mask.set(1, True)
    assert sel.pick_many(9) == ref.pick_many(9)


def test_zero_weights_and_empty_selector(fast_impl: FastImpl) -> None:
    mask = fast_impl.SourceMask(3)
    empty = fast_impl.SmoothSelector([], [], mask)
    assert empty.pick() == -1
    assert empty.pick_many(3) == []
    assert empty.sources == ()
    assert empty.weights == ()
    zero = fast_impl.SmoothSelector([0, 2], [0, 0], mask)
    assert zero.pick() == -1
    assert zero.pick_into(array.array("i", [0]), 1) == 0


def test_subset_of_mask_and_independent_selectors(fast_impl: FastImpl) -> None:
    mask = fast_impl.SourceMask(10)
    a = fast_impl.SmoothSelector([7, 3], [1, 3], mask)
    b = fast_impl.SmoothSelector([3, 9], [1, 1], mask)
    assert a.sources == (7, 3)
    assert a.weights == (1, 3)
    assert a.pick_many(4) == [3, 7, 3, 3]
    assert b.pick_many(4) == [3, 9, 3, 9]
    mask.set(3, False)
    assert a.pick_many(2) == [7, 7]
    assert b.pick_many(2) == [9, 9]


def test_reset_starts_over(fast_impl: FastImpl) -> None:
    _, sel = make(fast_impl, (5, 2, 3))
    first = sel.pick_many(7)
    sel.reset()
    assert sel.pick_many(7) == first


@pytest.mark.parametrize("n", [0, 1, 9, 10, 11, 999, 1000])
def test_pick_into_matches_pick(fast_impl: FastImpl, n: int) -> None:
    _, sel = make(fast_impl, (5, 2, 3))
    _, ref = make(fast_impl, (5, 2, 3))
    buf = array.array("i", [-5] * 1001)
    assert sel.pick_into(buf, n) == n
    assert buf[:n].tolist() == [ref.pick() for _ in range(n)]
    assert buf[n] == -5
    # The scores must end exactly where n single picks leave them.
    assert sel.pick_many(23) == ref.pick_many(23)


def test_pick_into_rejects_bad_buffers(fast_impl: FastImpl) -> None:
    _, sel = make(fast_impl, (1, 1))
    with pytest.raises(TypeError):
        sel.pick_into(bytes(8), 1)
    with pytest.raises(TypeError):
        sel.pick_into(array.array("d", [0.0]), 1)
    with pytest.raises(TypeError):
        sel.pick_into(array.array("q", [0]), 1)
    with pytest.raises(TypeError):
        sel.pick_into(memoryview(array.array("i", [0] * 4))[::2], 1)
    with pytest.raises(TypeError):
        sel.pick_into([0, 0], 1)
    with pytest.raises(ValueError):
        sel.pick_into(array.array("i", [0] * 2), 3)
    with pytest.raises(ValueError):
        sel.pick_into(array.array("i", [0] * 2), -1)
    # A bytearray cast to C int is fine.
    raw = bytearray(8)
    assert sel.pick_into(memoryview(raw).cast("i"), 2) == 2
    assert sorted(memoryview(raw).cast("i").tolist()) == [0, 1]


def test_validation(fast_impl: FastImpl) -> None:
    mask = fast_impl.SourceMask(4)
    with pytest.raises(ValueError, match="twice"):
        fast_impl.SmoothSelector([1, 1], [1, 1], mask)
    with pytest.raises(ValueError, match="weight"):
        fast_impl.SmoothSelector([0, 1], [1, -1], mask)
    with pytest.raises(ValueError, match="weight"):
        fast_impl.SmoothSelector([0], [2**32], mask)
    with pytest.raises(ValueError, match="2 sources but 1 weights"):
        fast_impl.SmoothSelector([0, 1], [1], mask)
    with pytest.raises(IndexError):
        fast_impl.SmoothSelector([4], [1], mask)
    with pytest.raises(IndexError):
        fast_impl.SmoothSelector([-1], [1], mask)
    with pytest.raises(TypeError):
        fast_impl.SmoothSelector([0], [1.5], mask)  # type: ignore[list-item]
    with pytest.raises(TypeError):
        fast_impl.SmoothSelector([0], [1], object())  # type: ignore[arg-type]
    sel = fast_impl.SmoothSelector([0], [1], mask)
    with pytest.raises(ValueError):
        sel.pick_many(-1)
    with pytest.raises(ValueError):
        fast_impl.SourceMask(-1)


def test_mask(fast_impl: FastImpl) -> None:
    mask = fast_impl.SourceMask(3)
    assert len(mask) == 3
    assert [mask.get(i) for i in range(3)] == [True, True, True]
    mask.set(1, False)
    assert [mask.get(i) for i in range(3)] == [True, False, True]
    mask.set(1, True)
    assert mask.get(1) is True
    for bad in (3, -1):
        with pytest.raises(IndexError):
            mask.set(bad, True)
        with pytest.raises(IndexError):
            mask.get(bad)
    assert len(fast_impl.SourceMask(0)) == 0


def test_twin_agrees_with_specification(fast_impl: FastImpl) -> None:
    # Bursts of picks long enough for the compiled twin to start replaying a cycle, broken
    # by eligibility changes and resets at every phase.
    rng = random.Random(99)
    py = _select_py
    steps = 0
    for _ in range(12):
        size = rng.randint(1, 16)
        masks = (fast_impl.SourceMask(size), py.SourceMask(size))
        sels: list[tuple[_select_py.SmoothSelector, _select_py.SmoothSelector]] = []
        for _ in range(3):
            srcs = rng.sample(range(size), rng.randint(0, size))
            # A common factor must not change anything.
            scale = rng.choice((1, 1, 3, 100))
            wts = [scale * rng.choice((0, 1, 1, 2, 3, 5, 8)) for _ in srcs]
            sels.append(
                (
                    fast_impl.SmoothSelector(srcs, wts, masks[0]),
                    py.SmoothSelector(srcs, wts, masks[1]),
                )
            )
        for _ in range(300):
            op = rng.random()
            if op < 0.2:
                index, flag = rng.randrange(size), rng.random() < 0.7
                for m in masks:
                    m.set(index, flag)
                continue
            mine, spec = rng.choice(sels)
            if op < 0.55:
                for _ in range(rng.randint(0, 80)):
                    assert mine.pick() == spec.pick()
                    steps += 1
            elif op < 0.7:
                k = rng.randint(0, 80)
                assert mine.pick_many(k) == spec.pick_many(k)
                steps += k
            elif op < 0.97:
                k = rng.randint(0, 300)
                bufs = array.array("i", [0] * k), array.array("i", [0] * k)
                assert mine.pick_into(bufs[0], k) == spec.pick_into(bufs[1], k)
                assert bufs[0] == bufs[1]
                steps += k
            else:
                mine.reset()
                spec.reset()
    assert steps > 100_000


@pytest.mark.parametrize("scale", [40_000, 1 << 20])
def test_large_pools_with_large_weights_agree_with_specification(
    fast_impl: FastImpl, scale: int
) -> None:
    # Weight sums past the replay limit and pools of 32+ sources take the compiled twin's
    # 32-bit batch path; weights of 2**20 x 40 sources are too large for it and must fall back.
    rng = random.Random(scale)
    size = 48
    masks = (fast_impl.SourceMask(size), _select_py.SourceMask(size))
    srcs = list(range(size))
    wts = [scale + rng.randint(0, 9) for _ in srcs]
    mine = fast_impl.SmoothSelector(srcs, wts, masks[0])
    spec = _select_py.SmoothSelector(srcs, wts, masks[1])
    for round_ in range(12):
        if round_ % 3 == 2:
            index, flag = rng.randrange(size), rng.random() < 0.6
            for m in masks:
                m.set(index, flag)
        k = rng.randint(1, 700)
        bufs = array.array("i", [0] * k), array.array("i", [0] * k)
        assert mine.pick_into(bufs[0], k) == spec.pick_into(bufs[1], k) == k
        assert bufs[0] == bufs[1]
        assert mine.pick() == spec.pick()
