"""GRAIN across data-parallel ranks, on ``torch.distributed`` (NCCL on GPUs, Gloo on CPUs).

Part of GRAIN's step, not an integration: :class:`GRAIN` with ``process_group`` hands each step's
local group gradients to the exchange here, which agrees on the groups, builds the global Gram and
returns ``d``.

- :mod:`._replicated` — replicated parameters (DDP's place): every rank ends with the whole ``d``.
- :mod:`._layout` — where each parameter's group gradients sit in the buckets and shards that
  travel.
"""

from torchgrain.exchange._base import Agreement, Exchange
from torchgrain.exchange._replicated import RankExchange

__all__ = ["Agreement", "Exchange", "RankExchange"]
