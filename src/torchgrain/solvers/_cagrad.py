"""CAGrad (Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021)
in weight form, solved exactly.

CAGrad maximises the worst group's first-order decrease within a ball around the preferred
combination ``g0 = sum_k p_k g_k``:

    d = argmax_x min_k <g_k, x>   s.t.   ||x - g0|| <= r = c ||g0||

For a level ``nu``, the point of ``{x : <x, g_k> >= nu for all k}`` nearest ``g0`` is
``J^T (p + lam(nu))`` with ``lam(nu)`` from the cone QP with ``q = G p - nu 1``
(:mod:`torchgrain.solvers._cone`), at distance ``f(nu) = sqrt(lam^T G lam)``, a non-decreasing
function of ``nu``. The optimum is the largest ``nu`` with ``f(nu) <= r``, found by a safeguarded
root search: on each piece of constant active set ``f(nu)^2`` is a quadratic in ``nu``, and its root
is exact once the cone QP at that root keeps the same active set; otherwise the bracket shrinks (by
bisection when the quadratic's root leaves it).

The paper's ``d = g0 + r g_w / ||g_w||`` with ``w`` the minimiser of ``w^T G p + r ||g_w||`` on the
simplex is the same point: ``lam = r w / ||g_w||``. When the origin lies in the hull of the group
gradients no level above 0 is reachable and every point of the ball in the dual cone is optimal;
then ``d`` is the one nearest ``g0`` (DualProj's), where TorchJD returns 0. "In the hull" means
within ``1e-5 max_k ||g_k||`` of it (squared: ``1e-10``, the cone QP's threshold for a vector in
the span of others): closer, the exact multipliers grow like the inverse of that distance and are
rounding noise of the Gram.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from torchgrain.solvers._common import prepare
from torchgrain.solvers._cone import DEPENDENT, kkt_residual, solve_cone
from torchgrain.solvers._wolfe import Solution, solve

# Cap on the root search's steps, each one cone QP: 4 or fewer sufficed on every Gram of the tests.
# The host stops when every problem is solved; the masked path always runs its (smaller) cap.
ROOT_STEPS, ROOT_STEPS_MASKED = 64, 24


def cagrad(
    gram: Tensor,
    c: float = 0.5,
    pref: Tensor | None = None,
    *,
    check: bool = True,
    masked: bool | None = None,
) -> Solution:
    """:func:`cagrad_weights` with the solver's report: ``gap`` is the larger of the cone QP's
    relative KKT residual at the final level and the ball constraint's relative violation,
    ``iterations`` the root search's steps."""
    check_radius(c)
    G, p, batch_shape = prepare(gram, pref, check=check)
    masked = gram.device.type != "cpu" if masked is None else masked
    N, m = p.shape
    G = 0.5 * (G + G.transpose(-1, -2))
    scale = G.diagonal(dim1=-2, dim2=-1).amax(-1)  # (N,)
    G = G / torch.where(scale > 0, scale, 1.0)[:, None, None]  # unit largest diagonal
    ones = torch.ones_like(p)
    Gp = (G @ p[..., None]).squeeze(-1)  # (N, m) <g_k, g0>
    r2 = (c * c) * (p * Gp).sum(-1).clamp_min(0.0)  # (N,) r^2
    diag = G.diagonal(dim1=-2, dim2=-1).clamp_min(0.0)
    lo = Gp.amin(-1)  # g0 itself reaches this level
    hi = (Gp + (r2[:, None] * diag).sqrt()).amin(-1)  # Cauchy-Schwarz: no x in the ball beats it
    # With the origin in the hull, min_k <g_k, x> <= 0 for every x: no level above 0 is reachable.
    # "In the hull" to the precision the cone QP treats vectors as dependent (DEPENDENT): past it
    # the multipliers of a positive level grow like 1 / distance and the Gram's own rounding rules.
    w0 = solve(G, check=False, masked=masked).weights
    in_hull = (w0 * (G @ w0[..., None]).squeeze(-1)).sum(-1) <= DEPENDENT
    hi = torch.where(in_hull, hi.clamp_max(0.0), hi)
    hi = torch.maximum(hi, lo)

    def distance2(nu: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        lam, _, converged = solve_cone(G, Gp - nu[:, None] * ones, masked=masked)
        return lam, (lam * (G @ lam[..., None]).squeeze(-1)).sum(-1), converged

    lam_lo = torch.zeros_like(p)  # lam at lo: 0, since Gp - lo >= 0
    lam_hi, f_hi, inner_ok = distance2(hi)  # inner_ok: every cone QP of the problem converged
    done = (r2 <= 0) | (f_hi <= r2)  # c = 0 or the top of the bracket is inside the ball
    lam_final = torch.where((r2 <= 0)[:, None], lam_lo, lam_hi)
    nu_final = torch.where(r2 <= 0, lo, hi)
    current = lam_hi  # the point whose piece proposes the next level
    steps = torch.zeros(N, dtype=torch.int64, device=p.device)
    for _ in range(ROOT_STEPS_MASKED if masked else ROOT_STEPS):
        if not masked and bool(done.all()):  # host: stop when done (no device to wait for)
            break
        root, exact_piece = _piece_root(G, Gp, r2, current)
        # A root on the bracket's end (one active group: the Cauchy-Schwarz level is exact) may
        # fall a rounding error outside it.
        slack = 1e-12 * torch.maximum(lo.abs(), hi.abs())
        inside = exact_piece & (root >= lo - slack) & (root <= hi + slack)
        nu = torch.where(inside, torch.minimum(torch.maximum(root, lo), hi), 0.5 * (lo + hi))
        lam, f, converged = distance2(nu)
        inner_ok = inner_ok & (converged | done)
        same = inside & ((lam > 0) == (current > 0)).all(-1)
        narrow = (hi - lo) <= 4 * float(np.finfo(np.float64).eps) * torch.maximum(
            lo.abs(), hi.abs()
        )
        below = f <= r2
        live = ~done
        finish = live & (same | narrow)
        lam_final = torch.where(finish[:, None], torch.where(same[:, None], lam, lam_lo), lam_final)
        nu_final = torch.where(finish, torch.where(same, nu, lo), nu_final)
        move = live & ~finish
        lo = torch.where(move & below, nu, lo)
        lam_lo = torch.where((move & below)[:, None], lam, lam_lo)
        hi = torch.where(move & ~below, nu, hi)
        current = torch.where(move[:, None], lam, current)
        steps = steps + live.long()
        done = done | finish
    # Problems the cap stopped: the feasible end of their bracket.
    lam_final = torch.where(done[:, None], lam_final, lam_lo)
    nu_final = torch.where(done, nu_final, lo)
    q = Gp - nu_final[:, None] * ones
    dist2 = (lam_final * (G @ lam_final[..., None]).squeeze(-1)).sum(-1)
    tight = ~(in_hull & (nu_final >= 0)) & (r2 > 0)  # else the ball need not be tight
    ball = torch.where(tight, (dist2 - r2).abs(), (dist2 - r2).clamp_min(0.0))
    gap = torch.maximum(kkt_residual(G, q, lam_final), ball / (1.0 + lam_final.sum(-1)) ** 2)
    zero = ~(scale > 0)
    weights = torch.where(zero[:, None], p, p + lam_final)
    return Solution(
        weights=weights.reshape(*batch_shape, m),
        gap=torch.where(zero, 0.0, gap).reshape(batch_shape),
        iterations=steps.reshape(batch_shape),
        converged=((done & inner_ok) | zero).reshape(batch_shape),
    )


def check_radius(c: object) -> None:
    """Raise unless ``c`` is a finite float >= 0 (a bool is no radius)."""
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not c >= 0 or c == float("inf"):
        raise ValueError(
            f"c must be a finite float >= 0 (the ball's radius over ||g0||), got {c!r}"
        )


def _piece_root(G: Tensor, Gp: Tensor, r2: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
    """On the piece with ``lam``'s active set P, ``lam_P(nu) = a + nu b`` (``G_PP b = 1``,
    ``G_PP a = -Gp_P``) and ``f(nu)^2 = sum(b) nu^2 + 2 sum(a) nu + a.(-Gp_P)``: its larger root of
    ``f^2 = r^2``, and whether the piece has one (P non-empty, real roots)."""
    m = G.shape[-1]
    active = lam > 0  # (N, m)
    pair = active[:, :, None] & active[:, None, :]
    eye = torch.eye(m, dtype=G.dtype, device=G.device)
    A = torch.where(pair, G, eye)
    rhs = torch.stack([torch.where(active, 1.0, 0.0), torch.where(active, -Gp, 0.0)], -1)
    sol, info = torch.linalg.solve_ex(A, rhs)  # (N, m, 2)
    b, a = torch.where(active, sol[..., 0], 0.0), torch.where(active, sol[..., 1], 0.0)
    qa, qb, qc = b.sum(-1), 2 * a.sum(-1), -(a * Gp).sum(-1) - r2
    disc = qb * qb - 4 * qa * qc
    sq = disc.clamp_min(0.0).sqrt()
    # The larger root, without cancellation: (-qb + sq) / (2 qa) = -2 qc / (qb + sq).
    denom = torch.where(qb >= 0, qb + sq, 2 * qa)
    numer = torch.where(qb >= 0, -2 * qc, sq - qb)
    ok = active.any(-1) & (info == 0) & (qa > 0) & (disc >= 0) & (denom != 0)
    root = numer / torch.where(denom != 0, denom, 1.0)
    return torch.where(ok, root, 0.0), ok


def cagrad_weights(gram: Tensor, c: float = 0.5, pref: Tensor | None = None) -> Tensor:
    r"""Weights of CAGrad: the best worst-group decrease within a ball around the preferred
    combination.

    .. math::
        d = \arg\max_{x} \min_k \langle g_k, x\rangle \ \text{ s.t. }\
        \|x - g_0\| \le c\,\|g_0\|, \qquad g_0 = \textstyle\sum_k p_k g_k

    ``c = 0`` is the preferred combination itself; larger ``c`` moves further towards the worst-off
    group (the paper uses ``c`` in [0, 1); ``c >= 1`` lets the ball reach the origin). Unlike the
    min-norm point and DualProj it does not promise ``<d, g_k> >= 0``: it maximises the smallest
    of them within the ball. The weights are ``p + lam``, ``lam >= 0``, ``d = sum_k w_k g_k``, as
    in the paper's ``g0 + c ||g0|| g_w / ||g_w||`` (without its optional ``1 / (1 + c^2)``
    rescaling). Solved exactly (an active-set cone QP inside a root search on the level, float64);
    scaling ``gram`` does not change the weights.

    Args:
        gram: ``(m, m)`` or batched ``(..., m, m)`` PSD Gram, any float dtype and device.
        c: the ball's radius relative to ``||g0||`` (default 0.5, the paper's most used value).
        pref: ``(..., m)`` non-negative weights of ``g0``; uniform ``1/m`` by default.

    Returns:
        ``(..., m)`` float64 non-negative weights ``w``.

    Example:
        >>> import torch
        >>> from torchgrain import cagrad_weights
        >>> g = torch.tensor([[1.0, 0.0], [-2.0, 1.0]], dtype=torch.float64)  # conflicting
        >>> w = cagrad_weights(g @ g.T, c=0.5)
        >>> g0, d = g.mean(0), w @ g
        >>> bool((g @ d).min() > (g @ g0).min())  # the worst group does better than under g0
        True
        >>> bool(torch.linalg.norm(d - g0) <= 0.5 * torch.linalg.norm(g0) + 1e-12)
        True
    """
    return cagrad(gram, c, pref).weights
