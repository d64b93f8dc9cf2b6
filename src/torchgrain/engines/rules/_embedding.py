"""Embeddings (incl. ``padding_idx`` and tied weights): group k's gradient is
``index_add`` of its samples' output gradients into the rows of their tokens, kept only on the
batch's distinct tokens (:class:`Rows`), never as m dense ``(V, d)`` matrices."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from torchgrain.engines._groups import GroupIndex
from torchgrain.engines._workspace import empty_flat
from torchgrain.engines.rules._base import GroupGrad, Rows, register_rule, trainable


def _tokens_and_grads(module: nn.Embedding, A: Tensor, Bk: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Flattened token ids ``(N,)``, output gradients ``(N, d)`` with padding rows zeroed, and the
    sample of each token ``(N,)``."""
    tokens = A.reshape(-1)
    grads = Bk.reshape(tokens.shape[0], -1)
    if module.padding_idx is not None:  # the padding row never receives a gradient
        grads = grads * (tokens != module.padding_idx).unsqueeze(-1).to(grads.dtype)
    sample = torch.arange(A.shape[0], device=A.device).repeat_interleave(A[0].numel())
    return tokens, grads, sample


@register_rule(nn.Embedding)
class EmbeddingRule:
    def param_names(self, module: nn.Module) -> list[str]:
        assert isinstance(module, nn.Embedding)
        if module.scale_grad_by_freq or module.sparse or module.max_norm is not None:
            return []  # batch-dependent scaling, sparse grads, renormed rows: exact fallback
        return trainable(module, "weight")

    def group_grads(
        self, module: nn.Module, A: Tensor, Bk: Tensor, groups: GroupIndex
    ) -> dict[str, GroupGrad]:
        assert isinstance(module, nn.Embedding)
        tokens, grads, sample = _tokens_and_grads(module, A, Bk)
        # Host sync: the number of distinct tokens U sizes the rows kept (one read per call).
        index, inverse = torch.unique(tokens, return_inverse=True)  # (U,), (N,)
        flat = groups.ids[sample] * index.shape[0] + inverse  # (N,) row of (m * U)
        rows, d = groups.m * index.shape[0], grads.shape[1]
        # the (m * U, d) rows: tens of MB at B x T = 4,096 tokens, reused from step to step
        values = empty_flat(rows * d, dtype=grads.dtype, device=grads.device).view(rows, d)
        values.zero_().index_add_(0, flat, grads)
        return {"weight": Rows(index, values.reshape(groups.m, index.shape[0], -1))}

    def combine(self, module: nn.Module, A: Tensor, Bk: Tensor) -> dict[str, Tensor]:
        assert isinstance(module, nn.Embedding)
        tokens, grads, _ = _tokens_and_grads(module, A, Bk)
        return {"weight": grads.new_zeros(module.weight.shape).index_add_(0, tokens, grads)}
