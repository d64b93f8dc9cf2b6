"""Tiny Hugging Face models built from configs (no downloads) and Trainer arguments for tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertForTokenClassification,
    GPT2Config,
    GPT2LMHeadModel,
    TrainingArguments,
)

transformers.logging.set_verbosity_error()
VOCAB, T = 60, 8


def bert_config(**overrides: Any) -> BertConfig:
    config = {
        "vocab_size": VOCAB,
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "max_position_embeddings": 16,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "num_labels": 3,
    }
    config.update(overrides)
    return BertConfig(**config)


def bert_classifier(seed: int = 0, **overrides: Any) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(bert_config(**overrides))


def bert_tokens(seed: int = 0) -> BertForTokenClassification:
    torch.manual_seed(seed)
    return BertForTokenClassification(bert_config())


def bert_mlm(seed: int = 0) -> BertForMaskedLM:
    torch.manual_seed(seed)
    return BertForMaskedLM(bert_config())


def gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def classification_data(n: int = 32, classes: int = 3, seed: int = 1) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(0, VOCAB, (T,), generator=g),
            "labels": int(torch.randint(0, classes, (), generator=g)),
        }
        for _ in range(n)
    ]


def lm_data(n: int = 16, seed: int = 1) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (T,), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def args(tmp_path: Path, **overrides: Any) -> TrainingArguments:
    """Quiet CPU arguments: no saving, no reports, a log every step, sequential batches."""
    config: dict[str, Any] = {
        "output_dir": str(tmp_path),
        "max_steps": 3,
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-3,
        "seed": 0,
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "train_sampling_strategy": "sequential",
    }
    config.update(overrides)
    return TrainingArguments(**config)


def max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(
        (p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )
