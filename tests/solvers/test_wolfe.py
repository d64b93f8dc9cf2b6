"""The exact min-norm solver: KKT on the zoo, invariances, both implementations, batching."""

from __future__ import annotations

import pytest
import torch

from tests.solvers._zoo import kkt_gap, zoo
from torchgrain import min_norm_weights
from torchgrain.solvers import min_norm_weights_closed_form, solve

ZOO = zoo()


def assert_on_simplex(w: torch.Tensor, atol: float = 1e-12) -> None:
    assert (w >= 0).all(), w
    assert abs(float(w.double().sum()) - 1.0) <= atol


@pytest.mark.parametrize("masked", [False, True], ids=["host", "masked"])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_exact_on_zoo(name: str, masked: bool) -> None:
    gram = ZOO[name]
    sol = solve(gram, masked=masked)
    assert bool(sol.converged)
    assert_on_simplex(sol.weights)
    assert kkt_gap(gram, sol.weights) <= 1e-10
    assert float(sol.gap) <= 1e-10


@pytest.mark.parametrize("name", sorted(ZOO))
def test_host_and_masked_agree(name: str) -> None:
    """The two implementations give the same min-norm point (the weights may differ where the
    point has several representations, e.g. duplicates)."""
    gram = ZOO[name]
    a, b = solve(gram, masked=False).weights, solve(gram, masked=True).weights
    scale = max(float(gram.diagonal().max()), 1e-300)
    diff = a - b
    assert float(diff @ gram @ diff) / scale <= 1e-20


@pytest.mark.parametrize("name", ["random_2", "rank1_opposite", "m1"])
def test_matches_closed_form(name: str) -> None:
    gram = ZOO[name]
    expected = min_norm_weights_closed_form(gram)
    got = min_norm_weights(gram)
    diff = got - expected
    assert float(diff @ gram @ diff) <= 1e-24 * float(gram.diagonal().max())


def test_known_values() -> None:
    # Orthogonal vectors of squared norms a, b: w = (b, a) / (a + b).
    w = min_norm_weights(torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64)))
    torch.testing.assert_close(w, torch.tensor([0.8, 0.2], dtype=torch.float64), rtol=0, atol=1e-15)
    # g and -g: the origin is in the hull, d = 0 with equal weights.
    w = min_norm_weights(torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64))
    torch.testing.assert_close(w, torch.tensor([0.5, 0.5], dtype=torch.float64), rtol=0, atol=1e-15)
    # A zero gradient among others: it alone is the min-norm point.
    w = min_norm_weights(ZOO["one_zero_gradient"])
    torch.testing.assert_close(w, torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64))
    # All zero: uniform.
    torch.testing.assert_close(
        min_norm_weights(ZOO["all_zero"]), torch.full((5,), 0.2, dtype=torch.float64)
    )


@pytest.mark.parametrize(
    "name", ["random_8", "near_identical_8", "conflicting_8", "ill_conditioned"]
)
def test_scale_invariance(name: str) -> None:
    gram = ZOO[name]
    w = min_norm_weights(gram)
    for scale in (1e-30, 1e-8, 1e8, 1e30):
        ws = min_norm_weights(scale * gram)
        diff = ws - w
        assert float(diff @ gram @ diff) <= 1e-20 * float(gram.diagonal().max())


@pytest.mark.parametrize(
    "name", ["random_8", "near_identical_8", "rank_deficient_8_in_3", "duplicates"]
)
def test_permutation_equivariance(name: str) -> None:
    gram = ZOO[name]
    m = gram.shape[0]
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(0))
    w = min_norm_weights(gram)
    wp = min_norm_weights(gram[perm][:, perm])
    back = torch.empty_like(wp)
    back[perm] = wp
    diff = back - w
    assert float(diff @ gram @ diff) <= 1e-20 * float(gram.diagonal().max())


def test_sparse_optimum_for_near_identical_groups() -> None:
    """With near-identical group gradients the exact optimum puts weight on few groups: an
    approximate solver spreads it and misses the point."""
    w = min_norm_weights(ZOO["near_identical_64"])
    assert int((w > 0).sum()) < 64


@pytest.mark.parametrize("masked", [False, True], ids=["host", "masked"])
def test_batched_equals_one_by_one(masked: bool) -> None:
    names = ["random_8", "conflicting_8", "scale_1e30", "near_identical_8", "rank_deficient_8_in_3"]
    batch = torch.stack([ZOO[n] for n in names]).reshape(5, 1, 8, 8)  # (5, 1, m, m)
    w = solve(batch, masked=masked).weights
    assert w.shape == (5, 1, 8)
    for i, name in enumerate(names):
        assert kkt_gap(ZOO[name], w[i, 0]) <= 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_input(dtype: torch.dtype) -> None:
    gram = ZOO["random_8"]
    w = min_norm_weights(gram.to(dtype))
    assert w.dtype == dtype
    assert_on_simplex(w, atol=1e-2)
    # The QP runs in float64 on the rounded Gram: the weights are that Gram's exact optimum.
    assert kkt_gap(gram.to(dtype).double(), min_norm_weights(gram.to(dtype).double())) <= 1e-10


def test_float32_extreme_scales() -> None:
    gram = ZOO["random_8"] / ZOO["random_8"].diagonal().max()
    for scale in (1e-30, 1e30):
        w = min_norm_weights((scale * gram).float())
        assert kkt_gap(gram, w) <= 1e-6


def test_iteration_cap_reports_non_convergence() -> None:
    sol = solve(ZOO["random_64"], max_iter=3)
    assert not bool(sol.converged)
    assert_on_simplex(sol.weights)  # still a feasible point


def test_does_not_track_gradients() -> None:
    gram = ZOO["random_8"].clone().requires_grad_(True)
    assert not min_norm_weights(gram).requires_grad


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (torch.ones(3), r"shape \(m, m\)"),
        (torch.ones(2, 3), r"shape \(m, m\)"),
        (torch.ones(0, 0), "m = 0"),
        (torch.eye(2, dtype=torch.int64), "floating"),
        (torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]), "NaN or Inf"),
        (torch.tensor([[float("inf"), 0.0], [0.0, 1.0]]), "NaN or Inf"),
        ([[1.0]], "torch.Tensor"),
    ],
)
def test_bad_input(bad: object, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        min_norm_weights(bad)  # type: ignore[arg-type]
