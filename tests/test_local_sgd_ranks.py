"""LocalSGD over torch.distributed with 2 and 3 Gloo processes, against a reference that gathers
every rank's whole delta: exactness for every aggregator, bit-identical ranks, model averaging,
uneven phases, a process subgroup, faults and checkpoints."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

import torchgrain
from tests import _dist
from tests._models import mlp, per_sample_ce
from tests.exchange.test_sharded import _shard


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)  # a different initialisation per rank: LocalSGD takes rank 0's
    return mlp(d_in=5, hidden=7, d_out=3).double()  # 80 parameters: shards of 3 ranks are uneven


def _batch(rank: int, step: int) -> tuple[Tensor, Tensor]:
    """Heterogeneous data: rank r's inputs are shifted by r, and it sees mostly label r % 3."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64) + rank
    y = torch.where(
        torch.rand(6, generator=g) < 0.7, rank % 3, torch.randint(0, 3, (6,), generator=g)
    )
    return x, y


def _inner_step(model: nn.Module, inner: torch.optim.Optimizer, rank: int, step: int) -> None:
    inner.zero_grad()
    x, y = _batch(rank, step)
    per_sample_ce(model, x, y).mean().backward()
    inner.step()


def _outer(params: list[Tensor] | nn.Module) -> torch.optim.Optimizer:
    source = params.parameters() if isinstance(params, nn.Module) else params
    return torch.optim.SGD(source, lr=0.7, momentum=0.9, nesterov=True)


def _custom(gram: Tensor, pref: Tensor) -> Tensor:
    """A user's aggregator: the weights of the largest-norm delta, doubled."""
    weights = torch.zeros_like(pref)
    weights[gram.diagonal().argmax()] = 2.0
    return weights


AGGREGATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "mean": lambda G, p: p,
    "min_norm": lambda G, p: torchgrain.min_norm_weights(G),
    "dual_proj": lambda G, p: torchgrain.dual_proj_weights(G, p),
    "upgrad": lambda G, p: torchgrain.upgrad_weights(G, p),
    "cagrad": lambda G, p: torchgrain.cagrad_weights(G, 0.5, p),
    "custom": _custom,
    "CAGrad(c=0.3)": lambda G, p: torchgrain.cagrad_weights(G, 0.3, p),
}


def _exact_worker(rank: int, world: int) -> dict[str, object]:
    """Per aggregator, 8 inner steps with sync_every 3 (and one explicit sync at the end), and
    beside it the reference: every rank's delta all-gathered whole, its Gram, the aggregator's
    weights by the public function, and the same outer optimizer on a copy."""
    out: dict[str, object] = {}
    for name, weights_of in AGGREGATORS.items():
        model = _model(seed=rank)
        inner = torch.optim.SGD(model.parameters(), lr=0.2)
        aggregator = {"custom": _custom, "CAGrad(c=0.3)": torchgrain.CAGrad(c=0.3)}.get(name, name)
        local = torchgrain.LocalSGD(model, 3, aggregator=aggregator, outer_optimizer=_outer(model))
        reference = [p.detach().clone() for p in model.parameters()]
        ref_outer = _outer(reference)
        worst, syncs = 0.0, []
        for step in range(8):
            _inner_step(model, inner, rank, step)
            last = step == 7
            if local.steps + 1 == local.sync_every or last:  # the reference's sync, first
                flat = torch.cat(
                    [(a - p).flatten() for a, p in zip(reference, model.parameters(), strict=True)]
                )
                every = flat.new_empty(world, flat.numel())
                dist.all_gather(list(every), flat)
                gram = every @ every.T  # (W, W)
                w = weights_of(gram, torch.full((world,), 1.0 / world, dtype=torch.float64))
                d = w @ every  # (P,)
                start = 0
                with torch.no_grad():
                    for r in reference:
                        r.grad = d[start : start + r.numel()].view_as(r).clone()
                        start += r.numel()
                ref_outer.step()
            stats = local.step()
            if last:  # an uneven last phase: 2 inner steps
                assert stats is None
                stats = local.sync()
            if stats is not None:
                syncs.append(stats.inner_steps)
                torch.testing.assert_close(stats.weights, w.double(), rtol=0, atol=1e-12)
                torch.testing.assert_close(stats.gram, gram, rtol=1e-12, atol=0)
                for p, r in zip(model.parameters(), reference, strict=True):
                    worst = max(worst, float((p.detach() - r).abs().max()))
        out[name] = {
            "worst": worst,
            "syncs": syncs,
            "params": [p.detach().clone() for p in model.parameters()],
            "bytes": local._exchange.bytes_sent,  # type: ignore[union-attr]
        }
    return out


def test_every_aggregator_matches_the_gathering_reference_and_ranks_agree(tmp_path: Path) -> None:
    results = _dist.run(_exact_worker, 3, tmp_path, timeout=60.0)
    assert all("error" not in r for r in results), [r.get("trace") for r in results]
    numel = sum(p.numel() for p in _model(0).parameters())
    for name in AGGREGATORS:
        assert results[0][name]["syncs"] == [3, 3, 2], name
        for rank in range(3):
            assert results[rank][name]["worst"] <= 1e-10, (name, rank)
            assert all(
                torch.equal(a, b)
                for a, b in zip(
                    results[0][name]["params"], results[rank][name]["params"], strict=True
                )
            ), (name, rank)
        # The ring all-reduce's 2 P (W-1)/W values, float64, with the shards padded to ceil(P/W).
        assert results[0][name]["bytes"] == 2 * -(-numel // 3) * 2 * 8


def _averaging_worker(rank: int, world: int) -> dict[str, object]:
    model = _model(seed=rank)
    inner = torch.optim.SGD(model.parameters(), lr=0.2)
    local = torchgrain.LocalSGD(model, 2)  # mean, SGD lr 1.0
    worst = 0.0
    for step in range(6):
        _inner_step(model, inner, rank, step)
        mean = [p.detach().clone() for p in model.parameters()]
        for m in mean:
            dist.all_reduce(m)
            m /= world
        if local.step() is not None:
            for p, m in zip(model.parameters(), mean, strict=True):
                worst = max(worst, float((p.detach() - m).abs().max()))
    return {"worst": worst, "params": [p.detach().clone() for p in model.parameters()]}


def test_mean_with_sgd_lr_one_is_parameter_averaging(tmp_path: Path) -> None:
    results = _dist.run(_averaging_worker, 2, tmp_path)
    assert all("error" not in r for r in results), [r.get("trace") for r in results]
    assert all(r["worst"] <= 1e-12 for r in results)
    assert all(
        torch.equal(a, b) for a, b in zip(results[0]["params"], results[1]["params"], strict=True)
    )


def _subgroup_worker(rank: int, world: int) -> dict[str, object]:
    """Ranks 0 and 2 of 3 are the workers; rank 1 trains alone, outside their group."""
    group = dist.new_group([0, 2])
    if rank == 1:
        return {"outside": True}
    model = _model(seed=rank)
    inner = torch.optim.SGD(model.parameters(), lr=0.2)
    local = torchgrain.LocalSGD(model, 4, "upgrad", _outer(model), process_group=group)
    synced = []
    for step in range(10):
        _inner_step(model, inner, rank, step)
        stats = local.step()
        if stats is not None:
            synced.append((step, stats.inner_steps, stats.num_groups))
    stats = local.sync()
    synced.append((10, stats.inner_steps, stats.num_groups))
    return {"synced": synced, "params": [p.detach().clone() for p in model.parameters()]}


def test_a_process_subgroup_with_an_uneven_last_phase(tmp_path: Path) -> None:
    results = _dist.run(_subgroup_worker, 3, tmp_path)
    assert all("error" not in r for r in results), [r.get("trace") for r in results]
    assert results[1] == {"outside": True}
    assert results[0]["synced"] == [(3, 4, 2), (7, 4, 2), (10, 2, 2)]
    assert all(
        torch.equal(a, b) for a, b in zip(results[0]["params"], results[2]["params"], strict=True)
    )


def _expect(error: type[Exception], fn: Callable[[], object]) -> str:
    try:
        fn()
    except error as caught:
        return str(caught)
    raise AssertionError(f"no {error.__name__}")


def _faults_worker(rank: int, world: int) -> dict[str, object]:
    out: dict[str, object] = {}
    # Parameters of other shapes on rank 1: every rank raises on construction.
    other = mlp(d_in=5, hidden=6 if rank == 1 else 7, d_out=3).double()
    out["shapes"] = _expect(RuntimeError, lambda: torchgrain.LocalSGD(other, 2))

    model = _model(seed=rank)
    inner = torch.optim.SGD(model.parameters(), lr=0.2)
    local = torchgrain.LocalSGD(model, 1, "min_norm", _outer(model))
    _inner_step(model, inner, rank, 0)
    if rank == 1:  # a NaN delta on rank 1 only
        with torch.no_grad():
            next(model.parameters())[0, 0] = float("nan")
    params = [p.detach().clone() for p in model.parameters()]
    anchor = [a.clone() for a in local.anchor]
    out["nonfinite"] = _expect(torchgrain.NonFiniteError, local.step)
    out["intact"] = all(
        torch.equal(p.detach().nan_to_num(), s.nan_to_num())
        for p, s in zip(model.parameters(), params, strict=True)
    ) and all(torch.equal(a, s) for a, s in zip(local.anchor, anchor, strict=True))

    with torch.no_grad():  # recover from the fault: back to the anchor, and go on
        for p, a in zip(model.parameters(), local.anchor, strict=True):
            p.copy_(a)
    local.steps = 0
    if rank == 0:  # rank 0's model changes between syncs
        model[0].bias.requires_grad_(False)  # type: ignore[index]
    out["changed"] = _expect(RuntimeError, local.sync)
    sharded = _shard(mlp().double(), world)  # FSDP2's fully_shard: parameters are DTensor shards
    out["sharded"] = _expect(ValueError, lambda: torchgrain.LocalSGD(sharded, 2))
    return out


def test_faults_raise_on_every_rank_before_anything_changes(tmp_path: Path) -> None:
    results = _dist.run(_faults_worker, 2, tmp_path)
    assert all("error" not in r for r in results), [r.get("trace") for r in results]
    for r in results:
        assert "parameters differ in names, shapes or dtypes" in r["shapes"]
        assert "not finite on rank(s) [1]" in r["nonfinite"] and r["intact"]
        assert "parameters changed since LocalSGD was built" in r["changed"]
    assert "on rank(s) [0]" in results[1]["changed"]
    assert all("are sharded (FSDP2's fully_shard)" in r["sharded"] for r in results)


def _dying_worker(rank: int, world: int, out: str) -> dict[str, object]:
    model = _model(seed=0)
    local = torchgrain.LocalSGD(model, 1)
    if rank == 1:  # dies without a word: no exception, no collective, the process just ends
        torch.save({"died": True}, Path(out) / "rank1.pt")
        os._exit(0)
    started = time.monotonic()
    try:
        local.step()
    except RuntimeError as error:
        return {"error": str(error), "seconds": time.monotonic() - started}
    return {"finished": True}


def test_a_dead_peer_makes_the_others_raise_within_the_timeout(tmp_path: Path) -> None:
    results = _dist.run(_dying_worker, 2, tmp_path, str(tmp_path), timeout=10.0)
    assert results[1] == {"died": True}
    error = str(results[0].get("error"))
    assert "LocalSGD: the agreement before the sync across ranks failed on rank 0 of 2" in error
    assert "local_sgd.step()" in error
    assert results[0]["seconds"] < 10.0 + 5.0  # the process group's timeout, and some slack


def _resume_worker(rank: int, world: int) -> dict[str, object]:
    def build(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, torchgrain.LocalSGD]:
        model = _model(seed)
        inner = torch.optim.AdamW(model.parameters(), lr=0.05)
        return model, inner, torchgrain.LocalSGD(model, 3, "dual_proj", _outer(model))

    model, inner, local = build(rank)
    for step in range(10):
        _inner_step(model, inner, rank, step)
        local.step()
    straight = [p.detach().clone() for p in model.parameters()]

    model, inner, local = build(rank)
    for step in range(5):
        _inner_step(model, inner, rank, step)
        local.step()
    buffer = io.BytesIO()  # each rank's own checkpoint: its local parameters differ
    torch.save(
        {"model": model.state_dict(), "inner": inner.state_dict(), "local": local.state_dict()},
        buffer,
    )
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model, inner, local = build(rank + 7)  # fresh objects, another initialisation
    model.load_state_dict(saved["model"])
    inner.load_state_dict(saved["inner"])
    local.load_state_dict(saved["local"])
    for step in range(5, 10):
        _inner_step(model, inner, rank, step)
        local.step()
    resumed = [p.detach().clone() for p in model.parameters()]
    return {"same": all(torch.equal(a, b) for a, b in zip(straight, resumed, strict=True))}


def test_a_resumed_run_is_bit_identical(tmp_path: Path) -> None:
    results = _dist.run(_resume_worker, 2, tmp_path)
    assert results == [{"same": True}, {"same": True}], results


@pytest.mark.parametrize("world", [2])
def test_rank_zero_parameters_are_everyone_s_first_anchor(world: int, tmp_path: Path) -> None:
    results = _dist.run(_anchor_worker, world, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(results[0], results[1], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(results[0], _model(0).parameters(), strict=True))


def _anchor_worker(rank: int, world: int) -> list[Tensor]:
    model = _model(seed=rank)
    local = torchgrain.LocalSGD(model, 5)
    return [a.clone() for a in local.anchor]
