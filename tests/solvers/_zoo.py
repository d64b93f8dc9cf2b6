"""A named zoo of Gram matrices for the solver's property tests: every case the QP meets in
training, and the edge cases that break approximate solvers."""

from __future__ import annotations

import torch
from torch import Tensor


def _gram(F: Tensor) -> Tensor:
    return F @ F.T


def zoo() -> dict[str, Tensor]:
    """``name -> (m, m)`` float64 PSD Gram, built from seeded group gradients ``F`` (m, P)."""
    g = torch.Generator().manual_seed(1234)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    base = randn(1, 50)
    cases = {
        "m1": _gram(randn(1, 10)),
        "m1_zero": torch.zeros(1, 1, dtype=torch.float64),
        "all_zero": torch.zeros(5, 5, dtype=torch.float64),
        "orthogonal": torch.eye(6, dtype=torch.float64),
        "orthogonal_uneven": torch.diag(torch.tensor([1.0, 4.0, 9.0, 1e-4], dtype=torch.float64)),
        "rank1_same_direction": _gram(
            torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64) * base
        ),
        "rank1_opposite": _gram(torch.tensor([[1.0], [-2.0]], dtype=torch.float64) * base),
        "opposite_pair_plus_one": _gram(torch.cat([base, -base, randn(1, 50)])),
        "duplicates": _gram(torch.cat([base, base, base, randn(2, 50)])),
        "duplicate_of_optimum": _gram(torch.cat([randn(3, 50)] * 2)),
        "rank_deficient_8_in_3": _gram(randn(8, 3) @ randn(3, 50)),
        "more_groups_than_dims": _gram(randn(16, 4)),
        "near_identical_8": _gram(base + 1e-3 * randn(8, 50)),
        "near_identical_64": _gram(base + 1e-2 * randn(64, 50)),
        "one_zero_gradient": _gram(
            torch.cat([randn(3, 20), torch.zeros(1, 20, dtype=torch.float64)])
        ),
        "random_2": _gram(randn(2, 30)),
        "random_8": _gram(randn(8, 30)),
        "random_64": _gram(randn(64, 200)),
        "random_256": _gram(randn(256, 400)),
        "conflicting_8": _gram(randn(8, 30) - 0.5 * base[:, :30]),
        "ill_conditioned": _gram(
            torch.linalg.qr(randn(6, 6)).Q
            @ torch.diag(torch.logspace(0, -8, 6, dtype=torch.float64))
            @ randn(6, 40)
        ),
        "scale_1e-30": 1e-30 * _gram(randn(8, 30)),
        "scale_1e30": 1e30 * _gram(randn(8, 30)),
        "mixed_scales": _gram(
            torch.logspace(-6, 6, 7, dtype=torch.float64)[:, None] * randn(7, 30)
        ),
    }
    # Rank 3 with a common direction: CAGrad's cone QP meets vectors in the span of its passive
    # set here (the ray step). Its own generator leaves the cases above as they were.
    h = torch.Generator().manual_seed(4321)
    shared = torch.randn(1, 50, generator=h, dtype=torch.float64)
    mix = torch.randn(12, 3, generator=h, dtype=torch.float64)
    spread = torch.randn(3, 50, generator=h, dtype=torch.float64)
    cases["rank_deficient_12_in_3_shared"] = _gram(mix @ (0.3 * shared + spread))
    return cases


def kkt_gap(gram: Tensor, weights: Tensor) -> float:
    """Relative optimality gap ``(w^T G w - min_k (G w)_k) / max_k G_kk`` (0 when G = 0)."""
    G = gram.to(torch.float64)
    w = weights.to(torch.float64)
    Gw = G @ w
    scale = float(G.diagonal().max())
    if scale <= 0:
        return 0.0
    return float((w @ Gw - Gw.min()) / scale)
