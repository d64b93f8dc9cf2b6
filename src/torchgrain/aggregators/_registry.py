"""The names GRAIN and LocalSGD take for an aggregator: the built-ins' aliases and a user's own.

A name stands for an instance (the built-ins', shared: they hold nothing but their parameters), a
class (a fresh instance, made with no arguments, each time the name is used) or a plain function
``(gram, pref) -> weights``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import Tensor

from torchgrain.aggregators._base import Aggregator
from torchgrain.aggregators._cagrad import CAGrad
from torchgrain.aggregators._dual_proj import DualProj
from torchgrain.aggregators._mean import Mean
from torchgrain.aggregators._min_norm import MinNorm
from torchgrain.aggregators._upgrad import UPGrad

AggregatorFn = Callable[[Tensor, Tensor], Tensor]
T = TypeVar("T")

_BUILT_IN: tuple[Aggregator, ...] = (MinNorm(), Mean(), DualProj(), UPGrad(), CAGrad())
AGGREGATOR_NAMES = tuple(a.name for a in _BUILT_IN)  # the built-in aliases, "min_norm" first
_REGISTRY: dict[str, object] = {a.name: a for a in _BUILT_IN}  # name -> instance, class or fn


def register_aggregator(name: str, *, override: bool = False) -> Callable[[T], T]:
    """Register an aggregator under ``name``, so that ``GRAIN(..., aggregator=name)`` and
    ``LocalSGD(..., aggregator=name)`` use it. A decorator; returns what it decorates unchanged.

    Args:
        name: the string to pick it by (also what the stats call it when picked by name).
        override: replace an aggregator registered under ``name`` already (a built-in too);
            otherwise that is an error.

    The decorated object is a class (an :class:`Aggregator` subclass, or any class whose
    instances are callables ``(gram, pref) -> weights``), instantiated with no arguments each
    time the name is used, or an instance or a function, used as is.

    Example:
        >>> import torch
        >>> import torchgrain
        >>> @torchgrain.register_aggregator("doc_largest_first")
        ... def largest_first(gram, pref):  # the preferred weights, tilted to the larger gradients
        ...     w = pref * gram.diagonal().sqrt()
        ...     return w / w.sum()
        >>> model = torch.nn.Linear(3, 1)
        >>> grain = torchgrain.GRAIN(model, num_groups=2, aggregator="doc_largest_first")
        >>> losses = model(torch.randn(8, 3)).pow(2).squeeze(1)  # (B,)
        >>> grain.backward(losses).aggregator
        'doc_largest_first'
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"an aggregator's name must be a non-empty str, got {name!r}")

    def register(aggregator: T) -> T:
        if not isinstance(aggregator, type) and not callable(aggregator):
            raise TypeError(
                f"register_aggregator({name!r}) takes a class or a callable (gram, pref) -> "
                f"weights, got {type(aggregator).__name__}"
            )
        if name in _REGISTRY and not override:
            raise ValueError(
                f"an aggregator is registered as {name!r} already ({_REGISTRY[name]!r}); pick "
                f"another name, or pass register_aggregator({name!r}, override=True) to replace it"
            )
        _REGISTRY[name] = aggregator
        return aggregator

    return register


def get_aggregator(aggregator: object) -> AggregatorFn:
    """The aggregator a name stands for (a registered class: a new instance of it), or
    ``aggregator`` itself when it is a callable already.

    Raises:
        ValueError: an unknown name (the message lists the registered ones).
        TypeError: neither a name nor a callable.

    Example:
        >>> from torchgrain.aggregators import CAGrad, get_aggregator
        >>> get_aggregator("cagrad"), get_aggregator(CAGrad(c=0.3))
        (CAGrad(c=0.5), CAGrad(c=0.3))
    """
    if isinstance(aggregator, str):
        if aggregator not in _REGISTRY:
            raise ValueError(
                f"aggregator must be one of {list(_REGISTRY)} or a callable (gram, pref) -> "
                f"weights, got {aggregator!r}; register your own with "
                "torchgrain.register_aggregator(name)"
            )
        found = _REGISTRY[aggregator]
        resolved = found() if isinstance(found, type) else found
        if not callable(resolved):  # a registered class whose instances are not callable
            raise TypeError(
                f"aggregator {aggregator!r} is registered as {found!r}, whose instances are not "
                "callables (gram, pref) -> weights; subclass torchgrain.Aggregator"
            )
        return resolved
    if isinstance(aggregator, type):  # calling a class makes an aggregator: its instance was meant
        raise TypeError(
            f"aggregator must be a name or a callable (gram, pref) -> weights, got the class "
            f"{aggregator.__name__}; pass an instance: {aggregator.__name__}()"
        )
    if not callable(aggregator):
        raise TypeError(
            f"aggregator must be a name or a callable (gram, pref) -> weights, got "
            f"{type(aggregator).__name__}"
        )
    return aggregator
