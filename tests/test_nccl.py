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
from torch import Tensor, nn

import torchgrain
from tests import _dist
from tests._models import mlp, per_sample_ce

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


def _data(rank: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(rank)
    B = 6 + 2 * rank
    return torch.randn(B, 5, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (B,), generator=g
    )


def _worker(rank: int, world: int, backend: str, mode: str) -> dict[str, object]:
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    torch.manual_seed(0)
    model = mlp().double().to(device)
    budget = 0 if mode == "fsdp-low-memory" else 1 << 30
    if mode.startswith("fsdp"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for layer in model:  # type: ignore[attr-defined]
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
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
    torch.manual_seed(0)
    model = mlp().double()
    data = [_data(r) for r in range(world)]
    ids = torch.cat([torch.arange(len(d[1])) * 2 // len(d[1]) + 2 * r for r, d in enumerate(data)])
    grain = torchgrain.GRAIN(model, num_groups=2 * world, engine="loop")
    x, y = torch.cat([d[0] for d in data]), torch.cat([d[1] for d in data])
    grain.backward(per_sample_ce(model, x, y), ids)
    for r in results:
        assert "error" not in r, r.get("trace")
        assert r["num_groups"] == 2 * world
        for got, p in zip(r["grads"], model.parameters(), strict=True):  # type: ignore[call-overload]
            assert float((got - p.grad).norm() / p.grad.norm()) <= 1e-10
