"""LocalSGD: GRAIN's outer step for local SGD across workers (DiLoCo-style)."""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from torchgrain._errors import NonFiniteError, shorten
from torchgrain._inputs import ParamsLike, collect_params
from torchgrain._stats import GrainStats, compute_stats
from torchgrain.aggregators import AggregatorLike, aggregate, aggregator_name, check_aggregator
from torchgrain.exchange._sharded import is_sharded
from torchgrain.exchange._workers import CHANGED, FINGERPRINT, SYNCS, WorkerExchange


@dataclass(frozen=True)
class SyncStats(GrainStats):
    """What one :class:`LocalSGD` sync reports: :class:`GrainStats` over the W workers, whose
    "group gradients" are the pseudo-gradients ``delta_r = anchor - theta_r`` (one per rank, in
    rank order; ``group_sizes`` all 1, so the "mean gradient" is the mean delta, plain model
    averaging's step), plus the sync's own figures.

    Attributes:
        sync: how many syncs this one makes (1 for the first).
        inner_steps: inner optimizer steps since the previous sync.
        seconds: host wall time of the whole sync (checks, exchange, solve, outer step).
        bytes_sent: bytes this rank's payload collectives sent (0 in a single process).
    """

    sync: int = 0
    inner_steps: int = 0
    seconds: float = 0.0
    bytes_sent: int = 0

    def to_dict(self, prefix: str = "local_sgd/") -> dict[str, float]:
        """Scalar diagnostics as Python floats (see :meth:`GrainStats.to_dict`), with the sync's
        count, its inner steps, seconds and bytes."""
        out = super().to_dict(prefix)
        out[prefix + "sync"] = float(self.sync)
        out[prefix + "inner_steps"] = float(self.inner_steps)
        out[prefix + "seconds"] = self.seconds
        out[prefix + "bytes_sent"] = float(self.bytes_sent)
        return out


class LocalSGD:
    r"""Local SGD with GRAIN's outer step: each worker takes ``sync_every`` inner optimizer steps
    on its own data, then the workers' pseudo-gradients are combined by an aggregator instead of
    averaged, and an outer optimizer steps on the combination (DiLoCo, Douillard et al. 2023,
    with the mean replaced).

    Every ``sync_every`` calls of :meth:`step`, with W ranks in ``process_group``:

    .. math::
        \begin{aligned}
        \delta_r &= \theta_{\text{anchor}} - \theta_r, \qquad
            G_{rs} = \langle \delta_r, \delta_s \rangle, \qquad
            w = \text{aggregator}(G, \tfrac{1}{W}\mathbf{1}), \qquad
            d = \textstyle\sum_r w_r \delta_r \\
        \theta &\leftarrow \theta_{\text{anchor}}, \quad \texttt{.grad} = d, \quad
            \texttt{outer\_optimizer.step()}, \quad
            \theta_{\text{anchor}} \leftarrow \theta
        \end{aligned}

    With ``aggregator="mean"`` and the default outer optimizer (SGD, lr 1.0) this is plain model
    averaging; DiLoCo's outer optimizer is SGD with Nesterov momentum 0.9 and lr 0.7. With
    ``"min_norm"``, ``"dual_proj"`` or ``"upgrad"``, ``<d, delta_r> >= 0`` for every worker: the
    outer step moves no worker's local progress backwards to first order. After a sync every rank
    holds bit-identical parameters, the new anchor.

    The Gram is computed without gathering every delta on every rank (see
    :mod:`torchgrain.exchange._workers`): a sync sends the bytes of the ring all-reduce that
    plain model averaging sends, plus a few hundred bytes.

    Args:
        model: an ``nn.Module`` (its parameters with ``requires_grad``), or an iterable of
            parameters, as :class:`~torchgrain.GRAIN` takes them. On construction every rank
            takes the parameters of the group's rank 0 (as DDP does), which become the first
            anchor: build LocalSGD before loading a checkpoint into the model.
        sync_every: H, the inner steps between syncs (an int >= 1).
        aggregator: how the workers' deltas are combined, exactly as :class:`~torchgrain.GRAIN`
            takes it: ``"mean"`` (default), ``"min_norm"``, ``"dual_proj"``, ``"upgrad"``,
            ``"cagrad"`` or another registered name, an :class:`~torchgrain.Aggregator` (e.g.
            ``CAGrad(c=0.3)``), or a callable ``(gram, pref) -> weights``; it gets the
            ``(W, W)`` float64 Gram and ``pref = 1/W`` on the CPU, the same bits on every rank.
        outer_optimizer: a ``torch.optim.Optimizer`` over exactly the model's trainable
            parameters, stepped once per sync on ``.grad = d`` (default: ``SGD(lr=1.0)``). The
            parameters' ``.grad`` from the inner steps is put back after it.
        process_group: the ``torch.distributed`` group of the workers (default: the world group
            when ``torch.distributed`` is initialised, else a single worker, whose outer step is
            Lookahead's). Every rank of it must call :meth:`step` as often as the others.

    Example:
        >>> import torch
        >>> import torchgrain
        >>> model = torch.nn.Linear(4, 1)
        >>> inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
        >>> outer = torch.optim.SGD(model.parameters(), lr=0.7, momentum=0.9, nesterov=True)
        >>> local = torchgrain.LocalSGD(model, sync_every=2, outer_optimizer=outer)
        >>> for _ in range(4):
        ...     inner.zero_grad()
        ...     model(torch.randn(8, 4)).pow(2).mean().backward()
        ...     inner.step()
        ...     stats = local.step()  # None, except after every second inner step
        >>> stats.sync, stats.inner_steps, stats.weights.tolist()
        (2, 2, [1.0])
    """

    def __init__(
        self,
        model: ParamsLike,
        sync_every: int,
        aggregator: AggregatorLike = "mean",
        outer_optimizer: torch.optim.Optimizer | None = None,
        process_group: Any = None,
    ) -> None:
        if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
            raise ValueError(
                f"sync_every must be an int >= 1 (the inner steps between syncs), got "
                f"{sync_every!r}"
            )
        check_aggregator(aggregator)
        self.sync_every = sync_every
        self.aggregator = aggregator
        self._aggregator_name = aggregator_name(aggregator)
        self._module = model if isinstance(model, nn.Module) else None
        self.names, self.params = collect_params(model)
        self._check_params()
        self._signature = self._current_signature()
        if outer_optimizer is None:
            outer_optimizer = torch.optim.SGD(self.params, lr=1.0)
        self._check_outer(outer_optimizer)
        self.outer_optimizer = outer_optimizer
        if process_group is None and dist.is_available() and dist.is_initialized():
            process_group = dist.group.WORLD
        self.process_group = process_group
        self._exchange = (
            None if process_group is None else WorkerExchange(process_group, self.params[0].device)
        )
        self.steps = 0  # inner steps since the last sync
        self.syncs = 0  # syncs done
        with torch.no_grad():
            if self._exchange is not None:
                self._check_agreement(self._exchange.agree(False, self._fingerprint(), 0))
                self._exchange.broadcast(self.params)
            self.anchor = [p.detach().clone() for p in self.params]

    @property
    def world(self) -> int:
        """W, the number of workers."""
        return 1 if self._exchange is None else self._exchange.world

    # ----------------------------------------------------------------------------------- step
    def step(self) -> SyncStats | None:
        """Count one inner step; every ``sync_every``-th call, :meth:`sync`. Returns the sync's
        :class:`SyncStats`, or ``None`` when it did not sync."""
        self.steps += 1
        if self.steps < self.sync_every:
            return None
        return self.sync()

    @torch.no_grad()
    def sync(self) -> SyncStats:
        """The outer step now, whatever the count (every rank must call it at the same point;
        e.g. before an evaluation or at the end of training). The count restarts from 0.

        Raises before any parameter, ``.grad`` or the anchor changes, on every rank alike:
        :class:`~torchgrain.NonFiniteError` when some rank's delta is not finite (lower the inner
        learning rate, or restore a checkpoint); ``RuntimeError`` when some rank's model changed
        since LocalSGD was built, or when the ranks' parameters or sync counts differ; a
        ``RuntimeError`` naming the collective when a peer died or is late (within the process
        group's timeout).
        """
        started = time.perf_counter()
        changed = self._current_signature() != self._signature
        if self._exchange is None:
            if changed:
                self._raise_changed()
            deltas = [a - p for a, p in zip(self.anchor, self.params, strict=True)]
            gram = torch.zeros(1, 1, dtype=torch.float64, device=self.params[0].device)
            for delta in deltas:
                gram += delta.double().pow(2).sum()
        else:
            rows = self._exchange.agree(changed, self._fingerprint(), self.syncs)
            if changed:
                self._raise_changed()
            self._check_agreement(rows)
            gram = self._exchange.gram(self.anchor, self.params)  # (W, W)
        # Host read: the same bits on every rank, so every rank goes on, or raises, alike.
        gram_host = gram.cpu()
        if not bool(torch.isfinite(gram_host).all()):
            self._raise_nonfinite(gram_host)
        W = self.world
        pref = torch.full((W,), 1.0 / W, dtype=torch.float64)
        solved = time.perf_counter()
        solution = aggregate(self.aggregator, gram_host, pref)
        solve_seconds = time.perf_counter() - solved
        if self._exchange is None:
            w = float(solution.weights[0])
            combined = [w * delta for delta in deltas]
        else:
            combined = self._exchange.combine(solution.weights)
        self._outer_step(combined)
        inner, self.steps = self.steps, 0
        self.syncs += 1
        base = compute_stats(
            solution.weights.to(gram.device),
            gram,
            torch.ones(W, dtype=torch.int64, device=gram.device),
            solver_gap=solution.gap.to(gram.device),
            solver_iterations=solution.iterations.to(gram.device),
            solver_seconds=solve_seconds,
            engine="local_sgd",
            aggregator=self._aggregator_name,
        )
        return SyncStats(
            **{f.name: getattr(base, f.name) for f in fields(GrainStats)},
            sync=self.syncs,
            inner_steps=inner,
            seconds=time.perf_counter() - started,
            bytes_sent=0 if self._exchange is None else self._exchange.bytes_sent,
        )

    def _outer_step(self, combined: list[Tensor]) -> None:
        """Parameters back to the anchor, ``.grad = d``, the outer optimizer's step, the new
        anchor; the inner ``.grad`` is put back."""
        inner_grads = [p.grad for p in self.params]
        try:
            for p, a, d in zip(self.params, self.anchor, combined, strict=True):
                p.copy_(a)
                p.grad = d.to(p.dtype)
            self.outer_optimizer.step()
        finally:
            for p, g in zip(self.params, inner_grads, strict=True):
                p.grad = g
        for a, p in zip(self.anchor, self.params, strict=True):
            a.copy_(p)

    # ---------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The anchor, the outer optimizer's state and the counts: with the model's and the inner
        optimizer's own state dicts, a resumed run continues bit-identically. Tensors and
        builtins only, so ``torch.load(..., weights_only=True)`` reads it."""
        return {
            "anchor": [a.clone() for a in self.anchor],
            "outer_optimizer": self.outer_optimizer.state_dict(),
            "steps": self.steps,
            "syncs": self.syncs,
            "sync_every": self.sync_every,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (load the model's own state dict too: its parameters are
        each rank's local ones, not the anchor)."""
        missing = {"anchor", "outer_optimizer", "steps", "syncs"} - set(state)
        if missing:
            raise KeyError(
                f"LocalSGD state_dict is missing {sorted(missing)}; pass local_sgd.state_dict()"
            )
        anchor = list(state["anchor"])
        shapes = [tuple(a.shape) for a in anchor]
        if shapes != [tuple(p.shape) for p in self.params]:
            raise ValueError(
                f"the checkpoint's anchor has {len(anchor)} tensors of shapes {shapes[:5]}..., "
                f"this model {len(self.params)} trainable parameters of other shapes; load a "
                "checkpoint of the same model"
            )
        self.outer_optimizer.load_state_dict(state["outer_optimizer"])
        with torch.no_grad():
            for a, saved in zip(self.anchor, anchor, strict=True):
                a.copy_(saved)
        self.steps = int(state["steps"])
        self.syncs = int(state["syncs"])

    # --------------------------------------------------------------------------------- checks
    def _check_params(self) -> None:
        sharded = [n for n, p in zip(self.names, self.params, strict=True) if is_sharded(p)]
        if sharded:
            raise ValueError(
                f"LocalSGD takes whole parameters on every rank; {shorten(sharded)} are sharded "
                "(FSDP2's fully_shard). Give each worker its whole model, or run FSDP inside each "
                "worker's own process group and LocalSGD across one rank of each"
            )
        devices = sorted({str(p.device) for p in self.params})
        if len(devices) > 1:
            raise ValueError(
                f"LocalSGD's parameters must be on one device, got {devices}; move the model "
                "(model.to(device)) before building LocalSGD"
            )

    def _check_outer(self, optimizer: object) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"outer_optimizer must be a torch.optim.Optimizer over the model's parameters, "
                f"got {type(optimizer).__name__}; e.g. torch.optim.SGD(model.parameters(), "
                "lr=0.7, momentum=0.9, nesterov=True)"
            )
        theirs = {id(p) for group in optimizer.param_groups for p in group["params"]}
        ours = {id(p): name for name, p in zip(self.names, self.params, strict=True)}
        missing = [name for key, name in ours.items() if key not in theirs]
        extra = len(theirs - ours.keys())
        if missing or extra:
            raise ValueError(
                f"outer_optimizer must step exactly the model's trainable parameters: it lacks "
                f"{shorten(missing) if missing else 'none'} and has {extra} others; build it "
                "over model.parameters() (or the same parameters LocalSGD is given)"
            )

    def _current_signature(self) -> list[tuple[str, int, tuple[int, ...], str, str, bool]]:
        named: list[tuple[str, Tensor]] = list(zip(self.names, self.params, strict=True))
        if self._module is not None:
            named = [(n, p) for n, p in self._module.named_parameters() if p.requires_grad]
        return [
            (n, id(p), tuple(p.shape), str(p.dtype), str(p.device), p.requires_grad)
            for n, p in named
        ]

    def _fingerprint(self) -> int:
        """The parameters' names, shapes and dtypes, as one int64 every rank can compare."""
        text = repr(
            [
                (n, tuple(p.shape), str(p.dtype))
                for n, p in zip(self.names, self.params, strict=True)
            ]
        )
        return zlib.crc32(text.encode())

    def _check_agreement(self, rows: Tensor) -> None:
        """Raise on every rank alike when the ranks' rows ``(W, 3)`` disagree."""
        changed = rows[:, CHANGED].nonzero().flatten().tolist()
        if changed:
            self._raise_changed(changed)
        if len(set(rows[:, FINGERPRINT].tolist())) > 1:
            raise RuntimeError(
                "LocalSGD: the ranks' trainable parameters differ in names, shapes or dtypes "
                f"(fingerprints by rank: {rows[:, FINGERPRINT].tolist()}); every rank must build "
                "the same model and freeze the same parameters"
            )
        if len(set(rows[:, SYNCS].tolist())) > 1:
            raise RuntimeError(
                f"LocalSGD: the ranks are at different syncs ({rows[:, SYNCS].tolist()} by rank); "
                "every rank must call step() as often as the others, and sync() at the same point"
            )

    def _raise_changed(self, ranks: list[int] | None = None) -> None:
        before = {s[0]: s for s in self._signature}
        after = {s[0]: s for s in self._current_signature()}
        names = sorted(n for n in before.keys() | after.keys() if before.get(n) != after.get(n))
        where = f"on rank(s) {ranks}" if ranks else f"({shorten(names)})"
        raise RuntimeError(
            f"LocalSGD: the trainable parameters changed since LocalSGD was built {where}: "
            "added, removed, replaced, reshaped, cast, moved or (un)frozen. Nothing was changed "
            "by this sync; build a new LocalSGD (and outer optimizer) after changing the model"
        )

    def _raise_nonfinite(self, gram: Tensor) -> None:
        """Name the ranks whose delta is not finite: their diagonal entry of the Gram is not."""
        ranks = (~torch.isfinite(gram.diagonal())).nonzero().flatten().tolist()
        where = f"rank(s) {ranks}" if ranks else "some rank (the Gram of the deltas overflows)"
        raise NonFiniteError(
            f"LocalSGD: the pseudo-gradient (anchor - parameters) is not finite on {where}; "
            "nothing was changed on any rank (the anchor and every rank's parameters are as they "
            "were). Lower the inner learning rate, or restore the last checkpoint"
        )

    def __repr__(self) -> str:
        return (
            f"LocalSGD(sync_every={self.sync_every}, aggregator={self._aggregator_name!r}, "
            f"world={self.world}, params={len(self.params)}, "
            f"numel={sum(p.numel() for p in self.params)}, syncs={self.syncs})"
        )
