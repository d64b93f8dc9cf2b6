"""GRAIN's solve stage by name: ``(m, m)`` Gram and the preferred ``(m,)`` weights -> a
:class:`Solution`.

Every aggregator is a map from the Gram (and the preferred combination, the sample mean's weights
inside GRAIN) to non-negative weights ``w`` with ``d = sum_k w_k g_k``; the engine that built the
Gram applies them at no extra cost. A user's callable ``(gram, pref) -> weights`` is checked here,
so that a bad result raises before anything is written to ``.grad``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Union

import torch
from torch import Tensor

from torchgrain.solvers._cagrad import cagrad
from torchgrain.solvers._dual_proj import dual_proj
from torchgrain.solvers._upgrad import upgrad
from torchgrain.solvers._wolfe import Solution, solve

AggregatorFn = Callable[[Tensor, Tensor], Tensor]
AggregatorLike = Union[str, AggregatorFn]  # noqa: UP007 (a runtime alias under Python 3.10)

AGGREGATOR_NAMES = ("min_norm", "mean", "dual_proj", "upgrad", "cagrad")


def check_aggregator(aggregator: object) -> None:
    """Raise unless ``aggregator`` is a known name or a callable."""
    if isinstance(aggregator, str):
        if aggregator not in AGGREGATOR_NAMES:
            raise ValueError(
                f"aggregator must be one of {list(AGGREGATOR_NAMES)} or a callable "
                f"(gram, pref) -> weights, got {aggregator!r}"
            )
    elif not callable(aggregator):
        raise TypeError(
            f"aggregator must be a name or a callable (gram, pref) -> weights, got "
            f"{type(aggregator).__name__}"
        )


def aggregator_name(aggregator: AggregatorLike) -> str:
    """The name stats and logs carry: the string itself, or the callable's ``__name__``."""
    if isinstance(aggregator, str):
        return aggregator
    return getattr(aggregator, "__name__", type(aggregator).__name__)


def aggregate(aggregator: AggregatorLike, gram: Tensor, pref: Tensor) -> Solution:
    """``(m, m)`` float64 Gram and ``(m,)`` float64 preferred weights on the host (both checked
    by the caller) -> the aggregator's :class:`Solution`, weights ``(m,)`` float64, checked to be
    finite and non-negative (a built-in solver's too: never a NaN step)."""
    name = aggregator_name(aggregator)
    zero = torch.zeros((), dtype=torch.float64, device=gram.device)
    true = torch.ones((), dtype=torch.bool, device=gram.device)
    if aggregator == "min_norm":
        solution = solve(gram, check=False)
    elif aggregator == "dual_proj":
        solution = dual_proj(gram, pref, check=False)
    elif aggregator == "upgrad":
        solution = upgrad(gram, pref, check=False)
    elif aggregator == "cagrad":
        solution = cagrad(gram, 0.5, pref, check=False)
    elif aggregator == "mean":
        solution = Solution(pref.clone(), zero, zero.long(), true)
    else:
        assert callable(aggregator)
        # Copies: the caller's tensors become the step's stats, which an in-place edit would spoil.
        weights = aggregator(gram.clone(), pref.clone())
        return Solution(_checked(weights, pref, name), zero + torch.nan, zero.long(), true)
    _checked(solution.weights, pref, name)
    return solution


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
