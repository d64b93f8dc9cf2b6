"""``grain_step`` under Lightning's ``ddp`` strategy on 2 CPU processes (run by
``test_lightning_ranks.py``; Lightning starts the second process by running this script again).

    python tests/integrations/_lightning_ranks.py OUT

Trains an MLP for 4 steps with 2 groups per rank (4 global groups), a LayerNorm and a linear head;
each rank writes its parameters and every step's stats to OUT/rank{r}.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchgrain
from tests.integrations.test_lightning import _mlp  # the single-process tests' model
from torchgrain.integrations.lightning import grain_step

STEPS, B = 4, 8


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    n = 2 * STEPS * B  # both ranks' batches
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


class Classifier(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = _mlp()
        self.grain = torchgrain.GRAIN(self.net, num_groups=2)  # grain_step binds it to the ranks
        self.seen: list[dict[str, Any]] = []

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        losses = nn.functional.cross_entropy(self.net(x), y, reduction="none")  # (B,)
        stats = grain_step(self, self.grain, losses)
        self.seen.append({"num_groups": stats.num_groups, "x": x.clone(), "y": y.clone()})

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main() -> None:
    out = Path(sys.argv[1])
    module = Classifier()
    trainer = lightning.Trainer(
        max_steps=STEPS, accelerator="cpu", devices=2, strategy="ddp", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    loader = DataLoader(data(), batch_size=B, shuffle=False)
    trainer.fit(module, loader)
    torch.save(
        {
            "params": [p.detach().clone() for p in module.net.parameters()],
            "seen": module.seen,
            "world": dist.get_world_size(),
        },
        out / f"rank{trainer.global_rank}.pt",
    )
    dist.barrier()  # no rank tears Gloo down while another still talks to it (see _trainer_ranks)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
