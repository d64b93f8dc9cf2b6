"""The local-SGD exchange: one vector per rank — its pseudo-gradient ``delta_r = anchor - theta_r``
after ``H`` inner steps — their ``(W, W)`` Gram, and their combination ``d = sum_r w_r delta_r``
on every rank.

It is the replicated exchange (:mod:`._replicated`) with one group per rank, so its bytes are
those of the ring all-reduce that plain model averaging does. Per sync:

1. **agree** — one ``all_gather`` of a few integers per rank: whether its delta is finite, whether
   its model changed since the last sync, a fingerprint of its parameters' names, shapes and
   dtypes, and its sync count; every rank raises together on any mismatch, before anything moves;
2. **shards** — per bucket of the flat delta, an asynchronous ``all_to_all`` (a reduce-scatter
   that keeps the pieces apart): rank r receives shard r of every rank's delta, ``P (W-1)/W``
   values sent;
3. **Gram** — each rank's ``(W, W)`` partial Gram of its shard, all-gathered and summed in rank
   order, so every rank solves on the same bits;
4. **combine** — each rank combines its shard with the weights, and an asynchronous
   ``all_gather`` per bucket assembles ``d`` everywhere, ``P (W-1)/W`` values sent.

Values travel in float32, or in the parameters' dtype if wider (float64).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from torchgrain.exchange._base import Agreement
from torchgrain.exchange._replicated import RankExchange

# The columns of the agreement each rank sends: see WorkerExchange.agree.
FINITE, CHANGED, FINGERPRINT, SYNCS = range(4)


class WorkerExchange:
    """The collectives of one local-SGD sync over ``process_group`` (every rank's delta is one
    group of the global Gram)."""

    def __init__(self, process_group: Any, device: torch.device) -> None:
        self._ranks = RankExchange(process_group)  # raises unless torch.distributed is initialised
        self._ranks.owner = "LocalSGD"
        self._ranks.contract = "every rank must call local_sgd.step() as often as the others"
        self.group = process_group
        self.device = device  # of the parameters, where every collective's tensors live
        self.world = self._ranks.world
        self.rank = self._ranks.rank

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank's payload collectives sent in the last sync (shards and combine)."""
        return self._ranks.bytes_sent

    def agree(self, finite: bool, changed: bool, fingerprint: int, syncs: int) -> Tensor:
        """``(W, 4)`` int64, every rank's row: ``[finite, changed, fingerprint, syncs]``."""
        row = [int(finite), int(changed), fingerprint, syncs]
        mine = torch.tensor(row, dtype=torch.int64, device=self.device)
        rows = mine.new_empty(self.world, mine.numel())
        self._ranks._collective("agreement before the sync", dist.all_gather, list(rows), mine)
        return rows.cpu()  # host read: the checks that follow decide whether the sync goes on

    def broadcast(self, tensors: list[Tensor]) -> None:
        """Every rank takes the group's rank 0's values of ``tensors`` (in place)."""
        source = dist.get_global_rank(self.group, 0)
        for t in tensors:
            self._ranks._collective("broadcast of rank 0's parameters", dist.broadcast, t, source)

    def gram(self, deltas: list[Tensor]) -> Tensor:
        """``(W, W)`` float64 Gram of every rank's delta (per parameter, this rank's piece)."""
        ones = torch.ones(self.world, dtype=torch.int64, device=self.device)
        agreement = Agreement(ones, [1] * self.world, True)
        stream = self._ranks.stream(agreement, deltas)
        for i, delta in enumerate(deltas):
            stream.add(i, delta.unsqueeze(0))  # (1, *shape): this rank's one group
        return stream.close()

    def combine(self, weights: Tensor) -> list[Tensor]:
        """``(W,)`` float64 weights -> ``d`` per parameter, the same bits on every rank."""
        out = self._ranks.combine(weights.to(self.device))
        assert all(d is not None for d in out)
        return out  # type: ignore[return-value]
