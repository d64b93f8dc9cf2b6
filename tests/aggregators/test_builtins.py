"""The built-in aggregators as objects: each name and its object give the same Solution, bit for
bit, as the solver GRAIN called for that name before the objects existed, on the whole Gram zoo;
called directly, each object gives its public function's weights; names, reprs and bad input."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import torchgrain
from tests.aggregators.test_registry import tiny_step
from tests.solvers._zoo import zoo
from tests.solvers.test_aggregators import prefs
from torchgrain.aggregators import CAGrad, DualProj, Mean, MinNorm, UPGrad, aggregate
from torchgrain.solvers import Solution, cagrad, dual_proj, solve, upgrad

ZOO = zoo()
SMALL = [name for name in sorted(ZOO) if ZOO[name].shape[0] <= 64]

# What each name ran before it named an object: the solver, called as GRAIN's dispatch called it.
BEFORE: dict[str, Callable[[Tensor, Tensor], Solution]] = {
    "min_norm": lambda gram, pref: solve(gram, check=False),
    "mean": lambda gram, pref: Solution(
        pref.clone(),
        torch.zeros((), dtype=torch.float64),
        torch.zeros((), dtype=torch.int64),
        torch.ones((), dtype=torch.bool),
    ),
    "dual_proj": lambda gram, pref: dual_proj(gram, pref, check=False),
    "upgrad": lambda gram, pref: upgrad(gram, pref, check=False),
    "cagrad": lambda gram, pref: cagrad(gram, 0.5, pref, check=False),
}
OBJECTS = {"min_norm": MinNorm(), "mean": Mean(), "dual_proj": DualProj(), "upgrad": UPGrad()}
OBJECTS["cagrad"] = CAGrad()
FUNCTIONS: dict[str, Callable[..., Tensor]] = {
    "min_norm": lambda gram, pref=None: torchgrain.min_norm_weights(gram),
    "dual_proj": torchgrain.dual_proj_weights,
    "upgrad": torchgrain.upgrad_weights,
    "cagrad": lambda gram, pref=None: torchgrain.cagrad_weights(gram, 0.5, pref),
}


def assert_same(a: Solution, b: Solution) -> None:
    for field in ("weights", "gap", "iterations", "converged"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype and torch.equal(x, y), field


def test_the_names_are_the_built_ins() -> None:
    names = ("min_norm", "mean", "dual_proj", "upgrad", "cagrad")
    assert torchgrain.aggregators.AGGREGATOR_NAMES == names == tuple(BEFORE)
    assert torchgrain.solvers.AGGREGATOR_NAMES is torchgrain.aggregators.AGGREGATOR_NAMES
    assert [OBJECTS[name].name for name in BEFORE] == list(BEFORE)


@pytest.mark.parametrize("name", list(BEFORE))
@pytest.mark.parametrize("case", SMALL)
def test_name_and_object_give_the_solution_of_before(name: str, case: str) -> None:
    gram = ZOO[case]
    for pref in prefs(gram.shape[0]).values():
        before = BEFORE[name](gram, pref)
        assert_same(aggregate(name, gram, pref), before)
        assert_same(aggregate(OBJECTS[name], gram, pref), before)


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize("case", ["random_8", "conflicting_8", "rank_deficient_8_in_3", "m1"])
def test_an_object_called_gives_its_function_s_weights(name: str, case: str) -> None:
    gram = ZOO[case]
    pref = prefs(gram.shape[0])["random"]
    assert torch.equal(OBJECTS[name](gram, pref), FUNCTIONS[name](gram, pref))
    assert torch.equal(OBJECTS[name](gram), FUNCTIONS[name](gram))  # uniform pref
    batch = torch.stack([gram, 2 * gram])  # (2, m, m)
    assert torch.equal(OBJECTS[name](batch), FUNCTIONS[name](batch))


def test_mean_returns_a_copy_of_pref_and_a_zero_report() -> None:
    pref = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    solution = Mean().solve(torch.eye(3), pref)
    assert torch.equal(solution.weights, pref) and solution.weights is not pref
    assert float(solution.gap) == 0 and int(solution.iterations) == 0 and bool(solution.converged)
    assert torch.equal(Mean()(torch.eye(4)), torch.full((4,), 0.25, dtype=torch.float64))
    assert Mean()(torch.eye(3)[None].expand(2, 3, 3), pref).shape == (2, 3)


def test_cagrad_s_radius() -> None:
    gram, pref = ZOO["conflicting_8"], prefs(8)["random"]
    for c in (0.0, 0.3, 1.5):
        assert torch.equal(CAGrad(c)(gram, pref), torchgrain.cagrad_weights(gram, c, pref))
    assert (CAGrad().name, CAGrad(0.5).name, CAGrad(c=0.3).name) == (
        "cagrad",
        "cagrad",
        "cagrad(c=0.3)",
    )
    assert repr(CAGrad(c=0.3)) == "CAGrad(c=0.3)" and repr(UPGrad()) == "UPGrad()"
    for c in (-0.1, float("nan"), float("inf"), True, "0.5"):
        with pytest.raises(ValueError, match="c must be a finite float >= 0"):
            CAGrad(c)  # type: ignore[arg-type]


def test_objects_check_their_input_when_called() -> None:
    for aggregator in OBJECTS.values():
        with pytest.raises(ValueError, match=r"\(m, m\)"):
            aggregator(torch.ones(3, 4))
        with pytest.raises(ValueError, match="NaN or Inf"):
            aggregator(torch.full((3, 3), float("nan")))


@pytest.mark.parametrize("name", list(BEFORE))
def test_grain_with_the_object_is_grain_with_the_name(name: str) -> None:
    by_name, stats_name = tiny_step(name)
    by_object, stats_object = tiny_step(OBJECTS[name])
    assert all(torch.equal(a, b) for a, b in zip(by_name, by_object, strict=True))
    assert stats_name.aggregator == stats_object.aggregator == name
    assert torch.equal(stats_name.weights, stats_object.weights)


def test_grain_names_an_object_with_its_parameters() -> None:
    _, stats = tiny_step(CAGrad(c=0.3))
    assert stats.aggregator == "cagrad(c=0.3)"
    _, by_hand = tiny_step(lambda gram, pref: torchgrain.cagrad_weights(gram, 0.3, pref))
    assert torch.equal(stats.weights, by_hand.weights)
