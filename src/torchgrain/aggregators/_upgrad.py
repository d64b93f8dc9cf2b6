"""UPGrad: the preferred combination of each group gradient's projection onto the dual cone."""

from __future__ import annotations

from torch import Tensor

from torchgrain.aggregators._base import Aggregator
from torchgrain.solvers import Solution, upgrad


class UPGrad(Aggregator):
    r"""UPGrad (Quinton & Rey, 2024; alias ``"upgrad"``): each group gradient projected onto the
    dual cone on its own, then combined with the preferred weights.

    .. math::
        d = \textstyle\sum_k p_k\, \Pi(g_k),\qquad
        \Pi(g_k) = \arg\min_{x} \|x - g_k\|^2 \ \text{ s.t. }\
        \langle x, g_j\rangle \ge 0 \ \ \forall j

    No group's loss increases to first order, with the groups treated more evenly than by
    :class:`DualProj`; ``w == pref`` exactly where no two groups conflict (:math:`G \ge 0`).
    The m projections are solved exactly, with no ridge (:func:`~torchgrain.upgrad_weights`).

    Example:
        >>> import torch
        >>> from torchgrain.aggregators import UPGrad
        >>> g = torch.tensor([[1.0, 0.0], [-2.0, 1.0]], dtype=torch.float64)  # conflicting
        >>> w = UPGrad()(g @ g.T)
        >>> bool((g @ (w @ g) >= -1e-12).all())  # no group's loss increases
        True
    """

    name = "upgrad"

    def solve(self, gram: Tensor, pref: Tensor | None = None, *, check: bool = True) -> Solution:
        """:func:`torchgrain.solvers.upgrad`'s report: the worst projection's KKT residual."""
        return upgrad(gram, pref, check=check)
