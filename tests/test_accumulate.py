"""Gradient accumulation: the groups of every micro-batch are groups of one GRAIN step, equal to
single-shot GRAIN on the joined batch with those groups."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchgrain
from tests._models import TiedLM, flat_grad, lm_losses, mlp, per_sample_ce

pytestmark = pytest.mark.usefixtures("float64")


def _micro_batches(sizes: list[int], seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 5, generator=g), torch.randint(0, 3, (b,), generator=g)) for b in sizes]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("budget", [0, float("inf")], ids=["bookkeeping", "keep"])
@pytest.mark.parametrize("engine", ["fused", "loop"])
@pytest.mark.parametrize("local_groups", [1, 2, 3])
def test_equals_single_shot_on_the_joined_batch(
    engine: str, local_groups: int, budget: float
) -> None:
    torch.manual_seed(0)
    model = mlp()
    reference = copy.deepcopy(model)
    batches = _micro_batches([5, 4, 6])
    grain = torchgrain.GRAIN(model, num_groups=local_groups, engine=engine, memory_budget=budget)
    with grain.accumulate() as acc:
        for x, y in batches:
            grain.backward(per_sample_ce(model, x, y))
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    ids = torch.cat(
        [
            torchgrain.contiguous_groups(len(b[1]), local_groups) + j * local_groups
            for j, b in enumerate(batches)
        ]
    )
    joined = torchgrain.GRAIN(reference, num_groups=3 * local_groups, engine="loop")
    expected = joined.backward(per_sample_ce(reference, x, y), ids)
    assert _rel(flat_grad(model), flat_grad(reference)) <= 1e-6
    assert acc.stats is not None and acc.stats.num_groups == 3 * local_groups
    assert _rel(acc.stats.gram, expected.gram) <= 1e-6
    assert grain.step == 1


def test_one_group_per_micro_batch_and_embeddings() -> None:
    torch.manual_seed(1)
    model = TiedLM()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 11, (b, 5), generator=g) for b in (3, 4, 2, 5)]
    grain = torchgrain.GRAIN(model, num_groups=1)
    with grain.accumulate() as acc:
        for tokens in batches:
            grain.backward(
                lm_losses(model, tokens), groups=torch.zeros(len(tokens), dtype=torch.long)
            )
    ids = torch.cat([torch.full((len(t),), j) for j, t in enumerate(batches)])
    torchgrain.GRAIN(reference, num_groups=4, engine="loop").backward(
        lm_losses(reference, torch.cat(batches)), ids
    )
    assert acc.stats is not None and acc.stats.group_sizes.tolist() == [3, 4, 2, 5]
    assert _rel(flat_grad(model), flat_grad(reference)) <= 1e-6


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_nan_in_one_micro_batch_skips_or_raises_the_whole_step(policy: str) -> None:
    model = mlp()
    grain = torchgrain.GRAIN(model, num_groups=2, nonfinite=policy)  # type: ignore[arg-type]
    batches = _micro_batches([4, 4, 4])
    if policy == "raise":
        with (
            pytest.raises(torchgrain.NonFiniteError, match="NaN or Inf in some micro-batch"),
            grain.accumulate(),
        ):
            for j, (x, y) in enumerate(batches):
                losses = per_sample_ce(model, x, y)
                grain.backward(losses * float("nan") if j == 1 else losses)
    else:
        with grain.accumulate() as acc:
            for j, (x, y) in enumerate(batches):
                losses = per_sample_ce(model, x, y)
                stats = grain.backward(losses * float("nan") if j == 1 else losses)
                assert stats.skipped == (j == 1)
        assert acc.stats is not None and acc.stats.skipped
    assert all(p.grad is None for p in model.parameters()) and grain.step == 0


def test_exception_inside_the_block_leaves_grad_untouched() -> None:
    model = mlp()
    grain = torchgrain.GRAIN(model, num_groups=2)
    (x, y), *_ = _micro_batches([4])
    with pytest.raises(KeyError), grain.accumulate():
        grain.backward(per_sample_ce(model, x, y))
        raise KeyError("user error")
    assert all(p.grad is None for p in model.parameters())
    grain.backward(per_sample_ce(model, x, y))  # usable afterwards, outside any block
    assert all(p.grad is not None for p in model.parameters())


def test_misuse_is_reported() -> None:
    model = mlp()
    grain = torchgrain.GRAIN(model, num_groups=2)
    with pytest.raises(RuntimeError, match=r"called no grain\.backward"), grain.accumulate():
        pass
    with pytest.raises(RuntimeError, match="do not nest"), grain.accumulate(), grain.accumulate():
        pass


def test_accumulated_steps_train() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    grain = torchgrain.GRAIN(model, num_groups=2)
    batches = _micro_batches([8, 8], seed=4)
    first = sum(float(per_sample_ce(model, x, y).detach().mean()) for x, y in batches)
    for _ in range(30):
        opt.zero_grad()
        with grain.accumulate():
            for x, y in batches:
                grain.backward(per_sample_ce(model, x, y))
        opt.step()
    assert sum(float(per_sample_ce(model, x, y).detach().mean()) for x, y in batches) < 0.7 * first


def test_lora_model_accumulates_with_the_fused_engine() -> None:
    pytest.importorskip("peft")
    from tests.engines.test_fused import _lora_bert, _seq_cls_losses, _tokens

    torch.manual_seed(5)
    model = _lora_bert()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(6)
    batches = [(*_tokens(b, seed=b), torch.randint(0, 3, (b,), generator=g)) for b in (3, 5)]
    grain = torchgrain.GRAIN(model, num_groups=2, memory_budget=0)
    with grain.accumulate() as acc:
        for batch in batches:
            grain.backward(_seq_cls_losses(model, batch))
    assert acc.stats is not None and not acc.stats.fallback
    ids = torch.cat([torchgrain.contiguous_groups(3, 2), torchgrain.contiguous_groups(5, 2) + 2])
    joined = tuple(torch.cat([b[k] for b in batches]) for k in range(3))
    torchgrain.GRAIN(reference, num_groups=4, engine="loop").backward(
        _seq_cls_losses(reference, joined), ids
    )
    assert _rel(flat_grad(model), flat_grad(reference)) <= 1e-6
