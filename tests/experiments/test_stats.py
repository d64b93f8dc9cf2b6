"""The statistics behind the reproduction's tables, against cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from torchgrain.experiments.stats import (
    paired_mean_test,
    paired_spread_test,
    spread_test,
    std_ratio_ci,
)


def test_std_ratio_of_a_scaled_sample_is_the_scale():
    rng = np.random.default_rng(0)
    b = rng.normal(size=8)
    ratio, lo, hi = std_ratio_ci(0.5 * b + 3.0, b)
    assert ratio == pytest.approx(0.5)
    assert lo <= ratio <= hi


def test_std_ratio_undefined_for_constant_baseline_or_one_seed():
    assert np.isnan(std_ratio_ci(np.array([1.0, 2.0]), np.array([1.0, 1.0]))[0])
    assert np.isnan(std_ratio_ci(np.array([1.0]), np.array([1.0, 2.0]))[0])


def test_paired_sign_flip_is_exact_for_small_n():
    # all five differences positive: only the all-plus and all-minus patterns are as extreme
    diff, p = paired_mean_test(np.arange(5.0) + 1.0, np.zeros(5))
    assert diff == pytest.approx(3.0)
    assert p == pytest.approx(2 / 32)


def test_sampled_sign_flips_never_give_p_zero():
    # above 16 seeds the sign patterns are sampled; the observed one counts, so p > 0
    _, p = paired_mean_test(np.arange(20.0) + 1.0, np.zeros(20))
    assert 0.0 < p <= 2 / 20_000


def test_paired_test_sees_no_difference_in_identical_runs():
    a = np.array([0.9, 0.8, 0.85])
    diff, p = paired_mean_test(a, a)
    assert diff == 0.0
    assert p == 1.0


def test_spread_test_separates_very_different_spreads_only():
    rng = np.random.default_rng(1)
    wide, narrow = rng.normal(scale=10.0, size=12), rng.normal(scale=0.1, size=12)
    assert spread_test(wide, narrow) < 0.01
    same = spread_test(rng.normal(size=12), rng.normal(size=12))
    assert same > 0.05


def _paired_normal(rng: np.random.Generator, n: int, rho: float, ratio: float, shift: float):
    """n pairs: b standard normal, a with std ``ratio`` and mean ``shift``, correlation rho."""
    cov = [[ratio**2, rho * ratio], [rho * ratio, 1.0]]
    x = rng.multivariate_normal([shift, 0.0], cov, size=n)
    return x[:, 0], x[:, 1]


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("shift", [0.0, 5.0])
def test_paired_spread_test_holds_its_level_when_the_means_differ(rho: float, shift: float):
    """Equal variances, any correlation, means 0 or 5 std apart: the false-positive rate at
    alpha = 0.05 over 300 simulated experiments of 30 pairs stays within sampling error of 5%
    (the first form of the test, which swapped raw values, gave 0.31 at rho 0 and a 5-std shift,
    and 0.003 at rho 0.9)."""
    rng = np.random.default_rng(0)
    rejected = 0
    for i in range(300):
        a, b = _paired_normal(rng, 30, rho, 1.0, shift)
        rejected += paired_spread_test(a, b, seed=i, permutations=499) < 0.05
    assert 0.015 <= rejected / 300 <= 0.09


def test_paired_spread_test_keeps_its_power():
    """A std ratio of 0.6 at 30 pairs, correlation 0.5, with or without a mean shift."""
    rng = np.random.default_rng(1)
    for shift in (0.0, 5.0):
        found = sum(
            paired_spread_test(*_paired_normal(rng, 30, 0.5, 0.6, shift), seed=i, permutations=499)
            < 0.05
            for i in range(100)
        )
        assert found >= 60, (shift, found)
