"""The aggregators beside the min-norm solver: the KKT conditions of each problem on the zoo, with
several preferred combinations, both implementations, batching and the invariances."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from tests.solvers._zoo import zoo
from torchgrain import cagrad_weights, dual_proj_weights, min_norm_weights, upgrad_weights
from torchgrain.solvers import Solution, cagrad, dual_proj, upgrad
from torchgrain.solvers._cone import kkt_residual, solve_cone

ZOO = zoo()
SOLVERS: dict[str, Callable[..., Solution]] = {
    "dual_proj": dual_proj,
    "upgrad": upgrad,
    "cagrad": lambda gram, pref=None, **kw: cagrad(gram, 0.5, pref, **kw),
}
TOL = 1e-12  # relative KKT residual the issue asks for


def prefs(m: int) -> dict[str, Tensor]:
    """Preferred combinations: uniform, seeded random, a single group (projecting one gradient,
    which conflicts most often), and sizes-like with a zero."""
    g = torch.Generator().manual_seed(m)
    random = torch.rand(m, generator=g, dtype=torch.float64) + 0.05
    one_hot = torch.zeros(m, dtype=torch.float64)
    one_hot[-1] = 1.0
    sizes = torch.arange(m, dtype=torch.float64)  # group 0 empty
    return {
        "uniform": torch.full((m,), 1.0 / m, dtype=torch.float64),
        "random": random / random.sum(),
        "one_hot": one_hot,
        "sizes": sizes / max(float(sizes.sum()), 1.0),
    }


CASES = [
    (name, pname)
    for name in sorted(ZOO)
    for pname in (
        ["uniform"] if ZOO[name].shape[0] > 64 else ["uniform", "random", "one_hot", "sizes"]
    )
]


def scale_of(gram: Tensor) -> float:
    return float(gram.diagonal().max())


def dual_kkt(gram: Tensor, pref: Tensor, w: Tensor) -> float:
    """Relative KKT residual of ``min_{lam>=0} 1/2 lam^T G lam + lam^T G p`` at ``lam = w - p``:
    dual feasibility ``G w >= 0``, complementarity ``lam_k (G w)_k = 0``, primal ``lam >= 0``."""
    lam = w - pref
    mu = gram @ w  # (m,) <g_k, d>
    scale = scale_of(gram) * (1.0 + float(lam.clamp_min(0).sum()))
    if scale == 0:
        return 0.0
    complementarity = torch.where(lam > 0, mu.abs(), 0.0)
    worst = max(float((-mu).clamp_min(0).max()), float(complementarity.max()))
    assert float(lam.min()) >= -1e-15 * (1 + float(pref.max())), lam
    return worst / scale


def cagrad_kkt(gram: Tensor, pref: Tensor, w: Tensor, c: float) -> float:
    """Relative KKT residual of ``max_x min_k <g_k, x>`` s.t. ``||x - g0|| <= c ||g0||`` at
    ``x = J^T w``: ``lam = w - p >= 0`` is supported on the groups attaining the minimum, and the
    ball is tight when ``lam != 0``."""
    lam = w - pref
    assert float(lam.min()) >= -1e-15, lam
    mu = gram @ w
    scale = scale_of(gram) * (1.0 + float(lam.sum())) ** 2
    if scale == 0:
        return 0.0
    level = float(mu.min())
    support = torch.where(lam > 0, mu - level, 0.0).abs().max()
    r2 = c * c * float(pref @ gram @ pref)
    dist2 = float(lam @ gram @ lam)
    ball = abs(dist2 - r2)
    w0 = min_norm_weights(gram)
    if abs(level) <= TOL * scale and float(w0 @ gram @ w0) <= 1e-10 * scale_of(gram):
        # The origin is in the hull (to the solver's documented 1e-10): no level above 0 exists,
        # and level 0 needs no tight ball.
        ball = max(dist2 - r2, 0.0)
    return max(float(support) / (scale_of(gram) * (1 + float(lam.sum()))), ball / scale)


def same_point(gram: Tensor, a: Tensor, b: Tensor) -> float:
    """``||J^T (a - b)||^2 / max_k ||g_k||^2 / (1 + |a|_1)^2``: the weights give the same d."""
    diff = (a - b).to(torch.float64)
    scale = scale_of(gram) * (1.0 + float(a.abs().sum())) ** 2
    return float(diff @ gram @ diff) / scale if scale > 0 else 0.0


@pytest.mark.parametrize(("name", "pname"), CASES)
def test_dual_proj_kkt(name: str, pname: str) -> None:
    gram = ZOO[name]
    pref = prefs(gram.shape[0])[pname]
    sol = dual_proj(gram, pref)
    assert sol.weights.dtype == torch.float64 and bool(torch.isfinite(sol.weights).all())
    assert bool(sol.converged)
    assert dual_kkt(gram, pref, sol.weights) <= TOL
    assert float(sol.gap) <= TOL


@pytest.mark.parametrize(("name", "pname"), CASES)
def test_upgrad_is_the_combination_of_projections(name: str, pname: str) -> None:
    gram = ZOO[name]
    m = gram.shape[0]
    pref = prefs(m)[pname]
    sol = upgrad(gram, pref)
    assert bool(sol.converged) and float(sol.gap) <= TOL
    assert bool(torch.isfinite(sol.weights).all()) and float(sol.weights.min()) >= 0
    # Every projection's own KKT conditions, and their combination.
    eye = torch.eye(m, dtype=torch.float64)
    projections = dual_proj(gram, eye)  # (m, m): row k projects g_k
    for k in range(m):
        assert dual_kkt(gram, eye[k], projections.weights[k]) <= TOL
    expected = pref @ projections.weights
    assert same_point(gram, sol.weights, expected) <= 1e-24
    # The combination lies in the dual cone: no group's loss increases.
    assert float((gram @ sol.weights).min()) >= -TOL * scale_of(gram) * float(sol.weights.sum())


@pytest.mark.parametrize(("name", "pname"), CASES)
def test_cagrad_kkt(name: str, pname: str) -> None:
    gram = ZOO[name]
    pref = prefs(gram.shape[0])[pname]
    for c in (0.5, 0.1, 1.5):
        sol = cagrad(gram, c, pref)
        assert bool(sol.converged) and float(sol.gap) <= TOL, (c, sol)
        assert bool(torch.isfinite(sol.weights).all())
        assert cagrad_kkt(gram, pref, sol.weights, c) <= TOL, c


@pytest.mark.parametrize("masked", [False, True], ids=["host", "masked"])
def test_cone_qp_edge_cases(masked: bool) -> None:
    """Near-opposite vectors (within the dependency threshold of each other's line) are added
    normally and solved; a zero vector with a negative linear term is unbounded below and says
    so; a stall is never reported as converged."""
    g = torch.tensor([[1.0, 0.0], [-1.0, 1e-6], [0.2, 1.0]], dtype=torch.float64)
    G = (g @ g.T)[None]
    for u in torch.eye(3, dtype=torch.float64):
        q = G[0] @ u
        lam, _, converged = solve_cone(G, q[None], masked=masked)
        assert bool(converged.all())
        assert float(kkt_residual(G, q[None], lam)) <= TOL
    zero = torch.zeros(1, 2, 2, dtype=torch.float64)
    zero[0, 0, 0] = 1.0  # g_1 = e_1, g_2 = 0
    lam, _, converged = solve_cone(
        zero, torch.tensor([[0.5, -0.1]], dtype=torch.float64), masked=masked
    )
    assert not bool(converged.all()) and bool(torch.isfinite(lam).all())


def test_cagrad_zero_radius_is_the_preferred_combination() -> None:
    gram = ZOO["conflicting_8"]
    pref = prefs(8)["random"]
    assert torch.equal(cagrad_weights(gram, 0.0, pref), pref)


@pytest.mark.parametrize("aggregator", sorted(SOLVERS))
@pytest.mark.parametrize("name", [n for n in sorted(ZOO) if ZOO[n].shape[0] <= 16])
def test_host_and_masked_agree(aggregator: str, name: str) -> None:
    gram = ZOO[name]
    pref = prefs(gram.shape[0])["random"]
    host = SOLVERS[aggregator](gram, pref, masked=False)
    masked = SOLVERS[aggregator](gram, pref, masked=True)
    assert bool(masked.converged)
    assert float(masked.gap) <= TOL
    assert same_point(gram, host.weights, masked.weights) <= 1e-24
    # Step for step: the same iterations (ties break to the smallest index in both).
    if aggregator != "cagrad":  # the host's root search stops early; the masked one runs on
        assert torch.equal(host.iterations, masked.iterations)


@pytest.mark.parametrize("aggregator", sorted(SOLVERS))
def test_batched_equals_one_by_one(aggregator: str) -> None:
    names = ["random_8", "conflicting_8", "rank_deficient_8_in_3", "scale_1e30", "all_zero"]
    grams = torch.stack([ZOO[n][:5, :5] for n in names])  # (5, 5, 5)
    batch = grams.reshape(5, 1, 5, 5).expand(5, 2, 5, 5)  # (5, 2, 5, 5)
    pref = prefs(5)["random"]  # broadcast over the batch
    for masked in (False, True):
        got = SOLVERS[aggregator](batch, pref, masked=masked).weights
        assert got.shape == (5, 2, 5)
        for i in range(5):
            one = SOLVERS[aggregator](grams[i], pref, masked=False).weights
            for j in range(2):
                assert same_point(grams[i], got[i, j], one) <= 1e-24


@pytest.mark.parametrize("aggregator", sorted(SOLVERS))
@pytest.mark.parametrize("name", ["random_8", "conflicting_8", "rank_deficient_8_in_3"])
def test_permutation_equivariance(aggregator: str, name: str) -> None:
    gram = ZOO[name]
    pref = prefs(8)["random"]
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    w = SOLVERS[aggregator](gram, pref).weights
    wp = SOLVERS[aggregator](gram[perm][:, perm], pref[perm]).weights
    assert same_point(gram, w[perm].new_zeros(8).index_copy(0, perm, wp), w) <= 1e-24


@pytest.mark.parametrize("aggregator", sorted(SOLVERS))
@pytest.mark.parametrize("name", ["random_8", "conflicting_8", "ill_conditioned", "mixed_scales"])
def test_scale_invariance(aggregator: str, name: str) -> None:
    gram = ZOO[name]
    m = gram.shape[0]
    pref = prefs(m)["random"]
    w = SOLVERS[aggregator](gram, pref).weights
    for scale in (1e-30, 1e-8, 1e8, 1e30):
        ws = SOLVERS[aggregator](scale * gram, pref).weights
        assert same_point(gram, ws, w) <= 1e-20


def conflict_free_gram(m: int = 6) -> Tensor:
    g = torch.Generator().manual_seed(7)
    F = torch.rand(m, 20, generator=g, dtype=torch.float64)  # positive entries: G > 0
    return F @ F.T


@pytest.mark.parametrize("aggregator", ["dual_proj", "upgrad"])
def test_conflict_free_gives_the_preferred_combination_exactly(aggregator: str) -> None:
    gram = conflict_free_gram()
    for pref in prefs(6).values():
        for masked in (False, True):
            assert torch.equal(SOLVERS[aggregator](gram, pref, masked=masked).weights, pref)


def test_dual_proj_keeps_a_conflict_free_mean_among_conflicting_groups() -> None:
    """The mean conflicts with no group although two groups conflict with each other: dual_proj
    keeps the mean exactly, UPGrad does not, the min-norm point moves away."""
    F = torch.tensor([[1.0, 0.0], [-0.3, 1.0], [1.0, 1.0]], dtype=torch.float64)
    gram = F @ F.T
    assert float(gram[0, 1]) < 0 and bool((gram.mean(1) > 0).all())
    uniform = torch.full((3,), 1 / 3, dtype=torch.float64)
    assert torch.equal(dual_proj_weights(gram), uniform)
    assert not torch.equal(upgrad_weights(gram), uniform)


def test_dual_proj_projects_a_conflicting_mean() -> None:
    # g1 = (1, 0), g2 = (-2, 1): the mean (-0.5, 0.5) conflicts with g1. Its projection onto
    # {x: x1 >= 0, -2 x1 + x2 >= 0} is (0, 0.5) = 1 * g1 + 0.5 * g2.
    F = torch.tensor([[1.0, 0.0], [-2.0, 1.0]], dtype=torch.float64)
    w = dual_proj_weights(F @ F.T)
    torch.testing.assert_close(w, torch.tensor([1.0, 0.5], dtype=torch.float64), rtol=0, atol=1e-15)


def test_cagrad_known_value() -> None:
    # Orthogonal unit gradients, uniform pref: g0 = (1/2, 1/2), symmetric, so d moves along g0:
    # d = (1 + c) g0, w = (1 + c) / 2 each.
    w = cagrad_weights(torch.eye(2, dtype=torch.float64), c=0.5)
    torch.testing.assert_close(w, torch.full((2,), 0.75, dtype=torch.float64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("fn", [dual_proj_weights, upgrad_weights, cagrad_weights])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_any_float_dtype_gives_float64(fn: Callable[..., Tensor], dtype: torch.dtype) -> None:
    gram = ZOO["conflicting_8"]
    scaled = gram / scale_of(gram)  # inside float16's range
    w = fn(scaled.to(dtype))
    assert w.dtype == torch.float64 and w.shape == (8,)
    assert same_point(scaled, w, fn(scaled.to(dtype).double())) <= 1e-24


@pytest.mark.parametrize("fn", [dual_proj_weights, upgrad_weights, cagrad_weights])
def test_bad_input(fn: Callable[..., Tensor]) -> None:
    gram = ZOO["random_8"]
    with pytest.raises(ValueError, match=r"shape \(\.\.\., m\) = \(8,\)"):
        fn(gram, pref=torch.ones(7, dtype=torch.float64))
    with pytest.raises(ValueError, match="finite and non-negative"):
        fn(gram, pref=-torch.ones(8, dtype=torch.float64))
    with pytest.raises(ValueError, match="finite and non-negative"):
        fn(gram, pref=torch.full((8,), math.nan, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating dtype"):
        fn(gram, pref=torch.ones(8, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN or Inf"):
        fn(torch.full((3, 3), math.nan))
    with pytest.raises(ValueError, match=r"\(m, m\)"):
        fn(torch.ones(3, 4))


def test_cagrad_rejects_a_bad_radius() -> None:
    for c in (-0.1, math.nan, math.inf, True):
        with pytest.raises(ValueError, match="c must be a finite float >= 0"):
            cagrad_weights(ZOO["random_8"], c=c)
