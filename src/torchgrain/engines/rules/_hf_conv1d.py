"""Hugging Face ``Conv1D`` (GPT-2): a linear layer whose weight is stored ``(in, out)``, so the
Linear rule with the weight gradient transposed (the ghost Gram is the same: a Gram does not see
the transposition)."""

from __future__ import annotations

from torch import Tensor, nn

from torchgrain.engines._groups import GroupIndex
from torchgrain.engines.rules._base import GroupGrad, register_rule
from torchgrain.engines.rules._linear import LinearRule


def _is_hf_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


@register_rule(_is_hf_conv1d)
class HFConv1DRule(LinearRule):
    """``y = A W + b`` with ``W`` of shape ``(in, out)``."""

    def group_grads(
        self,
        module: nn.Module,
        A: Tensor,
        Bk: Tensor,
        groups: GroupIndex,
        skip: frozenset[str] = frozenset(),
    ) -> dict[str, GroupGrad]:
        out = super().group_grads(module, A, Bk, groups, skip)
        if "weight" in out:
            out["weight"] = out["weight"].transpose(1, 2)  # type: ignore[union-attr]
        return out

    def combine(self, module: nn.Module, A: Tensor, Bk: Tensor) -> dict[str, Tensor]:
        out = super().combine(module, A, Bk)
        if "weight" in out:
            out["weight"] = out["weight"].T
        return out
