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

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from torchgrain.engines.rules._base import GroupGrad, gram_of
from torchgrain.exchange._layout import Bucket, pack, plan, touched_rows, unpack

CAPACITY = 64  # group sizes per rank that travel with the first collective; more need a second


@dataclass
class Agreement:
    """What every rank knows after :meth:`RankExchange.agree`, identically."""

    sizes: Tensor  # (W * slots,) every rank's group sizes, rank-major; empty slots are 0
    counts: list[int]  # groups per rank
    ok: bool  # every rank's losses and gradients are finite
    rows: dict[int, Tensor]  # parameter index -> (U,) rows some rank touched (row-sparse ones)

    @property
    def slots(self) -> int:
        return max(self.counts)


class RankExchange:
    """The cross-rank collectives of one GRAIN step over ``process_group``.

    Args:
        process_group: the ``torch.distributed`` group of the data-parallel ranks.
        row_sparse: indices of the parameters whose group gradients are exchanged on the rows
            some rank touched (embedding weights); the others are exchanged whole.
    """

    def __init__(self, process_group: Any, row_sparse: list[int] = ()) -> None:  # type: ignore[assignment]
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "process_group was given but torch.distributed is not initialised; call "
                "torch.distributed.init_process_group (torchrun does the rendezvous) first"
            )
        self.group = process_group
        self.world = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self.row_sparse = list(row_sparse)
        self.bytes_sent = 0  # by this rank's payload collectives (2 and 4), last step
        self._buckets: list[Bucket] = []
        self._shards: list[Tensor] = []  # per bucket, (W * slots, S_b): my shard of every group
        self._params: list[Tensor] = []

    # ---------------------------------------------------------------------------- collectives
    def _collective(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, group=self.group, **kwargs)
        except RuntimeError as error:
            raise self._failed(what, error) from error

    def _wait(self, what: str, work: Any) -> None:
        try:
            work.wait()
        except RuntimeError as error:
            raise self._failed(what, error) from error

    def _failed(self, what: str, error: Exception) -> RuntimeError:
        return RuntimeError(
            f"GRAIN: the {what} across ranks failed on rank {self.rank} of {self.world} "
            f"({error}). Another rank probably raised, stopped or is late; every rank must "
            "call grain.backward for every step (set a timeout in init_process_group)"
        )

    # ---------------------------------------------------------------------------------- agree
    def agree(
        self, grads: list[GroupGrad | None], sizes: Tensor, ok: bool, params: list[Tensor]
    ) -> Agreement:
        """One ``all_gather``: every rank's group count, finiteness, sizes ``(m_local,)`` and
        touched embedding rows."""
        device = sizes.device
        m = sizes.shape[0]
        head = torch.zeros(2 + CAPACITY, dtype=torch.int64, device=device)
        head[0], head[1] = m, int(ok)
        head[2 : 2 + min(m, CAPACITY)] = sizes[:CAPACITY]
        masks = [
            touched_rows(grads[i] if ok else None, params[i].shape[0], device)
            for i in self.row_sparse
        ]
        payload = torch.cat([head.view(torch.uint8), *masks])
        out = payload.new_empty(self.world, payload.numel())
        self._collective("agreement on the group sizes", dist.all_gather, list(out), payload)
        width = head.numel() * head.element_size()
        heads = out[:, :width].contiguous().view(torch.int64)  # (W, 2 + CAPACITY)
        # Host sync: the group counts decide the shapes of everything that follows.
        counts, oks = zip(*heads[:, :2].tolist(), strict=True)
        slots = max(counts)
        if slots <= CAPACITY:
            everyone = heads[:, 2 : 2 + slots]  # (W, slots)
        else:  # a second, rare, exchange of the sizes that did not fit
            padded = sizes.new_zeros(slots)
            padded[:m] = sizes
            everyone = padded.new_empty(self.world, slots)
            self._collective("exchange of the group sizes", dist.all_gather, list(everyone), padded)
        rows, start = {}, width
        for i in self.row_sparse:
            n = params[i].shape[0]
            rows[i] = out[:, start : start + n].ne(0).any(0).nonzero().squeeze(1)  # (U,) sorted
            start += n
        return Agreement(everyone.reshape(-1), list(counts), all(oks), rows)

    # ----------------------------------------------------------------------------------- gram
    def gram(
        self, grads: list[GroupGrad | None], agreement: Agreement, params: list[Tensor]
    ) -> Tensor:
        """Local ``(m_local, ...)`` group gradients per parameter -> the global ``(W * slots,
        W * slots)`` float64 Gram, the same bits on every rank."""
        world, slots, m = self.world, agreement.slots, agreement.counts[self.rank]
        dtype = torch.promote_types(
            torch.float32, max((p.dtype for p in params), key=lambda t: torch.finfo(t).bits)
        )
        size = torch.empty((), dtype=dtype).element_size()
        self._params = params
        self._buckets = plan(params, agreement.rows, world, slots, size)
        in_flight = []
        for bucket in self._buckets:  # pack the next bucket while the last one travels
            send = pack(bucket, grads, params, m, slots, world, dtype)  # (W, slots, S_b)
            recv = torch.empty_like(send)
            work = self._collective(
                "all-to-all of the group-gradient shards",
                dist.all_to_all_single,
                recv,
                send,
                async_op=True,
            )
            in_flight.append((work, send, recv))
        partial = torch.zeros(
            world * slots, world * slots, dtype=torch.float64, device=params[0].device
        )
        self._shards = []
        for work, _send, recv in in_flight:
            self._wait("all-to-all of the group-gradient shards", work)
            shard = recv.reshape(world * slots, -1)  # every rank's groups, my shard of them
            partial += gram_of(shard)
            self._shards.append(shard)
        self.bytes_sent = sum(b.shard for b in self._buckets) * (slots + 1) * (world - 1) * size
        partials = partial.new_empty(world, *partial.shape)
        self._collective(
            "all-gather of the partial Grams", dist.all_gather, list(partials), partial
        )
        gram = partials[0].clone()
        for r in range(1, world):  # in rank order on every rank: the same bits everywhere
            gram += partials[r]
        return gram

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
