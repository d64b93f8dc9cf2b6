"""Hugging Face ``Conv1D`` (GPT-2): a linear layer whose weight is stored ``(in, out)``, so the
Linear rule with its weight-gradient products transposed (the ghost Gram is the same: a Gram
does not see the transposition)."""

from __future__ import annotations

from torch import nn

from torchgrain.engines.rules._base import register_rule
from torchgrain.engines.rules._linear import LinearRule


def _is_hf_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


@register_rule(_is_hf_conv1d)
class HFConv1DRule(LinearRule):
    """``y = A W + b`` with ``W`` of shape ``(in, out)``: the Linear rule with its products taken
    as ``A^T Bk`` (contiguous in the stored layout)."""

    transposed = True
