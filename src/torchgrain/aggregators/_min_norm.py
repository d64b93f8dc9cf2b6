"""MinNorm: GRAIN's own aggregator, the min-norm point of the hull of the group gradients."""

from __future__ import annotations

from torch import Tensor

from torchgrain.aggregators._base import Aggregator
from torchgrain.solvers import Solution, solve


class MinNorm(Aggregator):
    r"""The point of the convex hull of the group gradients nearest the origin (the paper's GRAIN,
    alias ``"min_norm"``, GRAIN's default).

    .. math::
        w^* = \arg\min_{w \ge 0,\ \sum_k w_k = 1} w^\top G w, \qquad
        d = \textstyle\sum_k w^*_k g_k, \qquad \langle d, g_k \rangle \ge \|d\|^2 \ \ \forall k

    No group's loss increases to first order. ``pref`` is not used: the hull has no preferred
    point. Solved exactly by Wolfe's algorithm (:func:`~torchgrain.min_norm_weights`); the weights
    come back in the Gram's dtype.

    Example:
        >>> import torch
        >>> from torchgrain.aggregators import MinNorm
        >>> g = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)  # orthogonal
        >>> MinNorm()(g @ g.T)  # leans to the shorter gradient: w_k proportional to 1/||g_k||^2
        tensor([0.8000, 0.2000], dtype=torch.float64)
    """

    name = "min_norm"

    def solve(self, gram: Tensor, pref: Tensor | None = None, *, check: bool = True) -> Solution:
        """:func:`torchgrain.solvers.solve`'s report: ``gap`` is the optimality gap."""
        return solve(gram, check=check)
