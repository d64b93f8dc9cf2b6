"""Time and accuracy of the min-norm QP solvers, per solve, on the CPU.

Compares torchgrain's exact solver (Wolfe's min-norm point; host path, and the masked batched path
that accelerators run) with quadprog (Goldfarb-Idnani, the independent exact solver of the tests)
and with MGDA's Frank-Wolfe solver (Sener & Koltun 2018: 250 iterations, tol 1e-5), on Grams of the
kinds GRAIN meets: random group gradients, near-identical ones (the common case in fine-tuning),
and low-rank ones. "gap" is the relative KKT gap (w^T G w - min_k (G w)_k) / max_k G_kk, worst over
the instances; 0 is exact.

    python benchmarks/solver.py [--sizes 2 8 64 256] [--instances 5] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from torchgrain.solvers import solve

try:
    import quadprog
except ImportError:  # pragma: no cover - optional: pip install torchgrain[bench]
    quadprog = None


def frank_wolfe_mgda(G: np.ndarray, max_iter: int = 250, tol: float = 1e-5) -> np.ndarray:
    """MGDA's Frank-Wolfe min-norm solver on a Gram matrix (Sener & Koltun 2018, Alg. 2)."""
    m = G.shape[0]
    # Start from the best pair (the solver's own initialisation), or the single point if m = 1.
    w = np.zeros(m)
    if m == 1:
        return np.ones(1)
    best = np.inf
    for i in range(m):
        for j in range(i + 1, m):
            gamma = _line_min(G[i, i], G[i, j], G[j, j])
            cost = (
                gamma**2 * G[i, i] + 2 * gamma * (1 - gamma) * G[i, j] + (1 - gamma) ** 2 * G[j, j]
            )
            if cost < best:
                best, w = cost, np.zeros(m)
                w[i], w[j] = gamma, 1 - gamma
    for _ in range(max_iter):
        Gw = G @ w
        t = int(np.argmin(Gw))
        gamma = _line_min(w @ Gw, Gw[t], G[t, t])  # between the current point and g_t
        new = gamma * w
        new[t] += 1 - gamma
        if np.abs(new - w).sum() < tol:
            return new
        w = new
    return w


def _line_min(aa: float, ab: float, bb: float) -> float:
    """gamma in [0, 1] minimising ||gamma a + (1 - gamma) b||^2."""
    denom = aa + bb - 2 * ab
    return 0.5 if denom <= 0 else float(np.clip((bb - ab) / denom, 0.0, 1.0))


def quadprog_solver(G: np.ndarray) -> np.ndarray:
    m = G.shape[0]
    scale = max(float(np.diag(G).max()), 1e-300)
    C = np.concatenate([np.ones((m, 1)), np.eye(m)], axis=1)
    b = np.concatenate([[1.0], np.zeros(m)])
    # quadprog needs a positive definite matrix: a 1e-12 ridge on the normalised Gram.
    return quadprog.solve_qp(G / scale + 1e-12 * np.eye(m), np.zeros(m), C, b, meq=1)[0]


def instances(m: int, count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed + m)
    out = []
    for i in range(count):
        P = 2 * m + 16
        kind = i % 3
        if kind == 0:  # random group gradients
            F = rng.standard_normal((m, P))
        elif kind == 1:  # near-identical: a shared direction plus 5% noise
            F = rng.standard_normal((1, P)) + 0.05 * rng.standard_normal((m, P))
        else:  # low rank: m gradients in a 4-dimensional subspace
            F = rng.standard_normal((m, 4)) @ rng.standard_normal((4, P))
        out.append(F @ F.T)
    return out


def kkt_gap(G: np.ndarray, w: np.ndarray) -> float:
    w = np.clip(w, 0, None)
    w = w / w.sum()
    Gw = G @ w
    return float((w @ Gw - Gw.min()) / np.diag(G).max())


def timed(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 8, 64, 256], help="values of m")
    parser.add_argument(
        "--instances", type=int, default=6, help="Gram matrices per m (kinds rotate)"
    )
    parser.add_argument("--repeat", type=int, default=5, help="timed repeats per instance (median)")
    parser.add_argument("--csv", help="also write the table as CSV here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    solvers: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "torchgrain (host)": lambda G: solve(torch.from_numpy(G)).weights.numpy(),
        "torchgrain (masked)": lambda G: solve(torch.from_numpy(G), masked=True).weights.numpy(),
        "frank-wolfe (MGDA)": frank_wolfe_mgda,
    }
    if quadprog is not None:
        solvers["quadprog"] = quadprog_solver
    else:
        print(
            "quadprog is not installed (pip install 'torchgrain[bench]'): skipped", file=sys.stderr
        )

    rows = []
    for m in args.sizes:
        grams = instances(m, args.instances)
        for name, fn in solvers.items():
            if name == "torchgrain (masked)" and m > 64:
                continue  # the masked path does O(m^3) per iteration: for accelerators, small m
            gaps = [kkt_gap(G, fn(G)) for G in grams]
            seconds = [timed(lambda G=G, fn=fn: fn(G), args.repeat) for G in grams]
            rows.append(
                {
                    "m": m,
                    "solver": name,
                    "median_us": 1e6 * statistics.median(seconds),
                    "worst_gap": max(gaps),
                    "median_gap": statistics.median(gaps),
                }
            )
            time_us, gap = rows[-1]["median_us"], max(gaps)
            print(f"m={m:4d}  {name:20s}  {time_us:10.1f} us  worst gap {gap:.1e}", flush=True)

    print("\n| m | solver | time per solve | worst relative KKT gap |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['m']} | {r['solver']} | {r['median_us']:.0f} us | {r['worst_gap']:.0e} |")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
