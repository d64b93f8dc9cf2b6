"""The batch's partition as the engines use it: samples sorted by group, and group sizes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class GroupIndex:
    """``ids`` ``(B,)`` in ``[0, m)`` with every group non-empty, ready to split tensors by group.

    Attributes:
        ids: ``(B,)`` int64 group of each sample.
        sizes: ``(m,)`` int64 samples per group (all > 0).
        order: ``(B,)`` a stable permutation that sorts the samples by group.
        counts: the sizes as Python ints (read once, when the index is built).
        contiguous: the samples are already sorted by group (``order`` is the identity).
    """

    ids: Tensor
    sizes: Tensor
    order: Tensor
    counts: tuple[int, ...]
    contiguous: bool

    @classmethod
    def build(cls, ids: Tensor, sizes: Tensor) -> GroupIndex:
        order = torch.sort(ids, stable=True).indices
        sorted_ = (ids[1:] >= ids[:-1]).all().long().reshape(1)
        # Host sync: the split sizes must be Python ints, and whether the samples are already
        # sorted by group decides whether tensors need a gather (one small read per step).
        *counts, contiguous = torch.cat([sizes, sorted_]).tolist()
        return cls(ids, sizes, order, tuple(counts), bool(contiguous))

    @classmethod
    def known(
        cls, ids: Tensor, sizes: Tensor, counts: tuple[int, ...], contiguous: bool
    ) -> GroupIndex:
        """The index when the sizes and the order are already on the host (no device read)."""
        if contiguous:
            order = torch.arange(ids.shape[0], device=ids.device)
        else:
            order = torch.sort(ids, stable=True).indices
        return cls(ids, sizes, order, counts, contiguous)

    @property
    def m(self) -> int:
        return len(self.counts)

    @property
    def batch_size(self) -> int:
        return int(self.ids.shape[0])

    def sort(self, t: Tensor) -> Tensor:
        """``(B, ...)`` with the samples ordered by group (no copy when they already are)."""
        return t if self.contiguous else t.index_select(0, self.order)

    @property
    def uniform(self) -> bool:
        """The samples are sorted by group and the groups have equal sizes: a ``(B, ...)``
        tensor is an ``(m, B / m, ...)`` one, with no gather."""
        return self.contiguous and len(set(self.counts)) == 1

    def sums(self, t: Tensor, dims: int = 0) -> Tensor:
        """``(B, ...)`` -> ``(m, ...)``: each group's sum over its samples and over the ``dims``
        dimensions after the batch one (a bias: ``(B, T, out)`` with ``dims=1``). One reduction
        when the groups are :attr:`uniform`; else the per-sample sums scattered by group."""
        if self.uniform:
            return t.reshape(self.m, -1, *t.shape[1 + dims :]).sum(1)
        if dims:
            t = t.reshape(t.shape[0], -1, *t.shape[1 + dims :]).sum(1)
        return t.new_zeros(self.m, *t.shape[1:]).index_add_(0, self.ids, t)

    def split(self, t: Tensor) -> tuple[Tensor, ...]:
        """``(B, ...)`` -> m tensors ``(|S_k|, ...)``, one per group."""
        return self.sort(t).split(self.counts)

    def group_means(self, losses: Tensor) -> Tensor:
        """``(B,)`` per-sample losses -> ``(m,)`` group losses ``L_k = mean_{i in S_k} l_i``."""
        return self.sums(losses) / self.sizes.to(losses.dtype)
