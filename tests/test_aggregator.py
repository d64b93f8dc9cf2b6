"""``GRAIN(..., aggregator=...)``: every aggregator on the fused engine against the loop engine in
float64, the step against the aggregator applied to the Gram by hand, ``"mean"`` against
``losses.mean().backward()``, accumulation, and bad callables."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

import torchgrain
from tests._models import flat_grad, group_gradients, mlp, per_sample_ce
from tests.engines.test_fused import CASES, GROUPINGS, _assert_grads_close, _grads, _rel

pytestmark = pytest.mark.usefixtures("float64")

FUNCTIONS = {
    "min_norm": lambda gram, pref: torchgrain.min_norm_weights(gram),
    "mean": lambda gram, pref: pref,
    "dual_proj": torchgrain.dual_proj_weights,
    "upgrad": torchgrain.upgrad_weights,
    "cagrad": lambda gram, pref: torchgrain.cagrad_weights(gram, 0.5, pref),
}
NAMES = sorted(FUNCTIONS)


def upgrad_by_hand(gram: Tensor, pref: Tensor) -> Tensor:
    """A user's aggregator: UPGrad written with the public DualProj, one projection per group."""
    eye = torch.eye(gram.shape[0], dtype=torch.float64)
    return sum(p * torchgrain.dual_proj_weights(gram, e) for p, e in zip(pref, eye, strict=True))


def conflicting_batch(B: int = 12, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A regression batch whose targets pull the output apart: the mean conflicts with groups."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 5, generator=g)
    y = torch.randn(B, 1, generator=g) * 3
    return x, y


def mse(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return ((model(x) - y) ** 2).mean(dim=1)  # (B,)


@pytest.mark.parametrize("aggregator", NAMES)
@pytest.mark.parametrize("m", [3, 8])
@pytest.mark.parametrize("name", ["mlp_layernorm", "tied_embedding_lm", "hf_bert", "cnn_groupnorm"])
def test_fused_equals_loop(name: str, m: int, aggregator: str) -> None:
    if name.startswith("hf_"):
        pytest.importorskip("transformers")
    case = CASES[name]
    B, groups = GROUPINGS[m]
    torch.manual_seed(0)
    model = case.build()
    reference = copy.deepcopy(model)
    results = []
    for engine, net in (("loop", reference), ("fused", model)):
        grain = torchgrain.GRAIN(net, num_groups=m, engine=engine, aggregator=aggregator)
        results.append(grain.backward(case.losses(net, case.batch(B)), groups))
        grain.close()
    ref_stats, stats = results
    assert stats.aggregator == aggregator and stats.engine == "fused"
    assert _rel(stats.gram, ref_stats.gram) <= 1e-6
    _assert_grads_close(_grads(model), _grads(reference))
    # The weights are the public function's on the step's Gram and the sample mean's weights.
    sizes = stats.group_sizes.to(torch.float64)
    expected = FUNCTIONS[aggregator](stats.gram, sizes / sizes.sum())
    scale = float(stats.gram.diagonal().max()) * (1 + float(expected.sum())) ** 2
    diff = stats.weights - expected
    assert float(diff @ stats.gram @ diff) <= 1e-20 * scale


@pytest.mark.parametrize("aggregator", [*NAMES, "callable"])
def test_grad_is_the_weighted_sum_of_independent_group_gradients(aggregator: str) -> None:
    torch.manual_seed(1)
    model = mlp(d_out=1)
    x, y = conflicting_batch()
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4])  # uneven
    chosen = upgrad_by_hand if aggregator == "callable" else aggregator
    stats = torchgrain.GRAIN(model, num_groups=5, aggregator=chosen).backward(
        mse(model, x, y), groups
    )
    F = group_gradients(model, lambda: mse(model, x, y), groups, 5)  # (m, P) oracle
    assert _rel(flat_grad(model), stats.weights @ F) <= 1e-9
    assert bool(stats.mean_conflict)  # the batch does conflict: every rule but "mean" moves
    assert bool(stats.differs_from_mean) == (aggregator != "mean")
    if aggregator in ("dual_proj", "upgrad", "callable"):  # <d, g_k> >= 0
        assert float(stats.min_inner) >= -1e-12 * float(stats.gram.diagonal().max())
    if aggregator == "callable":
        assert stats.aggregator == "upgrad_by_hand"
        reference = torchgrain.upgrad_weights(stats.gram, stats.group_sizes / 12.0)
        torch.testing.assert_close(stats.weights, reference, rtol=0, atol=1e-12)


@pytest.mark.parametrize("engine", ["fused", "loop"])
def test_mean_aggregator_is_plain_training_with_uneven_groups(engine: str) -> None:
    torch.manual_seed(2)
    model = mlp()
    reference = copy.deepcopy(model)
    x = torch.randn(11, 5)
    y = torch.randint(0, 3, (11,))
    groups = torch.tensor([0, 0, 0, 0, 0, 1, 2, 2, 3, 3, 3])  # sizes 5, 1, 2, 3 (and 4 empty)
    grain = torchgrain.GRAIN(model, num_groups=5, engine=engine, aggregator="mean")
    stats = grain.backward(per_sample_ce(model, x, y), groups)
    per_sample_ce(reference, x, y).mean().backward()
    assert _rel(flat_grad(model), flat_grad(reference)) <= 1e-12
    assert not bool(stats.differs_from_mean) and float(stats.mean_distance) == 0.0
    assert float(stats.d_over_mean) == pytest.approx(1.0, abs=1e-12)
    assert stats.weights[4] == 0 and math.isfinite(float(stats.gram_condition))


@pytest.mark.parametrize("aggregator", ["dual_proj", "upgrad"])
def test_conflict_free_step_is_the_mean_exactly(aggregator: str) -> None:
    """Groups whose gradients all agree (every sample equal): no conflict, so the step is the
    mean's, weight for weight; the min-norm point still moves (it leans to the shortest)."""
    torch.manual_seed(3)
    model = nn.Linear(4, 1)
    x = torch.randn(1, 4).expand(8, 4) * torch.linspace(1, 2, 8)[:, None]  # same direction
    y = torch.full((8, 1), -5.0)  # every sample wants the output up
    stats = torchgrain.GRAIN(model, num_groups=4, aggregator=aggregator).backward(mse(model, x, y))
    assert not bool(stats.mean_conflict)
    assert not bool(stats.differs_from_mean)
    assert torch.equal(stats.weights, torch.full((4,), 0.25, dtype=torch.float64))
    model.zero_grad()
    stats = torchgrain.GRAIN(model, num_groups=4).backward(mse(model, x, y))
    assert bool(stats.differs_from_mean) and float(stats.mean_distance) > 0.1


@pytest.mark.parametrize("aggregator", ["dual_proj", "upgrad", "cagrad", "mean"])
def test_accumulation_equals_single_shot(aggregator: str) -> None:
    torch.manual_seed(4)
    model = mlp(d_out=1)
    reference = copy.deepcopy(model)
    micro = [conflicting_batch(B, seed=s) for s, B in enumerate([5, 4, 6])]
    grain = torchgrain.GRAIN(model, num_groups=2, aggregator=aggregator)
    with grain.accumulate() as acc:
        for x, y in micro:
            grain.backward(mse(model, x, y))
    x = torch.cat([b[0] for b in micro])
    y = torch.cat([b[1] for b in micro])
    ids = torch.cat(
        [torchgrain.contiguous_groups(len(b[1]), 2) + 2 * j for j, b in enumerate(micro)]
    )
    joined = torchgrain.GRAIN(reference, num_groups=6, engine="loop", aggregator=aggregator)
    expected = joined.backward(mse(reference, x, y), ids)
    assert acc.stats is not None and acc.stats.aggregator == aggregator
    assert _rel(flat_grad(model), flat_grad(reference)) <= 1e-6
    torch.testing.assert_close(acc.stats.weights, expected.weights, rtol=1e-6, atol=1e-9)


def test_bad_aggregators_are_refused_and_leave_grad_untouched() -> None:
    model = mlp()
    with pytest.raises(ValueError, match=r"aggregator must be one of \['min_norm', 'mean'"):
        torchgrain.GRAIN(model, num_groups=2, aggregator="minnorm")
    with pytest.raises(TypeError, match="a name or a callable"):
        torchgrain.GRAIN(model, num_groups=2, aggregator=3)  # type: ignore[arg-type]
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    bad = {
        "wrong shape": (lambda G, p: torch.ones(G.shape[0] + 1), ValueError, r"shape \(4,\)"),
        "negative": (lambda G, p: -p, ValueError, "finite and non-negative"),
        "nan": (lambda G, p: p * math.nan, ValueError, "finite and non-negative"),
        "not a tensor": (lambda G, p: p.tolist(), TypeError, "returned a list"),
        "integer": (lambda G, p: torch.ones(G.shape[0], dtype=torch.long), ValueError, "floating"),
    }
    for fn, error, match in bad.values():
        per_sample_ce(model, x, y).mean().backward()
        before = [p.grad.clone() for p in model.parameters()]
        grain = torchgrain.GRAIN(model, num_groups=3, aggregator=fn)
        with pytest.raises(error, match=match):
            grain.backward(per_sample_ce(model, x, y))
        for p, g in zip(model.parameters(), before, strict=True):
            assert torch.equal(p.grad, g)
        grain.close()
        model.zero_grad()


def test_the_callable_sees_the_non_empty_groups_on_the_host() -> None:
    seen: list[tuple[Tensor, Tensor]] = []

    def spy(gram: Tensor, pref: Tensor) -> Tensor:
        seen.append((gram, pref))
        return pref

    model = mlp()
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    stats = torchgrain.GRAIN(model, num_groups=4, aggregator=spy).backward(
        per_sample_ce(model, x, y), torch.tensor([0, 0, 0, 2, 3, 3])
    )
    ((gram, pref),) = seen
    assert gram.shape == (3, 3) and gram.dtype == torch.float64 and gram.device.type == "cpu"
    torch.testing.assert_close(pref, torch.tensor([0.5, 1 / 6, 1 / 3], dtype=torch.float64))
    assert stats.aggregator == "spy" and stats.weights[1] == 0
    assert math.isnan(float(stats.solver_gap))


def test_stats_report_the_distance_to_the_mean() -> None:
    torch.manual_seed(0)
    model = mlp(d_out=1)
    x, y = conflicting_batch(16)  # the mean conflicts with some group at this start
    for aggregator in NAMES:
        model.zero_grad()
        stats = torchgrain.GRAIN(model, num_groups=8, aggregator=aggregator).backward(
            mse(model, x, y)
        )
        logged = stats.to_dict()
        assert {"grain/mean_distance", "grain/differs_from_mean"} <= set(logged)
        share = stats.group_sizes / stats.group_sizes.sum()
        assert bool(stats.mean_conflict)
        assert logged["grain/differs_from_mean"] == float(aggregator != "mean")
        delta = stats.weights - share
        expected = float((delta @ stats.gram @ delta).sqrt() / stats.mean_grad_norm)
        assert logged["grain/mean_distance"] == pytest.approx(expected, rel=1e-9, abs=1e-12)
        assert repr(torchgrain.GRAIN(model, num_groups=2, aggregator=aggregator)).count(
            f"aggregator={aggregator!r}"
        )


def test_skipped_step_names_its_aggregator() -> None:
    model = mlp()
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    grain = torchgrain.GRAIN(model, num_groups=2, aggregator="upgrad", nonfinite="skip")
    stats = grain.backward(per_sample_ce(model, x, y) * math.nan)
    assert stats.skipped and stats.aggregator == "upgrad"
    assert math.isnan(stats.to_dict()["grain/mean_distance"])
