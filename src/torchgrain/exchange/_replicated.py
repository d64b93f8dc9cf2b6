"""The data-parallel exchange in DDP's place: every rank ends the step with the whole ``d``.

Every rank's local groups are global groups. The Gram needs inner products between different
ranks' group gradients, so each bucket of the flat group gradients (see :mod:`._layout`) is
sharded over the ranks. Per step, four kinds of collective:

1. **agree** — one ``all_gather`` of a few bytes per rank: its number of groups, whether its step is
   finite (a NaN on one rank makes every rank skip or raise together), its group sizes and, for an
   embedding, which rows its batch touched;
2. **shards** — per bucket, an asynchronous ``all_to_all``: rank r receives shard r of every rank's
   groups; the next bucket is packed while one travels, and each shard's partial ``(M, M)`` Gram
   is computed as it arrives;
3. **Gram** — one ``all_gather`` of the partial Grams, summed on every rank in rank order, so that
   every rank solves on the same bits;
4. **combine** — per bucket, each rank combines its shard with the weights and an asynchronous
   ``all_gather`` assembles ``d`` everywhere.

Bytes each rank sends in 2 and 4, for P exchanged values and W ranks: ``m_local * P (W-1)/W`` and
``P (W-1)/W`` — with one group per rank, the ``2 P (W-1)/W`` of DDP's ring all-reduce; with
``m_local`` groups per rank, ``(m_local + 1) / 2`` times it. An embedding counts only the rows some
rank's batch touched. Each group gradient is copied once, into its send buffer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from torchgrain.engines.rules._base import GroupGrad
from torchgrain.exchange._base import Agreement, Exchange, exchange_dtype
from torchgrain.exchange._layout import Bucket, pack, plan, unpack


class RankExchange(Exchange):
    """The replicated exchange (DDP's place): every rank ends with the whole ``d``."""

    def __init__(self, process_group: Any, row_sparse: Iterable[int] = ()) -> None:
        super().__init__(process_group, row_sparse)
        self._buckets: list[Bucket] = []
        self._params: list[Tensor] = []

    # ----------------------------------------------------------------------------------- gram
    def gram(
        self, grads: list[GroupGrad | None], agreement: Agreement, params: list[Tensor]
    ) -> Tensor:
        """Local ``(m_local, ...)`` group gradients per parameter -> the global ``(W * slots,
        W * slots)`` float64 Gram, the same bits on every rank."""
        world, slots, m = self.world, agreement.slots, agreement.counts[self.rank]
        dtype = exchange_dtype(params)
        size = torch.empty((), dtype=dtype).element_size()
        self._params, self.device = params, params[0].device
        self._buckets = plan(params, agreement.rows, world, slots, size)
        sends = (pack(b, grads, params, m, slots, world, dtype) for b in self._buckets)
        partial = self._exchange_shards(sends, slots)  # packs lazily: one bucket while one travels
        self.bytes_sent = sum(b.shard for b in self._buckets) * (slots + 1) * (world - 1) * size
        return self._sum_grams(partial)

    # -------------------------------------------------------------------------------- combine
    def combine(self, weights: Tensor) -> list[Tensor | None]:
        """``(W * slots,)`` global weights -> ``d`` per parameter, equal on all ranks."""
        in_flight = []
        for bucket, shard in zip(self._buckets, self._shards, strict=True):
            part = weights.to(shard.dtype) @ shard  # (S_b,) my shard of d
            full = part.new_empty(self.world, bucket.shard)
            work = self._collective(
                "all-gather of the combined shards",
                dist.all_gather,
                list(full),
                part,
                async_op=True,
            )
            in_flight.append((bucket, work, full, part))
        out: list[Tensor | None] = [None] * len(self._params)
        for bucket, work, full, _part in in_flight:
            self._wait("all-gather of the combined shards", work)
            unpack(bucket, full.reshape(-1)[: bucket.numel], self._params, out)
        self._shards = []
        return out
