"""Closed-form min-norm weights for m <= 2: the test oracle of the general solver."""

from __future__ import annotations

import torch
from torch import Tensor


def min_norm_weights_closed_form(gram: Tensor) -> Tensor:
    """Exact weights for ``(..., m, m)`` Grams with m in {1, 2}.

    For two points the min-norm point of the segment ``[g_1, g_2]`` is ``g_2 + t (g_1 - g_2)`` with
    ``t = clip(<g_2, g_2 - g_1> / ||g_1 - g_2||^2, 0, 1)``; when ``g_1 = g_2`` every ``t`` is
    optimal and ``t = 1/2`` is returned.

    Example:
        >>> import torch
        >>> min_norm_weights_closed_form(torch.tensor([[1.0, 0.0], [0.0, 4.0]]))
        tensor([0.8000, 0.2000])
    """
    m = gram.shape[-1]
    if m == 1:
        return torch.ones(gram.shape[:-1], dtype=gram.dtype, device=gram.device)
    if m != 2:
        raise ValueError(f"the closed form covers m <= 2, got m = {m}; use min_norm_weights")
    g11, g22, g12 = gram[..., 0, 0], gram[..., 1, 1], gram[..., 0, 1]
    denom = g11 + g22 - 2 * g12  # ||g_1 - g_2||^2
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    t = torch.where(denom > 0, ((g22 - g12) / safe).clamp(0, 1), torch.full_like(denom, 0.5))
    return torch.stack([t, 1 - t], dim=-1)
