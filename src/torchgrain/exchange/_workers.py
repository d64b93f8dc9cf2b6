"""The local-SGD exchange: one vector per rank — its pseudo-gradient ``delta_r = anchor - theta_r``
after ``H`` inner steps — their ``(W, W)`` Gram, and their combination ``d = sum_r w_r delta_r``
on every rank.

It is the replicated exchange (:mod:`._replicated`) with one group per rank, so its bytes are
those of the ring all-reduce that plain model averaging does. Per sync:

1. **agree** — one ``all_gather`` of a few integers per rank: whether its model changed since the
   last sync, a fingerprint of its parameters' names, shapes and dtypes, and its sync count; every
   rank raises together on any mismatch, before anything moves;
2. **shards** — per bucket of the flat delta, an asynchronous ``all_to_all`` (a reduce-scatter
   that keeps the pieces apart): rank r receives shard r of every rank's delta, ``P (W-1)/W``
   values sent;
3. **Gram** — each rank's ``(W, W)`` partial Gram of its shard, all-gathered and summed in rank
   order, so every rank solves on the same bits. A rank whose delta holds a NaN or an Inf has a
   non-finite diagonal entry: every rank sees it, and raises, before anything moves (no separate
   pass over the deltas to check them);
4. **combine** — each rank combines its shard with the weights, and an asynchronous
   ``all_gather`` per bucket (on Gloo an ``all_to_all``) assembles ``d`` everywhere,
   ``P (W-1)/W`` values sent.

Values travel in float32, or in the parameters' dtype if wider (float64).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from torchgrain.engines.rules._base import add_gram
from torchgrain.exchange._base import exchange_dtype
from torchgrain.exchange._layout import Bucket, plan
from torchgrain.exchange._replicated import RankExchange

_SHARDS = "all-to-all of the pseudo-gradient shards"

# The columns of the agreement each rank sends: see WorkerExchange.agree.
CHANGED, FINGERPRINT, SYNCS = range(3)


class WorkerExchange:
    """The collectives of one local-SGD sync over ``process_group`` (every rank's delta is one
    group of the global Gram)."""

    def __init__(self, process_group: Any, device: torch.device) -> None:
        self._ranks = RankExchange(process_group)  # raises unless torch.distributed is initialised
        self._ranks.owner = "LocalSGD"
        self._ranks.contract = "every rank must call local_sgd.step() as often as the others"
        self.group = process_group
        self.device = device  # of the parameters, where every collective's tensors live
        self._params: list[Tensor] = []
        self._buckets: list[Bucket] = []
        self._shards: list[Tensor] = []  # per bucket, (W, S_b): my shard of every rank's delta
        self._sends: list[Tensor] = []  # per bucket, the (W * S_b,) buffer the shards left
        self.world = self._ranks.world
        self.rank = self._ranks.rank

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank's payload collectives sent in the last sync (shards and combine)."""
        return self._ranks.bytes_sent

    def agree(self, changed: bool, fingerprint: int, syncs: int) -> Tensor:
        """``(W, 3)`` int64, every rank's row: ``[changed, fingerprint, syncs]``."""
        row = [int(changed), fingerprint, syncs]
        mine = torch.tensor(row, dtype=torch.int64, device=self.device)
        rows = mine.new_empty(self.world, mine.numel())
        self._ranks._collective("agreement before the sync", dist.all_gather, list(rows), mine)
        return rows.cpu()  # host read: the checks that follow decide whether the sync goes on

    def broadcast(self, tensors: list[Tensor]) -> None:
        """Every rank takes the group's rank 0's values of ``tensors`` (in place)."""
        source = dist.get_global_rank(self.group, 0)
        for t in tensors:
            self._ranks._collective("broadcast of rank 0's parameters", dist.broadcast, t, source)

    def gram(self, anchor: list[Tensor], params: list[Tensor]) -> Tensor:
        """``(W, W)`` float64 Gram of every rank's delta ``anchor - params``. Each parameter's
        delta is computed straight into its bucket's send buffer, and a full bucket travels while
        the next is computed."""
        W, dtype = self.world, exchange_dtype(params)
        size = torch.empty((), dtype=dtype).element_size()
        self._params = params
        self._buckets = plan(params, list(range(len(params))), {}, W, 1, size)
        in_flight = []
        for bucket in self._buckets:
            send = torch.empty(W * bucket.shard, dtype=dtype, device=self.device)  # (W * S_b,)
            for seg in bucket.segments:
                columns = send[seg.start : seg.start + seg.numel]
                torch.sub(anchor[seg.param].reshape(-1), params[seg.param].reshape(-1), out=columns)
            send[bucket.numel :].zero_()  # the last shard's padding
            recv = torch.empty_like(send)
            work = self._ranks._collective(
                _SHARDS, dist.all_to_all_single, recv, send, async_op=True
            )
            in_flight.append((work, send, recv))
        partial = torch.zeros(W, W, dtype=torch.float64, device=self.device)
        self._shards, self._sends = [], []
        for work, send, recv in in_flight:
            self._ranks._wait(_SHARDS, work)
            shard = recv.view(W, -1)  # (W, S_b): every rank's delta, my shard of it
            add_gram(partial, shard)
            self._shards.append(shard)
            self._sends.append(send)  # free now: the combine's scratch
        # Sent by this rank: its shards of the deltas, then its shard of the combination.
        shard_columns = sum(bucket.shard for bucket in self._buckets)
        self._ranks.bytes_sent = 2 * shard_columns * (W - 1) * size
        return self._ranks._sum_grams(partial)

    def combine(self, weights: Tensor) -> list[Tensor]:
        """``(W,)`` float64 weights -> ``d`` per parameter, the same bits on every rank."""
        shards, sends, self._shards, self._sends = self._shards, self._sends, [], []
        out = self._ranks.combine_shards(
            weights.to(self.device), self._buckets, shards, self._params, scratch=sends
        )
        assert all(d is not None for d in out)
        return out  # type: ignore[return-value]
