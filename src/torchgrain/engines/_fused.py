"""The fused engine: every group gradient from one backward pass.

During the forward, :class:`HookManager` records each hooked layer's input ``A`` and the autograd
edge of its output. ``gram`` then runs one backward of ``sum_k L_k`` that asks autograd for the
gradients ``Bk`` at those edges only — so autograd computes the input gradients that
backpropagation needs and skips every weight gradient — and each layer's rule splits its weight
gradient by group (the same FLOPs, m GEMMs instead of one). Per parameter the engine then either

- keeps the ``(m, *shape)`` group gradients (memory ``m x |p|``; ``d`` is a weighted sum), or
- keeps nothing but ``A`` and ``Bk`` and recomputes ``d`` as one more weight-gradient GEMM with
  ``Bk_i`` scaled by ``w_{k(i)}`` (the book-keeping mode),

choosing "keep" in parameter order while the kept bytes stay within ``memory_budget`` and the
rule's cost model does not find recomputing cheaper (``keep_pays``: a Linear weight on very few
tokens). A rule may also offer a Gram block without group gradients (``ghost_gram``: a Linear
weight on few tokens), which it takes when its cost model finds it cheaper than both.
The Linear and Embedding rules' buffers come from a workspace reused from step to step
(``_workspace``). On the CPU each layer's rule is served as its ``Bk`` arrives (a hook on its
output's autograd node), so that autograd frees ``Bk`` as plain training would, wherever the
order cannot change which parameters are kept (all fit ``memory_budget``, or none).

Exactness: a parameter is served by its rule only if every use of it in the autograd graph is a
recorded call whose input and output have the batch dimension B first and whose input was not
modified in place; every other trainable parameter goes to the exact fallback (per-group autograd
restricted to those parameters), named in ``fallback`` with the reason. A layer that mixes samples
(BatchNorm in training mode) makes the whole step use the reference loop engine, with a warning.
What the engine cannot see: a loss that couples samples (in-batch negatives) or a layer that
mixes samples without being a BatchNorm; use ``engine="loop"`` for those.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from torchgrain.engines._groups import GroupIndex
from torchgrain.engines._hooks import Call, HookManager, backward_to_outputs, count_uses
from torchgrain.engines._loop import LoopEngine, per_group_gradients
from torchgrain.engines._workspace import Workspace
from torchgrain.engines.rules import find_rule
from torchgrain.engines.rules._base import GroupGrad, Rows, add, add_gram, nbytes, weighted_sum

DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of kept group gradients (1 GiB)
SMALL_GRAM_VALUES = 4096  # 1-D parameters up to this size take their Gram blocks together


def _small_vector(grad: GroupGrad, m: int) -> Tensor | None:
    """The ``(m, P)`` group gradients of a 1-D parameter of at most ``SMALL_GRAM_VALUES``."""
    if isinstance(grad, Tensor) and grad.dim() == 2 and grad.numel() <= m * SMALL_GRAM_VALUES:
        return grad
    return None


class FusedEngine:
    """One-backward group Gram with per-layer rules; see the module docstring.

    Args:
        model: the model (hooked once, at construction, by a :class:`HookManager`).
        memory_budget: bytes of group gradients the engine may keep between ``gram`` and
            ``combine``; parameters past it use the book-keeping mode, as do those whose rule
            finds recomputing ``d`` cheaper (``keep_pays``). ``0`` keeps none.
        expand_broadcast: see :class:`HookManager`.
    """

    name = "fused"

    def __init__(
        self,
        model: nn.Module,
        memory_budget: float = DEFAULT_MEMORY_BUDGET,
        expand_broadcast: bool = True,
    ) -> None:
        self.hooks = HookManager(model, find_rule, expand_broadcast)
        self.memory_budget = memory_budget
        self._model = weakref.ref(model)
        self._owner: dict[int, tuple[str, nn.Module]] = {}  # id(param) -> (qualified name, module)
        self._index_owners()
        self._warned: set[str] = set()
        self._workspace = Workspace()  # the group-gradient buffers, reused from step to step
        self._reset()

    def _index_owners(self) -> None:
        """Name and module of every parameter the model holds now (FSDP2 swaps its unsharded
        parameters in for the backward: they are indexed when first seen)."""
        model = self._model()
        for name, module in [] if model is None else model.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                self._owner.setdefault(id(p), (f"{name}.{pname}" if name else pname, module))

    def _reset(self) -> None:
        self.fallback: dict[str, str] = {}  # parameter name -> why it used the exact fallback
        self.kept_bytes = 0
        self._params: list[Tensor] = []
        self._delegate: LoopEngine | None = None
        self._kept: dict[int, GroupGrad] = {}  # param index -> group gradients
        self._recompute: dict[int, list[tuple[Call, str, Tensor]]] = {}  # index -> (call, name, Bk)
        self._fallback_grads: dict[int, Tensor] = {}  # index -> (m, *shape)
        # the 1-D parameters' group gradients side by side, (m, sum P), and the columns of each
        # kept one: their d is one product in combine
        self._joint: tuple[Tensor, dict[int, tuple[int, int]]] | None = None
        self._reached: list[bool] = []
        self._groups: GroupIndex | None = None

    def close(self) -> None:
        self.hooks.remove()
        self._workspace.clear()

    def release(self) -> None:
        """Drop the recorded calls and anything kept for ``combine``."""
        self.hooks.take()
        self._reset()

    # --------------------------------------------------------------------------------- gram
    def gram(
        self,
        losses: Tensor,
        groups: GroupIndex,
        params: list[Tensor],
        *,
        keep_groups: bool = False,
        sink: Callable[[int, GroupGrad], None] | None = None,
        retain_graph: bool = False,
    ) -> Tensor:
        self._reset()
        self._workspace.begin()
        self._params, self._groups = params, groups
        if any(id(p) not in self._owner for p in params):
            self._index_owners()
        calls, mixing = self.hooks.take()
        if groups.m == 1 and not keep_groups:  # d is the plain gradient, bit for bit
            self._delegate = LoopEngine()
            return self._delegate.gram(losses, groups, params, retain_graph=retain_graph)
        if mixing:
            reason = "; ".join(sorted(mixing))
            if reason not in self._warned:
                self._warned.add(reason)
                warnings.warn(
                    f"{reason}: GRAIN uses the exact loop engine (m backward passes) for "
                    "this model; use GroupNorm/LayerNorm or put BatchNorm in eval mode for "
                    "the one-backward engine",
                    stacklevel=4,
                )
            self._delegate = LoopEngine()
            self.fallback = {self._name(p): reason for p in params}
            return self._delegate.gram(losses, groups, params, sink=sink, retain_graph=retain_graph)

        group_losses = groups.group_means(losses)  # (m,)
        index = {id(p): i for i, p in enumerate(params)}
        uses, graph = count_uses(group_losses.grad_fn, params)
        covered = self._cover(calls, index, groups.batch_size, graph)
        rule_params: dict[int, list[tuple[Call, str]]] = {}
        fallback: list[int] = []
        for i, p in enumerate(params):
            n_uses, mine = uses.get(id(p), 0), covered.get(i, [])
            if n_uses == 0:
                continue  # unreached
            why: str | None = self.fallback.get(self._name(p))
            if why is None and not mine:
                owner = self._owner.get(id(p), ("", None))[1]
                why = (
                    f"no rule for {type(owner).__name__}"
                    if owner not in self.hooks.rules
                    else "no recorded call of its layer reaches the losses (input passed by "
                    "keyword, or its output modified in place through a view)"
                )
            elif why is None and len(mine) != n_uses:
                why = f"used {n_uses} times in the graph but {len(mine)} times through its layer"
            if why is None:
                rule_params[i] = mine
            else:
                self.fallback[self._name(p)] = why
                fallback.append(i)
        self._reached = [uses.get(id(p), 0) > 0 for p in params]

        m = groups.m
        gram = torch.zeros(m, m, dtype=torch.float64, device=losses.device)
        edges = list({id(c): c for calls_ in rule_params.values() for c, _ in calls_}.values())
        if fallback:
            stacks = per_group_gradients(
                group_losses,
                [params[i] for i in fallback],
                retain_graph=retain_graph or bool(edges),
            )
            for i, stack in zip(fallback, stacks, strict=True):
                if stack is not None and sink is not None:
                    sink(i, stack)
                elif stack is not None:  # reached (uses > 0), so never None in practice
                    self._fallback_grads[i] = stack
                    add_gram(gram, stack)
        if edges:
            root = group_losses.sum()  # the backward's root, built with autograd on
            with self._workspace.active(), torch.no_grad():
                gram += self._rule_grams(
                    rule_params, edges, root, graph, groups, keep_groups, sink, retain_graph
                )
        return gram

    def _cover(
        self, calls: list[Call], index: dict[int, int], B: int, graph: dict[Any, list[Any]]
    ) -> dict[int, list[tuple[Call, str]]]:
        """param index -> its recorded (call, param name) pairs; sets fallback reasons."""
        covered: dict[int, list[tuple[Call, str]]] = {}
        for call in calls:
            if call.edge.node not in graph:
                continue  # from a forward whose output these losses do not use
            rule = self.hooks.rules[call.module]
            problem = None
            if call.A.shape[0] != B or call.out_batch != B:
                problem = (
                    f"{call.name} saw batch size {call.A.shape[0]} (input) / {call.out_batch} "
                    f"(output), not B={B}"
                )
            elif call.modified:
                problem = f"the input of {call.name} was modified in place after the layer used it"
            for pname in rule.param_names(call.module):
                i = index.get(id(call.module._parameters[pname]))
                if i is None:
                    continue
                covered.setdefault(i, []).append((call, pname))
                if problem:
                    self.fallback.setdefault(self._name(self._params[i]), problem)
        return covered

    def _rule_grams(
        self,
        rule_params: dict[int, list[tuple[Call, str]]],
        edges: list[Call],
        root: Tensor,
        graph: dict[Any, list[Any]],
        groups: GroupIndex,
        keep_all: bool,
        sink: Callable[[int, GroupGrad], None] | None,
        retain_graph: bool,
    ) -> Tensor:
        """The rules' Gram blocks: one backward to the recorded layers' outputs, each layer's
        rule served its output gradient ``Bk``.

        Streamed where the order cannot matter (see :meth:`_streams`): a layer is served from a
        hook on its output's autograd node, as its ``Bk`` arrives, and autograd frees ``Bk``
        once the backward has passed it, as in plain training; only the layers with no recorded
        layer below them are asked of ``autograd.grad``. Otherwise every ``Bk`` is held until
        the backward ends and the layers are served in parameter order.
        """
        gram = torch.zeros(groups.m, groups.m, dtype=torch.float64, device=groups.ids.device)
        pending: dict[int, GroupGrad | None] = {}
        remaining = {i: len(v) for i, v in rule_params.items()}
        users: dict[int, list[tuple[int, str]]] = {}
        for i, pairs in rule_params.items():
            for call, pname in pairs:
                users.setdefault(id(call), []).append((i, pname))

        # The 1-D parameters (biases, norm scales: most of a transformer's parameters, few of its
        # values) take their Gram blocks together, side by side as one (m, sum P) matrix, at the
        # end: one product instead of one per parameter, whose fixed cost (about 50 us on the
        # CPU, a few kernel launches on a GPU) outweighs their few values.
        small: list[tuple[int, Tensor]] = []  # (index, (m, P)), P <= SMALL_GRAM_VALUES
        given: list[Tensor] = []  # book-keeping's small buffers, given back after their Gram

        def finish(i: int) -> None:  # every call of parameter i is in: its Gram, keep or not
            total = pending.pop(i, None)
            if total is None:
                return
            if sink is not None:  # on its way to the other ranks; not kept here
                del self._recompute[i]
                sink(i, total)
                return
            held = _small_vector(total, groups.m)  # a bias, a norm scale: its Gram comes later
            if held is None:
                add_gram(gram, total)
            else:
                small.append((i, held))
            size = nbytes(total)
            if keep_all or (self._fits(size) and self._keep_pays(i, groups.m)):
                self.kept_bytes += size
                self._kept[i] = total
                del self._recompute[i]
            elif held is not None:
                given.append(held)
            else:  # book-keeping: its buffer serves the next
                self._workspace.give(total.values if isinstance(total, Rows) else total)

        def serve(call: Call, bk: Tensor | None) -> None:
            mine = users[id(call)]
            if bk is None:  # this call's output does not reach the losses
                for i, _ in mine:
                    remaining[i] -= 1
                    if remaining[i] == 0:
                        finish(i)
                return
            bk = bk.reshape(call.out_shape)
            rule = self.hooks.rules[call.module]
            ghosted = (
                frozenset()
                if keep_all
                else self._ghost(rule, call, bk, groups, mine, rule_params, gram)
            )
            for i, pname in mine:
                if pname in ghosted:
                    self._recompute.setdefault(i, []).append((call, pname, bk))
                    remaining[i] -= 1
            todo = [(i, pname) for i, pname in mine if pname not in ghosted]
            if not todo:
                return
            extra: dict[str, Any] = {}
            if ghosted:
                extra["skip"] = ghosted
            if getattr(rule, "reads_node", False):
                extra["node"] = call.edge.node  # not run yet when served from its hook
            grads = rule.group_grads(call.module, call.A, bk, groups, **extra)
            for i, pname in todo:
                shape = self._params[i].shape
                before, new = pending.get(i), grads[pname]
                pending[i] = add(before, new, shape)
                for part in (before, new):  # summed into the other or into new rows
                    if part is not None and part is not pending[i]:
                        self._workspace.give(part.values if isinstance(part, Rows) else part)
                self._recompute.setdefault(i, []).append((call, pname, bk))
                remaining[i] -= 1
                if remaining[i] == 0:
                    finish(i)

        stream = sink is None and self._streams(rule_params, groups.m, keep_all)
        backward_to_outputs(
            root, edges, serve, stream=stream, retain_graph=retain_graph, graph=graph
        )
        if small:
            joint = torch.cat([v for _, v in small], dim=1) if len(small) > 1 else small[0][1]
            add_gram(gram, joint)
            spans, start = {}, 0
            for i, vector in small:
                if i in self._kept:
                    spans[i] = (start, start + vector.shape[1])
                start += vector.shape[1]
            self._joint = (joint, spans) if spans else None
        for buffer in given:
            self._workspace.give(buffer)
        return gram

    def _streams(
        self, rule_params: dict[int, list[tuple[Call, str]]], m: int, keep_all: bool
    ) -> bool:
        """Whether the layers can be served in the backward's order: on the CPU (where a ``Bk``
        held to the end of the backward is memory the allocator returns to the OS and faults in
        again the next step), when which parameters keep their group gradients cannot depend on
        the order — all of them fit ``memory_budget``, or none does. Group gradients bound for
        other ranks keep the parameter order (the caller checks)."""
        calls = [c for pairs in rule_params.values() for c, _ in pairs]
        if not calls or calls[0].A.device.type != "cpu":
            return False
        if keep_all or self.memory_budget <= 0:
            return True
        upper = 0  # the most bytes the kept group gradients can take
        for i, pairs in rule_params.items():
            p = self._params[i]
            numel = p.numel()
            if p.dim() and all(isinstance(c.module, nn.Embedding) for c, _ in pairs):
                tokens = sum(c.A.numel() for c, _ in pairs)  # kept on the batch's tokens only
                numel = min(p.shape[0], tokens) * (numel // p.shape[0])
            upper += m * numel * p.element_size()
        return self.kept_bytes + upper <= self.memory_budget

    def _fits(self, size: int) -> bool:
        """Whether ``size`` more bytes of kept group gradients stay within the budget."""
        return self.kept_bytes + size <= self.memory_budget

    def _keep_pays(self, i: int, m: int) -> bool:
        """Whether keeping parameter i's group gradients is cheaper than recomputing its ``d``
        (the rules' cost models, e.g. a Linear weight on very few tokens; keep by default)."""
        for call, pname, bk in self._recompute[i]:
            pays = getattr(self.hooks.rules[call.module], "keep_pays", None)
            if pays is not None and not pays(call.module, call.A, bk, m, pname):
                return False
        return True

    def _ghost(
        self,
        rule: Any,
        call: Call,
        bk: Tensor,
        groups: GroupIndex,
        users: list[tuple[int, str]],
        rule_params: dict[int, list[tuple[Call, str]]],
        gram: Tensor,
    ) -> frozenset[str]:
        """Add the Gram blocks a rule computes without group gradients (``rule.ghost_gram``,
        e.g. a Linear weight on few tokens) to ``gram``; return those parameter names. Only a
        parameter with a single call qualifies: with more, the cross-call terms are needed. The
        rule weighs the ghost against keeping the group gradients only if they would fit."""
        ghost = getattr(rule, "ghost_gram", None)
        if ghost is None:
            return frozenset()
        done = set()
        for i, pname in users:
            if len(rule_params[i]) == 1:
                size = groups.m * self._params[i].numel() * bk.element_size()
                block = ghost(call.module, call.A, bk, groups, pname, self._fits(size))
                if block is not None:
                    gram += block
                    done.add(pname)
        return frozenset(done)

    def group_grads(self) -> list[GroupGrad | None]:
        """After :meth:`gram`: per parameter, its ``(m, ...)`` group gradients (recomputed for
        the parameters in book-keeping mode); releases what ``combine`` would have used."""
        if self._delegate is not None:
            out = self._delegate.group_grads()
            self._reset()
            return out
        grads: list[GroupGrad | None] = [None] * len(self._params)
        for i, kept in self._kept.items():
            grads[i] = kept
        for i, stack in self._fallback_grads.items():
            grads[i] = stack
        assert self._groups is not None
        per_call = self._per_call(
            lambda call, bk: self.hooks.rules[call.module].group_grads(
                call.module, call.A, bk, self._groups
            )
        )
        for i, entries in self._recompute.items():
            total: GroupGrad | None = None
            for call, pname, _ in entries:
                total = add(total, per_call[id(call)][pname], self._params[i].shape)
            grads[i] = total
        self._reset()
        return grads

    def reached(self) -> list[bool]:
        if self._delegate is not None:
            return self._delegate.reached()
        return self._reached

    # ------------------------------------------------------------------------------ combine
    def combine(self, weights: Tensor) -> list[Tensor | None]:
        if self._delegate is not None:
            delegated = self._delegate.combine(weights)
            self._reset()
            return delegated
        assert self._groups is not None
        out: list[Tensor | None] = [None] * len(self._params)
        cast: dict[torch.dtype, Tensor] = {}  # the weights in each dtype, cast once per step

        def like(dtype: torch.dtype) -> Tensor:
            if dtype not in cast:
                cast[dtype] = weights.to(dtype)
            return cast[dtype]

        spans: dict[int, tuple[int, int]] = {}
        if self._joint is not None:  # every kept 1-D parameter's d, from one product
            joint, spans = self._joint
            joint_d = like(joint.dtype) @ joint  # (sum P,)
        for i, grads in self._kept.items():
            values = grads.values if isinstance(grads, Rows) else grads
            if i in spans:
                d_i = joint_d[spans[i][0] : spans[i][1]]  # a view: the .grads share one buffer
            else:
                d_i = weighted_sum(like(values.dtype), grads, self._params[i].shape)
            out[i] = d_i.to(self._params[i].dtype)
            self._workspace.give(values)  # held by nothing else: d is a new tensor
        for i, stack in self._fallback_grads.items():
            out[i] = weighted_sum(like(stack.dtype), stack, self._params[i].shape)

        per_sample: dict[torch.dtype, Tensor] = {}  # (B,) w_{k(i)}, once per dtype
        ids = self._groups.ids

        def scaled(call: Call, bk: Tensor) -> dict[str, Tensor]:
            if bk.dtype not in per_sample:
                per_sample[bk.dtype] = like(bk.dtype)[ids]
            weighted = bk * per_sample[bk.dtype].reshape(-1, *([1] * (bk.dim() - 1)))
            return self.hooks.rules[call.module].combine(call.module, call.A, weighted)

        per_call = self._per_call(scaled)
        for i, entries in self._recompute.items():
            parts = [per_call[id(call)][pname] for call, pname, _ in entries]
            out[i] = sum(parts[1:], parts[0]).to(self._params[i].dtype)
        self._reset()
        return out

    def _per_call(self, fn: Any) -> dict[int, Any]:
        """``fn(call, Bk)`` once per recorded call that some book-keeping parameter needs (a
        Linear's weight and bias share one call)."""
        calls = {
            id(call): (call, bk) for entries in self._recompute.values() for call, _, bk in entries
        }
        return {key: fn(call, bk) for key, (call, bk) in calls.items()}

    def _name(self, p: Tensor) -> str:
        return self._owner.get(id(p), (f"param@{id(p):x}", None))[0]
