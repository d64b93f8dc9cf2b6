"""The exact solver against an independent QP solver (Goldfarb-Idnani dual active set, quadprog)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.solvers._zoo import kkt_gap, zoo
from torchgrain import min_norm_weights

quadprog = pytest.importorskip("quadprog")


def quadprog_weights(gram: torch.Tensor, ridge: float = 1e-12) -> np.ndarray:
    """min w^T G w on the simplex with quadprog (which needs G positive definite: a tiny ridge)."""
    G = gram.double().numpy()
    scale = max(float(np.diag(G).max()), 1e-300)
    G = G / scale
    m = G.shape[0]
    C = np.concatenate([np.ones((m, 1)), np.eye(m)], axis=1)  # sum w = 1, w >= 0
    b = np.concatenate([[1.0], np.zeros(m)])
    w = quadprog.solve_qp(G + ridge * np.eye(m), np.zeros(m), C, b, meq=1)[0]
    # quadprog meets its constraints to ~1e-10 only: put its answer back on the simplex, so that
    # the objectives compare feasible points.
    w = np.clip(w, 0.0, None)
    return w / w.sum()


@pytest.mark.parametrize("name", sorted(set(zoo()) - {"all_zero", "m1_zero"}))
def test_objective_never_worse_than_quadprog(name: str) -> None:
    gram = zoo()[name]
    scale = float(gram.diagonal().max())
    ours = min_norm_weights(gram)
    theirs = torch.from_numpy(quadprog_weights(gram))
    obj_ours = float(ours @ gram @ ours) / scale
    obj_theirs = float(theirs @ gram @ theirs) / scale
    assert obj_ours <= obj_theirs + 1e-10
    assert kkt_gap(gram, ours) <= kkt_gap(gram, theirs) + 1e-10


@pytest.mark.parametrize("seed", range(20))
def test_same_minimiser_on_random_full_rank_grams(seed: int) -> None:
    """Where the minimiser is unique (full-rank Gram), both solvers find the same weights."""
    g = torch.Generator().manual_seed(seed)
    m = int(torch.randint(2, 24, (), generator=g))
    F = torch.randn(m, m + 10, generator=g, dtype=torch.float64)
    F = F + float(torch.rand((), generator=g)) * 3 * torch.randn(
        1, m + 10, generator=g, dtype=torch.float64
    )
    gram = F @ F.T
    torch.testing.assert_close(
        min_norm_weights(gram),
        torch.from_numpy(quadprog_weights(gram, ridge=0.0)),
        rtol=0,
        atol=1e-7,
    )
