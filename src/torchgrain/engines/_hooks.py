"""Forward hooks that record, for every call of a layer with a rule, its input and the autograd
edge of its output — owned by one manager that removes them. Nothing is stored on the user's
modules or parameters."""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

_state = threading.local()


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Calls made inside are not recorded (the rules re-run layers this way)."""
    before = getattr(_state, "paused", False)
    _state.paused = True
    try:
        yield
    finally:
        _state.paused = before


@dataclass
class Call:
    """One recorded call of a layer: ``A`` ``(B, ...)`` and the edge of its output ``(B, ...)``."""

    name: str
    module: nn.Module
    A: Tensor
    edge: GradientEdge
    out_shape: tuple[int, ...]  # the gradient at ``edge`` is reshaped to this
    expanded: bool  # the output had batch size 1 and was broadcast to the batch by the hook
    version: int  # A's version counter when recorded: a later in-place change invalidates A

    @property
    def out_batch(self) -> int:
        return self.out_shape[0]

    @property
    def modified(self) -> bool:
        return self.A._version != self.version


class HookManager:
    """Records layer calls during the forward passes between two GRAIN steps.

    Args:
        model: the model whose layers are hooked.
        rule_for: ``module -> rule or None`` (the registry's lookup).
        expand_broadcast: a layer applied to an input with batch size 1 inside a batch of B (e.g.
            position ids of shape ``(1, T)``) gets its output expanded to ``(B, ...)``, so that
            its output gradient arrives per sample; the values seen downstream are the same.
    """

    def __init__(self, model: nn.Module, rule_for: Any, expand_broadcast: bool = True) -> None:
        self.calls: list[Call] = []
        self.mixing: set[str] = set()
        self.expand_broadcast = expand_broadcast
        self.rules: dict[nn.Module, Any] = {}
        self._batch = 0
        # The model holds the hooks; the hooks hold the manager only weakly, so that dropping the
        # GRAIN object removes them (weakref.finalize below).
        handles = [model.register_forward_pre_hook(_weak(self._forward_starts))]
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                handles.append(module.register_forward_hook(_weak(self._batchnorm_hook)))
                continue
            rule = rule_for(module)
            if rule is not None and rule.param_names(module):
                self.rules[module] = rule
                record = functools.partial(_weak(self._record), name)
                handles.append(module.register_forward_hook(record))
        self._finalizer = weakref.finalize(self, _remove, handles)

    def _record(self, name: str, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if getattr(_state, "paused", False) or not torch.is_grad_enabled():
            return None
        if not args or not isinstance(args[0], Tensor) or args[0].dim() == 0:
            return None  # not recorded: its parameters go to the exact fallback
        if not isinstance(output, Tensor) or output.dim() == 0 or not output.requires_grad:
            return None
        A = args[0]
        self._batch = max(self._batch, A.shape[0])
        expanded = (
            self.expand_broadcast and self._batch > 1 and A.shape[0] == 1 and output.shape[0] == 1
        )
        if expanded:
            A = A.expand(self._batch, *A.shape[1:])
            output = output.expand(self._batch, *output.shape[1:])
        # The edge is taken now, so that a later in-place op on the output (ReLU(inplace=True))
        # does not change what it points at. An output that is a reshaped view of a whole tensor
        # (F.linear on 3-d inputs) is followed to that tensor: an in-place op on the view
        # rebases the view's history and would leave the view's own node out of the graph.
        base = output._base
        whole = (
            base is not None
            and not expanded
            and base.numel() == output.numel()
            and base.is_contiguous()
            and output.is_contiguous()
        )
        edge = get_gradient_edge(base if whole else output)
        self.calls.append(
            Call(name, module, A.detach(), edge, tuple(output.shape), expanded, A._version)
        )
        return output if expanded else None

    def _forward_starts(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not getattr(_state, "paused", False):
            self._batch = 0  # the batch size is learnt anew from each forward's first layers

    def _batchnorm_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if module.training and torch.is_grad_enabled() and not getattr(_state, "paused", False):
            self.mixing.add(
                f"{type(module).__name__} in training mode mixes the samples of a batch"
            )

    def take(self) -> tuple[list[Call], set[str]]:
        """The calls and sample-mixing reasons recorded since the last take, and forget them."""
        calls, mixing = self.calls, self.mixing
        self.calls, self.mixing, self._batch = [], set(), 0
        return calls, mixing

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        self._finalizer()
        self.calls, self.mixing = [], set()


def _weak(method: Any) -> Any:
    """A hook that calls ``method`` while its object lives, holding the object weakly."""
    ref = weakref.WeakMethod(method)

    def hook(*args: Any) -> Any:
        bound = ref()
        return None if bound is None else bound(*args)

    return hook


def _remove(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()


def count_uses(root: Any, params: list[Tensor]) -> tuple[dict[int, int], dict[Any, list[Any]]]:
    """How many times each parameter enters the autograd graph below ``root`` (a grad_fn), and
    the graph: each node's children (the nodes its edges lead to, with repeats).

    A use is an edge into the parameter's ``AccumulateGrad`` node; a cast of the parameter
    (autocast caches one cast per parameter and reuses it) counts the edges into the cast instead.
    """
    wanted = {id(p) for p in params}
    parents: dict[Any, int] = {}  # node -> number of edges into it
    children: dict[Any, list[Any]] = {}
    stack = [root]
    while stack:
        node = stack.pop()
        if node is None or node in children:
            continue
        children[node] = [child for child, _ in node.next_functions if child is not None]
        for child in children[node]:
            parents[child] = parents.get(child, 0) + 1
            stack.append(child)
    uses: dict[int, int] = {}
    for node, count in parents.items():
        variable = getattr(node, "variable", None)
        if variable is None or id(variable) not in wanted:
            continue
        uses[id(variable)] = uses.get(id(variable), 0) + count
    # Casts: an edge into AccumulateGrad from a ToCopyBackward node stands for the cast's uses.
    for node, below in children.items():
        if type(node).__name__.startswith("ToCopyBackward"):
            for child in below:
                variable = getattr(child, "variable", None)
                if variable is not None and id(variable) in wanted:
                    uses[id(variable)] += parents.get(node, 1) - 1
    return uses, children


def reaches(root: Any, targets: set[Any], graph: dict[Any, list[Any]] | None = None) -> set[Any]:
    """The nodes of the autograd graph below ``root`` from which a node of ``targets`` is
    reached by one or more edges: the nodes a backward to those targets runs (targets that lie
    below other targets included). ``graph``: the children already known of some nodes
    (:func:`count_uses`'s), read instead of walking their edges again."""
    found: set[Any] = set()
    visited: set[Any] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        children = graph.get(node) if graph is not None else None
        if children is None:
            children = [child for child, _ in node.next_functions if child is not None]
        if expanded:  # every child is done (the graph has no cycles)
            if any(child in targets or child in found for child in children):
                found.add(node)
        elif node not in visited:
            visited.add(node)
            stack.append((node, True))
            stack.extend((child, False) for child in children if child not in visited)
    return found


def backward_to_outputs(
    root: Tensor,
    calls: list[Call],
    serve: Callable[[Call, Tensor | None], None],
    *,
    stream: bool,
    retain_graph: bool = False,
    graph: dict[Any, list[Any]] | None = None,
) -> None:
    """One backward from ``root`` to the recorded calls' outputs, ``serve(call, Bk)`` for each
    call (``Bk`` ``None`` where its output does not reach ``root``).

    ``stream``: a call whose output's node lies above another call's is served from a hook on
    that node as ``Bk`` arrives, so that autograd frees ``Bk`` once the backward has passed it;
    only the others (those with no recorded call below them) are asked of ``autograd.grad`` and
    served, in ``calls``' order, after it. Otherwise every call is asked for, and ``Bk`` is held
    until the backward ends. ``graph``: the graph's children as :func:`count_uses` found them."""
    asked, handles = calls, []
    if stream:
        below = reaches(root.grad_fn, {c.edge.node for c in calls}, graph)
        asked = [c for c in calls if c.edge.node not in below]
        for call in calls:
            if call.edge.node in below:  # its node runs on the way to a call asked for

                def hook(grad_outputs: tuple[Tensor | None, ...], call: Call = call) -> None:
                    serve(call, grad_outputs[call.edge.output_nr])

                handles.append(call.edge.node.register_prehook(hook))
    try:
        bks = torch.autograd.grad(
            root, [c.edge for c in asked], allow_unused=True, retain_graph=retain_graph
        )
    finally:
        for handle in handles:
            handle.remove()
    for call, bk in zip(asked, bks, strict=True):
        serve(call, bk)
