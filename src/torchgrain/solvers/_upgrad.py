"""UPGrad (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024): the
preferred combination of every group gradient's own projection onto the dual cone.

.. math::
    d = \\textstyle\\sum_k p_k \\, \\Pi(g_k), \\qquad
    \\Pi(g_k) = \\arg\\min_{x:\\ \\langle x, g_j \\rangle \\ge 0\\ \\forall j} \\|x - g_k\\|^2
        = J^\\top (e_k + \\lambda^{(k)})

so ``w = p + sum_k p_k lam^(k)``, with ``lam^(k)`` from the cone QP with ``q = G e_k``: m problems
of size m, solved as one batch. TorchJD solves the same problems with quadprog on ``G / tr(G) +
1e-4 I``; here they are solved exactly, with no ridge.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torchgrain.solvers._common import prepare
from torchgrain.solvers._cone import kkt_residual, solve_cone
from torchgrain.solvers._wolfe import Solution


def upgrad(
    gram: Tensor, pref: Tensor | None = None, *, check: bool = True, masked: bool | None = None
) -> Solution:
    """:func:`upgrad_weights` with the solver's report: ``gap`` is the worst relative KKT residual
    of the m projections, ``iterations`` their total."""
    G, p, batch_shape = prepare(gram, pref, check=check)
    masked = gram.device.type != "cpu" if masked is None else masked
    N, m = p.shape
    # Problem (n, k) projects g_k for Gram n: q = G e_k (0 where p_k = 0: nothing to project).
    Gk = G[:, None].expand(N, m, m, m).reshape(N * m, m, m)
    q = torch.where(p[..., None] > 0, G.transpose(-1, -2), 0.0).reshape(N * m, m)  # row k: G e_k
    lam, iterations, converged = solve_cone(Gk, q, masked=masked)
    gap = kkt_residual(Gk, q, lam).reshape(N, m).amax(-1)
    lam = lam.reshape(N, m, m)  # (N, k, j): lam^(k)_j
    weights = p + torch.einsum("nk,nkj->nj", p, lam)
    return Solution(
        weights=weights.reshape(*batch_shape, m),
        gap=gap.reshape(batch_shape),
        iterations=iterations.reshape(N, m).sum(-1).reshape(batch_shape),
        converged=converged.reshape(N, m).all(-1).reshape(batch_shape),
    )


def upgrad_weights(gram: Tensor, pref: Tensor | None = None) -> Tensor:
    r"""Weights of UPGrad: the preferred combination of the group gradients' projections onto
    the dual cone.

    .. math::
        d = \textstyle\sum_k p_k\, \Pi(g_k),\qquad
        \Pi(g_k) = \arg\min_{x} \|x - g_k\|^2 \ \text{ s.t. }\
        \langle x, g_j\rangle \ge 0 \ \ \forall j

    Every projection lies in the dual cone, so their non-negative combination does too: no
    group's loss increases to first order (:math:`\langle d, g_k \rangle \ge 0`). Where no two
    groups conflict (:math:`G \ge 0` entrywise) every :math:`\Pi(g_k) = g_k` and ``w == pref``
    exactly. The m projections are solved exactly (Lawson–Hanson on the Gram, float64, no ridge);
    scaling ``gram`` does not change the weights.

    Args:
        gram: ``(m, m)`` or batched ``(..., m, m)`` PSD Gram, any float dtype and device (host
            solve on the CPU, a batched masked iteration on accelerators).
        pref: ``(..., m)`` non-negative weights of the combination; uniform ``1/m`` by default.

    Returns:
        ``(..., m)`` float64 non-negative weights ``w``, with ``d = sum_k w_k g_k``.

    Example:
        >>> import torch
        >>> from torchgrain import upgrad_weights
        >>> g = torch.tensor([[1.0, 0.0], [-2.0, 1.0]], dtype=torch.float64)  # conflicting
        >>> w = upgrad_weights(g @ g.T)
        >>> d = w @ g
        >>> bool((g @ d >= -1e-12).all())  # no group's loss increases
        True
    """
    return upgrad(gram, pref).weights
