"""Small-sample statistics for comparing methods over seeds, in NumPy with fixed RNG seeds.

- :func:`std_ratio_ci`: run-to-run standard deviation ratio ``std(a) / std(b)`` with a
  percentile bootstrap 95% interval (seeds resampled within each method).
- :func:`spread_test`: does the spread differ? A permutation test of the Brown–Forsythe
  statistic (the difference of mean absolute deviations from each method's median), which,
  unlike the F test, does not assume normal metrics.
- :func:`paired_mean_test`: does the mean differ? Runs of the two methods with the same seed
  share the head, the data order and dropout, so the test is on per-seed differences: an exact
  sign-flip permutation test (all 2^n sign patterns up to n = 16, 20,000 random ones beyond).
- :func:`paired_std_ratio_ci` and :func:`paired_spread_test`: the paired counterparts of the first
  two, for many seeds (``torchgrain study``): the bootstrap resamples seeds jointly, and the
  spread test is a permutation Pitman–Morgan test (the correlation of the pairs' sums and
  differences, each centred), which holds its level when the means differ.
- :func:`holm`: Holm's step-down adjustment of p-values over many comparisons.

With 5 seeds a p-value can be no smaller than 1/16 (paired) and an interval is wide: these tests
say what the data can show, and a "no difference" answer is often "not enough seeds".
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

BOOTSTRAP = 10_000
PERMUTATIONS = 20_000


def std_ratio_ci(a: np.ndarray, b: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """``std(a) / std(b)`` (ddof 1) and its bootstrap 95% interval; NaN when undefined."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or len(b) < 2 or np.std(b, ddof=1) == 0:
        return float("nan"), float("nan"), float("nan")
    ratio = float(np.std(a, ddof=1) / np.std(b, ddof=1))
    rng = np.random.default_rng(seed)
    sa = rng.choice(a, size=(BOOTSTRAP, len(a))).std(axis=1, ddof=1)
    sb = rng.choice(b, size=(BOOTSTRAP, len(b))).std(axis=1, ddof=1)
    ok = sb > 0
    lo, hi = np.percentile(sa[ok] / sb[ok], [2.5, 97.5])
    return ratio, float(lo), float(hi)


def spread_test(a: np.ndarray, b: np.ndarray, seed: int = 0) -> float:
    """Two-sided permutation p-value for a difference in spread (Brown–Forsythe statistic)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    dev = np.concatenate([np.abs(a - np.median(a)), np.abs(b - np.median(b))])
    return _two_sample_perm(dev, len(a), seed)


def paired_mean_test(a: np.ndarray, b: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """Mean of ``a - b`` over paired seeds and its two-sided sign-flip permutation p-value."""
    diff = np.asarray(a, float) - np.asarray(b, float)
    n = len(diff)
    if n == 0:
        return float("nan"), float("nan")
    observed = abs(diff.mean())
    tol = 1e-12 * max(1.0, observed)
    if n <= 16:  # exact: every sign pattern, the observed one among them
        signs = np.array(list(itertools.product([1.0, -1.0], repeat=n)))  # (2^n, n)
        null = np.abs((signs * diff).mean(axis=1))
        return float(diff.mean()), float(np.mean(null >= observed - tol))
    signs = np.random.default_rng(seed).choice([1.0, -1.0], size=(PERMUTATIONS, n))
    null = np.abs((signs * diff).mean(axis=1))
    # the observed labelling counts as one permutation, so p > 0
    return float(diff.mean()), float((np.sum(null >= observed - tol) + 1) / (PERMUTATIONS + 1))


def paired_spread_test(
    a: np.ndarray, b: np.ndarray, seed: int = 0, permutations: int = 10_000
) -> float:
    """Two-sided p-value for ``var(a) != var(b)`` on paired samples, whatever their means: a
    permutation form of the Pitman–Morgan test.

    ``var(a) - var(b) = cov(a + b, a - b)``, so equal variances mean no correlation between the
    pairs' sums ``S`` and differences ``D``. Each is centred on its own mean (a shift of either
    arm's mean changes nothing), and the null distribution of ``|sum_i S_i D_i|`` comes from
    flipping the signs of ``D`` at random: exact when each pair's two values, less their arms'
    means, are exchangeable (a bivariate normal with equal variances, any correlation, is). The
    sign flips leave ``sum S_i^2`` and ``sum D_i^2`` unchanged, so this statistic orders the
    permutations as ``|corr(S, D)|`` and the log variance ratio do.

    The first form of this test swapped the raw values of a pair; a difference between the arms'
    means then leaked into the variance test (false positives at 0.16-0.31 for a 3-5 std shift
    at n = 60; ``tests/experiments/test_stats.py`` checks the level by simulation).
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    n = len(a)
    if n < 3:
        return float("nan")
    s, d = a + b, a - b
    s, d = s - s.mean(), d - d.mean()
    observed = abs(float(s @ d))
    signs = np.where(np.random.default_rng(seed).random((permutations, n)) < 0.5, -1.0, 1.0)
    null = np.abs((signs * d) @ s)  # (permutations,)
    tol = 1e-12 * max(1.0, observed)
    # the observed labelling counts as one permutation, so p > 0
    return float((np.sum(null >= observed - tol) + 1) / (permutations + 1))


def paired_std_ratio_ci(
    a: np.ndarray, b: np.ndarray, seed: int = 0, bootstrap: int = 5_000
) -> tuple[float, float, float]:
    """``std(a) / std(b)`` and its 95% paired bootstrap interval (pairs resampled jointly)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    n = len(a)
    if n < 3 or b.std(ddof=1) == 0:
        return float("nan"), float("nan"), float("nan")
    ratio = float(a.std(ddof=1) / b.std(ddof=1))
    idx = np.random.default_rng(seed).integers(0, n, size=(bootstrap, n))
    sa, sb = a[idx].std(axis=1, ddof=1), b[idx].std(axis=1, ddof=1)
    ok = sb > 0
    lo, hi = np.percentile(sa[ok] / sb[ok], [2.5, 97.5])
    return ratio, float(lo), float(hi)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN stays NaN and does not count)."""
    order = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    adjusted = [float("nan")] * len(pvalues)
    running, k = 0.0, len(order)
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (k - rank) * p))
        adjusted[i] = running
    return adjusted


def finite_or_none(value: Any) -> Any:
    """JSON has no NaN or infinity: a non-finite float (a diverged run's metric) becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def mean_of(values: list[float | None]) -> float | None:
    """The mean of the finite values, or None when there are none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def _two_sample_perm(values: np.ndarray, n_a: int, seed: int) -> float:
    """Permutation p-value of |mean(first n_a) - mean(rest)| under exchangeable labels."""
    observed = abs(values[:n_a].mean() - values[n_a:].mean())
    rng = np.random.default_rng(seed)
    idx = np.argsort(rng.random((PERMUTATIONS, len(values))), axis=1)
    perm = values[idx]  # (P, n)
    null = np.abs(perm[:, :n_a].mean(axis=1) - perm[:, n_a:].mean(axis=1))
    # the observed labelling counts as one permutation, so p > 0
    return float((np.sum(null >= observed - 1e-12 * max(1.0, observed)) + 1) / (PERMUTATIONS + 1))
