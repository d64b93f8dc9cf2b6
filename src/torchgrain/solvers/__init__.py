"""Stage 3 of GRAIN: ``(m, m)`` Gram (+ the preferred ``(m,)`` weights) -> ``(m,)`` weights.
Pure functions: no model, no autograd. One file per aggregator:

- ``_wolfe.py``: the min-norm point of the hull (GRAIN's own), Wolfe's algorithm;
- ``_dual_proj.py``: the preferred combination projected onto the dual cone (DualProj);
- ``_upgrad.py``: each group gradient projected onto the dual cone, then combined (UPGrad);
- ``_cagrad.py``: the best worst-group decrease in a ball around the preferred combination;
- ``_cone.py``: the exact non-negative QP the last three share;
- ``_aggregators.py``: the names GRAIN takes, and the check of a user's callable.
"""

from torchgrain.solvers._aggregators import (
    AGGREGATOR_NAMES,
    AggregatorFn,
    AggregatorLike,
    aggregate,
    aggregator_name,
    check_aggregator,
)
from torchgrain.solvers._cagrad import cagrad, cagrad_weights
from torchgrain.solvers._closed_form import min_norm_weights_closed_form
from torchgrain.solvers._dual_proj import dual_proj, dual_proj_weights
from torchgrain.solvers._upgrad import upgrad, upgrad_weights
from torchgrain.solvers._wolfe import Solution, default_max_iter, min_norm_weights, solve

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
