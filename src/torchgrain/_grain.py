"""GRAIN: wires grouping -> engine -> solver -> ``.grad`` and returns the step's stats."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from torchgrain._errors import NonFiniteError, shorten
from torchgrain._inputs import (
    ParamsLike,
    autocast_off,
    check_losses,
    collect_params,
    group_ids,
    local,
)
from torchgrain._stats import GrainStats, compute_stats, skipped_stats
from torchgrain.aggregators import AggregatorLike, aggregate, aggregator_name, check_aggregator
from torchgrain.engines import (
    DEFAULT_MEMORY_BUDGET,
    ENGINE_NAMES,
    Engine,
    FusedEngine,
    GroupIndex,
    LoopEngine,
)
from torchgrain.engines.rules._base import GroupGrad, add_gram, cat, weighted_sum
from torchgrain.exchange import Exchange, RankExchange, ShardedExchange
from torchgrain.exchange._sharded import check_sharded, is_sharded, unsharded
from torchgrain.solvers import Solution

Grouping = Literal["contiguous", "random", "key"]
NonFinite = Literal["raise", "skip"]


class GRAIN:
    r"""Group Aggregation via Min-Norm Objective: a drop-in replacement for ``loss.backward()``.

    For per-sample losses :math:`l_1..l_B` and a partition of the batch into groups
    :math:`S_1..S_m`:

    .. math::
        \begin{aligned}
        L_k &= \tfrac{1}{|S_k|} \textstyle\sum_{i \in S_k} l_i, \qquad g_k = \nabla_\theta L_k,
            \qquad G_{kl} = \langle g_k, g_l \rangle \\
        w^* &= \arg\min_{w \ge 0,\ \sum_k w_k = 1} w^\top G w, \qquad
            d = \textstyle\sum_k w^*_k g_k \quad\text{is added to } \texttt{.grad}
        \end{aligned}

    so that :math:`\langle d, g_k \rangle \ge \|d\|^2 \ge 0` for every group: no group's loss
    increases to first order. With one group, ``d`` is the mean gradient and GRAIN is plain
    training. The optimizer then steps on ``.grad`` as usual.

    The min-norm point is one *aggregator*: a map from the Gram and the preferred weights
    :math:`p_k = |S_k| / B` (those of the sample mean, :math:`\bar g = \sum_k p_k g_k`) to
    non-negative weights :math:`w`, with :math:`d = \sum_k w_k g_k` at the same one-backward cost:

    - ``"min_norm"`` (default): the min-norm point of the hull (:func:`min_norm_weights`);
      :math:`\langle d, g_k \rangle \ge \|d\|^2`, and :math:`\|d\| \le \|\bar g\|`.
    - ``"mean"``: :math:`\bar g`, as ``losses.mean().backward()``, with every diagnostic.
    - ``"dual_proj"``: :math:`\bar g` projected onto the dual cone
      :math:`\{x : \langle x, g_k \rangle \ge 0\}` (:func:`dual_proj_weights`); exactly
      :math:`\bar g` when it conflicts with no group.
    - ``"upgrad"``: :math:`\sum_k p_k \Pi(g_k)`, each group gradient projected onto the dual
      cone (:func:`upgrad_weights`); :math:`\langle d, g_k \rangle \ge 0`.
    - ``"cagrad"``: the best worst-group decrease within :math:`\|d - \bar g\| \le 0.5
      \|\bar g\|` (:func:`cagrad_weights`); no sign guarantee.

    Args:
        model_or_params: an ``nn.Module`` (its parameters with ``requires_grad``), or an iterable
            of parameters, of ``(name, parameter)`` pairs, or of optimizer-style param groups.
        num_groups: m, the number of groups for the ``"contiguous"`` and ``"random"`` groupings
            (and the id range of explicit ``groups``; inferred from them when ``None``).
        grouping: how to split a batch when ``backward`` gets no ``groups``: ``"contiguous"``
            (consecutive samples), ``"random"`` (a fresh seeded random partition each step), or
            ``"key"`` (one group per distinct value of ``backward(..., keys=...)``, e.g. labels).
        seed: seed of the ``"random"`` grouping (default: drawn from torch's global generator,
            so ``torch.manual_seed`` makes runs repeatable).
        engine: ``"fused"``: every group gradient from one backward pass, by per-layer rules,
            with an exact fallback for the parameters no rule covers (``stats.fallback`` names
            them); needs an ``nn.Module``. ``"loop"``: the reference, one backward per group,
            exact for any model. ``"auto"`` (default): ``"fused"`` for a module, else ``"loop"``.
            The fused engine assumes what mean training assumes of the forward: samples are
            independent, batch first. A BatchNorm in training mode is detected and sends the
            step to the loop engine with a warning; a loss that couples samples (in-batch
            negatives) is not detectable: use ``"loop"`` for it.
        memory_budget: bytes of group gradients the fused engine may keep per step (default
            1 GiB); past it, layers recompute ``d`` from their kept inputs and output gradients
            (one more weight-gradient GEMM, little memory). ``0`` keeps none. Within the budget
            a cost model still picks each Linear weight's path: a weight on very few tokens is
            recomputed, or takes its Gram from the tokens, where that is cheaper. On the CPU
            the kept buffers are reused from step to step (held until :meth:`close`). Inside
            :meth:`accumulate` and across data-parallel ranks every group gradient is computed
            whatever the budget: they are held to the block's end, or streamed to the other
            ranks as they are finished. On an FSDP2 model, a step whose ``m`` full-size group
            gradients exceed the budget takes the low-memory mode (the Gram from the streamed
            shards, then ``d`` through FSDP's own backward: one more backward pass; see
            :mod:`torchgrain.exchange`).
        nonfinite: on NaN/Inf losses or gradients, ``"raise"`` a :class:`NonFiniteError` or
            ``"skip"`` the step (``.grad`` untouched, ``stats.skipped`` True: skip
            ``optimizer.step()`` too). Never a NaN step.
        allow_unused: if False (default), a parameter that no group's loss reaches is an error,
            as in ``torch.autograd.grad``; if True its ``.grad`` is left as it is.
        aggregator: how the group gradients are combined: ``"min_norm"`` (default, the paper's
            GRAIN), ``"mean"`` (the sample mean with every diagnostic: the baseline at GRAIN's
            cost), ``"dual_proj"``, ``"upgrad"``, ``"cagrad"`` (c = 0.5), any name given to
            :func:`~torchgrain.register_aggregator`, an :class:`~torchgrain.Aggregator` (e.g.
            ``CAGrad(c=0.3)``; the names stand for these), or a callable ``(gram, pref) ->
            weights`` called with the non-empty groups' ``(m', m')`` float64 Gram and their
            ``(m',)`` float64 preferred weights (sizes / B) on the CPU, returning ``(m',)``
            finite non-negative weights. Under ``process_group`` every rank calls it on the same
            bits: it must be deterministic. Inside :meth:`accumulate` it also runs on each
            micro-batch's own groups, for that ``backward``'s diagnostics.
        process_group: a ``torch.distributed`` process group (e.g. ``dist.group.WORLD``) for
            data-parallel training: every rank's groups are global groups, and after
            ``backward`` every rank holds the same ``.grad`` (see
            :mod:`torchgrain.exchange`). ``None``: single process, or for a model sharded by
            FSDP2's ``fully_shard`` its mesh's group (every rank's ``.grad`` is then its DTensor
            shard of ``d``). Do not also wrap the model in DDP: GRAIN does the gradient exchange.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import torchgrain
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Linear(4, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> grain = torchgrain.GRAIN(model, num_groups=4)
        >>> x, y = torch.randn(16, 4), torch.randn(16, 1)
        >>> losses = ((model(x) - y) ** 2).mean(dim=1)  # (B,) per-sample losses
        >>> stats = grain.backward(losses)  # instead of losses.mean().backward()
        >>> bool(stats.min_inner >= stats.d_norm**2 - 1e-9)  # every group's loss decreases
        True
        >>> opt.step()
    """

    def __init__(
        self,
        model_or_params: ParamsLike,
        num_groups: int | None = None,
        *,
        grouping: Grouping = "contiguous",
        seed: int | None = None,
        engine: str = "auto",
        memory_budget: float = DEFAULT_MEMORY_BUDGET,
        process_group: Any = None,
        nonfinite: NonFinite = "raise",
        allow_unused: bool = False,
        aggregator: AggregatorLike = "min_norm",
    ) -> None:
        if num_groups is not None and (
            isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1
        ):
            raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
        if grouping not in ("contiguous", "random", "key"):
            raise ValueError(f"grouping must be 'contiguous', 'random' or 'key', got {grouping!r}")
        if engine not in ENGINE_NAMES:
            raise ValueError(f"engine must be one of {list(ENGINE_NAMES)}, got {engine!r}")
        if engine == "fused" and not isinstance(model_or_params, nn.Module):
            raise ValueError(
                "engine='fused' hooks the model's layers: pass the nn.Module, not its parameters "
                "(or use engine='loop')"
            )
        if not memory_budget >= 0:
            raise ValueError(f"memory_budget must be >= 0 bytes, got {memory_budget!r}")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        check_aggregator(aggregator)
        self.aggregator = aggregator
        self._aggregator_name = aggregator_name(aggregator)
        self.num_groups = num_groups
        self.grouping: Grouping = grouping
        if engine == "auto":
            engine = "fused" if isinstance(model_or_params, nn.Module) else "loop"
        self.engine_name = engine
        self.nonfinite: NonFinite = nonfinite
        self.allow_unused = allow_unused
        self._module = model_or_params if isinstance(model_or_params, nn.Module) else None
        self.names, self.params = collect_params(model_or_params)
        self._sharded = any(is_sharded(p) for p in self.params)  # by FSDP2's fully_shard
        self._signature = self._current_signature()
        self.memory_budget = memory_budget
        self._engine: Engine = (
            FusedEngine(model_or_params, memory_budget)  # type: ignore[arg-type]
            if engine == "fused"
            else LoopEngine()
        )
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)
        self.step = 0  # completed (not skipped) steps
        self._acc: Accumulation | None = None
        self.process_group = process_group
        self._exchange: Exchange | None = None
        if self._sharded or process_group is not None:
            self._bind(process_group)

    def _bind(self, process_group: Any) -> None:
        """Exchange the group gradients over ``process_group`` (the mesh's group for an FSDP2
        model when ``None``): the replicated exchange, or the sharded one for FSDP2."""
        if self._sharded:  # FSDP2: every rank ends with its shard of d
            if self._module is None:
                raise ValueError(
                    "GRAIN on an FSDP2-sharded model needs the model itself (it unshards its FSDP "
                    "units for the backward), not its parameters: GRAIN(model, ...)"
                )
            world = None if process_group is None else dist.get_world_size(process_group)
            mesh_group = check_sharded(self.names, self.params, world)
            self.process_group = process_group if process_group is not None else mesh_group
            self._exchange = ShardedExchange(self.process_group, self._row_sparse())
        else:
            self.process_group = process_group
            self._exchange = RankExchange(process_group, self._row_sparse())

    def _row_sparse(self) -> list[int]:
        """The parameters exchanged across ranks on their touched rows: embedding weights."""
        embedded = (
            set()
            if self._module is None
            else {id(mod.weight) for mod in self._module.modules() if isinstance(mod, nn.Embedding)}
        )
        return [i for i, p in enumerate(self.params) if id(p) in embedded and p.dim() == 2]

    def _graph_params(self) -> Any:
        """A context yielding the tensors the autograd graph uses for ``self.params``: the
        parameters themselves, or for an FSDP2 model its unsharded ones (see
        :func:`torchgrain.exchange.unsharded`)."""
        if self._sharded:
            assert self._module is not None
            return unsharded(self._module, self.names)
        return contextlib.nullcontext(self.params)

    # ------------------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Remove the fused engine's hooks from the model (also done when GRAIN is collected)."""
        if isinstance(self._engine, FusedEngine):
            self._engine.close()

    def __enter__(self) -> GRAIN:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The state GRAIN keeps between steps: the step count and the random grouping's RNG."""
        return {"step": self.step, "seed": self.seed, "generator": self._generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a resumed run continues bit-identically on the CPU."""
        missing = {"step", "seed", "generator"} - set(state)
        if missing:
            raise KeyError(
                f"GRAIN state_dict is missing {sorted(missing)}; pass grain.state_dict()"
            )
        self.step = int(state["step"])
        self.seed = int(state["seed"])
        self._generator.set_state(state["generator"])

    # -------------------------------------------------------------------------------- backward
    def backward(
        self, losses: Tensor, groups: Tensor | None = None, *, keys: Tensor | None = None
    ) -> GrainStats:
        """Add the aggregator's combination ``d`` of the group gradients to ``.grad``.

        Where ``losses.mean().backward()`` would add the mean gradient, this adds ``d`` (and
        accumulates into existing ``.grad`` the same way, so ``zero_grad`` keeps its meaning).
        The graph is freed as by ``backward()``. On any error, every ``.grad`` is left as it was.

        Args:
            losses: ``(B,)`` per-sample losses (``reduction="none"``).
            groups: optional ``(B,)`` integer group ids in ``[0, num_groups)``; they win over the
                configured grouping. Empty groups are dropped (weight 0).
            keys: ``(B,)`` integer keys for ``grouping="key"``: one group per distinct key.

        Returns:
            :class:`GrainStats` with the weights, the Gram and the diagnostics.
        """
        try:
            # The Gram and d are computed in the gradients' own precision even when the caller is
            # inside an autocast block (Lightning's training_step is): autocast would run the
            # rules' GEMMs in bfloat16.
            with autocast_off(losses):
                return self._backward(losses, groups, keys)
        finally:
            self._engine.release()  # what the engine still holds (hook records on an error path)

    def _backward(self, losses: Tensor, groups: Tensor | None, keys: Tensor | None) -> GrainStats:
        check_losses(losses)
        self._check_unchanged()
        ids, m = group_ids(  # (B,), m
            losses, groups, keys, self.num_groups, self.grouping, self._generator
        )
        # Host sync: one read decides whether the step can go on (finite losses, ids in range)
        # and brings the group sizes and whether the samples come sorted by group.
        in_range = ids.clamp(0, m - 1)  # counted without a sync (bincount reads its max)
        sizes = torch.zeros(m, dtype=torch.int64, device=ids.device)
        sizes.index_add_(0, in_range, torch.ones_like(in_range))  # (m,)
        head = torch.stack(
            [
                torch.isfinite(losses).all().long(),
                ids.min(),
                ids.max(),
                (ids[1:] >= ids[:-1]).all().long(),
            ]
        )
        finite, low, high, ordered, *counts = torch.cat([head, sizes]).tolist()
        if low < 0 or high >= m:
            raise ValueError(
                f"group ids must lie in [0, {m}), got ids from {low} to {high}; "
                f"use ids 0..{m - 1} or raise num_groups"
            )
        if not finite and self._acc is not None:  # the block learns of it at its end
            return self._collect(_Part([], sizes[sizes > 0], False, {}), m, sizes)
        if not finite and self._exchange is None:
            return self._nonfinite(sizes, "losses contain NaN or Inf")
        kept = [k for k, count in enumerate(counts) if count > 0]  # the non-empty groups
        present = torch.tensor(kept, device=ids.device)  # (m',)
        if len(kept) < m:  # renumber the non-empty groups 0..m'-1 (order kept: still sorted)
            compact = torch.full((m,), -1, dtype=torch.int64, device=ids.device)
            compact[present] = torch.arange(len(kept), device=ids.device)
            ids = compact[ids]
        groups_present = GroupIndex.known(
            ids, sizes[present], tuple(counts[k] for k in kept), bool(ordered)
        )

        if self._exchange is not None and self._acc is None:
            return self._across_ranks(losses, groups_present, sizes[present], bool(finite))

        engine = self._engine
        collective = self._acc is not None  # accumulation: the group gradients are kept
        with self._graph_params() as params:  # FSDP: its units unsharded until the rules ran
            gram_present = engine.gram(  # (m', m')
                losses, groups_present, params, keep_groups=collective
            )
            fallback = dict(getattr(engine, "fallback", {}))
            self._check_reached()
            # Host sync: the (m', m') Gram comes to the host once, to check it and to solve the
            # QP there (a few hundred microseconds, where a fixed-count masked solve on the
            # device would cost ~30 kernel launches per iteration).
            gram_host = gram_present.cpu()
            ok = bool(finite) and bool(torch.isfinite(gram_host).all())
            grads = engine.group_grads() if collective and ok else []
        if self._acc is not None:
            part = _Part(grads, sizes[present], ok, fallback)
            if not ok:
                return self._collect(part, m, sizes)
            # this micro-batch's own diagnostics
            local = self._solve(gram_host, sizes, present, groups_present.counts)
            self._acc.parts.append(part)  # after the solve: if it raises, the block is unchanged
            return self._stats(
                local.weights, gram_present, sizes, present, local, 0.0, engine.name, fallback
            )
        if not ok:
            return self._nonfinite(sizes, "gradients contain NaN or Inf")
        started = time.perf_counter()
        solution = self._solve(gram_host, sizes, present, groups_present.counts)
        seconds = time.perf_counter() - started
        update = engine.combine(solution.weights.to(ids.device))  # d per parameter
        self._write(update)
        return self._stats(
            solution.weights, gram_present, sizes, present, solution, seconds, engine.name, fallback
        )

    def _check_reached(self) -> None:
        """After the engine's ``gram``: every parameter got a gradient, or ``allow_unused``."""
        reached = self._engine.reached()
        unreached = [name for name, hit in zip(self.names, reached, strict=True) if not hit]
        if unreached and not self.allow_unused:
            raise ValueError(
                f"parameters {shorten(unreached)} received no gradient from the losses; pass only "
                "the parameters the loss uses, freeze them (requires_grad_(False)) before building "
                "GRAIN, or set allow_unused=True"
            )

    def _across_ranks(
        self, losses: Tensor, groups: GroupIndex, sizes: Tensor, finite: bool
    ) -> GrainStats:
        """One step whose groups are every rank's (``sizes``: this rank's non-empty ones): agree
        before the backward, stream the group gradients to the other ranks as the engine
        finishes them, Gram, solve, then combine — or, in FSDP2's low-memory mode, a second
        backward of the re-weighted losses through FSDP's own reduce-scatter."""
        exchange, engine = self._exchange, self._engine
        assert exchange is not None
        agreement = exchange.agree(sizes, finite)
        everyone = agreement.sizes  # (W * slots,) every rank's group sizes
        if not agreement.ok:  # no rank runs a backward
            return self._nonfinite(everyone, "losses contain NaN or Inf on some rank")
        low_memory = exchange.sharded and self._over_budget(groups.m)
        stream = exchange.stream(agreement, self.params, keep=not low_memory)
        with self._graph_params() as params:  # FSDP: its units unsharded until the step is done
            engine.gram(
                losses, groups, params, keep_groups=True, sink=stream.add, retain_graph=low_memory
            )
            fallback = dict(getattr(engine, "fallback", {}))
            gram = stream.close()  # every rank's collectives done before any check can raise
            self._check_reached()
            present = (everyone > 0).nonzero().squeeze(-1)
            gram_present = gram[present][:, present]
            gram_host = gram_present.cpu()  # the same bits on every rank: they all agree on it
            if not bool(torch.isfinite(gram_host).all()):
                return self._nonfinite(everyone, "gradients contain NaN or Inf on some rank")
            started = time.perf_counter()
            solution = self._solve(gram_host, everyone, present)
            seconds = time.perf_counter() - started
            weights = torch.zeros(len(everyone), dtype=torch.float64)  # (W * slots,)
            weights[present.cpu()] = solution.weights
            if low_memory:
                self._reweighted_backward(losses, groups, weights, agreement.slots)
                self.step += 1
            else:
                self._write(exchange.combine(weights.to(everyone.device)))
        return self._stats(
            solution.weights, gram_present, everyone, present, solution, seconds, engine.name,
            fallback,
        )  # fmt: skip

    def _over_budget(self, m: int) -> bool:
        """Whether ``m`` full-size group gradients of every parameter exceed ``memory_budget``."""
        size = sum(p.numel() * max(p.element_size(), 4) for p in self.params)
        return m * size > self.memory_budget

    def _reweighted_backward(
        self, losses: Tensor, groups: GroupIndex, weights: Tensor, slots: int
    ) -> None:
        """FSDP2's low-memory mode: ``d`` through FSDP's own backward. This rank's part of
        ``d = sum_k w_k grad L_k`` is the gradient of ``sum_i w_{k(i)} / |S_k| l_i``; FSDP
        reduce-scatters the mean over the W ranks, hence the factor W."""
        exchange = self._exchange
        assert exchange is not None
        mine = weights[exchange.rank * slots : exchange.rank * slots + groups.m]  # (m',)
        counts = torch.tensor(groups.counts, dtype=torch.float64)  # (m',)
        per_group = (mine / counts * exchange.world).to(losses.device, losses.dtype)
        (losses * per_group[groups.ids]).sum().backward()

    def _collect(self, part: _Part, m: int, sizes: Tensor) -> GrainStats:
        """A micro-batch's contribution to its accumulation block's step."""
        assert self._acc is not None
        self._acc.parts.append(part)
        return skipped_stats(
            m, sizes, "NaN or Inf in this micro-batch", self._engine.name, self._aggregator_name
        )

    def _apply(self, parts: list[_Part], engine: str) -> GrainStats:
        """The step over the groups of several micro-batches and/or ranks: join the parts,
        agree across ranks, Gram, solve, combine, write."""
        counts = [int(part.sizes.shape[0]) for part in parts]
        sizes = torch.cat([part.sizes for part in parts])  # (M_local,) all > 0
        ok = all(part.ok for part in parts)
        fallback = {k: v for part in parts for k, v in part.fallback.items()}
        grads = self._join(parts, counts) if ok else []
        if self._exchange is not None:
            agreement = self._exchange.agree(sizes, ok)
            sizes = agreement.sizes  # (W * slots,) every rank's groups
            if not agreement.ok:
                return self._nonfinite(sizes, "NaN or Inf on some rank")
            stream = self._exchange.stream(agreement, self.params)
            for i, g in enumerate(grads):
                stream.add(i, g)
            gram = stream.close()
        else:
            if not ok:
                return self._nonfinite(sizes, "NaN or Inf in some micro-batch")
            gram = torch.zeros(len(sizes), len(sizes), dtype=torch.float64, device=sizes.device)
            for g in grads:
                if g is not None:
                    add_gram(gram, g)
        present = (sizes > 0).nonzero().squeeze(-1)
        gram_present = gram[present][:, present]
        started = time.perf_counter()
        solution = self._solve(gram_present.cpu(), sizes, present)
        seconds = time.perf_counter() - started
        weights = torch.zeros(len(sizes), dtype=torch.float64)
        weights[present.cpu()] = solution.weights
        if self._exchange is not None:
            update = self._exchange.combine(weights.to(sizes.device))
        else:
            update = [
                None if g is None else weighted_sum(weights.to(p.device), g, p.shape).to(p.dtype)
                for g, p in zip(grads, self.params, strict=True)
            ]
        self._write(update)
        return self._stats(
            solution.weights, gram_present, sizes, present, solution, seconds, engine, fallback
        )

    def _join(self, parts: list[_Part], counts: list[int]) -> list[GroupGrad | None]:
        """Per parameter, the group gradients of all parts stacked along the group axis."""
        if len(parts) == 1:
            return parts[0].grads
        grads: list[GroupGrad | None] = []
        for i, p in enumerate(self.params):
            pieces = [part.grads[i] for part in parts]
            grads.append(
                None if all(g is None for g in pieces) else cat(pieces, counts, p.shape, local(p))
            )
        return grads

    def _solve(
        self, gram_host: Tensor, sizes: Tensor, present: Tensor, counts: tuple[int, ...] = ()
    ) -> Solution:
        """The solve stage on the host: the non-empty groups' ``(m', m')`` Gram -> weights, with
        the sample mean's weights (sizes / B) as the preferred combination. ``counts``: the
        non-empty groups' sizes when already on the host (no device read)."""
        if counts:
            pref = torch.tensor(counts, dtype=torch.float64) / sum(counts)  # (m',)
        else:
            pref = sizes[present].to("cpu", torch.float64) / sizes.sum().cpu()
        return aggregate(self.aggregator, gram_host.to(torch.float64), pref)

    def _write(self, update: list[Tensor | None]) -> None:
        """``.grad += d`` (or ``= d``), the only place GRAIN writes gradients."""
        for p, d in zip(self.params, update, strict=True):
            if d is None:
                continue
            if p.grad is None:
                p.grad = d.detach()
            else:
                p.grad.add_(d)
        self.step += 1

    def _stats(
        self,
        weights_present: Tensor,
        gram_present: Tensor,
        sizes: Tensor,
        present: Tensor,
        solution: Solution,
        seconds: float,
        engine: str,
        fallback: dict[str, str],
    ) -> GrainStats:
        m, device = sizes.shape[0], sizes.device
        weights = torch.zeros(m, dtype=torch.float64, device=device)
        weights[present] = weights_present.to(device, torch.float64)
        gram = torch.zeros(m, m, dtype=torch.float64, device=device)
        gram[present[:, None], present[None, :]] = gram_present.to(device)
        return compute_stats(
            weights,
            gram,
            sizes,
            solver_gap=solution.gap.to(device),
            solver_iterations=solution.iterations.to(device),
            solver_seconds=seconds,
            engine=engine,
            fallback=fallback,
            aggregator=self._aggregator_name,
        )

    # ---------------------------------------------------------------------------- accumulation
    @contextlib.contextmanager
    def accumulate(self) -> Iterator[Accumulation]:
        """Gradient accumulation: the groups of every micro-batch are groups of one step.

        Inside the block, each ``grain.backward(losses_j, groups=...)`` computes micro-batch j's
        group gradients and keeps them (its local group k is a global group of its own; pass
        ``groups=torch.zeros(B_j, dtype=torch.long)`` for one group per micro-batch). On leaving
        the block, the aggregator's combination of all of them is added to ``.grad`` — what
        single-shot GRAIN on the joined batch with those groups gives — and the step's stats are
        ``acc.stats``. Each ``backward`` inside returns its micro-batch's own diagnostics.

        Memory: the group gradients of every micro-batch are kept until the block ends, ``M x
        |params|`` for ``M`` groups in all (embedding gradients only on the batch's tokens):
        cheap for PEFT-sized parameter sets, large for full fine-tuning.

        NaN/Inf in any micro-batch skips (or raises at the end of) the whole step. An exception
        inside the block leaves ``.grad`` untouched.

        Example:
            >>> import torch
            >>> import torchgrain
            >>> model = torch.nn.Linear(3, 1)
            >>> grain = torchgrain.GRAIN(model, num_groups=2)
            >>> with grain.accumulate() as acc:
            ...     for _ in range(3):  # 3 micro-batches of 4 samples, 2 groups each
            ...         x, y = torch.randn(4, 3), torch.randn(4, 1)
            ...         _ = grain.backward(((model(x) - y) ** 2).squeeze(1))
            >>> acc.stats.num_groups
            6
        """
        if self._acc is not None:
            raise RuntimeError("grain.accumulate() blocks do not nest; leave the first one first")
        acc = Accumulation()
        self._acc = acc
        try:
            yield acc
        finally:
            self._acc = None
        if not acc.parts:
            raise RuntimeError(
                "the grain.accumulate() block called no grain.backward; nothing was accumulated"
            )
        with autocast_off(self.params[0]):
            acc.stats = self._apply(acc.parts, self._engine.name)

    # ---------------------------------------------------------------------------------- checks
    def _current_signature(self) -> list[tuple[str, int, tuple[int, ...], bool]]:
        named: list[tuple[str, Tensor]] = list(zip(self.names, self.params, strict=True))
        if self._module is not None:
            named = [(n, p) for n, p in self._module.named_parameters() if p.requires_grad]
        # FSDP2 swaps sharded and unsharded parameter objects in and out: names and shapes only
        return [
            (n, 0 if self._sharded else id(p), tuple(p.shape), p.requires_grad) for n, p in named
        ]

    def _stale(self) -> bool:
        """Whether the trainable parameters changed since GRAIN was built."""
        return self._current_signature() != self._signature

    def _check_unchanged(self) -> None:
        now = self._current_signature()
        if now == self._signature:
            return
        before = {s[0]: s for s in self._signature}
        after = {s[0]: s for s in now}
        changed = sorted(n for n in before.keys() | after.keys() if before.get(n) != after.get(n))
        raise RuntimeError(
            f"the trainable parameters changed after GRAIN was built ({shorten(changed)}: added, "
            "removed, replaced, reshaped or (un)frozen); build a new GRAIN after changing the model"
        )

    def _nonfinite(self, sizes: Tensor, reason: str) -> GrainStats:
        m = int(sizes.shape[0])
        if self.nonfinite == "raise":
            raise NonFiniteError(
                f"{reason}; .grad was left untouched. Use GRAIN(..., nonfinite='skip') to skip "
                "such "
                "steps, or lower the learning rate / check the data"
            )
        return skipped_stats(m, sizes, reason, self.engine_name, self._aggregator_name)

    def __repr__(self) -> str:
        return (
            f"GRAIN(num_groups={self.num_groups}, grouping={self.grouping!r}, "
            f"engine={self.engine_name!r}, aggregator={self._aggregator_name!r}, "
            f"nonfinite={self.nonfinite!r}, params={len(self.params)}, "
            f"numel={sum(p.numel() for p in self.params)})"
        )


@dataclass
class _Part:
    """One micro-batch's (or one single step's) contribution to a collective step."""

    grads: list[GroupGrad | None]  # per parameter, (m_j, ...) group gradients
    sizes: Tensor  # (m_j,) sizes of its non-empty groups
    ok: bool  # finite losses and gradients
    fallback: dict[str, str]


@dataclass
class Accumulation:
    """What ``GRAIN.accumulate()`` yields; ``stats`` is set when the block ends."""

    parts: list[_Part] = field(default_factory=list)
    stats: GrainStats | None = None
