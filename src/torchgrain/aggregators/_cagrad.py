"""CAGrad: the best worst-group decrease within a ball around the preferred combination."""

from __future__ import annotations

from torch import Tensor

from torchgrain.aggregators._base import Aggregator
from torchgrain.solvers import Solution, cagrad
from torchgrain.solvers._cagrad import check_radius

DEFAULT_C = 0.5  # the paper's most used radius, and the alias "cagrad"'s


class CAGrad(Aggregator):
    r"""CAGrad (Liu et al., 2021; alias ``"cagrad"``, with ``c = 0.5``): the largest decrease of
    the worst group's loss within a ball around the preferred combination.

    .. math::
        d = \arg\max_{x} \min_k \langle g_k, x\rangle \ \text{ s.t. }\
        \|x - g_0\| \le c\,\|g_0\|, \qquad g_0 = \textstyle\sum_k p_k g_k

    ``c = 0`` is the preferred combination itself; larger ``c`` lets the step leave it further
    toward the worst-off group. No sign guarantee. Solved exactly
    (:func:`~torchgrain.cagrad_weights`), float64.

    Args:
        c: the ball's radius over ``||g0||``, a finite float >= 0 (checked here).

    Example:
        >>> import torch
        >>> from torchgrain.aggregators import CAGrad
        >>> CAGrad(c=0.3)(torch.eye(2, dtype=torch.float64))  # orthogonal: d = (1 + c) g0
        tensor([0.6500, 0.6500], dtype=torch.float64)
        >>> CAGrad(c=0.3).name, CAGrad().name
        ('cagrad(c=0.3)', 'cagrad')
    """

    def __init__(self, c: float = DEFAULT_C) -> None:
        check_radius(c)
        self.c = c

    @property
    def name(self) -> str:
        """``"cagrad"`` for the default ``c``, else ``"cagrad(c=...)"``."""
        return "cagrad" if self.c == DEFAULT_C else f"cagrad(c={self.c!r})"

    def solve(self, gram: Tensor, pref: Tensor | None = None, *, check: bool = True) -> Solution:
        """:func:`torchgrain.solvers.cagrad`'s report: KKT residual and the ball's violation."""
        return cagrad(gram, self.c, pref, check=check)

    def __repr__(self) -> str:
        return f"CAGrad(c={self.c!r})"
