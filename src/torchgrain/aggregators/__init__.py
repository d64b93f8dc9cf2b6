"""Stage 3 of GRAIN as objects: an aggregator maps the ``(m, m)`` Gram of the group gradients and
the ``(m,)`` preferred weights to the ``(m,)`` weights of their combination ``d = sum_k w_k g_k``.
One file per aggregator, each a thin object over its exact solver in :mod:`torchgrain.solvers`:

- ``_base.py``: :class:`Aggregator`, the interface (subclass it for your own);
- ``_min_norm.py``: :class:`MinNorm`, the min-norm point of the hull (GRAIN's own, ``"min_norm"``);
- ``_mean.py``: :class:`Mean`, the preferred combination itself (``"mean"``);
- ``_dual_proj.py``: :class:`DualProj`, the preferred combination projected onto the dual cone
  (``"dual_proj"``);
- ``_upgrad.py``: :class:`UPGrad`, each group gradient projected, then combined (``"upgrad"``);
- ``_cagrad.py``: :class:`CAGrad`, the best worst-group decrease in a ball (``"cagrad"``: c = 0.5);
- ``_registry.py``: the names: :func:`register_aggregator`, :func:`get_aggregator`;
- ``_aggregate.py``: what GRAIN and LocalSGD call on whatever they were given (a name, an
  aggregator, a plain callable ``(gram, pref) -> weights``), and the check of its weights.

Example:
    >>> import torch
    >>> import torchgrain
    >>> from torchgrain.aggregators import CAGrad
    >>> model = torch.nn.Linear(3, 1)
    >>> grain = torchgrain.GRAIN(model, num_groups=2, aggregator=CAGrad(c=0.3))
    >>> stats = grain.backward(model(torch.randn(8, 3)).pow(2).squeeze(1))  # (B,) losses
    >>> stats.aggregator
    'cagrad(c=0.3)'
"""

from torchgrain.aggregators._aggregate import (
    AggregatorLike,
    aggregate,
    aggregator_name,
    check_aggregator,
)
from torchgrain.aggregators._base import Aggregator
from torchgrain.aggregators._cagrad import CAGrad
from torchgrain.aggregators._dual_proj import DualProj
from torchgrain.aggregators._mean import Mean
from torchgrain.aggregators._min_norm import MinNorm
from torchgrain.aggregators._registry import (
    AGGREGATOR_NAMES,
    AggregatorFn,
    get_aggregator,
    register_aggregator,
)
from torchgrain.aggregators._upgrad import UPGrad

__all__ = [
    "AGGREGATOR_NAMES",
    "Aggregator",
    "AggregatorFn",
    "AggregatorLike",
    "CAGrad",
    "DualProj",
    "Mean",
    "MinNorm",
    "UPGrad",
    "aggregate",
    "aggregator_name",
    "check_aggregator",
    "get_aggregator",
    "register_aggregator",
]
