"""Time and accuracy of every aggregator's solver, per solve, on the CPU.

min_norm (GRAIN's QP): torchgrain's exact solver (Wolfe's min-norm point; the host path, and the
masked batched path that accelerators run) against quadprog (Goldfarb-Idnani, the independent exact
solver of the tests) and MGDA's Frank-Wolfe solver (Sener & Koltun 2018: 250 iterations, tol 1e-5).
Its "gap" is the relative KKT gap (w^T G w - min_k (G w)_k) / max_k G_kk.

dual_proj, upgrad, cagrad: torchgrain's exact active-set solvers (host and masked) against TorchJD
0.18's DualProj / UPGrad (quadprog on G / tr(G) + 1e-4 I) and CAGrad (cvxpy + Clarabel), with
TorchJD's defaults. Their "gap" is the relative KKT residual of the problem each solves exactly:
dual feasibility, complementarity (as products, fair to interior-point answers) and sign of the
projection's dual (for upgrad: the worst of its m projections, each computed by the same code, and
the combination's dual-cone violation), and for cagrad the optimality of the worst group's level
within the ball.

Grams of the kinds GRAIN meets: random group gradients (about half the pairs conflict),
near-identical ones (the common case in fine-tuning) and low-rank ones; worst over the instances.

    python benchmarks/solver.py [--aggregators min_norm dual_proj upgrad cagrad]
        [--sizes 2 8 64 256] [--instances 6] [--csv out.csv]
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

from torchgrain.solvers import cagrad, dual_proj, min_norm_weights, solve, upgrad

try:
    import quadprog
except ImportError:  # pragma: no cover - optional: pip install torchgrain[bench]
    quadprog = None
try:
    import torchjd.aggregation as tjd
    import torchjd.linalg as tjd_linalg
except ImportError:  # pragma: no cover - optional: pip install torchgrain[bench]
    tjd = tjd_linalg = None

CAGRAD_C = 0.5
# The masked path does O(m^3) per iteration and runs its full fixed count: for accelerators and
# small m. CAGrad's runs a root search of cone QPs, each a full masked solve.
MASKED_UP_TO = {"min_norm": 64, "dual_proj": 64, "upgrad": 8, "cagrad": 8}


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
    start = time.perf_counter()
    fn()  # warm-up (and the timing of slow solvers: one repeat is enough past 0.5 s)
    if time.perf_counter() - start > 0.5:
        repeat = 1
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def dual_kkt(G: np.ndarray, p: np.ndarray, w: np.ndarray) -> float:
    """Relative KKT residual of ``min_{lam >= 0} 1/2 lam^T G lam + lam^T G p``, lam = w - p."""
    lam = w - p
    mu = G @ w
    total = 1.0 + np.clip(lam, 0, None).sum()
    scale = np.diag(G).max() * total
    complementarity = np.abs(np.clip(lam, 0, None) * mu).max(initial=0.0) / total
    worst = max((-mu).max(initial=0.0), complementarity, (-lam).max(initial=0.0) * scale)
    return float(worst / scale)


def cagrad_kkt(G: np.ndarray, p: np.ndarray, w: np.ndarray, c: float) -> float:
    """Relative KKT residual of ``max_x min_k <g_k, x>`` s.t. ``||x - g0|| <= c ||g0||``."""
    lam = w - p
    mu = G @ w
    level = mu.min()
    scale = np.diag(G).max() * (1.0 + np.clip(lam, 0, None).sum())
    total = 1.0 + np.clip(lam, 0, None).sum()
    support = np.abs(np.clip(lam, 0, None) * (mu - level)).max(initial=0.0) / (scale * total)
    r2 = c * c * float(p @ G @ p)
    dist2 = float(lam @ G @ lam)
    w0 = min_norm_weights(torch.from_numpy(G)).numpy()
    in_hull = float(w0 @ G @ w0) <= 1e-10 * np.diag(G).max()
    ball = max(dist2 - r2, 0.0) if in_hull and abs(level) <= 1e-12 * scale else abs(dist2 - r2)
    negative = (-lam).max(initial=0.0)
    return float(max(support, ball / scale / (1.0 + np.clip(lam, 0, None).sum()), negative))


def aggregator_solvers(aggregator: str) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Name -> ``G -> weights`` for the solvers of one aggregator (uniform preference)."""
    ours = {
        "dual_proj": dual_proj,
        "upgrad": upgrad,
        "cagrad": lambda G, **kw: cagrad(G, 0.5, **kw),
    }
    fn = ours[aggregator]
    solvers: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "torchgrain (host)": lambda G: fn(torch.from_numpy(G)).weights.numpy(),
        "torchgrain (masked)": lambda G: fn(torch.from_numpy(G), masked=True).weights.numpy(),
    }
    if tjd is not None:
        theirs = {
            "dual_proj": tjd.DualProjWeighting,
            "upgrad": tjd.UPGradWeighting,
            "cagrad": lambda: tjd.CAGradWeighting(c=CAGRAD_C),
        }[aggregator]()
        solvers["torchjd 0.18"] = lambda G: theirs(torch.from_numpy(G)).numpy()
    return solvers


def upgrad_projections(solver: str, G: np.ndarray) -> np.ndarray:
    """``(m, m)``: row k the weights of g_k's projection onto the dual cone, computed as the named
    solver computes UPGrad (ours: the same cone QPs; TorchJD: its default projector)."""
    m = G.shape[0]
    eye = np.eye(m)
    if solver.startswith("torchgrain"):
        masked = solver.endswith("(masked)")
        return dual_proj(torch.from_numpy(G), torch.from_numpy(eye), masked=masked).weights.numpy()
    return tjd_linalg.QuadprogProjector()(torch.from_numpy(eye), torch.from_numpy(G)).numpy()


def residual(aggregator: str, solver: str, G: np.ndarray, w: np.ndarray) -> float:
    m = G.shape[0]
    p = np.full(m, 1.0 / m)
    if aggregator == "min_norm":
        return kkt_gap(G, w)
    if aggregator == "dual_proj":
        return dual_kkt(G, p, w)
    if aggregator == "cagrad":
        return cagrad_kkt(G, p, w, CAGRAD_C)
    W = upgrad_projections(solver, G)
    worst = max(dual_kkt(G, np.eye(m)[k], W[k]) for k in range(m))
    cone = (-(G @ w)).max(initial=0.0) / (np.diag(G).max() * w.sum())  # <d, g_k> >= 0
    return float(max(worst, cone))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--aggregators",
        nargs="+",
        default=list(MASKED_UP_TO),
        choices=list(MASKED_UP_TO),
        help="which aggregators' solvers to compare",
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 8, 64, 256], help="values of m")
    parser.add_argument(
        "--instances", type=int, default=6, help="Gram matrices per m (kinds rotate)"
    )
    parser.add_argument("--repeat", type=int, default=5, help="timed repeats per instance (median)")
    parser.add_argument("--csv", help="also write the table as CSV here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if quadprog is None:
        print(
            "quadprog is not installed (pip install 'torchgrain[bench]'): skipped", file=sys.stderr
        )
    if tjd is None:
        print(
            "torchjd is not installed (pip install 'torchgrain[bench]'): skipped", file=sys.stderr
        )

    rows = []
    for aggregator in args.aggregators:
        if aggregator == "min_norm":
            solvers: dict[str, Callable[[np.ndarray], np.ndarray]] = {
                "torchgrain (host)": lambda G: solve(torch.from_numpy(G)).weights.numpy(),
                "torchgrain (masked)": lambda G: solve(
                    torch.from_numpy(G), masked=True
                ).weights.numpy(),
                "frank-wolfe (MGDA)": frank_wolfe_mgda,
            }
            if quadprog is not None:
                solvers["quadprog"] = quadprog_solver
        else:
            solvers = aggregator_solvers(aggregator)
        for m in args.sizes:
            grams = instances(m, args.instances)
            for name, fn in solvers.items():
                if name == "torchgrain (masked)" and m > MASKED_UP_TO[aggregator]:
                    continue
                gaps = [residual(aggregator, name, G, fn(G)) for G in grams]
                seconds = [timed(lambda G=G, fn=fn: fn(G), args.repeat) for G in grams]
                rows.append(
                    {
                        "aggregator": aggregator,
                        "m": m,
                        "solver": name,
                        "median_us": 1e6 * statistics.median(seconds),
                        "worst_gap": max(gaps),
                        "median_gap": statistics.median(gaps),
                    }
                )
                time_us, gap = rows[-1]["median_us"], max(gaps)
                print(
                    f"{aggregator:9s} m={m:4d}  {name:20s}  {time_us:12.1f} us  gap {gap:.1e}",
                    flush=True,
                )

    print(
        "\n| aggregator | m | solver | time per solve | KKT residual: worst (median) |"
        "\n|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['aggregator']} | {r['m']} | {r['solver']} | {r['median_us']:.0f} us "
            f"| {r['worst_gap']:.0e} ({r['median_gap']:.0e}) |"
        )
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
