"""Stage 2 and 4 of GRAIN: the interface every engine implements.

An engine is used once per step in two calls:

1. ``gram(losses, groups, params)`` takes the ``(B,)`` per-sample losses of one forward and the
   partition (:class:`GroupIndex`), and returns the ``(m, m)`` float64 Gram
   ``G_kl = <grad L_k, grad L_l>`` over ``params`` (``L_k`` the mean loss of group k);
2. ``combine(weights)`` then returns, per parameter, ``d = sum_k w_k grad L_k`` in the parameter's
   dtype (``None`` for a parameter that no group's loss reaches).

Between the two calls the engine keeps whatever it needs (the group gradients, or the layers' inputs
and output gradients); ``combine`` releases it. An engine never writes ``.grad``: the caller does,
after every check has passed, so that an error leaves ``.grad`` untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from torch import Tensor

from torchgrain.engines._groups import GroupIndex
from torchgrain.engines.rules._base import GroupGrad


class Engine(Protocol):
    """Computes the group Gram, then the weighted combination of the group gradients."""

    name: str

    def gram(
        self,
        losses: Tensor,
        groups: GroupIndex,
        params: list[Tensor],
        *,
        keep_groups: bool = False,
        sink: Callable[[int, GroupGrad], None] | None = None,
        retain_graph: bool = False,
    ) -> Tensor:
        """``(B,)`` losses and groups -> ``(m, m)`` float64 Gram of the group gradients.

        ``keep_groups``: :meth:`group_grads` follows (accumulation, ranks), so every group
        gradient is materialised anyway: an engine then keeps them all and takes no shortcut that
        skips them (a Gram block computed without them; with one group, a plain backward where a
        rule's compact form, an embedding's rows, pays).

        ``sink``: with ``keep_groups``, hand each reached parameter's ``(m, ...)`` group
        gradients to ``sink(index, grad)`` as soon as they are complete, instead of keeping them
        or adding them to the Gram (the returned Gram is then zero): the exchange across ranks
        sends them while the engine goes on. ``retain_graph``: keep the autograd graph of
        ``losses`` for another backward."""
        ...

    def reached(self) -> list[bool]:
        """After :meth:`gram`: whether each parameter received a gradient from some group."""
        ...

    def combine(self, weights: Tensor) -> list[Tensor | None]:
        """``(m,)`` weights -> ``d`` per parameter (``None`` where no group reached it)."""
        ...

    def group_grads(self) -> list[GroupGrad | None]:
        """Instead of :meth:`combine`: per parameter, the ``(m, ...)`` group gradients themselves
        (for accumulation over micro-batches and for combining across ranks)."""
        ...

    def release(self) -> None:
        """Forget everything held for this step (called after every step, error or not)."""
        ...
