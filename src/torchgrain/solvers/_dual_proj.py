"""DualProj: the projection of the preferred combination onto the dual cone of the group gradients.

.. math::
    d = \\arg\\min_{x} \\|x - \\textstyle\\sum_k p_k g_k\\|^2
        \\quad\\text{s.t.}\\quad \\langle x, g_k \\rangle \\ge 0 \\ \\text{for all } k

With ``J`` the ``(m, P)`` matrix of group gradients, ``d = J^T (p + lam)`` where ``lam >= 0`` solves
the dual ``min_{lam >= 0} 1/2 lam^T G lam + lam^T G p`` (:mod:`torchgrain.solvers._cone`).
"""

from __future__ import annotations

from torch import Tensor

from torchgrain.solvers._common import prepare
from torchgrain.solvers._cone import kkt_residual, solve_cone
from torchgrain.solvers._wolfe import Solution


def dual_proj(
    gram: Tensor, pref: Tensor | None = None, *, check: bool = True, masked: bool | None = None
) -> Solution:
    """:func:`dual_proj_weights` with the solver's report; ``gap`` is the dual's relative KKT
    residual (:func:`torchgrain.solvers._cone.kkt_residual`)."""
    G, p, batch_shape = prepare(gram, pref, check=check)
    masked = gram.device.type != "cpu" if masked is None else masked
    q = (G @ p[..., None]).squeeze(-1)  # (N, m) <g_k, v>
    lam, iterations, converged = solve_cone(G, q, masked=masked)
    m = G.shape[-1]
    return Solution(
        weights=(p + lam).reshape(*batch_shape, m),
        gap=kkt_residual(G, q, lam).reshape(batch_shape),
        iterations=iterations.reshape(batch_shape),
        converged=converged.reshape(batch_shape),
    )


def dual_proj_weights(gram: Tensor, pref: Tensor | None = None) -> Tensor:
    r"""Weights of the projection of the preferred combination onto the dual cone (DualProj).

    .. math::
        d = \arg\min_{x} \big\|x - \textstyle\sum_k p_k g_k\big\|^2
            \ \text{ s.t. }\ \langle x, g_k \rangle \ge 0 \ \ \forall k,
        \qquad d = \textstyle\sum_k w_k g_k,\quad w = p + \lambda^*,\quad
        \lambda^* = \arg\min_{\lambda \ge 0} \tfrac12 \lambda^\top G \lambda + \lambda^\top G p

    No group's loss increases to first order (:math:`\langle d, g_k \rangle \ge 0`), and the step
    is the preferred combination itself, ``w == pref`` exactly, whenever that combination conflicts
    with no group (:math:`G p \ge 0`). ``||d|| <= ||sum_k p_k g_k||`` (a projection onto a cone).
    Solved exactly by an active-set method (Lawson–Hanson on the Gram) in float64; scaling
    ``gram`` does not change the weights. Where several ``w`` give the same ``d`` (duplicate or
    opposite gradients) one of them is returned.

    Args:
        gram: ``(m, m)`` or batched ``(..., m, m)`` PSD Gram ``G_kl = <g_k, g_l>``, any float
            dtype and device (the CPU solves on the host; accelerators run a batched masked
            iteration of fixed length that never waits for the device).
        pref: ``(..., m)`` non-negative weights of the combination to project; uniform ``1/m``
            by default (GRAIN passes the sample mean's, group sizes / B).

    Returns:
        ``(..., m)`` float64 non-negative weights ``w``, with ``d = sum_k w_k g_k``.

    Example:
        >>> import torch
        >>> from torchgrain import dual_proj_weights
        >>> g = torch.tensor([[1.0, 0.0], [-2.0, 1.0]], dtype=torch.float64)  # conflicting
        >>> w = dual_proj_weights(g @ g.T)
        >>> d = w @ g
        >>> bool((g @ d >= -1e-12).all())  # no group's loss increases
        True
        >>> h = torch.tensor([[1.0, 0.2], [0.3, 1.0]], dtype=torch.float64)  # no conflict
        >>> dual_proj_weights(h @ h.T)  # the mean, exactly
        tensor([0.5000, 0.5000], dtype=torch.float64)
    """
    return dual_proj(gram, pref).weights
