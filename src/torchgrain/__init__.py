"""torchgrain: GRAIN (Group Aggregation via Min-Norm Objective) for PyTorch.

Replace the mean over a mini-batch's samples with the min-norm convex combination of group
gradients, so that no group's loss increases to first order::

    grain = torchgrain.GRAIN(model, num_groups=8)
    losses = criterion(model(x), y)      # (B,), reduction="none"
    stats = grain.backward(losses)       # instead of losses.mean().backward()
    optimizer.step()

``GRAIN(model, num_groups=8, aggregator="dual_proj")`` keeps the same one-backward engine and
combines the group gradients by another rule: ``"mean"``, ``"dual_proj"``, ``"upgrad"``,
``"cagrad"`` (the names of the objects in :mod:`torchgrain.aggregators`, e.g. ``CAGrad(c=0.3)``),
your own :class:`Aggregator` or any callable ``(gram, pref) -> weights``.
``LocalSGD(model, sync_every=H)`` combines the pseudo-gradients of workers that each took H local
steps by the same aggregators (DiLoCo-style outer steps).
"""

from torchgrain import aggregators, integrations, losses
from torchgrain._errors import NonFiniteError
from torchgrain._grain import GRAIN
from torchgrain._local_sgd import LocalSGD, SyncStats
from torchgrain._stats import GrainStats
from torchgrain.aggregators import (
    Aggregator,
    CAGrad,
    DualProj,
    Mean,
    MinNorm,
    UPGrad,
    register_aggregator,
)
from torchgrain.engines.rules import Rule, register_rule
from torchgrain.grouping import contiguous_groups, key_groups, random_groups
from torchgrain.solvers import (
    cagrad_weights,
    dual_proj_weights,
    min_norm_weights,
    upgrad_weights,
)

__version__ = "0.1.0"

__all__ = [
    "GRAIN",
    "Aggregator",
    "CAGrad",
    "DualProj",
    "GrainStats",
    "LocalSGD",
    "Mean",
    "MinNorm",
    "NonFiniteError",
    "Rule",
    "SyncStats",
    "UPGrad",
    "__version__",
    "aggregators",
    "cagrad_weights",
    "contiguous_groups",
    "dual_proj_weights",
    "integrations",
    "key_groups",
    "losses",
    "min_norm_weights",
    "random_groups",
    "register_aggregator",
    "register_rule",
    "upgrad_weights",
]
