"""Mean: the preferred combination itself (inside GRAIN, the sample mean's step)."""

from __future__ import annotations

import torch
from torch import Tensor

from torchgrain.aggregators._base import Aggregator
from torchgrain.solvers import Solution
from torchgrain.solvers._common import prepare


class Mean(Aggregator):
    r"""The preferred combination, unchanged (alias ``"mean"``): inside GRAIN the step of
    ``losses.mean().backward()`` with all of GRAIN's diagnostics, the baseline at GRAIN's cost;
    inside LocalSGD plain model averaging.

    .. math::
        w = p, \qquad d = \textstyle\sum_k p_k g_k

    No guarantee: ``stats.mean_conflict`` says how often this step raises some group's loss.
    ``pref`` defaults to uniform ``1/m``; the weights are float64.

    Example:
        >>> import torch
        >>> from torchgrain.aggregators import Mean
        >>> Mean()(torch.eye(3), torch.tensor([0.5, 0.25, 0.25]))
        tensor([0.5000, 0.2500, 0.2500], dtype=torch.float64)
    """

    name = "mean"

    def solve(self, gram: Tensor, pref: Tensor | None = None, *, check: bool = True) -> Solution:
        """``pref`` (a copy) with a zero gap and 0 iterations."""
        if check:
            prepare(gram, pref)  # the checks only
        m = gram.shape[-1]
        if pref is None:
            pref = torch.full((m,), 1.0 / m, dtype=torch.float64, device=gram.device)
        p = pref.detach().to(device=gram.device, dtype=torch.float64)
        weights = torch.broadcast_tensors(p, gram.diagonal(dim1=-2, dim2=-1))[0].clone()  # (..., m)
        batch_shape = weights.shape[:-1]
        zero = torch.zeros(batch_shape, dtype=torch.float64, device=gram.device)
        return Solution(
            weights=weights,
            gap=zero,
            iterations=zero.long(),
            converged=torch.ones(batch_shape, dtype=torch.bool, device=gram.device),
        )
