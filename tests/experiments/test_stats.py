"""The statistics behind the reproduction's tables, against cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from torchgrain.experiments.stats import paired_mean_test, spread_test, std_ratio_ci


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
