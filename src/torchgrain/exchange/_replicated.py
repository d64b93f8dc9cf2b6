"""The data-parallel exchange in DDP's place: every rank ends the step with the whole ``d``.

Every rank's local groups are global groups. The Gram needs inner products between different
ranks' group gradients, so each bucket of the flat group gradients (see :mod:`._layout`) is
sharded over the ranks. Per step, four kinds of collective:

1. **agree** — before the backward, one ``all_gather`` of a few bytes per rank: its number of
   groups, whether its losses are finite (a NaN on one rank makes every rank skip or raise
   together, before any backward) and its group sizes;
2. **shards** — per bucket, an asynchronous ``all_to_all``: rank r receives shard r of every rank's
   groups. Each parameter's group gradients are written into their bucket as the engine finishes
   them, and a full bucket travels while the engine computes the next (:class:`._base.Stream`);
   each shard's partial ``(M, M)`` Gram is computed as it arrives. Embeddings go last, after one
   small ``all_gather`` of the rows each rank touched;
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

import torch.distributed as dist
from torch import Tensor

from torchgrain.engines.rules._base import GroupGrad
from torchgrain.exchange._base import Exchange
from torchgrain.exchange._layout import Bucket, blank, plan, put, unpack

_COMBINE = "all-gather of the combined shards"


class RankExchange(Exchange):
    """The replicated exchange (DDP's place): every rank ends with the whole ``d``."""

    def _plan(
        self,
        params: list[Tensor],
        which: list[int],
        slots: int,
        rows: dict[int, Tensor],
        element_size: int,
    ) -> list[Bucket]:
        return plan(params, which, rows, self.world, slots, element_size)

    def _put(self, send: Tensor, bucket: Bucket, i: int, grad: GroupGrad, m: int) -> None:
        put(send, bucket.where[i], grad, self._params[i].shape, m)

    def _blank(self, send: Tensor, bucket: Bucket, written: set[int], m: int) -> None:
        blank(send, bucket, written, m)

    def combine(self, weights: Tensor) -> list[Tensor | None]:
        """``(W * slots,)`` global weights -> ``d`` per parameter, equal on all ranks: per bucket,
        my shard of it, then an asynchronous ``all_gather``."""
        out = self.combine_shards(weights, self._buckets, self._shards, self._params)
        self._shards = []
        return out

    def combine_shards(
        self,
        weights: Tensor,
        buckets: list[Bucket],
        shards: list[Tensor],
        params: list[Tensor],
        scratch: list[Tensor] | None = None,
    ) -> list[Tensor | None]:
        """:meth:`combine` of the received ``(W * slots, S_b)`` ``shards`` of ``buckets`` laid
        out over ``params``. ``scratch``: per bucket, a free buffer of ``W * S_b`` values (the
        send buffer the shards came from), when the shards are ``(W, S_b)``: the combination is
        then assembled in the shards' own buffer, and no new buffer is allocated; on Gloo it
        travels by an ``all_to_all`` of the combined shard repeated into ``scratch`` (the same
        bytes as the all-gather; Gloo's all-to-all was the faster of the two on this CPU:
        11M float32 values in 51 ms against 56 with 2 ranks, 93 against 102 with 4)."""
        to_all = scratch is not None and dist.get_backend(self.group) == "gloo"
        in_flight = []
        for b, (bucket, shard) in enumerate(zip(buckets, shards, strict=True)):
            part = weights.to(shard.dtype) @ shard  # (S_b,) my shard of d
            full = shard if scratch is not None else part.new_empty(self.world, bucket.shard)
            if to_all:
                assert scratch is not None
                copies = scratch[b].view(self.world, -1).copy_(part.expand(self.world, -1))
                work = self._collective(
                    _COMBINE, dist.all_to_all_single, full, copies, async_op=True
                )
                part = copies  # held until the collective is done
            else:
                work = self._collective(_COMBINE, dist.all_gather, list(full), part, async_op=True)
            in_flight.append((bucket, work, full, part))
        out: list[Tensor | None] = [None] * len(params)
        for bucket, work, full, _part in in_flight:
            self._wait(_COMBINE, work)
            unpack(bucket, full.reshape(-1)[: bucket.numel], params, out)
        return out
