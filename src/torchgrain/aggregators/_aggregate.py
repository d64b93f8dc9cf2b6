"""GRAIN's and LocalSGD's solve stage: whatever the user passed as ``aggregator=`` (a name, an
:class:`Aggregator`, a plain callable), the Gram and the preferred weights -> a checked
:class:`Solution`.

The weights are checked here, a built-in's too, so that a bad result raises before anything is
written to ``.grad``: never a NaN step.
"""

from __future__ import annotations

import dataclasses
from typing import Union

import torch
from torch import Tensor

from torchgrain.aggregators._base import Aggregator, unreported
from torchgrain.aggregators._registry import AggregatorFn, get_aggregator
from torchgrain.solvers import Solution

AggregatorLike = Union[str, AggregatorFn]  # noqa: UP007 (a runtime alias under Python 3.10)


def check_aggregator(aggregator: object) -> None:
    """Raise unless ``aggregator`` is a registered name or a callable (see
    :func:`get_aggregator`)."""
    get_aggregator(aggregator)


def aggregator_name(aggregator: AggregatorLike) -> str:
    """The name stats and logs carry: the string itself, an :class:`Aggregator`'s ``name``, or
    the callable's ``__name__``."""
    if isinstance(aggregator, str):
        return aggregator
    if isinstance(aggregator, Aggregator):
        return aggregator.name
    return getattr(aggregator, "__name__", type(aggregator).__name__)


def aggregate(aggregator: AggregatorLike, gram: Tensor, pref: Tensor) -> Solution:
    """``(m, m)`` float64 Gram and ``(m,)`` float64 preferred weights on the host (both checked
    by the caller) -> the aggregator's :class:`Solution`, weights ``(m,)`` float64, checked to be
    finite and non-negative. A plain callable's report is a NaN gap and 0 iterations."""
    name = aggregator_name(aggregator)
    resolved = get_aggregator(aggregator)
    # Copies: the caller's tensors become the step's stats, which an in-place edit would spoil.
    if isinstance(resolved, Aggregator):
        solution = resolved.solve(gram.clone(), pref.clone(), check=False)
        if not isinstance(solution, Solution):
            raise TypeError(
                f"aggregator {name}'s solve returned a {type(solution).__name__}; return a "
                "torchgrain.solvers.Solution, or define __call__ alone"
            )
    else:
        solution = unreported(resolved(gram.clone(), pref.clone()), gram)
    return dataclasses.replace(solution, weights=_checked(solution.weights, pref, name))


def _checked(weights: object, pref: Tensor, name: str) -> Tensor:
    m = pref.shape[0]
    if not isinstance(weights, Tensor):
        raise TypeError(
            f"aggregator {name} returned a {type(weights).__name__}; return a torch.Tensor of "
            f"shape ({m},), one weight per group"
        )
    if weights.shape != (m,) or not weights.dtype.is_floating_point:
        raise ValueError(
            f"aggregator {name} returned weights of shape {tuple(weights.shape)} and dtype "
            f"{weights.dtype}; return a floating tensor of shape ({m},), one weight per non-empty "
            "group"
        )
    weights = weights.detach().to(device=pref.device, dtype=torch.float64)
    # Host read: the weights are on the host already (GRAIN solves there).
    if not bool((torch.isfinite(weights) & (weights >= 0)).all()):
        raise ValueError(
            f"aggregator {name} returned weights {weights.tolist()}; they must be finite and "
            "non-negative (d = sum_k w_k g_k); .grad was left untouched"
        )
    return weights
