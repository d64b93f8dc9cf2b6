"""Exact min-norm point of a convex hull given only its Gram matrix (Wolfe, 1976).

Given the Gram matrix ``G`` of m points ``g_1..g_m`` (``G_kl = <g_k, g_l>``), find

    w* = argmin_{w >= 0, sum(w) = 1}  w^T G w

so that ``d = sum_k w*_k g_k`` is the point of ``conv{g_1..g_m}`` closest to the origin.

Wolfe's algorithm keeps an active set ``S`` of affinely independent points and a weight vector
``w`` supported on ``S``. Each iteration computes the minimiser ``v`` of ``||sum v_k g_k||`` over
the *affine* hull of ``S``:

- if ``v > 0`` on ``S`` (a *major* step), ``w = v``; the point is optimal when no other point has
  ``<g_j, d> < ||d||^2`` (the KKT condition, checked up to ``tol``), else the most violating
  ``j`` joins ``S``;
- otherwise (a *minor* step) ``w`` moves towards ``v`` until its first coordinate reaches zero,
  and that point leaves ``S``.

The affine minimiser is ``v = u / sum(u)`` with ``(1 1^T + G_SS) u = 1``: that matrix is
``[1; P]^T [1; P]``, positive definite exactly when ``S`` is affinely independent, and it stays well
scaled because ``G`` is normalised to a unit largest diagonal first (the weights are invariant to
scaling ``G``).

Two implementations of the same iteration, tested against each other:

- ``_solve_masked`` writes it on masks over all m coordinates, so it runs batched over
  ``(..., m, m)`` on any device and never asks the host about the data: it runs a fixed number of
  iterations with finished problems frozen. This is the accelerator path.
- ``_solve_host`` is the textbook loop over index lists in NumPy, one problem at a time, stopping as
  soon as it is done. On the CPU there is no device to wait for, and a tiny QP costs 10-50x less
  this way than as ~100 tensor operations per iteration.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Solution:
    """What a solver returns besides the weights (all tensors, no host sync to build it). Every
    aggregator returns one; the fields below are the min-norm solver's, and each other solver's
    docstring says what its ``gap`` and ``iterations`` measure.

    Attributes:
        weights: ``(..., m)`` the weights; for the min-norm point, the minimiser on the simplex
            in the input dtype (the other aggregators return float64).
        gap: ``(...)`` float64 relative KKT residual; for the min-norm point the optimality gap
            ``(w^T G w - min_k (G w)_k) / max_k G_kk`` (0 for an all-zero Gram).
        iterations: ``(...)`` iterations each problem used (int64).
        converged: ``(...)`` bool; False when the iteration cap ran out (or, for the cone QP,
            when rounding stalled it).
    """

    weights: Tensor
    gap: Tensor
    iterations: Tensor
    converged: Tensor


def default_max_iter(m: int) -> int:
    """Iteration cap: every major step adds one point and every minor step removes one, and in
    practice the total stays below ``2 m``; the cap leaves room for ill-conditioned inputs."""
    return 4 * m + 16


def _validate(gram: Tensor) -> None:
    if not isinstance(gram, Tensor):
        raise TypeError(f"gram must be a torch.Tensor, got {type(gram).__name__}")
    if gram.dim() < 2 or gram.shape[-1] != gram.shape[-2]:
        raise ValueError(
            f"gram must have shape (m, m) or (..., m, m), got {tuple(gram.shape)}; "
            "build it as G = F @ F.T from the (m, P) matrix of flattened group gradients"
        )
    if gram.shape[-1] == 0:
        raise ValueError("gram has m = 0 groups; pass at least one group gradient")
    if not gram.dtype.is_floating_point:
        raise TypeError(f"gram must have a floating dtype, got {gram.dtype}; call gram.double()")
    # Host sync on accelerators: the caller chose validation (check=True).
    if not bool(torch.isfinite(gram).all()):
        raise ValueError(
            "gram contains NaN or Inf; some group gradient is not finite. Check the losses "
            "for NaN/Inf (GRAIN(nonfinite='skip') skips such steps) or lower the learning rate"
        )


def solve(
    gram: Tensor, *, max_iter: int | None = None, check: bool = True, masked: bool | None = None
) -> Solution:
    """Wolfe's min-norm-point algorithm on a batch of Gram matrices; see :func:`min_norm_weights`.

    Args:
        gram: ``(..., m, m)`` symmetric positive semi-definite matrices.
        max_iter: iteration cap (default :func:`default_max_iter`).
        check: validate shape, dtype and finiteness (one host sync on accelerators).
        masked: use the batched masked iteration (default: off the CPU only).
    """
    if check:
        _validate(gram)
    batch_shape, m = gram.shape[:-2], gram.shape[-1]
    max_iter = default_max_iter(m) if max_iter is None else max_iter
    masked = gram.device.type != "cpu" if masked is None else masked
    # The QP is tiny: solve it in float64 whatever the Gram's dtype.
    G = gram.detach().to(torch.float64).reshape(-1, m, m)  # (N, m, m)
    if masked:
        w, gap, iterations, converged = _solve_masked(G, max_iter)
    else:
        found = _solve_host(G.cpu().numpy(), max_iter)
        w, gap, iterations, converged = (torch.from_numpy(a).to(gram.device) for a in found)
    return Solution(
        weights=w.to(gram.dtype).reshape(*batch_shape, m),
        gap=gap.reshape(batch_shape),
        iterations=iterations.reshape(batch_shape),
        converged=converged.reshape(batch_shape),
    )


def _tolerance(m: int) -> float:
    """Stop when no point violates KKT by more than this (relative to max_k G_kk = 1). The
    rounding error of (G w)_k is about m * eps; 64 m eps keeps clear of it and far below 1e-10."""
    return 64.0 * m * float(np.finfo(np.float64).eps)


def _solve_host(G: np.ndarray, max_iter: int) -> tuple[np.ndarray, ...]:
    """The textbook iteration over index lists, one problem at a time, on ``(N, m, m)`` float64
    Grams. Returns weights ``(N, m)``, gaps, iterations and convergence flags ``(N,)``; mirrors
    :func:`_solve_masked` step for step."""
    N, m = G.shape[0], G.shape[-1]
    tol = _tolerance(m)
    weights = np.full((N, m), 1.0 / m)  # stays uniform for an all-zero Gram
    gaps = np.zeros(N)
    iterations = np.zeros(N, dtype=np.int64)
    converged = np.ones(N, dtype=bool)
    for n in range(N):
        scale = np.diagonal(G[n]).max()
        if not scale > 0:  # all-zero Gram: every point is the origin, any w is optimal
            continue
        Gn = 0.5 * (G[n] + G[n].T) / scale
        w, S, iterations[n], converged[n] = _wolfe_host(Gn, max_iter, tol)
        weights[n] = 0.0
        weights[n, S] = w
        Gw = Gn @ weights[n]
        gaps[n] = max(weights[n] @ Gw - Gw.min(), 0.0)
    return weights, gaps, iterations, converged


def _wolfe_host(
    Gn: np.ndarray, max_iter: int, tol: float
) -> tuple[np.ndarray, list[int], int, bool]:
    """One ``(m, m)`` problem with unit largest diagonal -> weights on ``S``, ``S``, iterations,
    converged."""
    S = [int(np.argmin(np.diag(Gn)))]  # the shortest point
    newest = S[0]
    w = np.ones(1)  # weights on S
    for it in range(1, max_iter + 1):
        A = Gn[np.ix_(S, S)] + 1.0  # (1 1^T + G)_SS
        u = np.linalg.solve(A, np.ones(len(S)))
        v = u / u.sum()
        if (v > 0).all():  # major step
            w = v
            Gv = Gn[:, S] @ v  # (m,)
            outside = Gv.copy()
            outside[S] = np.inf
            j = int(np.argmin(outside))
            if v @ Gv[S] - outside[j] <= tol:
                return w, S, it, True
            S.append(j)
            w = np.append(w, 0.0)
            newest = j
            continue
        # Minor step: move w towards v until the first weight on S hits zero; drop that point.
        ratio = np.where(v <= 0, w / np.maximum(w - v, 1e-300), np.inf)
        k = int(np.argmin(ratio))
        theta = ratio[k]
        if theta <= 0 and S[k] == newest:  # dropping the point just added: no progress
            return w, S, it, True
        w = np.maximum(w + theta * (v - w), 0.0)
        keep = w > 0
        keep[k] = False
        S = [s for s, kept in zip(S, keep, strict=True) if kept]
        w = w[keep] / w[keep].sum()
    return w, S, max_iter, False


def _solve_masked(G: Tensor, max_iter: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The batched iteration on masks, on ``(N, m, m)`` float64 Grams on any device. Returns
    weights ``(N, m)``, gaps, iterations and convergence flags ``(N,)``."""
    m = G.shape[-1]
    G = 0.5 * (G + G.transpose(-1, -2))
    scale = G.diagonal(dim1=-2, dim2=-1).amax(-1)  # (N,)
    zero = ~(scale > 0)  # all-zero Gram: every point is the origin; any w is optimal
    G = G / torch.where(zero, torch.ones_like(scale), scale)[:, None, None]
    w, iterations, converged = _wolfe_masked(G, max_iter)
    w = torch.where(zero[:, None], torch.full_like(w, 1.0 / m), w)
    Gw = (G @ w[..., None]).squeeze(-1)  # (N, m)
    gap = ((w * Gw).sum(-1) - Gw.amin(-1)).clamp_min(0.0)
    return w, gap, iterations, converged | zero


def _wolfe_masked(G: Tensor, max_iter: int) -> tuple[Tensor, Tensor, Tensor]:
    """The masked iteration on ``(N, m, m)`` float64 Grams with unit largest diagonal."""
    N, m = G.shape[0], G.shape[-1]
    device = G.device
    tol = _tolerance(m)
    arange = torch.arange(m, device=device)
    eye = torch.eye(m, dtype=torch.float64, device=device)
    ones = torch.ones(N, m, dtype=torch.float64, device=device)
    start = G.diagonal(dim1=-2, dim2=-1).argmin(-1)  # (N,) the shortest point
    active = arange == start[:, None]  # (N, m) the active set S
    newest = start.clone()  # (N,) the point added last: dropping it at once means no progress
    w = active.to(torch.float64)  # (N, m)
    done = torch.zeros(N, dtype=torch.bool, device=device)
    iterations = torch.zeros(N, dtype=torch.int64, device=device)
    for _ in range(max_iter):
        # Affine minimiser v on S: (1 1^T + G)_SS u = 1, v = u / sum u; identity off S.
        pair = active[:, :, None] & active[:, None, :]
        A = torch.where(pair, G + 1.0, eye)
        u, _ = torch.linalg.solve_ex(A, torch.where(active, ones, 0.0))
        v = torch.where(active, u / u.sum(-1, keepdim=True), 0.0)  # (N, m)
        major = (v > 0).eq(active).all(-1)  # v strictly positive on S
        # Major step: w = v; optimal unless some point outside S violates KKT.
        Gv = (G @ v[..., None]).squeeze(-1)  # (N, m)
        norm2 = (v * Gv).sum(-1)  # (N,) ||d||^2
        outside = torch.where(active, torch.inf, Gv)
        j = outside.argmin(-1)  # (N,)
        optimal = major & (norm2 - outside.gather(-1, j[:, None]).squeeze(-1) <= tol)
        add = major & ~optimal
        # Minor step: move w towards v until the first weight on S hits zero; drop that point.
        ratio = torch.where(active & (v <= 0), w / (w - v).clamp_min(1e-300), torch.inf)
        theta, k = ratio.min(-1)  # (N,)
        w_minor = (w + theta[:, None] * (v - w)).clamp_min(0.0)
        dropped = (arange == k[:, None]) | (w_minor <= 0)
        w_minor = torch.where(dropped, 0.0, w_minor)
        # Dropping the point just added, with no movement, would cycle: the optimum is reached.
        stuck = ~major & (theta <= 0) & (k == newest)
        live = ~done & ~stuck
        new_w = torch.where(major[:, None], v, w_minor / w_minor.sum(-1, keepdim=True))
        grown = active | (add[:, None] & (arange == j[:, None]))
        new_active = torch.where(major[:, None], grown, active & ~dropped)
        w = torch.where(live[:, None], new_w, w)
        active = torch.where(live[:, None], new_active, active)
        newest = torch.where(live & add, j, newest)
        iterations = iterations + (~done).long()
        done = done | optimal | stuck
    return w, iterations, done


def min_norm_weights(gram: Tensor, *, max_iter: int | None = None) -> Tensor:
    r"""Exact weights of the min-norm point of the convex hull of m vectors, from their Gram.

    .. math::
        w^* = \arg\min_{w \ge 0,\ \sum_k w_k = 1} w^\top G w

    so that :math:`d = \sum_k w^*_k g_k` satisfies :math:`\langle d, g_k\rangle \ge \|d\|^2` for
    every k (no group's loss increases to first order). Solved exactly by Wolfe's active-set
    min-norm-point algorithm in float64 (relative optimality gap near 1e-15), whatever the input
    dtype; the result has the input's dtype and device. Scaling ``gram`` does not change the
    weights. An all-zero Gram returns uniform weights. The minimiser ``d`` is unique; where several
    ``w`` give it (duplicate points, rank-deficient Grams) one of them is returned.

    Args:
        gram: ``(m, m)`` or batched ``(..., m, m)`` symmetric positive semi-definite matrix
            (``G = F @ F.T`` for the ``(m, P)`` matrix ``F`` of flattened vectors).
        max_iter: iteration cap; the default ``4 m + 16`` is never reached in practice. On the
            CPU the solver stops when every problem is solved; on accelerators it runs the full
            count with finished problems frozen, so that it never waits for the device.

    Returns:
        ``(..., m)`` non-negative weights summing to 1.

    Raises:
        ValueError: ``gram`` is not ``(..., m, m)`` or contains NaN/Inf.
        TypeError: ``gram`` is not a floating-point tensor.

    Example:
        >>> import torch
        >>> from torchgrain import min_norm_weights
        >>> g = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # two orthogonal gradients
        >>> w = min_norm_weights(g @ g.T)
        >>> w
        tensor([0.8000, 0.2000])
        >>> d = w @ g
        >>> bool((g @ d >= d @ d - 1e-6).all())  # every group's loss decreases
        True
    """
    return solve(gram, max_iter=max_iter).weights
