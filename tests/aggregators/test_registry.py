"""A user's aggregators: registered under a name and picked by it in GRAIN and LocalSGD, an
:class:`Aggregator` subclass or any callable passed as is, and the errors of each, early and
naming the fix."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

import torchgrain
from tests._models import mlp, per_sample_ce
from torchgrain import Aggregator, GrainStats, register_aggregator
from torchgrain.aggregators import _registry, aggregate, aggregator_name, get_aggregator
from torchgrain.solvers import Solution


@pytest.fixture(autouse=True)
def registry() -> Iterator[None]:
    """Each test registers into a copy of the registry, which is put back after it."""
    saved = dict(_registry._REGISTRY)
    yield
    _registry._REGISTRY.clear()
    _registry._REGISTRY.update(saved)


def tiny_step(aggregator: object, m: int = 3) -> tuple[list[Tensor], GrainStats]:
    """One GRAIN backward of a seeded MLP: its ``.grad`` and stats."""
    torch.manual_seed(0)
    model = mlp().double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (9,), generator=g)
    grain = torchgrain.GRAIN(model, num_groups=m, aggregator=aggregator)  # type: ignore[arg-type]
    stats = grain.backward(per_sample_ce(model, x, y))
    grain.close()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None], stats


def smallest_first(gram: Tensor, pref: Tensor) -> Tensor:
    """All the weight on the group with the smallest gradient."""
    w = torch.zeros_like(pref)
    w[gram.diagonal().argmin()] = 1.0
    return w


class SmallestFirst(Aggregator):
    def __call__(self, gram: Tensor, pref: Tensor | None = None) -> Tensor:
        assert pref is not None
        return smallest_first(gram, pref)


class Reported(Aggregator):
    """An aggregator that reports on its solve: the mean, with a made-up report."""

    name = "reported"

    def solve(self, gram: Tensor, pref: Tensor | None = None, *, check: bool = True) -> Solution:
        assert pref is not None
        return Solution(pref * 1.0, torch.tensor(0.25), torch.tensor(7), torch.tensor(True))


class CallableObject:  # no Aggregator: the same call signature is enough
    def __call__(self, gram: Tensor, pref: Tensor) -> Tensor:
        return smallest_first(gram, pref)


def test_a_registered_function_is_picked_by_name_in_grain() -> None:
    assert register_aggregator("smallest_first")(smallest_first) is smallest_first
    grads, stats = tiny_step("smallest_first")
    direct, direct_stats = tiny_step(smallest_first)
    assert all(torch.equal(a, b) for a, b in zip(grads, direct, strict=True))
    assert stats.aggregator == "smallest_first" and float(stats.weights.max()) == 1.0
    assert torch.equal(stats.weights, direct_stats.weights)
    assert math.isnan(float(stats.solver_gap))


def test_a_registered_class_is_made_anew_each_time_its_name_is_used() -> None:
    register_aggregator("smallest_class")(SmallestFirst)
    first, second = get_aggregator("smallest_class"), get_aggregator("smallest_class")
    assert isinstance(first, SmallestFirst) and first is not second
    grads, stats = tiny_step("smallest_class")
    direct, _ = tiny_step(smallest_first)
    assert all(torch.equal(a, b) for a, b in zip(grads, direct, strict=True))
    assert stats.aggregator == "smallest_class"


def test_a_registered_name_works_in_local_sgd() -> None:
    seen: list[tuple[Tensor, Tensor]] = []

    @register_aggregator("twice_the_mean")
    def twice_the_mean(gram: Tensor, pref: Tensor) -> Tensor:
        seen.append((gram, pref))
        return 2 * pref

    torch.manual_seed(0)
    model = mlp().double()
    anchor = [p.detach().clone() for p in model.parameters()]
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    local = torchgrain.LocalSGD(model, 1, aggregator="twice_the_mean")
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    per_sample_ce(model, x, y).mean().backward()
    inner.step()
    fast = [p.detach().clone() for p in model.parameters()]
    stats = local.step()
    assert stats is not None and stats.aggregator == "twice_the_mean"
    assert stats.weights.tolist() == [2.0] and len(seen) == 1 and seen[0][0].shape == (1, 1)
    # The outer SGD (lr 1) steps on d = 2 (anchor - fast): theta = 2 fast - anchor.
    for p, a, f in zip(model.parameters(), anchor, fast, strict=True):
        torch.testing.assert_close(p.detach(), 2 * f - a, rtol=0, atol=1e-15)


def test_a_user_class_or_callable_passed_as_is() -> None:
    direct, _ = tiny_step(smallest_first)
    for aggregator, name in [
        (SmallestFirst(), "SmallestFirst"),
        (CallableObject(), "CallableObject"),
    ]:
        grads, stats = tiny_step(aggregator)
        assert all(torch.equal(a, b) for a, b in zip(grads, direct, strict=True))
        assert stats.aggregator == name == aggregator_name(aggregator)  # type: ignore[arg-type]
        assert math.isnan(float(stats.solver_gap)) and int(stats.solver_iterations) == 0
    _, stats = tiny_step(Reported())
    assert stats.aggregator == "reported"
    assert float(stats.solver_gap) == 0.25 and int(stats.solver_iterations) == 7


def test_a_user_s_solve_gets_copies() -> None:
    class Spoiler(Aggregator):
        def solve(
            self, gram: Tensor, pref: Tensor | None = None, *, check: bool = True
        ) -> Solution:
            assert pref is not None
            solution = Solution(
                pref.clone(), torch.tensor(0.0), torch.tensor(0), torch.tensor(True)
            )
            gram.zero_()
            pref.zero_()
            return solution

    gram = torch.eye(2, dtype=torch.float64)
    pref = torch.tensor([0.5, 0.5], dtype=torch.float64)
    solution = aggregate(Spoiler(), gram, pref)
    assert torch.equal(gram, torch.eye(2, dtype=torch.float64)) and pref.tolist() == [0.5, 0.5]
    assert solution.weights.tolist() == [0.5, 0.5]


def test_unknown_names_and_non_callables_are_refused() -> None:
    register_aggregator("smallest_first")(smallest_first)
    with pytest.raises(ValueError, match=r"one of \['min_norm', .*'smallest_first'\].* got 'sm'"):
        torchgrain.GRAIN(mlp(), num_groups=2, aggregator="sm")
    with pytest.raises(ValueError, match="aggregator must be one of"):
        torchgrain.LocalSGD(mlp(), 2, aggregator="sm")
    with pytest.raises(TypeError, match=r"a name or a callable .* got object"):
        torchgrain.GRAIN(mlp(), num_groups=2, aggregator=object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"got the class UPGrad; pass an instance: UPGrad\(\)"):
        torchgrain.GRAIN(mlp(), num_groups=2, aggregator=torchgrain.UPGrad)  # type: ignore[arg-type]


def test_registering_is_checked() -> None:
    register_aggregator("smallest_first")(smallest_first)
    with pytest.raises(ValueError, match=r"registered as 'smallest_first' already.*override=True"):
        register_aggregator("smallest_first")(SmallestFirst)
    with pytest.raises(ValueError, match="registered as 'upgrad' already"):
        register_aggregator("upgrad")(smallest_first)
    register_aggregator("smallest_first", override=True)(SmallestFirst)
    assert isinstance(get_aggregator("smallest_first"), SmallestFirst)
    with pytest.raises(TypeError, match="takes a class or a callable"):
        register_aggregator("three")(3)
    for name in ("", 3, None):
        with pytest.raises(TypeError, match="non-empty str"):
            register_aggregator(name)  # type: ignore[arg-type]
    register_aggregator("not_callable")(object)  # a class whose instances are not callable
    with pytest.raises(TypeError, match="whose instances are not callables"):
        torchgrain.GRAIN(mlp(), num_groups=2, aggregator="not_callable")


def test_an_aggregator_must_define_call_or_solve() -> None:
    with pytest.raises(TypeError, match=r"Empty defines neither __call__.* nor solve"):

        class Empty(Aggregator):
            pass


def test_bad_results_are_refused_and_leave_grad_untouched() -> None:
    class Negative(Aggregator):
        def __call__(self, gram: Tensor, pref: Tensor | None = None) -> Tensor:
            assert pref is not None
            return -pref

    class NotASolution(Aggregator):
        def solve(
            self, gram: Tensor, pref: Tensor | None = None, *, check: bool = True
        ) -> Solution:
            return pref  # type: ignore[return-value]

    model = mlp()
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    for aggregator, error, match in [
        (Negative(), ValueError, "aggregator Negative returned .* finite and non-negative"),
        (NotASolution(), TypeError, "NotASolution's solve returned a Tensor; return a .*Solution"),
    ]:
        per_sample_ce(model, x, y).mean().backward()
        before = [p.grad.clone() for p in model.parameters()]
        grain = torchgrain.GRAIN(model, num_groups=3, aggregator=aggregator)
        with pytest.raises(error, match=match):
            grain.backward(per_sample_ce(model, x, y))
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), before, strict=True))
        grain.close()
        model.zero_grad()
