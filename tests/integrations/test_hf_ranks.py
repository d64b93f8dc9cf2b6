"""GrainTrainer under ``torchrun`` with 2 Gloo processes: every rank's groups are global groups,
the ranks stay identical, the main process logs and saves, and a resumed run continues exactly.
FSDP2: accelerate shards a model only on GPUs (``MULTI_CPU`` ignores its FSDP plugin), so here
the model is sharded as accelerate would shard it, over a 1-rank CPU mesh, after GrainTrainer was
built: GRAIN is rebuilt on the shards and the run ends where the unsharded one does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor

from tests import _dist

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "integrations" / "_trainer_ranks.py"


def _torchrun(out: Path, *extra: str) -> list[dict[str, object]]:
    out.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
    }
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(SCRIPT), str(out), *extra],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, object]]]:
    out = tmp_path_factory.mktemp("straight")
    return out, _torchrun(out)


def test_ranks_take_one_grain_step_over_all_their_groups(
    straight: tuple[Path, list[dict[str, object]]],
) -> None:
    _, ranks = straight
    assert [r["world"] for r in ranks] == [2, 2]
    for r in ranks:
        # 2 ranks x 2 micro-batches x 2 groups of 2 samples
        assert r["num_groups"] == 8 and r["group_sizes"] == [2] * 8
        for p, q in zip(r["params"], ranks[0]["params"], strict=True):  # type: ignore[call-overload]
            assert torch.equal(p, q)
    assert [r["main"] for r in ranks] == [True, False]
    logs = [row for row in ranks[0]["logs"] if "loss" in row]  # type: ignore[attr-defined]
    assert [row["step"] for row in logs] == [2, 4]
    assert all(1 <= row["grain/active_groups"] <= 8 for row in logs)  # GRAIN's, from rank 0


def test_a_resumed_run_continues_exactly(
    straight: tuple[Path, list[dict[str, object]]], tmp_path: Path
) -> None:
    out, ranks = straight
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / "grain_state.pt").is_file()
    resumed = _torchrun(tmp_path, str(checkpoint))
    for r, s in zip(resumed, ranks, strict=True):
        for p, q in zip(r["params"], s["params"], strict=True):  # type: ignore[call-overload]
            assert torch.equal(p, q)


def _sharded_after_construction(rank: int, world: int, out: str, shard: bool) -> list[Tensor]:
    """GrainTrainer built on the plain model; the model is then sharded by FSDP2 (as accelerate
    does when Trainer prepares it) before training: GRAIN is rebuilt on the shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from tests.integrations import _tiny
    from torchgrain.integrations.hf import GrainTrainer

    model = _tiny.bert_classifier()
    args = _tiny.args(Path(out), max_steps=3, per_device_train_batch_size=4)
    trainer = GrainTrainer(model, args, train_dataset=_tiny.classification_data(), num_groups=2)
    if shard:
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.bert.encoder.layer:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    trainer.train()
    assert trainer.grain._sharded == shard and trainer.grain.step == 3
    return [_full(p) for p in model.parameters()]


def _full(p: Tensor) -> Tensor:
    full = getattr(p, "full_tensor", None)
    return (p if full is None else full()).detach().clone()


def test_grain_is_rebuilt_when_the_model_is_sharded_after_construction(tmp_path: Path) -> None:
    plain = _dist.run(_sharded_after_construction, 1, tmp_path, str(tmp_path), False)[0]
    sharded = _dist.run(_sharded_after_construction, 1, tmp_path, str(tmp_path), True)[0]
    assert isinstance(sharded, list), sharded
    for p, q in zip(sharded, plain, strict=True):
        assert float((p - q).abs().max()) <= 1e-6
