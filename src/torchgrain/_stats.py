"""What one GRAIN step reports: the weights, the Gram and the diagnostics derived from them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class GrainStats:
    """The result of :meth:`torchgrain.GRAIN.backward`.

    Every tensor stays on the device it was computed on, so building the stats never waits for
    the device; :meth:`to_dict` reads them to Python floats for a logger (that read does wait).
    Empty groups have weight 0 and zero rows in ``gram``; the norms and inner products are those of
    the combined gradient ``d = sum_k w_k g_k`` and the mean gradient ``sum_k (n_k / B) g_k``.

    Attributes:
        weights: ``(m,)`` float64 weights of the aggregator, ``d = sum_k w_k g_k`` (the min-norm
            ``w*`` by default; 0 for empty groups).
        gram: ``(m, m)`` float64 Gram ``G_kl = <g_k, g_l>`` of the group gradients.
        group_sizes: ``(m,)`` int64 number of samples per group.
        mean_grad_norm: ``()`` ``||mean gradient||`` (what ``losses.mean().backward()`` gives).
        d_norm: ``()`` ``||d||``.
        min_inner: ``()`` ``min_k <d, g_k>`` over non-empty groups; ``>= ||d||^2`` for the
            min-norm point, ``>= 0`` for ``dual_proj`` and ``upgrad``.
        min_cos: ``()`` ``min_k cos(d, g_k)``; NaN when ``d = 0``.
        mean_conflict: ``()`` bool: the mean gradient has a negative inner product with some group
            (a plain step would increase that group's loss to first order).
        mean_distance: ``()`` ``||d - mean gradient|| / ||mean gradient||``: how far the step is
            from plain training's (0 for ``"mean"``; NaN when the mean gradient is 0).
        differs_from_mean: ``()`` bool: the weights differ from the sample mean's (group sizes /
            B) in any bit; ``dual_proj`` and ``upgrad`` keep them exactly on conflict-free steps.
        active_groups: ``()`` int64 number of groups with positive weight.
        gram_condition: ``()`` condition number of the non-empty groups' Gram (inf if singular).
        solver_gap: ``()`` the aggregator's relative KKT residual (about 1e-16 for the built-in
            solvers; 0 for ``"mean"``, NaN for a callable; see each solver).
        solver_iterations: ``()`` int64 solver iterations.
        solver_seconds: host wall time of the solve (float).
        skipped: True when the step was skipped for NaN/Inf (``nonfinite="skip"``); ``.grad`` was
            left untouched and every tensor above is NaN.
        reason: why the step was skipped ("" otherwise).
        engine: the engine that computed the Gram.
        fallback: parameters whose group gradients the fused engine took from the exact
            fallback (per-group autograd), each with the reason; empty for the loop engine.
        aggregator: the aggregator's name (a callable's ``__name__``).
    """

    weights: Tensor
    gram: Tensor
    group_sizes: Tensor
    mean_grad_norm: Tensor
    d_norm: Tensor
    min_inner: Tensor
    min_cos: Tensor
    mean_conflict: Tensor
    mean_distance: Tensor
    differs_from_mean: Tensor
    active_groups: Tensor
    gram_condition: Tensor
    solver_gap: Tensor
    solver_iterations: Tensor
    solver_seconds: float
    skipped: bool = False
    reason: str = ""
    engine: str = "loop"
    fallback: dict[str, str] = field(default_factory=dict)
    aggregator: str = "min_norm"

    @property
    def num_groups(self) -> int:
        """m, the number of groups (empty ones included)."""
        return int(self.weights.shape[0])

    @property
    def d_over_mean(self) -> Tensor:
        """``||d|| / ||mean gradient||``: the step GRAIN takes relative to SGD's (<= 1 for
        ``min_norm`` and ``dual_proj``; up to 1 + c for ``cagrad``)."""
        return self.d_norm / self.mean_grad_norm

    def to_dict(self, prefix: str = "grain/") -> dict[str, float]:
        """Scalar diagnostics as Python floats, keyed for TensorBoard, W&B or CSV loggers.

        Example:
            >>> import torch
            >>> from torchgrain import GRAIN
            >>> w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
            >>> stats = GRAIN([w], num_groups=2).backward(torch.eye(2) @ w)
            >>> logged = stats.to_dict()
            >>> round(logged["grain/d_over_mean"], 6), logged["grain/active_groups"]
            (1.0, 2.0)
        """
        scalars = {
            "d_over_mean": self.d_over_mean,
            "d_norm": self.d_norm,
            "mean_grad_norm": self.mean_grad_norm,
            "min_inner": self.min_inner,
            "min_cos": self.min_cos,
            "mean_conflict": self.mean_conflict,
            "mean_distance": self.mean_distance,
            "differs_from_mean": self.differs_from_mean,
            "active_groups": self.active_groups,
            "gram_condition": self.gram_condition,
            "solver_gap": self.solver_gap,
            "solver_iterations": self.solver_iterations,
        }
        # One host read for all of them.
        values = torch.stack([v.detach().to("cpu", torch.float64) for v in scalars.values()])
        out = {prefix + k: float(v) for k, v in zip(scalars, values.tolist(), strict=True)}
        out[prefix + "solver_seconds"] = self.solver_seconds
        out[prefix + "skipped"] = float(self.skipped)
        out[prefix + "max_weight"] = float(self.weights.max()) if not self.skipped else math.nan
        return out


def compute_stats(
    weights: Tensor, gram: Tensor, group_sizes: Tensor, **solver: object
) -> GrainStats:
    """Derive every diagnostic from the ``(m,)`` weights, the ``(m, m)`` Gram and the sizes."""
    nonempty = group_sizes > 0  # (m,)
    share = group_sizes.to(torch.float64) / group_sizes.sum()  # (m,) mean = sum_k share_k g_k
    Gw = gram @ weights  # (m,) <g_k, d>
    Gs = gram @ share  # (m,) <g_k, mean>
    d_norm2 = (weights @ Gw).clamp_min(0.0)
    g_norm = gram.diagonal().clamp_min(0.0).sqrt()  # (m,)
    d_norm = d_norm2.sqrt()
    delta = weights - share  # (m,) d - mean = sum_k delta_k g_k
    mean_norm = (share @ Gs).clamp_min(0.0).sqrt()
    inf = torch.tensor(torch.inf, dtype=torch.float64, device=gram.device)
    cos = Gw / (g_norm * d_norm)
    usable = nonempty & (g_norm > 0)
    sub = gram[nonempty][:, nonempty]
    eig = torch.linalg.eigvalsh(sub).clamp_min(0.0)  # ascending
    condition = torch.where(eig[0] > 0, eig[-1] / eig[0], inf)
    return GrainStats(
        weights=weights,
        gram=gram,
        group_sizes=group_sizes,
        mean_grad_norm=mean_norm,
        d_norm=d_norm,
        min_inner=torch.where(nonempty, Gw, inf).amin(),
        min_cos=torch.where(usable, cos, inf).amin().where(d_norm > 0, torch.nan),
        mean_conflict=(torch.where(nonempty, Gs, inf) < 0).any(),
        mean_distance=torch.where(
            mean_norm > 0, (delta @ gram @ delta).clamp_min(0.0).sqrt() / mean_norm, torch.nan
        ),
        differs_from_mean=(nonempty & (weights != share)).any(),
        active_groups=(weights > 0).sum(),
        gram_condition=condition,
        **solver,  # type: ignore[arg-type]
    )


def skipped_stats(
    num_groups: int, group_sizes: Tensor, reason: str, engine: str, aggregator: str = "min_norm"
) -> GrainStats:
    """Stats of a step skipped for NaN/Inf: every tensor NaN, ``skipped=True``."""
    nan = torch.full((), torch.nan, dtype=torch.float64, device=group_sizes.device)
    return GrainStats(
        weights=torch.full((num_groups,), torch.nan, dtype=torch.float64, device=nan.device),
        gram=torch.full(
            (num_groups, num_groups), torch.nan, dtype=torch.float64, device=nan.device
        ),
        group_sizes=group_sizes,
        mean_grad_norm=nan,
        d_norm=nan,
        min_inner=nan,
        min_cos=nan,
        mean_conflict=torch.zeros((), dtype=torch.bool, device=nan.device),
        mean_distance=nan,
        differs_from_mean=torch.zeros((), dtype=torch.bool, device=nan.device),
        active_groups=torch.zeros((), dtype=torch.int64, device=nan.device),
        gram_condition=nan,
        solver_gap=nan,
        solver_iterations=torch.zeros((), dtype=torch.int64, device=nan.device),
        solver_seconds=0.0,
        skipped=True,
        reason=reason,
        engine=engine,
        aggregator=aggregator,
    )
