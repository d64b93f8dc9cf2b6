"""DualProj: the preferred combination projected onto the dual cone of the group gradients."""

from __future__ import annotations

from torch import Tensor

from torchgrain.aggregators._base import Aggregator
from torchgrain.solvers import Solution, dual_proj


class DualProj(Aggregator):
    r"""The preferred combination projected onto the dual cone of the group gradients (alias
    ``"dual_proj"``).

    .. math::
        d = \arg\min_{x} \big\|x - \textstyle\sum_k p_k g_k\big\|^2
            \ \text{ s.t. }\ \langle x, g_k \rangle \ge 0 \ \ \forall k,
        \qquad w = p + \lambda^*,\quad
        \lambda^* = \arg\min_{\lambda \ge 0} \tfrac12 \lambda^\top G \lambda + \lambda^\top G p

    No group's loss increases to first order, and ``w == pref`` exactly whenever the preferred
    combination conflicts with no group (:math:`G p \ge 0`): the least change to the mean that
    removes its conflicts. Solved exactly (:func:`~torchgrain.dual_proj_weights`), float64.

    Example:
        >>> import torch
        >>> from torchgrain.aggregators import DualProj
        >>> g = torch.tensor([[1.0, 0.0], [-2.0, 1.0]], dtype=torch.float64)  # conflicting
        >>> DualProj()(g @ g.T)  # d = (0, 0.5): the mean (-0.5, 0.5) without its part against g_1
        tensor([1.0000, 0.5000], dtype=torch.float64)
    """

    name = "dual_proj"

    def solve(self, gram: Tensor, pref: Tensor | None = None, *, check: bool = True) -> Solution:
        """:func:`torchgrain.solvers.dual_proj`'s report: ``gap`` is the dual's KKT residual."""
        return dual_proj(gram, pref, check=check)
