"""Stages 2 and 4 of GRAIN: group Gram from the backward, then ``d`` from the weights.

- :class:`LoopEngine`: the reference, one backward per group, exact for any model.
- :class:`FusedEngine`: one backward, per-layer rules (``rules/``), exact fallback elsewhere.
"""

from torchgrain.engines._base import Engine
from torchgrain.engines._fused import DEFAULT_MEMORY_BUDGET, FusedEngine
from torchgrain.engines._groups import GroupIndex
from torchgrain.engines._loop import LoopEngine

ENGINE_NAMES = ("auto", "fused", "loop")

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "ENGINE_NAMES",
    "Engine",
    "FusedEngine",
    "GroupIndex",
    "LoopEngine",
]
