"""DESIGN.md section 7: every bad input gets a clear error naming the value and the fix, and
leaves every .grad exactly as it was."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import torch
from torch import nn

import torchgrain
from tests._models import classification_batch, mlp, per_sample_ce


@pytest.fixture
def setup() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = mlp()
    model[0].weight.grad = torch.full_like(model[0].weight, 0.25)  # some .grad set, others None
    x, y = classification_batch(B=8)
    return model, x, y


def grads_of(model: nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


@contextlib.contextmanager
def grads_untouched(model: nn.Module):  # type: ignore[no-untyped-def]
    before = grads_of(model)
    params = [p.detach().clone() for p in model.parameters()]
    yield
    for b, a in zip(before, grads_of(model), strict=True):
        assert (b is None and a is None) or (b is not None and a is not None and torch.equal(a, b))
    assert all(torch.equal(p, q) for p, q in zip(params, model.parameters(), strict=True))


Case = Callable[[nn.Module, torch.Tensor, torch.Tensor], object]

BACKWARD_CASES: dict[str, tuple[Case, type[Exception], str]] = {
    "scalar_loss": (
        lambda m, x, y: torchgrain.GRAIN(m, num_groups=2).backward(per_sample_ce(m, x, y).mean()),
        ValueError,
        r"shape \(B,\).*got \(\).*reduction='none'",
    ),
    "2d_losses": (
        lambda m, x, y: torchgrain.GRAIN(m, num_groups=2).backward(
            per_sample_ce(m, x, y)[:, None].expand(8, 3)
        ),
        ValueError,
        r"got \(8, 3\).*losses.flatten\(1\).mean\(dim=1\)",
    ),
    "empty_batch": (
        lambda m, x, y: torchgrain.GRAIN(m, num_groups=2).backward(per_sample_ce(m, x, y)[:0]),
        ValueError,
        "B = 0",
    ),
    "losses_without_grad": (
        lambda m, x, y: torchgrain.GRAIN(m, num_groups=2).backward(per_sample_ce(m, x, y).detach()),
        ValueError,
        "do not require grad.*torch.no_grad",
    ),
    "losses_not_tensor": (
        lambda m, x, y: torchgrain.GRAIN(m, num_groups=2).backward([1.0, 2.0]),  # type: ignore[arg-type]
        TypeError,
        "torch.Tensor of shape",
    ),
    "nan_loss": (
        lambda m, x, y: torchgrain.GRAIN(m, num_groups=2).backward(
            per_sample_ce(m, x, y) * torch.tensor([float("nan")] + [1.0] * 7)
        ),
        torchgrain.NonFiniteError,
        "losses contain NaN or Inf.*nonfinite='skip'",
    ),
    "inf_gradient": (
        # sqrt at 0: the loss is finite, its gradient infinite.
        lambda m, x, y: torchgrain.GRAIN(m, num_groups=2).backward(
            per_sample_ce(m, x, y) + (m(x)[:, 0] * 0).sqrt()
        ),
        torchgrain.NonFiniteError,
        "gradients contain NaN or Inf",
    ),
    "group_id_too_large": (
        lambda m, x, y: torchgrain.GRAIN(m, num_groups=2).backward(
            per_sample_ce(m, x, y), torch.tensor([0, 1, 2, 0, 1, 0, 1, 0])
        ),
        ValueError,
        r"\[0, 2\), got ids from 0 to 2.*raise num_groups",
    ),
    "negative_group_id": (
        lambda m, x, y: torchgrain.GRAIN(m, num_groups=2).backward(
            per_sample_ce(m, x, y), torch.tensor([-1, 1, 0, 0, 1, 0, 1, 0])
        ),
        ValueError,
        "got ids from -1 to 1",
    ),
    "groups_wrong_length": (
        lambda m, x, y: torchgrain.GRAIN(m, num_groups=2).backward(
            per_sample_ce(m, x, y), torch.tensor([0, 1])
        ),
        ValueError,
        r"\(B,\) = \(8,\).*shape \(2,\)",
    ),
    "groups_float": (
        lambda m, x, y: torchgrain.GRAIN(m, num_groups=2).backward(
            per_sample_ce(m, x, y), torch.zeros(8)
        ),
        TypeError,
        "integer ids.*groups.long",
    ),
    "more_groups_than_samples": (
        lambda m, x, y: torchgrain.GRAIN(m, num_groups=9).backward(per_sample_ce(m, x, y)),
        ValueError,
        "num_groups=9 is larger than the batch size B=8",
    ),
    "key_grouping_without_keys": (
        lambda m, x, y: torchgrain.GRAIN(m, grouping="key").backward(per_sample_ce(m, x, y)),
        ValueError,
        "keys=",
    ),
    "keys_wrong_length": (
        lambda m, x, y: torchgrain.GRAIN(m, grouping="key").backward(
            per_sample_ce(m, x, y), keys=y[:3]
        ),
        ValueError,
        "B = 8 rows",
    ),
    "no_num_groups": (
        lambda m, x, y: torchgrain.GRAIN(m).backward(per_sample_ce(m, x, y)),
        ValueError,
        "num_groups is not set",
    ),
}


@pytest.mark.parametrize("name", sorted(BACKWARD_CASES))
def test_backward_errors_leave_grad_untouched(name: str, setup) -> None:  # type: ignore[no-untyped-def]
    model, x, y = setup
    call, error, match = BACKWARD_CASES[name]
    with grads_untouched(model), pytest.raises(error, match=match):
        call(model, x, y)


def test_parameter_without_gradient(setup) -> None:  # type: ignore[no-untyped-def]
    model, x, y = setup
    model[0].add_module("unused", nn.Linear(3, 3))  # a child that Linear.forward never calls
    grain = torchgrain.GRAIN(model, num_groups=2)
    with (
        grads_untouched(model),
        pytest.raises(
            ValueError,
            match=r"0.unused.weight, 0.unused.bias received no gradient.*allow_unused=True",
        ),
    ):
        grain.backward(per_sample_ce(model, x, y))
    torchgrain.GRAIN(model, num_groups=2, allow_unused=True).backward(per_sample_ce(model, x, y))
    assert model[0].unused.weight.grad is None and model[3].weight.grad is not None


def test_model_changed_after_build(setup) -> None:  # type: ignore[no-untyped-def]
    model, x, y = setup
    grain = torchgrain.GRAIN(model, num_groups=2)
    model[3] = nn.Linear(8, 3)  # replaced layer
    with (
        grads_untouched(model),
        pytest.raises(
            RuntimeError, match=r"changed after GRAIN was built \(3.bias, 3.weight.*new GRAIN"
        ),
    ):
        grain.backward(per_sample_ce(model, x, y))
    grain = torchgrain.GRAIN(model, num_groups=2)
    model[0].bias.requires_grad_(False)  # frozen afterwards
    with grads_untouched(model), pytest.raises(RuntimeError, match=r"\(0.bias"):
        grain.backward(per_sample_ce(model, x, y))


def test_nonfinite_skip_leaves_grad_untouched(setup) -> None:  # type: ignore[no-untyped-def]
    model, x, y = setup
    grain = torchgrain.GRAIN(model, num_groups=2, nonfinite="skip")
    with grads_untouched(model):
        stats = grain.backward(per_sample_ce(model, x, y) * float("inf"))
    assert stats.skipped and "losses" in stats.reason and grain.step == 0
    with grads_untouched(model):
        stats = grain.backward(per_sample_ce(model, x, y) + (model(x)[:, 0] * 0).sqrt())
    assert stats.skipped and "gradients" in stats.reason
    assert stats.to_dict()["grain/skipped"] == 1.0
    stats = grain.backward(per_sample_ce(model, x, y))  # the next finite step goes through
    assert not stats.skipped and grain.step == 1


CONSTRUCTOR_CASES: dict[str, tuple[Callable[[nn.Module], object], type[Exception], str]] = {
    "num_groups_zero": (
        lambda m: torchgrain.GRAIN(m, num_groups=0),
        ValueError,
        "positive int, got 0",
    ),
    "num_groups_float": (
        lambda m: torchgrain.GRAIN(m, num_groups=2.5),
        ValueError,
        "positive int, got 2.5",
    ),  # type: ignore[arg-type]
    "num_groups_bool": (
        lambda m: torchgrain.GRAIN(m, num_groups=True),
        ValueError,
        "positive int, got True",
    ),
    "bad_grouping": (
        lambda m: torchgrain.GRAIN(m, 2, grouping="labels"),
        ValueError,
        "'contiguous', 'random' or 'key', got 'labels'",
    ),  # type: ignore[arg-type]
    "bad_engine": (
        lambda m: torchgrain.GRAIN(m, 2, engine="fast"),
        ValueError,
        r"engine must be one of \['auto', 'fused', 'loop'\], got 'fast'",
    ),
    "fused_needs_module": (
        lambda m: torchgrain.GRAIN(m.parameters(), 2, engine="fused"),
        ValueError,
        "pass the nn.Module",
    ),
    "negative_budget": (
        lambda m: torchgrain.GRAIN(m, 2, memory_budget=-1),
        ValueError,
        "memory_budget must be >= 0 bytes, got -1",
    ),
    "bad_nonfinite": (
        lambda m: torchgrain.GRAIN(m, 2, nonfinite="ignore"),
        ValueError,
        "'raise' or 'skip', got 'ignore'",
    ),  # type: ignore[arg-type]
    "all_frozen": (
        lambda m: torchgrain.GRAIN(m.requires_grad_(False), 2),
        ValueError,
        "no trainable parameters.*requires_grad_",
    ),
    "empty_list": (lambda m: torchgrain.GRAIN([], 2), ValueError, "no trainable parameters"),
    "frozen_in_list": (
        lambda m: torchgrain.GRAIN([m[0].weight, m[0].bias.requires_grad_(False)], 2),
        ValueError,
        "param1 is frozen",
    ),
    "single_tensor": (
        lambda m: torchgrain.GRAIN(m[0].weight, 2),
        TypeError,
        r"not a single tensor: \[param\]",
    ),
    "not_a_tensor": (lambda m: torchgrain.GRAIN([1.0], 2), TypeError, "param0 is a float"),  # type: ignore[list-item]
}


@pytest.mark.parametrize("name", sorted(CONSTRUCTOR_CASES))
def test_constructor_errors(name: str, setup) -> None:  # type: ignore[no-untyped-def]
    model, _, _ = setup
    call, error, match = CONSTRUCTOR_CASES[name]
    with pytest.raises(error, match=match):
        call(model)


def test_named_params_and_param_groups_accepted(setup) -> None:  # type: ignore[no-untyped-def]
    model, x, y = setup
    grain = torchgrain.GRAIN(model.named_parameters(), num_groups=2)
    assert grain.names[0] == "0.weight"
    grain = torchgrain.GRAIN(
        [{"params": model[0].parameters()}, {"params": model[3].parameters(), "lr": 1.0}], 2
    )
    assert len(grain.params) == 4
    grain.backward(per_sample_ce(model, x, y))
    assert model[3].bias.grad is not None
