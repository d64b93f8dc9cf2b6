"""The ghost Gram of a Linear weight (from the tokens, no group gradients) against the Gram of the
materialised group gradients, and the engine choosing it only where it is exact and cheaper."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchgrain
from torchgrain.engines import FusedEngine, GroupIndex
from torchgrain.engines.rules._base import gram_of
from torchgrain.engines.rules._linear import LinearRule, ghost_weight_gram, path_costs


def _groups(ids: list[int]) -> GroupIndex:
    t = torch.tensor(ids)
    return GroupIndex.build(t, torch.bincount(t))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tokens", [1, 3])
def test_ghost_gram_equals_the_materialised_gram(dtype: torch.dtype, tokens: int) -> None:
    g = torch.Generator().manual_seed(tokens)
    groups = _groups([0, 2, 1, 1, 0, 2, 2])  # uneven, unsorted
    A = torch.randn(7, tokens, 40, generator=g, dtype=dtype)  # (B, T, in)
    Bk = torch.randn(7, tokens, 50, generator=g, dtype=dtype)  # (B, T, out)
    ghost = ghost_weight_gram(A, Bk, groups)
    assert ghost is not None and ghost.dtype == torch.float64
    expected = gram_of(LinearRule().group_grads(nn.Linear(40, 50), A, Bk, groups)["weight"])
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(ghost, expected, rtol=tol, atol=tol * float(expected.abs().max()))


def test_ghost_is_declined_when_materialising_is_cheaper() -> None:
    groups = _groups([0, 1] * 8)
    assert ghost_weight_gram(torch.randn(16, 8, 4), torch.randn(16, 8, 4), groups) is None


def test_cancelling_tokens_are_redone_in_float64() -> None:
    # two tokens per sample whose gradients cancel to 1e-4 of their size: float32 products would
    # lose the diagonal, so the block must come out as accurate as the float64 one
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 1, 64, generator=g, dtype=torch.float64)
    b = torch.randn(4, 1, 64, generator=g, dtype=torch.float64)
    A = torch.cat([a, a], 1).float()  # (B, 2, in)
    Bk = torch.cat([b, -b * (1 - 1e-4)], 1).float()  # (B, 2, out)
    groups = _groups([0, 0, 1, 1])
    exact = ghost_weight_gram(A.double(), Bk.double(), groups)  # the same inputs, in float64
    got = ghost_weight_gram(A, Bk, groups)
    assert exact is not None and got is not None
    torch.testing.assert_close(got, exact, rtol=1e-9, atol=0)
    a2, b2 = A.reshape(8, 64), Bk.reshape(8, 64)
    s = nn.functional.one_hot(torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), 2).float()
    naive = (s.T @ ((a2 @ a2.T) * (b2 @ b2.T)) @ s).double()  # what float32 alone would give
    assert float(((naive - exact) / exact).abs().max()) > 1e-5


def test_fused_engine_with_ghost_grams_equals_the_loop_engine() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.LayerNorm(96), nn.Linear(96, 5)).double()
    x = torch.randn(12, 2, 48, dtype=torch.float64)  # 24 tokens: the ghost is cheaper
    y = torch.randint(0, 5, (12,))

    def losses(net: nn.Module) -> torch.Tensor:
        logits = net(x).mean(1)  # (B, 5)
        return nn.functional.cross_entropy(logits, y, reduction="none")

    ref_model = copy.deepcopy(model)
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3])
    ref = torchgrain.GRAIN(ref_model, num_groups=4, engine="loop").backward(losses(ref_model), ids)
    grain = torchgrain.GRAIN(model, num_groups=4, engine="fused")
    calls = []
    rule = LinearRule

    def counting(self, module, A, Bk, groups, name, keep):  # type: ignore[no-untyped-def]
        out = rule_ghost(self, module, A, Bk, groups, name, keep)
        calls.append((list(model).index(module), name, out is not None))
        return out

    rule_ghost = rule.ghost_gram
    rule.ghost_gram = counting  # type: ignore[method-assign]
    try:
        stats = grain.backward(losses(model), ids)
    finally:
        rule.ghost_gram = rule_ghost  # type: ignore[method-assign]
    # (weight, bias) per layer: by the cost model the first weight's ghost is the cheapest, the
    # second weight's is dearer than recomputing d (book-keeping); a bias has none
    taken = {(layer, name): ghost for layer, name, ghost in calls}
    assert len(calls) == 4 and taken == {
        (0, "weight"): True,
        (0, "bias"): False,
        (3, "weight"): False,
        (3, "bias"): False,
    }
    torch.testing.assert_close(stats.gram, ref.gram, rtol=1e-10, atol=1e-14)
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize(
    ("m", "shape", "tokens", "expected"),
    [
        (8, (256, 256), 64, "ghost"),
        (8, (256, 256), 128, "ghost"),  # the former N (in + out) < in out rule kept: 1.7x slower
        (8, (256, 256), 256, "keep"),
        (8, (256, 1024), 128, "ghost"),
        (8, (256, 1024), 256, "keep"),
        (8, (384, 1536), 256, "ghost"),
        (8, (384, 1536), 512, "keep"),
        (8, (384, 1536), 2048, "keep"),
        # twice the groups: four times the Gram's products per value, the ghost reaches further
        (16, (256, 256), 256, "ghost"),
        (16, (256, 256), 512, "keep"),
        (16, (256, 1024), 256, "ghost"),
        (16, (384, 1536), 512, "ghost"),  # keep before the Gram term: 1.08-1.29x slower
        (16, (384, 1536), 1024, "keep"),
    ],
)
def test_the_cost_model_picks_the_path_timed_fastest(
    m: int, shape: tuple[int, int], tokens: int, expected: str
) -> None:
    """The paths timed alone on the 2-core CPU (``docs/results/benchmarks/step_paths.txt``)."""
    costs = path_costs(tokens, *shape, m=m)
    assert min(costs, key=costs.__getitem__) == expected


def test_each_layer_takes_its_cheapest_path_and_all_stay_exact() -> None:
    """Three weights, three paths, with an unlimited memory budget: a wide layer on few tokens
    takes the ghost Gram; a narrow output layer is cheaper to recompute than to keep
    (book-keeping); a square one on more tokens keeps its group gradients."""
    torch.manual_seed(0)
    wide, square, narrow = nn.Linear(48, 96), nn.Linear(12, 12), nn.Linear(96, 1)
    few = nn.Sequential(wide, nn.Tanh(), narrow).double()
    many = nn.Sequential(square, nn.Tanh()).double()
    x_few, x_many = torch.randn(12, 1, 48), torch.randn(12, 40, 12)

    def losses(head: nn.Module, body: nn.Module) -> torch.Tensor:
        return head(x_few.double()).pow(2).mean((1, 2)) + body(x_many.double()).pow(2).mean((1, 2))

    for layer, tokens, path in ((wide, 12, "ghost"), (narrow, 12, "bookkeeping")):
        costs = path_costs(tokens, layer.in_features, layer.out_features, m=4)
        assert min(costs, key=costs.__getitem__) == path
    costs = path_costs(480, 12, 12, m=4)
    assert min(costs, key=costs.__getitem__) == "keep"
    model = nn.ModuleList([few, many])
    reference = copy.deepcopy(model)
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3])
    groups = GroupIndex.build(ids, torch.bincount(ids))
    engine = FusedEngine(model, memory_budget=float("inf"))
    params = list(model.parameters())
    gram = engine.gram(losses(*model), groups, params)
    index = {id(p): i for i, p in enumerate(params)}
    kept = {name for name, p in model.named_parameters() if index[id(p)] in engine._kept}
    assert {"1.0.weight"} <= kept and not {"0.0.weight", "0.2.weight"} & kept
    weights = torch.rand(4, dtype=torch.float64)
    got = engine.combine(weights)
    ref = torchgrain.engines.LoopEngine()
    ref_gram = ref.gram(losses(*reference), groups, list(reference.parameters()))
    torch.testing.assert_close(gram, ref_gram, rtol=1e-10, atol=1e-14)
    for a, b in zip(got, ref.combine(weights), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    engine.close()
