"""The aggregator interface: the ``(m, m)`` Gram and the ``(m,)`` preferred weights in, ``(m,)``
weights out.

An aggregator combines the group gradients ``g_1..g_m`` into ``d = sum_k w_k g_k`` knowing only
their Gram ``G_kl = <g_k, g_l>`` and the preferred combination ``p`` (the sample mean's weights
inside GRAIN, ``1/W`` inside LocalSGD); the engine that built the Gram applies ``w``. The whole
protocol:

- ``aggregator(gram, pref) -> weights``: ``(..., m)`` non-negative weights;
- ``aggregator.solve(gram, pref, *, check=True) -> Solution``: the same weights with the solver's
  report (``gap``, ``iterations``, ``converged``: what ``GrainStats`` shows); ``check=False`` when
  the caller validated the inputs already, as GRAIN and LocalSGD do;
- ``aggregator.name``: the name ``GrainStats.aggregator`` and the logs carry.

A subclass defines ``__call__`` (its report is then a NaN gap and 0 iterations, as for a plain
function) or ``solve`` (``__call__`` returns its weights).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from torchgrain.solvers import Solution


class Aggregator:
    r"""A map from the Gram of the group gradients and the preferred weights to the weights of
    their combination.

    .. math::
        w = A(G, p) \ge 0, \qquad d = \textstyle\sum_k w_k g_k, \qquad G_{kl} = \langle g_k,
        g_l \rangle

    Pass an instance as ``GRAIN(..., aggregator=...)`` or ``LocalSGD(..., aggregator=...)``; the
    strings they take are the names of registered instances (:func:`register_aggregator`). Define
    ``__call__(gram, pref) -> weights``, or ``solve(gram, pref, *, check=True) -> Solution`` to
    report a gap and iterations too; override ``name`` to change what the stats call it (the
    class's name by default). GRAIN calls it with the non-empty groups' ``(m, m)`` float64 Gram
    and ``(m,)`` float64 preferred weights on the CPU, and checks that the weights it returns are
    ``(m,)``, finite and non-negative.

    Example:
        >>> import torch
        >>> from torchgrain.aggregators import Aggregator
        >>> class Worst(Aggregator):  # all the weight on the group with the smallest gradient
        ...     def __call__(self, gram, pref=None):
        ...         return torch.nn.functional.one_hot(gram.diagonal().argmin(), len(gram)).double()
        >>> Worst()(torch.diag(torch.tensor([4.0, 1.0, 9.0])))
        tensor([0., 1., 0.], dtype=torch.float64)
        >>> Worst().name, Worst()
        ('Worst', Worst())
    """

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        # Each default calls the other: a subclass with neither would recurse at its first step.
        if cls.__call__ is Aggregator.__call__ and cls.solve is Aggregator.solve:
            raise TypeError(
                f"{cls.__name__} defines neither __call__(gram, pref) -> weights nor "
                "solve(gram, pref, *, check=True) -> Solution; define one of them"
            )

    @property
    def name(self) -> str:
        """The name stats and logs carry: a built-in's alias, else the class's name."""
        return type(self).__name__

    def __call__(self, gram: Tensor, pref: Tensor | None = None) -> Tensor:
        """``(..., m, m)`` Gram and ``(..., m)`` preferred weights -> ``(..., m)`` weights."""
        return self.solve(gram, pref).weights

    def solve(self, gram: Tensor, pref: Tensor | None = None, *, check: bool = True) -> Solution:
        """The weights with the solver's report; here, none: :func:`unreported`."""
        return unreported(self(gram, pref), gram)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def unreported(weights: Tensor, gram: Tensor) -> Solution:
    """A :class:`Solution` for weights that came without a report (a user's ``__call__`` or plain
    function): a NaN gap (unknown), 0 iterations, converged."""
    batch_shape = gram.shape[:-2]
    return Solution(
        weights=weights,
        gap=torch.full(batch_shape, math.nan, dtype=torch.float64, device=gram.device),
        iterations=torch.zeros(batch_shape, dtype=torch.int64, device=gram.device),
        converged=torch.ones(batch_shape, dtype=torch.bool, device=gram.device),
    )
