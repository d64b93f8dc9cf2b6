"""GrainTrainer's built-in per-sample losses for each standard head, and what it refuses."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import Trainer

from tests.integrations import _tiny
from torchgrain.integrations.hf import GrainTrainer


def _collate(trainer: Trainer, data: list[dict[str, Any]]) -> dict[str, Any]:
    return trainer.data_collator(data)  # type: ignore[no-any-return]


HEADS: dict[str, tuple[Callable[[], nn.Module], Callable[[], list[dict[str, Any]]]]] = {
    "single_label": (_tiny.bert_classifier, _tiny.classification_data),
    "regression": (
        lambda: _tiny.bert_classifier(num_labels=1),
        lambda: [{**row, "labels": float(row["labels"])} for row in _tiny.classification_data()],
    ),
    "multi_label": (
        lambda: _tiny.bert_classifier(problem_type="multi_label_classification"),
        lambda: [
            {**row, "labels": torch.tensor([1.0, 0.0, float(row["labels"] == 2)])}
            for row in _tiny.classification_data()
        ],
    ),
    "token": (
        _tiny.bert_tokens,
        lambda: [{**row, "labels": row["input_ids"] % 3} for row in _tiny.classification_data()],
    ),
    "causal_lm": (_tiny.gpt2, _tiny.lm_data),
    "masked_lm": (_tiny.bert_mlm, _tiny.lm_data),
}


@pytest.mark.parametrize("head", list(HEADS))
def test_per_sample_losses_average_to_the_models_own_loss(head: str, tmp_path: Path) -> None:
    make_model, make_data = HEADS[head]
    model, data = make_model(), make_data()
    trainer = GrainTrainer(
        model, _tiny.args(tmp_path, max_steps=2), train_dataset=data, num_groups=2
    )
    batch = _collate(trainer, data[:8])
    losses, outputs = trainer.compute_per_sample_losses(model, batch)
    assert losses.shape == (8,) and "logits" in outputs
    own = model(**batch).loss  # the head's mean loss (equal token counts per sequence here)
    torch.testing.assert_close(losses.mean(), own, rtol=1e-5, atol=1e-6)
    trainer.train()
    assert trainer.grain_stats is not None and trainer.grain_stats.num_groups == 2


def test_label_smoothing_is_honoured(tmp_path: Path) -> None:
    model, data = _tiny.bert_classifier(), _tiny.classification_data()
    args = _tiny.args(tmp_path, label_smoothing_factor=0.1)
    trainer = GrainTrainer(model, args, train_dataset=data, num_groups=2)
    batch = _collate(trainer, data[:8])
    losses, outputs = trainer.compute_per_sample_losses(model, batch)
    smoothed = trainer.label_smoother(outputs, batch["labels"])  # Trainer's own
    torch.testing.assert_close(losses.mean(), smoothed, rtol=1e-5, atol=1e-6)


class _Scorer(nn.Module):
    """A custom model: dict inputs, no Hugging Face head, scores under another name."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(_tiny.VOCAB, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor, labels: Any = None) -> dict[str, torch.Tensor]:
        return {"scores": self.out(self.embed(input_ids))}  # (B, 3)


class _ScorerForSequenceClassification(_Scorer):
    """Named like a classification head, but returns no logits."""


def test_unknown_model_is_refused_at_construction_naming_the_override(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="override compute_per_sample_losses"):
        GrainTrainer(_Scorer(), _tiny.args(tmp_path), num_groups=2)


def test_encoder_decoder_model_is_refused_naming_the_override(tmp_path: Path) -> None:
    # BART is listed among the masked-LM heads, but its decoder inputs come from the labels,
    # which the per-sample loss keeps out of the forward: scored as masked LM it would be wrong.
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
    )  # fmt: skip
    with pytest.raises(TypeError, match="override compute_per_sample_losses"):
        GrainTrainer(BartForConditionalGeneration(config), _tiny.args(tmp_path), num_groups=2)


def test_overriding_compute_per_sample_losses_trains_any_model(tmp_path: Path) -> None:
    class ScorerTrainer(GrainTrainer):
        def compute_per_sample_losses(self, model: nn.Module, inputs: dict[str, Any]) -> Any:
            outputs = model(input_ids=inputs["input_ids"])
            scores = outputs["scores"]  # (B, 3)
            return nn.functional.cross_entropy(scores, inputs["labels"], reduction="none"), outputs

    model = _Scorer()
    before = model.out.weight.detach().clone()
    trainer = ScorerTrainer(
        model, _tiny.args(tmp_path), train_dataset=_tiny.classification_data(), num_groups=4
    )
    trainer.train()
    assert trainer.grain_stats is not None and trainer.grain_stats.num_groups == 4
    assert not torch.equal(model.out.weight, before)


def test_outputs_without_logits_fail_before_any_gradient(tmp_path: Path) -> None:
    model = _ScorerForSequenceClassification()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = GrainTrainer(
        model, _tiny.args(tmp_path), train_dataset=_tiny.classification_data(), num_groups=2
    )
    with pytest.raises(TypeError, match=r"no 'logits'.*override GrainTrainer\.compute_per_sample"):
        trainer.train()
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_missing_labels_are_named(tmp_path: Path) -> None:
    data = [{"input_ids": row["input_ids"]} for row in _tiny.classification_data()]
    trainer = GrainTrainer(
        _tiny.bert_classifier(), _tiny.args(tmp_path), train_dataset=data, num_groups=2
    )
    with pytest.raises(ValueError, match="no 'labels' field"):
        trainer.train()


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("deepspeed", "ds_config.json", "DeepSpeed.*torchrun"),
        ("_n_gpu", 2, "n_gpu=2.*CUDA_VISIBLE_DEVICES"),
        ("fp16", True, "fp16=True.*bf16=True"),
        ("torch_compile", True, "torch_compile=True.*grain_engine='loop'"),
        ("optim", "lomo", "optim='lomo'.*adamw_torch"),
    ],
)
def test_unsupported_settings_are_refused_before_the_model_is_touched(
    setting: str, value: Any, message: str, tmp_path: Path
) -> None:
    args = _tiny.args(tmp_path)
    object.__setattr__(args, setting, value)  # set after validation: no DeepSpeed/GPU here
    model = _tiny.bert_classifier()
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    with pytest.raises(ValueError, match=message):
        GrainTrainer(model, args, num_groups=2)
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks  # no GRAIN was built


def test_fsdp1_is_refused_naming_fsdp2(tmp_path: Path) -> None:
    args = _tiny.args(tmp_path)
    object.__setattr__(args, "fsdp", "full_shard")  # set after validation: one process here
    object.__setattr__(args, "fsdp_config", {"version": 1})
    with pytest.raises(ValueError, match=r"FSDP2 only.*version 1.*'version': 2"):
        GrainTrainer(_tiny.bert_classifier(), args, num_groups=2)


def test_bad_grain_options_are_refused(tmp_path: Path) -> None:
    model, args = _tiny.bert_classifier(), _tiny.args(tmp_path)
    with pytest.raises(ValueError, match="needs num_groups=m"):
        GrainTrainer(model, args)
    with pytest.raises(ValueError, match="grain_grouping='key' and grain_key="):
        GrainTrainer(model, args, grain_grouping="key")
    with pytest.raises(ValueError, match=r"compute_loss_func.*compute_per_sample_losses"):
        GrainTrainer(model, args, num_groups=2, compute_loss_func=lambda *a, **k: 0.0)
    with pytest.raises(ValueError, match="num_groups must be a positive int"):
        GrainTrainer(model, args, num_groups=0)
