"""GRAIN across data-parallel ranks, on ``torch.distributed`` (NCCL on GPUs, Gloo on CPUs).

Part of GRAIN's step, not an integration: :class:`GRAIN` with ``process_group`` hands each step's
local group gradients to the exchange here, which agrees on the groups, builds the global Gram and
returns ``d``.

- :mod:`._replicated` — replicated parameters (DDP's place): every rank ends with the whole ``d``.
- :mod:`._sharded` — parameters sharded by FSDP2's ``fully_shard``: every rank ends with its
  shard of ``d`` as the DTensor ``.grad`` FSDP expects.
- :mod:`._workers` — local SGD's outer step (:class:`~torchgrain.LocalSGD`): one pseudo-gradient
  per rank, the replicated exchange with one group per rank.
- :mod:`._base` — what they share: the agreement on the groups, the all-to-all of the shards with
  their partial Grams, and the Gram's sum in rank order.
- :mod:`._layout` — where each parameter's group gradients sit in the buckets and shards that
  travel.
"""

from torchgrain.exchange._base import Agreement, Exchange
from torchgrain.exchange._replicated import RankExchange
from torchgrain.exchange._sharded import ShardedExchange, unsharded
from torchgrain.exchange._workers import WorkerExchange

__all__ = [
    "Agreement",
    "Exchange",
    "RankExchange",
    "ShardedExchange",
    "WorkerExchange",
    "unsharded",
]
