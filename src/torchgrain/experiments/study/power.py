"""How many seeds does the study need to see a 30% change of run-to-run spread?

Monte-Carlo power of the study's own spread test
(:func:`torchgrain.experiments.stats.paired_spread_test`): pairs ``(a, b)`` drawn from a bivariate
normal with ``std(a) / std(b) = ratio`` and correlation ``rho`` (runs of two methods on the same
seed share the head and the data order, so they correlate), the test run at level ``alpha``, the
share of rejections counted. Run it as

    python -m torchgrain.experiments.study.power [--rho 0 0.5 0.8] [--seeds 20 40 60]

The table it prints, and the correlations the study measured, are in ``docs/study.md``.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from torchgrain.experiments.stats import paired_spread_test


def spread_power(
    n: int,
    ratio: float = 0.7,
    rho: float = 0.5,
    alpha: float = 0.05,
    sims: int = 400,
    seed: int = 0,
) -> float:
    """The share of ``sims`` simulated cells of ``n`` paired seeds in which the paired spread
    test rejects equal spread at ``alpha``."""
    rng = np.random.default_rng(seed)
    cov = np.array([[ratio**2, rho * ratio], [rho * ratio, 1.0]])
    hits = 0
    for i in range(sims):
        a, b = rng.multivariate_normal([0.0, 0.0], cov, size=n).T
        hits += paired_spread_test(a, b, seed=i) < alpha
    return hits / sims


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.7, help="std ratio to detect (0.7)")
    parser.add_argument("--rho", type=float, nargs="+", default=[0.0, 0.5, 0.8])
    parser.add_argument("--seeds", type=int, nargs="+", default=[10, 20, 30, 40, 60])
    parser.add_argument("--sims", type=int, default=400)
    args = parser.parse_args(argv)
    print(f"power to detect std ratio {args.ratio} at alpha 0.05 ({args.sims} simulations)")
    print("| seeds | " + " | ".join(f"rho = {r:g}" for r in args.rho) + " |")
    print("|---|" + "---|" * len(args.rho))
    for n in args.seeds:
        cells = [f"{spread_power(n, args.ratio, r, sims=args.sims):.2f}" for r in args.rho]
        print(f"| {n} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
