"""Stages 2 and 4 of GRAIN: group Gram from the backward, then ``d`` from the weights."""

from torchgrain.engines._base import Engine
from torchgrain.engines._loop import LoopEngine

ENGINES = {"loop": LoopEngine}

__all__ = ["ENGINES", "Engine", "LoopEngine"]
