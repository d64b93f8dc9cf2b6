"""Stage 2 and 4 of GRAIN: the interface every engine implements.

An engine is used once per step in two calls:

1. ``gram(group_losses, params)`` takes the ``(m,)`` group losses ``L_k`` (each the mean of its
   samples' losses, all from one forward) and returns the ``(m, m)`` float64 Gram
   ``G_kl = <grad L_k, grad L_l>`` over ``params``;
2. ``combine(weights)`` then returns, per parameter, ``d = sum_k w_k grad L_k`` in the parameter's
   dtype (``None`` for a parameter that no group's loss reaches).

Between the two calls the engine keeps whatever it needs (the group gradients, or the layers' inputs
and output gradients); ``combine`` releases it. An engine never writes ``.grad``: the caller does,
after every check has passed, so that an error leaves ``.grad`` untouched.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor


class Engine(Protocol):
    """Computes the group Gram, then the weighted combination of the group gradients."""

    name: str

    def gram(self, group_losses: Tensor, params: list[Tensor]) -> Tensor:
        """``(m,)`` group losses -> ``(m, m)`` float64 Gram of their gradients over ``params``."""
        ...

    def reached(self) -> list[bool]:
        """After :meth:`gram`: whether each parameter received a gradient from some group."""
        ...

    def combine(self, weights: Tensor) -> list[Tensor | None]:
        """``(m,)`` weights -> ``d`` per parameter (``None`` where no group reached it)."""
        ...
