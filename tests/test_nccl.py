"""The data-parallel exchange on the device's own backend: NCCL with one GPU per rank (as many
ranks as GPUs, at most 2), and the same checks with Gloo on the CPU so that CI runs the test
itself. Replicated and FSDP2-sharded GRAIN (both memory modes) against single-process GRAIN on
the joined batch in float64; every buffer on the ranks' device. ``benchmarks/gpu_check.sh`` runs
this module with ``-m cuda``; the world size NCCL got is in the test's id."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import torchgrain
from tests import _dist
from tests._models import per_sample_ce
from tests.exchange.test_sharded import _data, _model, _reference, _shard

pytestmark = pytest.mark.cuda
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
BACKENDS = [
    pytest.param("gloo", 2, id="gloo-cpu-2"),
    pytest.param(
        "nccl",
        min(GPUS, 2),
        id=f"nccl-cuda-{min(GPUS, 2)}",
        marks=pytest.mark.skipif(GPUS == 0, reason="no CUDA device"),
    ),
]


def _worker(rank: int, world: int, backend: str, mode: str) -> dict[str, object]:
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    model = _model().to(device)
    budget = 0 if mode == "fsdp-low-memory" else 1 << 30
    if mode.startswith("fsdp"):
        _shard(model, world, device.type)
    grain = torchgrain.GRAIN(
        model, num_groups=2, process_group=dist.group.WORLD, memory_budget=budget
    )
    x, y = _data(rank)
    stats = grain.backward(per_sample_ce(model, x.to(device), y.to(device)))
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.device == device for g in grads)
    full = [getattr(g, "full_tensor", lambda g=g: g)() for g in grads]
    return {"grads": [g.cpu() for g in full], "num_groups": stats.num_groups}


@pytest.mark.parametrize("mode", ["replicated", "fsdp", "fsdp-low-memory"])
@pytest.mark.parametrize(("backend", "world"), BACKENDS)
def test_exchange_on_the_backend_equals_single_process_grain(
    backend: str, world: int, mode: str, tmp_path: Path
) -> None:
    results = _dist.run(_worker, world, tmp_path, backend, mode, timeout=60.0, backend=backend)
    reference, _ = _reference(world, 2, steps=1)
    for r in results:
        assert "error" not in r, r.get("trace")
        assert r["num_groups"] == 2 * world
        for got, ref in zip(r["grads"], reference, strict=True):  # type: ignore[call-overload]
            assert float((got - ref).norm() / ref.norm()) <= 1e-10


def _moved(model: torch.nn.Module, rank: int) -> list[torch.Tensor]:
    """Rank r's fixed step away from the anchor, as if it had trained alone."""
    g = torch.Generator().manual_seed(10 + rank)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in model.parameters()]


def _local_sgd_worker(rank: int, world: int, backend: str) -> dict[str, object]:
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    model = _model().to(device)
    outer = torch.optim.SGD(model.parameters(), lr=0.7, momentum=0.9, nesterov=True)
    local = torchgrain.LocalSGD(model, 1, "min_norm", outer)
    with torch.no_grad():
        for p, step in zip(model.parameters(), _moved(model, rank), strict=True):
            p.add_(step.to(device))
    stats = local.step()
    assert stats is not None and all(a.device == device for a in local.anchor)
    return {"params": [p.detach().cpu() for p in model.parameters()]}


@pytest.mark.parametrize(("backend", "world"), BACKENDS)
def test_local_sgd_on_the_backend_equals_the_gathered_outer_step(
    backend: str, world: int, tmp_path: Path
) -> None:
    results = _dist.run(_local_sgd_worker, world, tmp_path, backend, timeout=60.0, backend=backend)
    assert all("error" not in r for r in results), [r.get("trace") for r in results]
    model = _model()
    steps = [_moved(model, r) for r in range(world)]
    every = torch.stack([-torch.cat([s.flatten() for s in rank]) for rank in steps])  # (W, P)
    d = torchgrain.min_norm_weights(every @ every.T) @ every
    outer = torch.optim.SGD(model.parameters(), lr=0.7, momentum=0.9, nesterov=True)
    start = 0
    for p in model.parameters():
        p.grad = d[start : start + p.numel()].view_as(p)
        start += p.numel()
    outer.step()
    for r in results:
        for got, ref in zip(r["params"], model.parameters(), strict=True):  # type: ignore[call-overload]
            assert float((got - ref.detach()).norm() / ref.detach().norm()) <= 1e-10
