"""GRAIN on a model sharded by FSDP2 (``fully_shard`` over a CPU mesh of 2 Gloo processes): every
rank's ``.grad`` is the DTensor shard FSDP expects; gathered, it equals single-process GRAIN on
the joined batch (float64), for the fused and the loop engine; the optimizer steps on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import torchgrain
from tests import _dist
from tests._models import mlp, per_sample_ce

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("this torch has no FSDP2 (fully_shard)", allow_module_level=True)


def _data(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    B = 6 + 2 * rank
    return torch.randn(B, 5, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (B,), generator=g
    )


def _model() -> nn.Module:
    torch.manual_seed(0)
    return mlp().double()  # Linear(5, 8), LayerNorm(8), ReLU, Linear(8, 3): 3 rows split 2 + 1


def _shard(model: nn.Module, world: int, device: str = "cpu") -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device, (world,))
    for layer in model:  # type: ignore[attr-defined]
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root: the LayerNorm's parameters
    return model


def _worker(
    rank: int, world: int, engine: str, m: int, steps: int, budget: float
) -> dict[str, object]:
    from torch.distributed.tensor import DTensor

    model = _shard(_model(), world)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grain = torchgrain.GRAIN(
        model, num_groups=m, engine=engine, process_group=dist.group.WORLD, memory_budget=budget
    )
    assert grain._over_budget(m) == (budget == 0)  # the low-memory mode, or the keep mode
    x, y = _data(rank)
    first = None
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        stats = grain.backward(per_sample_ce(model, x, y))
        grads = list(model.named_parameters())
        assert all(isinstance(p.grad, DTensor) for _, p in grads)
        assert all(p.grad.placements == p.placements for _, p in grads)  # type: ignore[union-attr]
        assert all(p.grad.to_local().shape == p.to_local().shape for _, p in grads)  # type: ignore[union-attr]
        if first is None:
            first = [p.grad.full_tensor() for _, p in grads]  # type: ignore[union-attr]
        opt.step()
    exchange = grain._exchange
    assert exchange is not None
    return {
        "grads": first,
        "params": [p.detach().full_tensor() for p in model.parameters()],  # type: ignore[attr-defined]
        "num_groups": stats.num_groups,
        "bytes": exchange.bytes_sent,
    }


def _reference(world: int, m: int, steps: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    data = [_data(r) for r in range(world)]
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.cat([d[0] for d in data])
    y = torch.cat([d[1] for d in data])
    ids = torch.cat([torch.arange(len(d[1])) * m // len(d[1]) + m * r for r, d in enumerate(data)])
    grain = torchgrain.GRAIN(model, num_groups=m * world, engine="loop")
    first = None
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        grain.backward(per_sample_ce(model, x, y), ids)
        if first is None:
            first = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
        opt.step()
    assert first is not None
    return first, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    ("engine", "m", "budget"),
    [
        ("fused", 3, 1 << 30),
        ("fused", 1, 1 << 30),
        ("loop", 2, 1 << 30),
        ("fused", 3, 0),  # the low-memory mode: FSDP's own reduce-scatter of the re-weighted loss
        ("loop", 2, 0),
    ],
)
def test_fsdp2_shards_equal_single_process_grain(
    engine: str, m: int, budget: float, tmp_path: Path
) -> None:
    steps = 3
    results = _dist.run(_worker, 2, tmp_path, engine, m, steps, budget)
    for r in results:
        assert "error" not in r, r.get("trace")
        assert r["num_groups"] == 2 * m
    grads, params = _reference(2, m, steps)
    for r in results:
        for got, ref in zip(r["grads"], grads, strict=True):  # type: ignore[call-overload]
            assert float((got - ref).norm() / ref.norm()) <= 1e-12
        for got, ref in zip(r["params"], params, strict=True):  # type: ignore[call-overload]
            assert float((got - ref).norm() / ref.norm()) <= 1e-12
    # one group per rank: FSDP's reduce-scatter bytes, each rank's rows of every parameter
    if m == 1 and budget:
        rows = 4 * 5 + 4 + 4 + 4 + 2 * 8 + 2  # chunks of Linear(5, 8), LayerNorm(8), Linear(8, 3)
        assert results[0]["bytes"] == rows * 1 * 8


def _bert_worker(rank: int, world: int, low_memory: bool) -> dict[str, object]:
    """A tiny HF BERT, each layer and the root sharded: 2 micro-batches accumulated, or one
    batch of both in the low-memory mode (the embeddings are the root's: FSDP reduce-scatters
    them from its end-of-backward callback)."""
    from tests.integrations import _tiny

    model = _tiny.bert_classifier().double()
    _shard_bert(model, world)
    if low_memory:
        grain = torchgrain.GRAIN(model, num_groups=4, memory_budget=0)
        batches = [_bert_batch(2 * rank + j) for j in range(2)]
        tokens = torch.cat([b[0] for b in batches])
        labels = torch.cat([b[1] for b in batches])
        stats = grain.backward(per_sample_ce_logits(model, tokens, labels))
    else:
        grain = torchgrain.GRAIN(model, num_groups=2)  # process_group: the mesh's
        with grain.accumulate() as acc:
            for j in range(2):
                tokens, labels = _bert_batch(2 * rank + j)
                grain.backward(per_sample_ce_logits(model, tokens, labels))
        assert acc.stats is not None
        stats = acc.stats
    exchange = grain._exchange
    assert exchange is not None
    whole = sum(-(-p.shape[0] // world) * (p.numel() // p.shape[0]) for p in model.parameters())
    return {
        "grads": [p.grad.full_tensor() for p in model.parameters()],  # type: ignore[union-attr]
        "fallback": stats.fallback,
        "bytes": exchange.bytes_sent,
        "whole": whole * 4 * (world - 1) * 8,  # every row of every parameter, 4 groups a rank
    }


def _shard_bert(model: nn.Module, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model.bert.encoder.layer:  # type: ignore[union-attr]
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _bert_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from tests.integrations import _tiny

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, _tiny.VOCAB, (4, _tiny.T), generator=g), torch.randint(
        0, 3, (4,), generator=g
    )


def per_sample_ce_logits(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor):  # type: ignore[no-untyped-def]
    return nn.functional.cross_entropy(model(input_ids=tokens).logits, labels, reduction="none")


@pytest.mark.parametrize("low_memory", [False, True])
def test_fsdp2_hugging_face_bert(low_memory: bool, tmp_path: Path) -> None:
    from tests.integrations import _tiny

    results = _dist.run(_bert_worker, 2, tmp_path, low_memory)
    for r in results:
        assert "error" not in r, r.get("trace")
        assert r["fallback"] == {}  # every parameter by its rule, unsharded for the step
        # the position and token-type embeddings travel on their touched rows only
        assert r["bytes"] < r["whole"]
    model = _tiny.bert_classifier().double()
    grain = torchgrain.GRAIN(model, num_groups=2, engine="loop")
    with grain.accumulate():
        for batch in range(4):  # rank-major: rank 0's two micro-batches, then rank 1's
            tokens, labels = _bert_batch(batch)
            grain.backward(per_sample_ce_logits(model, tokens, labels))
    reference = torch.cat([p.grad.flatten() for p in model.parameters()])  # type: ignore[union-attr]
    for r in results:
        got = torch.cat([g.flatten() for g in r["grads"]])  # type: ignore[attr-defined]
        assert float((got - reference).norm() / reference.norm()) <= 1e-10


def _misuse_worker(rank: int, world: int) -> list[str]:
    errors = []
    model = _model()
    grain = torchgrain.GRAIN(model, num_groups=2)  # built before fully_shard
    _shard(model, world)
    x, y = _data(rank)
    try:
        grain.backward(per_sample_ce(model, x, y))
    except RuntimeError as error:
        errors.append(str(error))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    partly = _model()
    fully_shard(partly[0], mesh=init_device_mesh("cpu", (world,)))  # type: ignore[index]
    try:
        torchgrain.GRAIN(partly, num_groups=2)
    except ValueError as error:
        errors.append(str(error))
    return errors


def test_fsdp2_misuse_is_named(tmp_path: Path) -> None:
    for r in _dist.run(_misuse_worker, 2, tmp_path):
        assert isinstance(r, list), r
        assert "trainable parameters changed after GRAIN was built" in r[0]
        assert "not sharded while others are" in r[1] and "fully_shard on the root" in r[1]
