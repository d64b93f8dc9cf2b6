"""Linear layers, any leading dims: ``y = A W^T + b``.

Group k's weight gradient is the ordinary weight-gradient GEMM restricted to the group,
``M_k = sum_{i in S_k} Bk_i^T A_i``: the same FLOPs as one weight gradient, split m ways.
LoRA adapters (PEFT) are ``nn.Linear`` modules and use this rule.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from torchgrain.engines._groups import GroupIndex
from torchgrain.engines.rules._base import GroupGrad, register_rule, trainable


def _weight_grads(A: Tensor, Bk: Tensor, groups: GroupIndex) -> Tensor:
    """``(m, out, in)`` per-group ``sum_i Bk_i^T A_i`` over all leading (token) dims."""
    d_in, d_out = A.shape[-1], Bk.shape[-1]
    if len(set(groups.counts)) == 1:  # equal sizes: one batched GEMM
        n = groups.counts[0] * (A.numel() // (A.shape[0] * d_in))
        A_g = groups.sort(A).reshape(groups.m, n, d_in)
        B_g = groups.sort(Bk).reshape(groups.m, n, d_out)
        return torch.bmm(B_g.transpose(1, 2), A_g)
    return torch.stack(
        [
            b.reshape(-1, d_out).T @ a.reshape(-1, d_in)
            for a, b in zip(groups.split(A), groups.split(Bk), strict=True)
        ]
    )


def _bias_grads(Bk: Tensor, groups: GroupIndex) -> Tensor:
    """``(m, out)`` per-group sums of the output gradient."""
    per_sample = Bk.reshape(Bk.shape[0], -1, Bk.shape[-1]).sum(1)  # (B, out)
    return per_sample.new_zeros(groups.m, Bk.shape[-1]).index_add_(0, groups.ids, per_sample)


@register_rule(nn.Linear)
class LinearRule:
    def param_names(self, module: nn.Module) -> list[str]:
        return trainable(module, "weight", "bias")

    def group_grads(
        self, module: nn.Module, A: Tensor, Bk: Tensor, groups: GroupIndex
    ) -> dict[str, GroupGrad]:
        names = self.param_names(module)
        A = A.to(Bk.dtype)
        out: dict[str, GroupGrad] = {}
        if "weight" in names:
            out["weight"] = _weight_grads(A, Bk, groups)
        if "bias" in names:
            out["bias"] = _bias_grads(Bk, groups)
        return out

    def combine(self, module: nn.Module, A: Tensor, Bk: Tensor) -> dict[str, Tensor]:
        names = self.param_names(module)
        A = A.to(Bk.dtype)
        out = {}
        if "weight" in names:
            out["weight"] = Bk.reshape(-1, Bk.shape[-1]).T @ A.reshape(-1, A.shape[-1])
        if "bias" in names:
            out["bias"] = Bk.reshape(-1, Bk.shape[-1]).sum(0)
        return out
