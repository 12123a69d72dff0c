"""The paired bootstrap (sdpo_core.bootstrap) on cases whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sdpo_core.bootstrap import interval, paired_difference, unpaired_difference


def test_constant_values_give_a_point_interval() -> None:
    i = interval(np.full((3, 50), 0.25))
    assert (i.mean, i.low, i.high) == (0.25, 0.25, 0.25)
    assert (i.seeds, i.items) == (3, 50)


def test_bernoulli_interval_matches_the_normal_approximation() -> None:
    # 2000 items, 30% ones, one seed: the 95% interval is p +- 1.96 sqrt(p(1-p)/n) = 0.3 +- 0.0201.
    values = np.zeros(2000)
    values[:600] = 1
    i = interval(values, replicates=4000, seed=1)
    half = 1.96 * math.sqrt(0.3 * 0.7 / 2000)
    assert i.mean == pytest.approx(0.3)
    assert i.low == pytest.approx(0.3 - half, abs=0.004)
    assert i.high == pytest.approx(0.3 + half, abs=0.004)


def test_pairing_cancels_what_the_arms_share() -> None:
    # Items differ wildly, but arm a is always arm b + 0.1: the paired difference is exactly 0.1,
    # while treating the arms as independent gives a wide interval.
    rng = np.random.default_rng(0)
    b = rng.normal(0, 5, size=(3, 200))
    a = b + 0.1
    d = paired_difference(a, b)
    assert d.mean == pytest.approx(0.1)
    assert d.high - d.low < 1e-9 and d.excludes_zero()
    u = unpaired_difference(a, b)
    assert u.high - u.low > 0.5 and not u.excludes_zero()


def test_seeds_widen_the_interval_when_they_disagree() -> None:
    items = np.tile(np.linspace(0, 1, 100), (4, 1))
    agree = interval(items)
    disagree = interval(items + np.array([[-0.3], [0.3], [-0.3], [0.3]]))
    assert disagree.high - disagree.low > 2 * (agree.high - agree.low)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="finite"):
        interval([0.1, float("nan")])
    with pytest.raises(ValueError, match="non-empty"):
        interval(np.zeros((2, 0)))
    with pytest.raises(ValueError, match="same items"):
        paired_difference(np.zeros((2, 3)), np.zeros((2, 4)))
