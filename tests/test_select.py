"""Smooth weighted round robin: exact ratios, interleaving, eligibility and twin agreement."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence

import pytest

from kumopy._fast import _select_py
from tests.conftest_fast import FastImpl

RATIO_WEIGHTS = [(1, 2), (5, 2, 3), (1, 1, 1), (1, 0, 3), (5, 1, 1), (4, 3, 2, 1)]


def make(
    impl: FastImpl, weights: tuple[int, ...]
) -> tuple[_select_py.SourceMask, _select_py.SmoothSelector]:
    """Build a mask and a selector over sources 0..n-1 with `weights`."""
    mask = impl.SourceMask(len(weights))
    return mask, impl.SmoothSelector(range(len(weights)), weights, mask)


def take(sel: _select_py.SmoothSelector, n: int) -> list[int]:
    """Return the next `n` picks, -1 where none was eligible."""
    return [sel.pick() for _ in range(n)]


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


# The bounds below, for picks from a fresh selector with every source eligible. W is the weight
# sum, n the number of sources of weight > 0, c_i(t) the picks of source i among the first t.
# Source i's score after t picks is s_i(t) = t*w_i - W*c_i(t) (each pick adds w_i, each win takes
# W), and the scores sum to 0, so after the add step they sum to W and the winner holds >= W/n.
# - Every window of W picks, at every start, holds exactly w_i of each source (bound 0): within
#   the first W picks, a source that already has w_i holds t*w_i - W*w_i <= 0 < W/n after the
#   add step and cannot win; the counts add up to W, so each is exactly w_i, all scores are 0
#   again and the picks repeat with period W; a window of W picks is then a rotated period.
# - From the start of a period, no source ever runs ahead of its share by more than (n-1)/n
#   pick: a winner keeps >= W/n - W and the other scores only grow, so s_i(t) >= -(n-1)*W/n,
#   that is c_i(t) - t*w_i/W <= (n-1)/n. Equal weights reach it.
# Windows of W picks alone cannot tell smooth from classic WRR: any schedule that repeats with
# period W and gives source i w_i picks a period passes them. The second bound does: classic
# WRR (each weight as one run, or LVS's interleaved rounds) breaks it for (5, 2, 3), (5, 1, 1)
# and (4, 3, 2, 1), where it serves the heaviest source several times in a row.
def assert_smooth_windows(picks: Sequence[int], weights: Sequence[int]) -> None:
    """Assert both smooth-WRR bounds above on picks taken from a fresh selector."""
    total = sum(weights)
    live = sum(1 for w in weights if w > 0)
    assert len(picks) >= 2 * total
    errors = window_errors(list(picks), dict(enumerate(weights)))
    assert errors == [0] * len(errors), "a window of W picks misses a weight"
    counts = [0] * len(weights)
    for t, source in enumerate(picks, 1):
        counts[source] += 1
        for i, w in enumerate(weights):
            # c_i(t) - t*w_i/W <= (n-1)/n, in integers.
            assert live * (total * counts[i] - t * w) <= (live - 1) * total, (t, i, picks[:t])


@pytest.mark.parametrize("weights", RATIO_WEIGHTS, ids=str)
def test_weights_hold_in_every_window(fast_impl: FastImpl, weights: tuple[int, ...]) -> None:
    _, sel = make(fast_impl, weights)
    total = sum(weights)
    picks = take(sel, 6 * total)
    assert_smooth_windows(picks, weights)
    # Periodic with period sum(weights).
    assert picks[total:] == picks[:-total]
    for source, w in enumerate(weights):
        if w == 0:
            assert source not in picks


def test_exact_ratio_over_100_picks(fast_impl: FastImpl) -> None:
    _, sel = make(fast_impl, (50, 30, 15, 5))
    assert Counter(take(sel, 100)) == {0: 50, 1: 30, 2: 15, 3: 5}


@pytest.mark.parametrize("weights", RATIO_WEIGHTS, ids=str)
def test_picks_are_interleaved(fast_impl: FastImpl, weights: tuple[int, ...]) -> None:
    _, sel = make(fast_impl, weights)
    picks = take(sel, 4 * sum(weights))
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
        picks = take(sel, 3 * total)
        assert_smooth_windows(picks, weights)
        runs = longest_runs(picks)
        for source, w in enumerate(weights):
            assert runs[source] <= math.ceil(total / (total - w))


def test_weights_5_1_1_spread_the_heavy_source(fast_impl: FastImpl) -> None:
    _, sel = make(fast_impl, (5, 1, 1))
    assert take(sel, 7) == [0, 0, 1, 0, 2, 0, 0]


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
                take(sel, phase)
                mask.set(off, False)
                picks = take(sel, away + rest_total)
                assert off not in picks
                errors = window_errors(picks, rest)
                assert max(errors) <= 1
                assert not any(errors[settle_off:]), (off, phase, away)
                worst_off = max([worst_off] + [i + 1 for i, e in enumerate(errors) if e])
                mask.set(off, True)
                picks = take(sel, 4 * total)
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
    assert take(sel, 3) == [0, 0, 0]
    mask.set(1, True)
    # Source 1 kept its score from the first pick, so it now leads.
    assert sel.pick() == 1


def test_none_eligible(fast_impl: FastImpl) -> None:
    mask, sel = make(fast_impl, (2, 1))
    _, ref = make(fast_impl, (2, 1))
    assert take(sel, 2) == take(ref, 2)
    mask.set(0, False)
    mask.set(1, False)
    assert take(sel, 5) == [-1] * 5
    # Nothing moved while none was eligible.
    mask.set(0, True)
    mask.set(1, True)
    assert take(sel, 9) == take(ref, 9)


def test_zero_weights_and_empty_selector(fast_impl: FastImpl) -> None:
    mask = fast_impl.SourceMask(3)
    empty = fast_impl.SmoothSelector([], [], mask)
    assert take(empty, 3) == [-1] * 3
    assert empty.sources == ()
    assert empty.weights == ()
    zero = fast_impl.SmoothSelector([0, 2], [0, 0], mask)
    assert take(zero, 3) == [-1] * 3
    # A weight-0 entry never wins, even when it is the only eligible one.
    some = fast_impl.SmoothSelector([0, 1, 2], [0, 3, 1], mask)
    assert Counter(take(some, 40)) == {1: 30, 2: 10}
    mask.set(1, False)
    mask.set(2, False)
    assert some.pick() == -1


def test_subset_of_mask_and_independent_selectors(fast_impl: FastImpl) -> None:
    mask = fast_impl.SourceMask(10)
    a = fast_impl.SmoothSelector([7, 3], [1, 3], mask)
    b = fast_impl.SmoothSelector([3, 9], [1, 1], mask)
    assert a.sources == (7, 3)
    assert a.weights == (1, 3)
    assert take(a, 4) == [3, 7, 3, 3]
    assert take(b, 4) == [3, 9, 3, 9]
    mask.set(3, False)
    assert take(a, 2) == [7, 7]
    assert take(b, 2) == [9, 9]


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
    # Bursts of picks on several selectors sharing one mask, broken by eligibility changes at
    # every phase; a common factor in the weights must not change anything.
    rng = random.Random(99)
    py = _select_py
    steps = 0
    for _ in range(12):
        size = rng.randint(1, 16)
        masks = (fast_impl.SourceMask(size), py.SourceMask(size))
        sels: list[tuple[_select_py.SmoothSelector, _select_py.SmoothSelector]] = []
        for _ in range(3):
            srcs = rng.sample(range(size), rng.randint(0, size))
            scale = rng.choice((1, 1, 3, 100))
            wts = [scale * rng.choice((0, 1, 1, 2, 3, 5, 8)) for _ in srcs]
            sels.append(
                (
                    fast_impl.SmoothSelector(srcs, wts, masks[0]),
                    py.SmoothSelector(srcs, wts, masks[1]),
                )
            )
        for _ in range(300):
            if rng.random() < 0.3:
                index, flag = rng.randrange(size), rng.random() < 0.7
                for m in masks:
                    m.set(index, flag)
                continue
            mine, spec = rng.choice(sels)
            for _ in range(rng.randint(0, 80)):
                assert mine.pick() == spec.pick()
                steps += 1
    assert steps > 80_000


def test_large_pools_with_large_weights_agree_with_specification(fast_impl: FastImpl) -> None:
    # Weights near the 32-bit limit on 48 sources: scores far beyond 32 bits, which the
    # compiled twin must carry in 64 bits exactly as Python's integers do.
    rng = random.Random(48)
    size = 48
    masks = (fast_impl.SourceMask(size), _select_py.SourceMask(size))
    srcs = list(range(size))
    wts = [0xFFFFFFFF - rng.randint(0, 9) for _ in srcs]
    mine = fast_impl.SmoothSelector(srcs, wts, masks[0])
    spec = _select_py.SmoothSelector(srcs, wts, masks[1])
    for round_ in range(12):
        if round_ % 3 == 2:
            index, flag = rng.randrange(size), rng.random() < 0.6
            for m in masks:
                m.set(index, flag)
        for _ in range(rng.randint(1, 700)):
            assert mine.pick() == spec.pick()
