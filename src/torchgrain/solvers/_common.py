"""What every aggregator does to its inputs: validate the Gram and the preferred weights, flatten
the batch dimensions, and go to float64."""

from __future__ import annotations

import torch
from torch import Tensor

from torchgrain.solvers._wolfe import _validate


def prepare(
    gram: Tensor, pref: Tensor | None, *, check: bool = True
) -> tuple[Tensor, Tensor, torch.Size]:
    """``(..., m, m)`` Gram and optional ``(..., m)`` pref -> float64 ``(N, m, m)`` Gram, ``(N, m)``
    pref (uniform ``1/m`` when ``None``) and the batch shape ``...``: the two batch shapes
    broadcast (one Gram with several prefs, or the reverse).

    ``check`` validates both (one host sync on accelerators, as in :func:`min_norm_weights`)."""
    if check:
        _validate(gram)
    m = gram.shape[-1]
    if pref is None:
        batch_shape = gram.shape[:-2]
        G = gram.detach().to(torch.float64).reshape(-1, m, m)  # (N, m, m)
        p = torch.full((G.shape[0], m), 1.0 / m, dtype=torch.float64, device=gram.device)
        return G, p, batch_shape
    if check:
        _validate_pref(pref, gram)
    batch_shape = torch.broadcast_shapes(gram.shape[:-2], pref.shape[:-1])
    G = gram.detach().to(torch.float64).expand(*batch_shape, m, m).reshape(-1, m, m)
    p = pref.detach().to(device=gram.device, dtype=torch.float64)
    p = p.expand(*batch_shape, m).reshape(-1, m)  # (N, m)
    return G, p, batch_shape


def _validate_pref(pref: Tensor, gram: Tensor) -> None:
    m = gram.shape[-1]
    if not isinstance(pref, Tensor):
        raise TypeError(f"pref must be a torch.Tensor of shape (..., m), got {type(pref).__name__}")
    if not pref.dtype.is_floating_point:
        raise TypeError(f"pref must have a floating dtype, got {pref.dtype}; call pref.double()")
    try:
        ok = pref.dim() >= 1 and pref.shape[-1] == m
        torch.broadcast_shapes(pref.shape[:-1], gram.shape[:-2])
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"pref must have shape (..., m) = {(*gram.shape[:-2], m)} (batch dimensions that "
            f"broadcast with the Gram's), got {tuple(pref.shape)}; pass one non-negative weight "
            "per group"
        )
    # Host sync on accelerators, like the Gram's own check.
    if not bool((torch.isfinite(pref) & (pref >= 0)).all()):
        shown = pref.tolist() if pref.numel() <= 16 else f"a tensor with min {float(pref.min())}"
        raise ValueError(
            f"pref must be finite and non-negative, got {shown}; pass the weights of the "
            "preferred combination (e.g. group sizes / B)"
        )
