"""GRAIN's step: the min-norm combination reaches .grad, with the paper's properties."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchgrain
from tests._models import (
    CNN,
    TiedLM,
    classification_batch,
    flat_grad,
    group_gradients,
    lm_losses,
    mlp,
    per_sample_ce,
)
from tests.solvers._zoo import kkt_gap

pytestmark = pytest.mark.usefixtures("float64")


def _check_against_oracle(
    model: nn.Module, losses_fn, groups: torch.Tensor, m: int
) -> torchgrain.GrainStats:  # type: ignore[no-untyped-def]
    """GRAIN's .grad equals sum_k w_k g_k with g_k from independent backward passes, and w is the
    exact min-norm point of their Gram."""
    F = group_gradients(model, losses_fn, groups, m)  # (m, P)
    grain = torchgrain.GRAIN(model, num_groups=m)
    model.zero_grad(set_to_none=True)
    stats = grain.backward(losses_fn(), groups)
    present = stats.group_sizes > 0
    torch.testing.assert_close(
        stats.gram[present][:, present], (F @ F.T)[present][:, present], rtol=1e-10, atol=1e-14
    )
    torch.testing.assert_close(
        flat_grad(model), stats.weights[present] @ F[present], rtol=1e-10, atol=1e-14
    )
    assert kkt_gap((F @ F.T)[present][:, present], stats.weights[present]) <= 1e-10
    return stats


@pytest.mark.parametrize("m", [1, 2, 3, 8])
def test_mlp_grad_is_min_norm_combination(m: int) -> None:
    torch.manual_seed(0)
    model = mlp()
    x, y = classification_batch(B=13)
    groups = torchgrain.contiguous_groups(13, m)
    stats = _check_against_oracle(model, lambda: per_sample_ce(model, x, y), groups, m)
    assert float(stats.min_inner) >= float(stats.d_norm) ** 2 - 1e-12  # KKT: no group gets worse
    assert float(stats.d_norm) <= float(stats.mean_grad_norm) + 1e-12


def test_uneven_and_empty_groups() -> None:
    torch.manual_seed(1)
    model = mlp()
    x, y = classification_batch(B=10)
    groups = torch.tensor([0, 0, 0, 0, 0, 0, 2, 2, 4, 4])  # groups 1 and 3 empty
    stats = _check_against_oracle(model, lambda: per_sample_ce(model, x, y), groups, 5)
    assert stats.group_sizes.tolist() == [6, 0, 2, 0, 2]
    assert float(stats.weights[1]) == 0.0 and float(stats.weights[3]) == 0.0
    assert torch.isfinite(stats.gram).all() and not stats.skipped


def test_batchnorm_model_is_exact_with_the_loop_engine() -> None:
    torch.manual_seed(2)
    model = CNN(batchnorm=True)
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    _check_against_oracle(
        model, lambda: per_sample_ce(model, x, y), torchgrain.contiguous_groups(8, 4), 4
    )


def test_tied_weights_counted_once() -> None:
    torch.manual_seed(3)
    model = TiedLM()
    tokens = torch.randint(0, 11, (6, 5))
    grain = torchgrain.GRAIN(model, num_groups=3)
    assert len(grain.params) == len(list(model.parameters()))  # the tied matrix once
    _check_against_oracle(
        model, lambda: lm_losses(model, tokens), torchgrain.contiguous_groups(6, 3), 3
    )


def test_accumulates_into_existing_grad() -> None:
    """Like loss.backward(): .grad += d, so that zero_grad keeps its meaning."""
    torch.manual_seed(4)
    model = mlp()
    x, y = classification_batch()
    grain = torchgrain.GRAIN(model, num_groups=3)
    grain.backward(per_sample_ce(model, x, y))
    d = flat_grad(model).clone()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    grain.backward(per_sample_ce(model, x, y))
    torch.testing.assert_close(flat_grad(model), 0.5 + d, rtol=0, atol=1e-15)


def _train(
    model: nn.Module, steps: int, use_grain: bool, m: int = 1, **grain_kwargs
) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    grain = torchgrain.GRAIN(model, num_groups=m, **grain_kwargs) if use_grain else None
    trajectory = []
    for step in range(steps):
        x, y = classification_batch(B=12, seed=step)
        opt.zero_grad()
        losses = per_sample_ce(model, x, y)
        if grain is None:
            losses.mean().backward()
        else:
            grain.backward(losses)
        opt.step()
        trajectory.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    return trajectory


def test_one_group_is_plain_training_bit_for_bit() -> None:
    torch.manual_seed(5)
    model = mlp()
    plain = _train(copy.deepcopy(model), 10, use_grain=False)
    grain = _train(copy.deepcopy(model), 10, use_grain=True, m=1)
    for a, b in zip(plain, grain, strict=True):
        assert torch.equal(a, b)


def test_equal_group_gradients_give_plain_training() -> None:
    """Every group holds the same samples: all g_k equal, so d is the mean gradient."""
    torch.manual_seed(6)
    model = mlp()
    opt_plain_model, grain_model = copy.deepcopy(model), copy.deepcopy(model)
    opt_a = torch.optim.AdamW(opt_plain_model.parameters(), lr=1e-2)
    opt_b = torch.optim.AdamW(grain_model.parameters(), lr=1e-2)
    grain = torchgrain.GRAIN(grain_model, num_groups=4)
    for step in range(8):
        x, y = classification_batch(B=3, seed=step)
        opt_a.zero_grad()
        per_sample_ce(opt_plain_model, x, y).mean().backward()
        opt_a.step()
        opt_b.zero_grad()
        grain.backward(per_sample_ce(grain_model, x.repeat(4, 1), y.repeat(4)))
        opt_b.step()
    for p, q in zip(opt_plain_model.parameters(), grain_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_permuting_group_labels_changes_nothing() -> None:
    torch.manual_seed(7)
    model = mlp()
    x, y = classification_batch(B=16)
    groups = torchgrain.contiguous_groups(16, 8)
    grain = torchgrain.GRAIN(model, num_groups=8)
    stats = grain.backward(per_sample_ce(model, x, y), groups)
    g1 = flat_grad(model).clone()
    perm = torch.randperm(8)
    model.zero_grad(set_to_none=True)
    stats_p = grain.backward(per_sample_ce(model, x, y), perm[groups])
    torch.testing.assert_close(flat_grad(model), g1, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(stats_p.d_norm, stats.d_norm)


def test_random_grouping_is_seeded_and_bit_identical() -> None:
    def run(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(8)
        return _train(mlp(), 5, use_grain=True, m=4, grouping="random", seed=seed)

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not torch.equal(a[-1], c[-1])


def test_state_dict_resume_is_bit_identical() -> None:
    torch.manual_seed(9)
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    grain = torchgrain.GRAIN(model, num_groups=4, grouping="random", seed=3)

    def step(i: int) -> None:
        x, y = classification_batch(B=12, seed=i)
        opt.zero_grad()
        grain.backward(per_sample_ce(model, x, y))
        opt.step()

    for i in range(3):
        step(i)
    saved = copy.deepcopy(
        {"model": model.state_dict(), "opt": opt.state_dict(), "grain": grain.state_dict()}
    )
    for i in range(3, 6):
        step(i)
    finished = [p.detach().clone() for p in model.parameters()]

    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    grain = torchgrain.GRAIN(
        model, num_groups=4, grouping="random", seed=99
    )  # seed overwritten below
    grain.load_state_dict(saved["grain"])
    assert grain.step == 3
    for i in range(3, 6):
        step(i)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), finished, strict=True))


def test_key_grouping_by_label() -> None:
    torch.manual_seed(10)
    model = mlp()
    x, y = classification_batch(B=20)
    grain = torchgrain.GRAIN(model, grouping="key")
    stats = grain.backward(per_sample_ce(model, x, y), keys=y)
    assert stats.num_groups == len(torch.unique(y))
    assert stats.group_sizes.tolist() == torch.bincount(y).tolist()


def test_explicit_groups_win_over_configured_grouping() -> None:
    torch.manual_seed(11)
    model = mlp()
    x, y = classification_batch(B=12)
    grain = torchgrain.GRAIN(model, num_groups=2, grouping="random")
    stats = grain.backward(per_sample_ce(model, x, y), torch.tensor([0] * 11 + [1]))
    assert stats.group_sizes.tolist() == [11, 1]


def test_opposite_groups_give_zero_step() -> None:
    """Two samples whose gradients are exactly opposite: the origin is in the hull, d = 0."""
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    x = torch.tensor([[1.0, -1.0], [-2.0, 2.0]])  # mean gradient (-0.5, 0.5) conflicts with g_1
    grain = torchgrain.GRAIN([w], num_groups=2)
    stats = grain.backward(x @ w)
    torch.testing.assert_close(w.grad, torch.zeros(2), rtol=0, atol=1e-15)
    torch.testing.assert_close(stats.weights, torch.tensor([2 / 3, 1 / 3]))
    assert float(stats.d_norm) <= 1e-15 and bool(stats.mean_conflict)


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_extreme_loss_scales(scale: float) -> None:
    torch.manual_seed(12)
    model = mlp()
    x, y = classification_batch()
    grain = torchgrain.GRAIN(model, num_groups=3)
    grain.backward(per_sample_ce(model, x, y))
    reference = flat_grad(model).clone()
    model.zero_grad(set_to_none=True)
    grain.backward(scale * per_sample_ce(model, x, y))
    torch.testing.assert_close(flat_grad(model), scale * reference, rtol=1e-9, atol=0.0)


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_extreme_scales_in_float32(scale: float) -> None:
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(12)
    model = mlp()
    x, y = classification_batch()
    stats = torchgrain.GRAIN(model, num_groups=3).backward(scale * per_sample_ce(model, x, y))
    assert torch.isfinite(flat_grad(model)).all() and float(flat_grad(model).abs().max()) > 0
    assert float(stats.min_inner) >= float(stats.d_norm) ** 2 * (1 - 1e-5)


def test_all_zero_gradients_give_zero_step_without_nan() -> None:
    model = mlp()
    x, y = classification_batch()
    stats = torchgrain.GRAIN(model, num_groups=3).backward(0.0 * per_sample_ce(model, x, y))
    assert torch.equal(flat_grad(model), torch.zeros_like(flat_grad(model)))
    assert torch.equal(stats.weights, torch.full((3,), 1 / 3))


def test_frozen_parameters_are_left_out() -> None:
    model = mlp()
    model[0].weight.requires_grad_(False)
    x, y = classification_batch()
    grain = torchgrain.GRAIN(model, num_groups=2)
    grain.backward(per_sample_ce(model, x, y))
    assert model[0].weight.grad is None and model[0].bias.grad is not None


def test_stats_to_dict_for_loggers() -> None:
    torch.manual_seed(13)
    model = mlp()
    x, y = classification_batch()
    logged = torchgrain.GRAIN(model, num_groups=4).backward(per_sample_ce(model, x, y)).to_dict()
    assert all(key.startswith("grain/") and isinstance(v, float) for key, v in logged.items())
    assert 0 < logged["grain/d_over_mean"] <= 1 + 1e-12
    assert 1 <= logged["grain/active_groups"] <= 4


OPTIMIZERS = [
    (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    (torch.optim.Adam, {"lr": 1e-2}),
    (torch.optim.AdamW, {"lr": 1e-2}),
    (torch.optim.Adamax, {"lr": 1e-2}),
    (torch.optim.Adagrad, {"lr": 0.05}),
    (torch.optim.Adadelta, {"lr": 1.0}),
    (torch.optim.RMSprop, {"lr": 1e-2}),
    (torch.optim.NAdam, {"lr": 1e-2}),
    (torch.optim.RAdam, {"lr": 1e-2}),
    (torch.optim.ASGD, {"lr": 0.05}),
    (torch.optim.Rprop, {"lr": 1e-2}),
    (torch.optim.Adafactor, {"lr": 1e-2}),
]


@pytest.mark.parametrize(("opt_cls", "kwargs"), OPTIMIZERS, ids=[o.__name__ for o, _ in OPTIMIZERS])
def test_every_optimizer_and_a_scheduler(opt_cls, kwargs) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(14)
    model = mlp()
    opt = opt_cls(model.parameters(), **kwargs)
    sched = (
        torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=kwargs["lr"], total_steps=30)
        if "momentum" in kwargs
        else torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    )
    grain = torchgrain.GRAIN(model, num_groups=4)
    x, y = classification_batch(B=32, seed=1)
    first = float(per_sample_ce(model, x, y).detach().mean())
    for _ in range(30):
        opt.zero_grad()
        grain.backward(per_sample_ce(model, x, y))
        opt.step()
        sched.step()
    assert float(per_sample_ce(model, x, y).detach().mean()) < first
