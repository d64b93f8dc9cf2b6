"""PEFT LoRA models with GrainTrainer and plain GRAIN: only the adapters are in the Gram."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import torchgrain
from tests.integrations import _tiny
from torchgrain import losses
from torchgrain.integrations.hf import GrainTrainer


def _trainable(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def _frozen(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def _assert_only_trainable_moved(
    model: nn.Module, frozen: dict[str, torch.Tensor], before: dict[str, torch.Tensor]
) -> None:
    now = dict(model.named_parameters())
    assert all(torch.equal(now[n], value) for n, value in frozen.items())  # base untouched
    moved = {n for n, value in before.items() if not torch.equal(now[n], value)}
    assert any("lora_A" in n for n in moved) and any("lora_B" in n for n in moved)


def test_lora_classifier_trains_with_grain_trainer(tmp_path: Path) -> None:
    config = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
    model = get_peft_model(_tiny.bert_classifier(), config)
    trainable = _trainable(model)
    assert any("modules_to_save" in n for n in trainable)  # the head, trained in full
    frozen = _frozen(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = _tiny.args(tmp_path, max_steps=4, learning_rate=1e-2)
    trainer = GrainTrainer(
        model, args, train_dataset=_tiny.classification_data(), num_groups=4, grain_seed=0
    )
    assert trainer.grain.names == trainable  # the Gram is over the adapters and the head only
    trainer.train()
    _assert_only_trainable_moved(model, frozen, before)
    assert trainer.grain_stats is not None and trainer.grain_stats.num_groups == 4
    assert not trainer.grain_stats.fallback  # LoRA layers are Linear layers: the fused rule


def test_lora_gpt2_trains_with_plain_grain() -> None:
    config = LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True
    )
    model = get_peft_model(_tiny.gpt2(), config)
    frozen = _frozen(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    grain = torchgrain.GRAIN(model, num_groups=2)
    assert grain.names == _trainable(model)
    optimizer = torch.optim.AdamW(grain.params, lr=1e-2)
    batch = torch.stack([row["input_ids"] for row in _tiny.lm_data(n=8)])  # (B, T)
    for _ in range(3):
        optimizer.zero_grad()
        logits = model(input_ids=batch).logits  # (B, T, vocab)
        stats = grain.backward(losses.causal_lm(logits, batch))
        optimizer.step()
    assert stats.num_groups == 2 and bool(stats.min_inner >= stats.d_norm**2 - 1e-9)
    _assert_only_trainable_moved(model, frozen, before)
