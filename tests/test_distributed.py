"""GRAIN over torch.distributed with 2 and 3 Gloo processes: every rank's groups are global
groups; all ranks end with bit-identical .grad, equal to single-process GRAIN on the joined
batch."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import torchgrain
from tests import _dist
from tests._models import mlp, per_sample_ce

ROOT = Path(__file__).resolve().parents[1]


def _data(world: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per rank: inputs, labels and local group ids; uneven sizes, and rank 1 leaves group 1
    empty."""
    g = torch.Generator().manual_seed(0)
    out = []
    for rank in range(world):
        B = 4 + 2 * rank
        x = torch.randn(B, 5, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (B,), generator=g)
        ids = torch.arange(B) * 2 // B
        if rank == 1:
            ids = torch.where(ids == 1, 2, ids)  # ids in {0, 2}: group 1 empty on this rank
        out.append((x, y, ids))
    return out


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return mlp().double()


def _worker(
    rank: int, world: int, engine: str, nonfinite_rank: int, aggregator: str = "min_norm"
) -> dict[str, object]:
    x, y, ids = _data(world)[rank]
    model = _model()
    grain = torchgrain.GRAIN(
        model,
        num_groups=3,
        engine=engine,
        process_group=dist.group.WORLD,
        nonfinite="skip",
        aggregator=aggregator,
    )
    losses = per_sample_ce(model, x, y)
    if rank == nonfinite_rank:
        losses = losses * float("nan")
    stats = grain.backward(losses, ids)
    return {
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "skipped": stats.skipped,
        "sizes": stats.group_sizes.tolist(),
        "bytes": grain._exchange.bytes_sent,  # type: ignore[union-attr]
    }


def _reference(world: int, aggregator: str = "min_norm") -> list[torch.Tensor]:
    data = _data(world)
    model = _model()
    x = torch.cat([d[0] for d in data])
    y = torch.cat([d[1] for d in data])
    ids = torch.cat([d[2] + 3 * r for r, d in enumerate(data)])
    grain = torchgrain.GRAIN(model, num_groups=3 * world, engine="loop", aggregator=aggregator)
    grain.backward(per_sample_ce(model, x, y), ids)
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize("engine", ["fused", "loop"])
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_agree_bitwise_and_match_single_process(
    world: int, engine: str, tmp_path: Path
) -> None:
    results = _dist.run(_worker, world, tmp_path, engine, -1)
    for r in results:
        assert "error" not in r, r.get("trace")
    reference = _reference(world)
    for r in results:
        assert not r["skipped"]
        for got, first in zip(r["grads"], results[0]["grads"], strict=True):
            assert torch.equal(got, first)  # bit-identical across ranks
    for got, ref in zip(results[0]["grads"], reference, strict=True):
        assert float((got - ref).norm() / ref.norm()) <= 1e-6
    sizes = results[0]["sizes"]
    assert sorted(s for s in sizes if s) == sorted(
        int(c) for d in _data(world) for c in torch.bincount(d[2]) if c
    )


@pytest.mark.parametrize("aggregator", ["dual_proj", "upgrad", "mean"])
def test_every_aggregator_across_ranks(aggregator: str, tmp_path: Path) -> None:
    """The same Gram bits on every rank give the same weights: ranks agree bit for bit, and the
    step is single-process GRAIN's with that aggregator on the joined batch (pref: the joined
    batch's group sizes / its size)."""
    results = _dist.run(_worker, 2, tmp_path, "fused", -1, aggregator)
    for r in results:
        assert "error" not in r, r.get("trace")
        for got, first in zip(r["grads"], results[0]["grads"], strict=True):
            assert torch.equal(got, first)
    for got, ref in zip(results[0]["grads"], _reference(2, aggregator), strict=True):
        assert float((got - ref).norm() / ref.norm()) <= 1e-6


def test_nan_on_one_rank_skips_on_every_rank(tmp_path: Path) -> None:
    results = _dist.run(_worker, 2, tmp_path, "fused", 1)
    for r in results:
        assert "error" not in r, r.get("trace")
        assert r["skipped"] and all(g is None for g in r["grads"])


def _failing_worker(rank: int, world: int) -> str:
    model = _model()
    grain = torchgrain.GRAIN(model, num_groups=2, process_group=dist.group.WORLD)
    if rank == 1:
        raise RuntimeError("rank 1 failed before its backward")
    x, y, _ = _data(world)[rank]
    grain.backward(per_sample_ce(model, x, y))
    return "finished"


def test_a_failing_rank_does_not_hang_the_others(tmp_path: Path) -> None:
    results = _dist.run(_failing_worker, 2, tmp_path, timeout=5.0)
    assert "rank 1 failed" in results[1]["error"]
    assert (
        "GRAIN: the agreement on the group sizes across ranks failed on rank 0 of 2"
        in results[0]["error"]
    )


def _dying_worker(rank: int, world: int, out: str) -> dict[str, object]:
    model = _model()
    grain = torchgrain.GRAIN(model, num_groups=2, process_group=dist.group.WORLD)
    if rank == 1:  # dies without a word: no exception, no collective, the process just ends
        torch.save({"died": True}, Path(out) / "rank1.pt")
        os._exit(0)
    x, y, _ = _data(world)[rank]
    started = time.monotonic()
    try:
        grain.backward(per_sample_ce(model, x, y))
    except RuntimeError as error:
        return {"error": str(error), "seconds": time.monotonic() - started}
    return {"finished": True}


def test_a_rank_that_dies_makes_the_others_raise_within_the_timeout(tmp_path: Path) -> None:
    results = _dist.run(_dying_worker, 2, tmp_path, str(tmp_path), timeout=10.0)
    assert results[1] == {"died": True}
    assert "GRAIN: the agreement on the group sizes across ranks failed on rank 0 of 2" in str(
        results[0].get("error")
    )
    assert results[0]["seconds"] < 10.0 + 5.0  # the process group's timeout, and some slack


@pytest.mark.parametrize(
    ("example", "says"),
    [
        ("ddp_train.py", "every rank holds the same .grad"),
        ("fsdp_train.py", "rank 1 holds rows (16, 10) of (32, 10)"),
        ("local_sgd_train.py", "every rank holds the same parameters"),
    ],
)
def test_torchrun_examples_from_the_readme(example: str, says: str) -> None:
    assert (
        f"torchrun --standalone --nproc_per_node=2 examples/{example}"
        in (ROOT / "README.md").read_text()
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(ROOT / "examples" / example),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0: loss" in done.stdout and says in done.stdout
