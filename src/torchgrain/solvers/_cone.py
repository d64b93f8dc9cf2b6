"""Exact non-negative QP on a Gram matrix: the engine of the dual-cone aggregators.

Given the Gram ``G`` of m vectors ``g_1..g_m`` (``G = J J^T``) and a linear term ``q``, find

    lam* = argmin_{lam >= 0}  1/2 lam^T G lam + q^T lam

With ``q = G u`` this is the dual of projecting ``v = J^T u`` onto the dual cone
``{x : <x, g_k> >= 0 for all k}``: the projection is ``J^T (u + lam*)`` (DualProj, UPGrad). With
``q = G u - nu 1`` it projects ``v`` onto ``{x : <x, g_k> >= nu}`` (CAGrad's inner problem).

KKT: ``mu = G lam + q >= 0``, ``lam >= 0`` and ``lam_k mu_k = 0``. The method is Lawson and
Hanson's active set for non-negative least squares, written on the Gram: a passive set ``P`` of
coordinates free to be positive, the unconstrained minimiser ``z`` on ``P``
(``G_PP z_P = -q_P``), then

- if ``z > 0`` on ``P`` (a *major* step), ``lam = z``; optimal unless some coordinate outside ``P``
  has ``mu_j < 0``, and the most negative joins ``P``;
- otherwise (a *minor* step) ``lam`` moves towards ``z`` until its first coordinate on ``P`` reaches
  zero, and that coordinate leaves ``P``.

When ``q`` lies in the range of ``G`` (DualProj, UPGrad) a coordinate joins ``P`` only if its
vector is not in the span of ``P``'s (else ``mu_j`` would be 0), so ``G_PP`` stays non-singular;
duplicate and opposite vectors never both enter. CAGrad's ``q`` does not (``1`` is not in the
range of a rank-deficient ``G``): a coordinate whose vector is in that span is brought in by a *ray
step* instead, along the null direction of ``G`` on which the objective falls, until a coordinate of
``P`` reaches zero and leaves (a simplex pivot).

The iteration mirrors Wolfe's min-norm solver (:mod:`torchgrain.solvers._wolfe`), with the same two
implementations, tested against each other: a NumPy loop over index lists for the CPU, and a
batched masked iteration with a fixed count for accelerators.

Every problem is scaled to a unit largest diagonal of ``G`` first (``q`` with it): the solution
``lam`` is invariant to scaling ``G`` and ``q`` together.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from torchgrain.solvers._wolfe import default_max_iter

# A vector whose squared distance to the span of the passive set's is below this share of its
# squared norm counts as in the span (a rank-deficient Gram computed in float64).
DEPENDENT = 1e-10


def tolerance(m: int) -> float:
    """A coordinate joins ``P`` when ``mu_j < -tol (1 + sum lam)`` (with ``max_k G_kk = 1``): the
    rounding error of ``(G lam)_j`` is about ``m eps sum lam``; 64 m eps keeps clear of it."""
    return 64.0 * m * float(np.finfo(np.float64).eps)


def kkt_residual(G: Tensor, q: Tensor, lam: Tensor) -> Tensor:
    """``(...)`` relative KKT residual of ``(..., m, m)`` ``G``, ``(..., m)`` ``q`` and ``lam``:
    ``max(max_k (-mu_k)+, max_{lam_k > 0} |mu_k|) / (max_k G_kk (1 + sum lam))``, 0 when G = 0."""
    mu = (G @ lam[..., None]).squeeze(-1) + q
    violation = torch.maximum((-mu).clamp_min(0.0), torch.where(lam > 0, mu.abs(), 0.0))
    scale = G.diagonal(dim1=-2, dim2=-1).amax(-1) * (1.0 + lam.sum(-1))
    return torch.where(scale > 0, violation.amax(-1) / torch.where(scale > 0, scale, 1.0), 0.0)


def solve_cone(
    G: Tensor, q: Tensor, *, masked: bool, max_iter: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(N, m, m)`` float64 PSD ``G`` and ``(N, m)`` ``q`` -> ``lam`` ``(N, m)``, iterations and
    convergence flags ``(N,)``; on ``G``'s device."""
    m = G.shape[-1]
    max_iter = default_max_iter(m) if max_iter is None else max_iter
    G = 0.5 * (G + G.transpose(-1, -2))
    scale = G.diagonal(dim1=-2, dim2=-1).amax(-1)  # (N,)
    zero = ~(scale > 0)  # all-zero Gram: every lam >= 0 with q^T lam = 0 is optimal; keep 0
    safe = torch.where(zero, torch.ones_like(scale), scale)
    Gn, qn = G / safe[:, None, None], q / safe[:, None]
    if masked:
        lam, iterations, converged = _cone_masked(Gn, qn, max_iter)
    else:
        found = _cone_host_batch(Gn.cpu().numpy(), qn.cpu().numpy(), max_iter)
        lam, iterations, converged = (torch.from_numpy(a).to(G.device) for a in found)
    lam = torch.where(zero[:, None], 0.0, lam)
    return lam, iterations, converged | zero


def _cone_host_batch(G: np.ndarray, q: np.ndarray, max_iter: int) -> tuple[np.ndarray, ...]:
    N, m = q.shape
    lam = np.zeros((N, m))
    iterations = np.zeros(N, dtype=np.int64)
    converged = np.ones(N, dtype=bool)
    tol = tolerance(m)
    for n in range(N):
        lam[n], iterations[n], converged[n] = _cone_host(G[n], q[n], max_iter, tol)
    return lam, iterations, converged


def _cone_host(
    G: np.ndarray, q: np.ndarray, max_iter: int, tol: float
) -> tuple[np.ndarray, int, bool]:
    """One problem with unit largest diagonal -> ``lam`` ``(m,)``, iterations, converged. ``P``
    is kept sorted, so that every tie breaks to the smallest index, as in the masked iteration."""
    m = q.shape[0]
    lam = np.zeros(m)
    P: list[int] = []
    newest = -1
    for it in range(1, max_iter + 1):
        z = np.zeros(m)
        if P:
            z[P] = _solve(G[np.ix_(P, P)], -q[P])
        if (z[P] > 0).all():  # major step
            lam = z
            mu = G @ lam + q
            outside = mu.copy()
            outside[P] = np.inf
            j = int(np.argmin(outside))
            if len(P) == m or outside[j] >= -tol * (1.0 + lam.sum()):
                return lam, it, True
            newest = j
            a = _solve(G[np.ix_(P, P)], G[P, j]) if P else np.zeros(0)  # g_j ~ sum_i a_i g_i
            if not G[j, j] > 0:  # a zero vector with mu_j = q_j < 0: unbounded below
                return lam, it, False
            if G[j, j] - G[P, j] @ a > DEPENDENT * G[j, j] or not (a > 0).any():
                P = sorted([*P, j])
                continue
            # Ray step: g_j lies in the span of P's vectors, so adding j would make G_PP singular.
            # Along n = e_j - sum_i a_i e_i (G n = 0) the objective falls at the rate mu_j < 0:
            # move until the first coordinate of P reaches zero, and swap it for j.
            ratio = np.where(a > 0, lam[P] / np.where(a > 0, a, 1.0), np.inf)
            k = int(np.argmin(ratio))
            lam[P] = np.maximum(lam[P] - ratio[k] * a, 0.0)
            lam[j] = ratio[k]
            lam[P[k]] = 0.0
            P = sorted([p for p in P if lam[p] > 0] + [j])
            continue
        # Minor step: move lam towards z until the first coordinate on P hits zero; drop it.
        idx = np.asarray(P)
        zp, lp = z[idx], lam[idx]
        ratio = np.where(zp <= 0, lp / np.maximum(lp - zp, 1e-300), np.inf)
        k = int(np.argmin(ratio))
        if ratio[k] <= 0 and P[k] == newest:
            # Dropping the coordinate just added, without moving: rounding stalls the method
            # (in exact arithmetic z_j > 0 for it). Stop, and say so.
            return lam, it, False
        lam = np.maximum(lam + ratio[k] * (z - lam), 0.0)
        lam[P[k]] = 0.0
        P = [p for p in P if lam[p] > 0]
        off = np.ones(m, dtype=bool)
        off[P] = False
        lam[off] = 0.0
    return lam, max_iter, False


def _solve(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.solve(A, b)
    except np.linalg.LinAlgError:  # singular to rounding: the least-squares solution
        return np.linalg.lstsq(A, b, rcond=None)[0]


def _cone_masked(G: Tensor, q: Tensor, max_iter: int) -> tuple[Tensor, Tensor, Tensor]:
    """The batched masked iteration on ``(N, m, m)`` float64 Grams with unit largest diagonal."""
    N, m = q.shape
    device = G.device
    tol = tolerance(m)
    arange = torch.arange(m, device=device)
    eye = torch.eye(m, dtype=torch.float64, device=device)
    passive = torch.zeros(N, m, dtype=torch.bool, device=device)  # P
    lam = torch.zeros(N, m, dtype=torch.float64, device=device)
    newest = torch.full((N,), -1, dtype=torch.int64, device=device)
    done = torch.zeros(N, dtype=torch.bool, device=device)
    failed = torch.zeros(N, dtype=torch.bool, device=device)  # stopped short of the optimum
    iterations = torch.zeros(N, dtype=torch.int64, device=device)
    for _ in range(max_iter):
        # Unconstrained minimiser on P: G_PP z_P = -q_P; identity (and z = 0) off P.
        pair = passive[:, :, None] & passive[:, None, :]
        A = torch.where(pair, G, eye)
        z, _ = torch.linalg.solve_ex(A, torch.where(passive, -q, 0.0))
        z = torch.where(passive, z, 0.0)  # (N, m)
        major = (z > 0).eq(passive).all(-1)  # z > 0 on P (true for an empty P)
        mu = (G @ z[..., None]).squeeze(-1) + q  # (N, m)
        outside = torch.where(passive, torch.inf, mu)
        low, j = outside.min(-1)  # (N,)
        full = passive.all(-1)
        optimal = major & (full | (low >= -tol * (1.0 + z.sum(-1))))
        add = major & ~optimal
        # Is g_j in the span of P's vectors? Then the ray step (see the host loop) instead.
        onehot_j = arange == j[:, None]  # (N, m)
        col = (G @ onehot_j.to(G.dtype)[..., None]).squeeze(-1)  # (N, m) G e_j
        a, _ = torch.linalg.solve_ex(A, torch.where(passive, col, 0.0))
        a = torch.where(passive, a, 0.0)
        gjj = torch.where(onehot_j, col, 0.0).sum(-1)
        positive = passive & (a > 0)
        ray = add & (gjj > 0) & (gjj - (col * a).sum(-1) <= DEPENDENT * gjj) & positive.any(-1)
        failed = failed | (add & ~done & ~(gjj > 0))  # a zero vector: unbounded below
        ray_ratio = torch.where(positive, z / torch.where(a > 0, a, 1.0), torch.inf)
        ray_t, ray_k = ray_ratio.min(-1)
        ray_t = torch.where(torch.isfinite(ray_t), ray_t, 0.0)
        lam_ray = (z - ray_t[:, None] * a).clamp_min(0.0)
        lam_ray = torch.where(arange == ray_k[:, None], 0.0, lam_ray)
        lam_ray = torch.where(onehot_j, ray_t[:, None], lam_ray)
        passive_ray = (passive & (lam_ray > 0)) | onehot_j
        # Minor step: move lam towards z until the first coordinate on P hits zero; drop it.
        ratio = torch.where(passive & (z <= 0), lam / (lam - z).clamp_min(1e-300), torch.inf)
        theta, k = ratio.min(-1)  # (N,)
        theta = torch.where(torch.isfinite(theta), theta, 0.0)
        lam_minor = (lam + theta[:, None] * (z - lam)).clamp_min(0.0)
        dropped = (arange == k[:, None]) | (lam_minor <= 0)
        lam_minor = torch.where(dropped, 0.0, lam_minor)
        stuck = ~major & (theta <= 0) & (k == newest)  # rounding stalls it (see the host loop)
        failed = failed | (stuck & ~done)
        live = ~done  # a row failing now still takes this step's lam, as the host loop returns it
        new_lam = torch.where(major[:, None], torch.where(ray[:, None], lam_ray, z), lam_minor)
        new_passive = torch.where(
            major[:, None],
            torch.where(ray[:, None], passive_ray, passive | (add[:, None] & onehot_j)),
            passive & ~dropped,
        )
        lam = torch.where(live[:, None], new_lam, lam)
        passive = torch.where(live[:, None], new_passive, passive)
        newest = torch.where(live & add, j, newest)
        iterations = iterations + (~done).long()
        done = done | optimal | failed
    return lam, iterations, done & ~failed
