"""Opt-in (TORCHGRAIN_SLOW=1): GrainTrainer fine-tunes the real pretrained MiniLM, offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.integrations import _tiny
from torchgrain.integrations.hf import GrainTrainer


@pytest.mark.slow
def test_grain_trainer_fine_tunes_pretrained_minilm_on_bbc_titles(tmp_path: Path) -> None:
    from torchgrain.experiments.assets import bbc_news, load_minilm

    torch.manual_seed(0)
    tokenizer, model = load_minilm(5)  # all-MiniLM-L6-v2 and a fresh 5-topic head
    articles = bbc_news()[::45]  # ~50 titles, every topic
    encoded = tokenizer(
        [a.title for a in articles], padding="max_length", truncation=True, max_length=24
    )
    data = [
        {key: torch.tensor(values[i]) for key, values in encoded.items()}
        | {"labels": article.topic}
        for i, article in enumerate(articles)
    ]
    assert len({row["labels"] for row in data}) == 5
    args = _tiny.args(
        tmp_path,
        max_steps=24,
        per_device_train_batch_size=16,
        learning_rate=2e-4,
        train_sampling_strategy="random",
        logging_steps=4,
    )
    trainer = GrainTrainer(model, args, train_dataset=data, num_groups=4)
    batch = trainer.data_collator(data)

    def mean_loss() -> float:
        model.eval()
        with torch.no_grad():
            losses, _ = trainer.compute_per_sample_losses(model, batch)
        return float(losses.mean())

    before = mean_loss()
    trainer.train()
    after = mean_loss()
    assert after < 0.7 * before, (before, after)
    logs = [row for row in trainer.state.log_history if "grain/d_over_mean" in row]
    assert logs and all(0.0 < row["grain/d_over_mean"] <= 1.0 + 1e-6 for row in logs)
