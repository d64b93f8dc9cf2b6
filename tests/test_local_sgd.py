"""LocalSGD in one process (one worker: the outer step is Lookahead's): the outer step's
arithmetic, the counts, checkpoints and the bad-input contract. The ranks' tests are in
test_local_sgd_ranks.py."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import torchgrain
from tests._models import mlp, per_sample_ce


def _setup(
    sync_every: int = 3, outer_lr: float = 0.5, momentum: float = 0.9
) -> tuple[nn.Module, torch.optim.Optimizer, torchgrain.LocalSGD]:
    torch.manual_seed(0)
    model = mlp().double()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    outer = torch.optim.SGD(
        model.parameters(), lr=outer_lr, momentum=momentum, nesterov=momentum > 0
    )
    return model, inner, torchgrain.LocalSGD(model, sync_every, outer_optimizer=outer)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (8,), generator=g
    )


def _inner_step(model: nn.Module, inner: torch.optim.Optimizer, step: int) -> None:
    inner.zero_grad()
    x, y = _batch(step)
    per_sample_ce(model, x, y).mean().backward()
    inner.step()


def _snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_one_worker_with_sgd_is_lookahead() -> None:
    """delta = anchor - theta, d = delta, theta <- anchor - lr * d: Lookahead's slow weights."""
    model, inner, local = _setup(sync_every=2, outer_lr=0.5, momentum=0.0)
    anchor = _snapshot(model)
    for step in range(2):
        _inner_step(model, inner, step)
        fast = _snapshot(model)
        stats = local.step()
    assert stats is not None and stats.sync == 1 and stats.inner_steps == 2
    for p, a, f in zip(model.parameters(), anchor, fast, strict=True):
        torch.testing.assert_close(p.detach(), a + 0.5 * (f - a), rtol=0, atol=1e-15)
    for p, a in zip(model.parameters(), local.anchor, strict=True):
        assert torch.equal(p.detach(), a)
    assert stats.weights.tolist() == [1.0]
    assert stats.bytes_sent == 0
    delta_norm2 = sum(float((a - f).pow(2).sum()) for a, f in zip(anchor, fast, strict=True))
    assert float(stats.gram[0, 0]) == pytest.approx(delta_norm2, rel=1e-12)


def test_default_outer_optimizer_keeps_the_local_parameters() -> None:
    """One worker, mean, SGD lr 1.0: anchor - (anchor - theta) = theta (model averaging of one)."""
    torch.manual_seed(0)
    model = mlp().double()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    local = torchgrain.LocalSGD(model, sync_every=1)
    _inner_step(model, inner, 0)
    fast = _snapshot(model)
    assert local.step() is not None
    for p, f in zip(model.parameters(), fast, strict=True):
        torch.testing.assert_close(p.detach(), f, rtol=0, atol=1e-15)


def test_step_counts_and_explicit_sync() -> None:
    model, inner, local = _setup(sync_every=3)
    synced = []
    for step in range(7):
        _inner_step(model, inner, step)
        stats = local.step()
        synced.append(None if stats is None else stats.inner_steps)
    assert synced == [None, None, 3, None, None, 3, None]
    assert local.steps == 1 and local.syncs == 2
    last = local.sync()  # an uneven last phase, e.g. before evaluating
    assert (last.sync, last.inner_steps, local.steps) == (3, 1, 0)
    assert set(last.to_dict()) >= {"local_sgd/d_norm", "local_sgd/sync", "local_sgd/bytes_sent"}


def test_inner_grad_is_put_back_after_the_outer_step() -> None:
    model, inner, local = _setup(sync_every=1)
    _inner_step(model, inner, 0)
    before = [p.grad for p in model.parameters()]
    local.step()
    assert all(p.grad is g for p, g in zip(model.parameters(), before, strict=True))


def test_resume_from_a_weights_only_checkpoint_is_bit_identical() -> None:
    model, inner, local = _setup(sync_every=3)
    for step in range(11):
        _inner_step(model, inner, step)
        local.step()
    straight = _snapshot(model)

    model, inner, local = _setup(sync_every=3)
    for step in range(5):  # mid-phase: 2 inner steps since the sync at 3
        _inner_step(model, inner, step)
        local.step()
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "inner": inner.state_dict(), "local": local.state_dict()},
        buffer,
    )
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    torch.manual_seed(1)  # another initialisation: everything must come from the checkpoint
    model = mlp().double()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    outer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, nesterov=True)
    local = torchgrain.LocalSGD(model, 3, outer_optimizer=outer)
    model.load_state_dict(saved["model"])
    inner.load_state_dict(saved["inner"])
    local.load_state_dict(saved["local"])
    assert (local.steps, local.syncs) == (2, 1)
    for step in range(5, 11):
        _inner_step(model, inner, step)
        local.step()
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(model), straight, strict=True))


@pytest.mark.parametrize("sync_every", [0, -3, 2.0, True, "4", None])
def test_bad_sync_every_is_refused(sync_every: object) -> None:
    with pytest.raises(ValueError, match=f"sync_every must be an int >= 1.*{sync_every!r}"):
        torchgrain.LocalSGD(mlp(), sync_every)  # type: ignore[arg-type]


def test_bad_aggregator_and_outer_optimizer_are_refused() -> None:
    model = mlp()
    with pytest.raises(ValueError, match="aggregator must be one of"):
        torchgrain.LocalSGD(model, 2, aggregator="median")
    with pytest.raises(TypeError, match=r"outer_optimizer must be a torch\.optim\.Optimizer"):
        torchgrain.LocalSGD(model, 2, outer_optimizer=lambda: None)  # type: ignore[arg-type]
    partial = torch.optim.SGD(list(model.parameters())[:1], lr=1.0)
    with pytest.raises(ValueError, match=r"it lacks .* and has 0 others"):
        torchgrain.LocalSGD(model, 2, outer_optimizer=partial)
    other = torch.optim.SGD([*model.parameters(), nn.Parameter(torch.zeros(2))], lr=1.0)
    with pytest.raises(ValueError, match=r"lacks none and has 1 others"):
        torchgrain.LocalSGD(model, 2, outer_optimizer=other)


def _assert_untouched(
    model: nn.Module, local: torchgrain.LocalSGD, params: list[torch.Tensor], anchor: list
) -> None:
    assert all(torch.equal(p.detach(), s) for p, s in zip(model.parameters(), params, strict=True))
    assert all(torch.equal(a, s) for a, s in zip(local.anchor, anchor, strict=True))


def test_nonfinite_delta_raises_and_changes_nothing() -> None:
    model, inner, local = _setup(sync_every=1)
    _inner_step(model, inner, 0)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    params, anchor = _snapshot(model), [a.clone() for a in local.anchor]
    state = local.outer_optimizer.state_dict()
    with pytest.raises(torchgrain.NonFiniteError, match=r"not finite on rank\(s\) \[0\]"):
        local.step()
    assert all(
        torch.equal(p.detach(), s) or (p.isnan() == s.isnan()).all()
        for p, s in zip(model.parameters(), params, strict=True)
    )
    assert all(torch.equal(a, s) for a, s in zip(local.anchor, anchor, strict=True))
    assert local.outer_optimizer.state_dict() == state and local.syncs == 0


@pytest.mark.parametrize("change", ["freeze", "replace", "cast"])
def test_a_model_changed_between_syncs_raises_and_changes_nothing(change: str) -> None:
    model, inner, local = _setup(sync_every=1)
    _inner_step(model, inner, 0)
    first = model[0]  # type: ignore[index]
    if change == "freeze":
        first.bias.requires_grad_(False)
    elif change == "replace":
        first.bias = nn.Parameter(first.bias.detach().clone())
    else:
        model.float()
    params, anchor = _snapshot(model), [a.clone() for a in local.anchor]
    with pytest.raises(RuntimeError, match="trainable parameters changed since LocalSGD was built"):
        local.step()
    _assert_untouched(model, local, params, anchor)


def test_load_state_dict_checks_what_it_reads() -> None:
    _, _, local = _setup()
    with pytest.raises(KeyError, match="missing \\['anchor'"):
        local.load_state_dict({"steps": 0, "syncs": 0, "outer_optimizer": {}})
    state = local.state_dict()
    state["anchor"] = state["anchor"][:1]
    with pytest.raises(ValueError, match="load a checkpoint of the same model"):
        local.load_state_dict(state)


def test_parameters_on_two_devices_are_refused() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).to("meta"))
    with pytest.raises(ValueError, match=r"must be on one device, got \['cpu', 'meta'\]"):
        torchgrain.LocalSGD(model, 2)
