"""GRAIN called inside an autocast block, in float32 (no float64 default here)."""

from __future__ import annotations

import copy

import torch
from torch import nn

import torchgrain


def test_backward_inside_autocast_keeps_the_gram_in_full_precision() -> None:
    """Called inside a bf16 autocast block (as in Lightning's training_step), the Gram and d are
    those of the float32 gradients, not of bf16 GEMMs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))
    ref_model = copy.deepcopy(model)
    x, y = torch.randn(16, 64), torch.randint(0, 4, (16,))
    grains = [torchgrain.GRAIN(net, num_groups=4) for net in (model, ref_model)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = [
            nn.functional.cross_entropy(n(x), y, reduction="none") for n in (model, ref_model)
        ]
        got = grains[0].backward(losses[0])  # inside the autocast block
    ref = grains[1].backward(losses[1])  # outside it
    assert got.engine == "fused" and not got.fallback
    torch.testing.assert_close(got.gram, ref.gram, rtol=1e-6, atol=0)
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-9)
