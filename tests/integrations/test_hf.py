"""GrainTrainer against the real transformers Trainer and against GRAIN by hand."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import Trainer

import torchgrain
from tests.integrations import _tiny
from torchgrain.integrations.hf import GrainTrainer


def _batches(data: list[dict[str, Any]], size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        (
            torch.stack([row["input_ids"] for row in data[i : i + size]]),
            torch.tensor([row["labels"] for row in data[i : i + size]]),
        )
        for i in range(0, len(data), size)
    ]


def test_one_group_is_plain_trainer_step_for_step(tmp_path: Path) -> None:
    # Default AdamW, linear schedule, max_grad_norm=1: m = 1 is the mean gradient.
    data = _tiny.classification_data()
    plain = _tiny.bert_classifier()
    Trainer(plain, _tiny.args(tmp_path, max_steps=4), train_dataset=data).train()
    model = _tiny.bert_classifier()
    trainer = GrainTrainer(
        model, _tiny.args(tmp_path, max_steps=4), train_dataset=data, num_groups=1
    )
    trainer.train()
    assert _tiny.max_diff(plain, model) <= 1e-6
    logs = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logs) == 4 and all(row["grain/d_over_mean"] == pytest.approx(1.0) for row in logs)


def test_accumulation_equals_grain_accumulate_by_hand(tmp_path: Path) -> None:
    # 5 micro-batches, gradient_accumulation_steps=2: windows of 2, 2 and the epoch's last 1.
    # Clipping on (max_grad_norm), the user's optimizer and scheduler through optimizers=.
    data = _tiny.classification_data(n=20)
    model = _tiny.bert_classifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    setup = {"num_train_epochs": 1, "max_steps": -1, "per_device_train_batch_size": 4}
    trainer = GrainTrainer(
        model,
        _tiny.args(tmp_path, gradient_accumulation_steps=2, max_grad_norm=0.05, **setup),
        train_dataset=data,
        optimizers=(opt, sched),
        num_groups=2,
    )
    trainer.train()
    assert trainer.state.global_step == 3

    ref = _tiny.bert_classifier()
    grain = torchgrain.GRAIN(ref, num_groups=2)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    batches = _batches(data, 4)
    groups_per_step = []
    for window in (batches[0:2], batches[2:4], batches[4:5]):
        with grain.accumulate() as acc:
            for ids, labels in window:
                logits = ref(input_ids=ids).logits  # (B, C)
                grain.backward(nn.functional.cross_entropy(logits, labels, reduction="none"))
        groups_per_step.append(acc.stats.num_groups if acc.stats else 0)
        nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        opt.step()
        sched.step()
        opt.zero_grad()
    assert groups_per_step == [4, 4, 2]
    assert _tiny.max_diff(ref, model) <= 1e-6
    logged = [row["grain/active_groups"] for row in trainer.state.log_history if "loss" in row]
    assert len(logged) == 3 and logged[-1] <= 2


def test_mean_aggregator_is_plain_trainer_with_groups_and_diagnostics(tmp_path: Path) -> None:
    data = _tiny.classification_data()
    plain = _tiny.bert_classifier()
    Trainer(plain, _tiny.args(tmp_path, max_steps=4), train_dataset=data).train()
    model = _tiny.bert_classifier()
    trainer = GrainTrainer(
        model,
        _tiny.args(tmp_path, max_steps=4),
        train_dataset=data,
        num_groups=4,
        grain_aggregator="mean",
    )
    trainer.train()
    assert _tiny.max_diff(plain, model) <= 1e-6
    logs = [row for row in trainer.state.log_history if "loss" in row]
    assert all(row["grain/differs_from_mean"] == 0.0 for row in logs)
    assert all(row["grain/active_groups"] == 4.0 for row in logs)
    assert trainer.grain_stats is not None and trainer.grain_stats.aggregator == "mean"


@pytest.mark.parametrize("aggregator", ["dual_proj", "upgrad", "cagrad"])
def test_aggregator_equals_grain_by_hand(aggregator: str, tmp_path: Path) -> None:
    data = _tiny.classification_data(n=16)
    model = _tiny.bert_classifier()
    setup = {"max_steps": 4, "per_device_train_batch_size": 4, "max_grad_norm": 0.0}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    GrainTrainer(
        model,
        _tiny.args(tmp_path, **setup),
        train_dataset=data,
        optimizers=(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)),
        num_groups=4,
        grain_aggregator=aggregator,
    ).train()
    ref = _tiny.bert_classifier()
    grain = torchgrain.GRAIN(ref, num_groups=4, aggregator=aggregator)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for ids, labels in _batches(data, 4):
        logits = ref(input_ids=ids).logits
        grain.backward(nn.functional.cross_entropy(logits, labels, reduction="none"))
        opt.step()
        opt.zero_grad()
    assert _tiny.max_diff(ref, model) <= 1e-6


def test_unknown_aggregator_is_refused_before_training(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="aggregator must be one of"):
        GrainTrainer(
            _tiny.bert_classifier(),
            _tiny.args(tmp_path, max_steps=1),
            train_dataset=_tiny.classification_data(),
            num_groups=2,
            grain_aggregator="dualproj",
        )


class _NaNAtStep(GrainTrainer):
    """Makes the losses of optimizer step ``nan_step`` (1-based) NaN."""

    nan_step = 2

    def compute_per_sample_losses(self, model: nn.Module, inputs: dict[str, Any]) -> Any:
        losses, outputs = super().compute_per_sample_losses(model, inputs)
        if self.state.global_step + 1 == self.nan_step:
            losses = losses * torch.nan
        return losses, outputs


def test_skipped_step_does_not_move_parameters(tmp_path: Path) -> None:
    # AdamW with momentum from step 1: a zero .grad would still move the weights at step 2.
    data = _tiny.classification_data()
    one = _tiny.bert_classifier()
    GrainTrainer(one, _tiny.args(tmp_path, max_steps=1), train_dataset=data, num_groups=2).train()
    two = _tiny.bert_classifier()
    trainer = _NaNAtStep(
        two,
        _tiny.args(tmp_path, max_steps=2, lr_scheduler_type="constant"),
        train_dataset=data,
        num_groups=2,
        grain_nonfinite="skip",
    )
    trainer.train()
    assert trainer.state.global_step == 2 and trainer.grain_stats is not None
    assert trainer.grain_stats.skipped
    assert _tiny.max_diff(one, two) == 0.0
    logs = [row for row in trainer.state.log_history if "loss" in row]
    assert [row["grain/skipped"] for row in logs] == [0.0, 1.0]
    assert math.isnan(logs[1]["grain/d_over_mean"])


def test_nonfinite_raise_leaves_grad_and_weights(tmp_path: Path) -> None:
    model = _tiny.bert_classifier()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = _NaNAtStep(
        model, _tiny.args(tmp_path), train_dataset=_tiny.classification_data(), num_groups=2
    )
    trainer.nan_step = 1
    with pytest.raises(torchgrain.NonFiniteError, match="nonfinite='skip'"):
        trainer.train()
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_bf16_mixed_precision_trains(tmp_path: Path) -> None:
    model = _tiny.bert_classifier()
    trainer = GrainTrainer(
        model,
        _tiny.args(tmp_path, bf16=True),
        train_dataset=_tiny.classification_data(),
        num_groups=4,
    )
    trainer.train()
    stats = trainer.grain_stats
    assert stats is not None and stats.gram.dtype == torch.float64
    assert 0.0 < float(stats.d_over_mean) <= 1.0 + 1e-6
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_key_grouping_reads_a_batch_field_the_model_does_not_take(tmp_path: Path) -> None:
    data = _tiny.classification_data(n=16)
    for i, row in enumerate(data):
        row["domain"] = i % 2  # not a BERT input: kept for GRAIN, not passed to the model
    trainer = GrainTrainer(
        _tiny.bert_classifier(),
        _tiny.args(tmp_path, max_steps=2),
        train_dataset=data,
        grain_grouping="key",
        grain_key="domain",
    )
    trainer.train()
    assert trainer.grain_stats is not None and trainer.grain_stats.num_groups == 2


def test_a_short_last_batch_gets_one_group_per_sample(tmp_path: Path) -> None:
    data = _tiny.classification_data(n=18)  # batches of 8, 8 and 2 < num_groups
    trainer = GrainTrainer(
        _tiny.bert_classifier(),
        _tiny.args(tmp_path, max_steps=-1, num_train_epochs=1),
        train_dataset=data,
        num_groups=4,
    )
    trainer.train()
    assert trainer.state.global_step == 3 and trainer.grain_stats is not None
    assert trainer.grain_stats.group_sizes.tolist() == [1, 1, 0, 0]


def test_grain_state_is_checkpointed_and_resumed(tmp_path: Path) -> None:
    data = _tiny.classification_data()
    options = {"num_groups": 2, "grain_grouping": "random", "grain_seed": 3}
    full = _tiny.bert_classifier()
    GrainTrainer(
        full, _tiny.args(tmp_path / "a", max_steps=4), train_dataset=data, **options
    ).train()
    saving = _tiny.args(tmp_path / "b", max_steps=4, save_strategy="steps", save_steps=2)
    GrainTrainer(_tiny.bert_classifier(), saving, train_dataset=data, **options).train()
    checkpoint = tmp_path / "b" / "checkpoint-2"
    assert (checkpoint / "grain_state.pt").is_file()
    resumed = _tiny.bert_classifier()
    trainer = GrainTrainer(
        resumed, _tiny.args(tmp_path / "b", max_steps=4), train_dataset=data, **options
    )
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.grain.step == 4
    assert _tiny.max_diff(full, resumed) <= 1e-6


class _Payload:
    """A pickle that runs code when loaded with weights_only=False: it creates a file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (Path.touch, (str(self.path),))  # type: ignore[return-value]


def test_an_untrusted_grain_state_cannot_run_code_when_resumed(tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    marker = tmp_path / "code-ran"
    torch.save({"step": 2, "payload": _Payload(marker)}, checkpoint / "grain_state.pt")
    trainer = GrainTrainer(
        _tiny.bert_classifier(),
        _tiny.args(tmp_path / "out", max_steps=1),
        train_dataset=_tiny.classification_data(),
        num_groups=2,
    )
    with pytest.raises(Exception, match="weights_only"):
        trainer._load_rng_state(str(checkpoint))
    assert not marker.exists()
    assert trainer.grain.step == 0


def test_model_init_gets_a_grain_of_its_own(tmp_path: Path) -> None:
    trainer = GrainTrainer(
        model_init=lambda: _tiny.bert_classifier(),
        args=_tiny.args(tmp_path, max_steps=1),
        train_dataset=_tiny.classification_data(),
        num_groups=2,
    )
    trainer.train()  # Trainer calls model_init again: a new model, so a new GRAIN on it
    assert trainer.grain._module is trainer.model and trainer.grain.step == 1
