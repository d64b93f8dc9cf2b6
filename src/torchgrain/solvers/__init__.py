"""Stage 3 of GRAIN: ``(m, m)`` Gram -> ``(m,)`` weights on the simplex. Pure functions: no model,
no autograd."""

from torchgrain.solvers._closed_form import min_norm_weights_closed_form
from torchgrain.solvers._wolfe import Solution, default_max_iter, min_norm_weights, solve

__all__ = [
    "Solution",
    "default_max_iter",
    "min_norm_weights",
    "min_norm_weights_closed_form",
    "solve",
]
