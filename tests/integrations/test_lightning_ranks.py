"""``grain_step`` under Lightning's ``ddp`` strategy, 2 CPU processes: GRAIN exchanges across the
ranks by itself, the ranks stay identical, and their steps are single-process GRAIN's on the
joined batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

import torchgrain
from tests.integrations import _lightning_ranks as script
from tests.integrations.test_lightning import _mlp

ROOT = Path(__file__).resolve().parents[2]


def test_ddp_strategy_takes_one_grain_step_over_every_rank(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
    }
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "integrations" / "_lightning_ranks.py"),
         str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    for r in ranks:
        assert [s["num_groups"] for s in r["seen"]] == [4] * script.STEPS
        for p, q in zip(r["params"], ranks[0]["params"], strict=True):
            assert torch.equal(p, q)
    # The same steps in one process: each step's batch is rank 0's then rank 1's samples.
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grain = torchgrain.GRAIN(model, num_groups=4, engine="loop")
    for step in range(script.STEPS):
        x = torch.cat([r["seen"][step]["x"] for r in ranks])
        y = torch.cat([r["seen"][step]["y"] for r in ranks])
        assert not torch.equal(ranks[0]["seen"][step]["x"], ranks[1]["seen"][step]["x"])
        opt.zero_grad()
        grain.backward(nn_ce(model, x, y))
        opt.step()
    for got, ref in zip(ranks[0]["params"], model.parameters(), strict=True):
        assert float((got - ref.detach()).abs().max()) <= 1e-5


def nn_ce(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(x), y, reduction="none")
