"""Stage 3 of GRAIN: ``(m, m)`` Gram (+ the preferred ``(m,)`` weights) -> ``(m,)`` weights.
Pure functions: no model, no autograd. One file per aggregator:

- ``_wolfe.py``: the min-norm point of the hull (GRAIN's own), Wolfe's algorithm;
- ``_dual_proj.py``: the preferred combination projected onto the dual cone (DualProj);
- ``_upgrad.py``: each group gradient projected onto the dual cone, then combined (UPGrad);
- ``_cagrad.py``: the best worst-group decrease in a ball around the preferred combination;
- ``_cone.py``: the exact non-negative QP the last three share.

The same maps as objects, with the names GRAIN takes, are in :mod:`torchgrain.aggregators`; the
names of its plumbing that were first defined here are still found here (``_MOVED``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torchgrain.solvers._cagrad import cagrad, cagrad_weights
from torchgrain.solvers._closed_form import min_norm_weights_closed_form
from torchgrain.solvers._dual_proj import dual_proj, dual_proj_weights
from torchgrain.solvers._upgrad import upgrad, upgrad_weights
from torchgrain.solvers._wolfe import Solution, default_max_iter, min_norm_weights, solve

if TYPE_CHECKING:
    from torchgrain.aggregators import (
        AGGREGATOR_NAMES,
        AggregatorFn,
        AggregatorLike,
        aggregate,
        aggregator_name,
        check_aggregator,
    )

# Names that moved to torchgrain.aggregators, looked up there on first use: that package builds on
# this one, so importing it here would be a cycle.
_MOVED = (
    "AGGREGATOR_NAMES",
    "AggregatorFn",
    "AggregatorLike",
    "aggregate",
    "aggregator_name",
    "check_aggregator",
)


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import torchgrain.aggregators

        return getattr(torchgrain.aggregators, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AGGREGATOR_NAMES",
    "AggregatorFn",
    "AggregatorLike",
    "Solution",
    "aggregate",
    "aggregator_name",
    "cagrad",
    "cagrad_weights",
    "check_aggregator",
    "default_max_iter",
    "dual_proj",
    "dual_proj_weights",
    "min_norm_weights",
    "min_norm_weights_closed_form",
    "solve",
    "upgrad",
    "upgrad_weights",
]
