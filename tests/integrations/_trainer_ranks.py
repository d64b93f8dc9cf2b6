"""GrainTrainer on every rank of a ``torchrun`` job (run by ``test_hf_ranks.py``).

    torchrun --standalone --nproc_per_node=2 tests/integrations/_trainer_ranks.py OUT [CHECKPOINT]

Trains the tiny BERT classifier for 4 steps (2 micro-batches of 4 samples and 2 groups each per
rank and step: 8 global groups), saving a checkpoint every 2 steps, or resumes from CHECKPOINT;
each rank writes its parameters, its last step's stats and (rank 0) the logs to OUT/rank{r}.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tests.integrations import _tiny
from torchgrain.integrations.hf import GrainTrainer


def main() -> None:
    out = Path(sys.argv[1])
    checkpoint = sys.argv[2] if len(sys.argv) > 2 else None
    model = _tiny.bert_classifier()
    args = _tiny.args(
        out,
        max_steps=4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        save_strategy="steps",
        save_steps=2,
        logging_steps=2,
    )
    trainer = GrainTrainer(model, args, train_dataset=_tiny.classification_data(n=64), num_groups=2)
    trainer.train(resume_from_checkpoint=checkpoint)
    stats = trainer.grain_stats
    assert stats is not None
    torch.save(
        {
            "world": dist.get_world_size(),
            "params": [p.detach().clone() for p in model.parameters()],
            "num_groups": stats.num_groups,
            "group_sizes": stats.group_sizes.tolist(),
            "logs": trainer.state.log_history,
            "main": trainer.is_world_process_zero(),
        },
        out / f"rank{dist.get_rank()}.pt",
    )
    # Trainer leaves the process group up; a rank that exits with Gloo's threads still running
    # died once with SIGABRT ("terminate called without an active exception") in CI.
    dist.barrier()  # no rank tears Gloo down while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
