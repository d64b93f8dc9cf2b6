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
    """

    ids: Tensor
    sizes: Tensor
    order: Tensor
    counts: tuple[int, ...]

    @classmethod
    def build(cls, ids: Tensor, sizes: Tensor) -> GroupIndex:
        # Host sync: the split sizes must be Python ints (one small read per step).
        counts = tuple(int(c) for c in sizes.tolist())
        order = torch.sort(ids, stable=True).indices
        return cls(ids=ids, sizes=sizes, order=order, counts=counts)

    @property
    def m(self) -> int:
        return len(self.counts)

    @property
    def batch_size(self) -> int:
        return int(self.ids.shape[0])

    @property
    def contiguous(self) -> bool:
        """Whether the samples are already sorted by group (no gather needed)."""
        return bool(
            torch.equal(self.order, torch.arange(self.batch_size, device=self.order.device))
        )

    def split(self, t: Tensor) -> tuple[Tensor, ...]:
        """``(B, ...)`` -> m tensors ``(|S_k|, ...)``, one per group."""
        return t.index_select(0, self.order).split(self.counts)

    def group_means(self, losses: Tensor) -> Tensor:
        """``(B,)`` per-sample losses -> ``(m,)`` group losses ``L_k = mean_{i in S_k} l_i``."""
        sums = losses.new_zeros(self.m).index_add(0, self.ids, losses)  # (m,)
        return sums / self.sizes.to(losses.dtype)
