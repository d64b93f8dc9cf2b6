"""Per-sample losses of the standard Hugging Face heads, read from the model's class and config.

The head is found by the model's class (a PEFT wrapper is looked through): the ``transformers``
auto-mapping names, then the class-name suffix (``...ForSequenceClassification``,
``...ForTokenClassification``, ``...ForCausalLM`` / ``...LMHeadModel``, ``...ForMaskedLM``).
Each head's per-sample loss is the per-sample form of the head's own loss
(:mod:`torchgrain.losses`; its mean is the head's mean-reduced loss when every sample counts the
same number of tokens). For sequence classification ``config.problem_type`` picks regression,
single-label or multi-label exactly as the model does (inferred from ``num_labels`` and the
labels' dtype when unset).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from torchgrain import losses as per_sample

SEQUENCE, TOKEN, CAUSAL, MASKED = (
    "sequence_classification",
    "token_classification",
    "causal_lm",
    "masked_lm",
)
_MAPPINGS = {
    SEQUENCE: "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    TOKEN: "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    CAUSAL: "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    MASKED: "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
}
_SUFFIXES = {
    SEQUENCE: ("ForSequenceClassification",),
    TOKEN: ("ForTokenClassification",),
    CAUSAL: ("ForCausalLM", "LMHeadModel"),
    MASKED: ("ForMaskedLM",),
}


def base_model(model: nn.Module) -> nn.Module:
    """The model under a PEFT wrapper (``get_base_model``), else the model itself."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def head_kind(model: nn.Module) -> str | None:
    """One of the four heads above, or ``None`` for a model GrainTrainer cannot score itself.

    Encoder-decoder models (BART, T5, ...) are ``None``: their decoder inputs are built from the
    labels, which the per-sample loss keeps out of the forward (override
    ``compute_per_sample_losses`` for them)."""
    if getattr(getattr(base_model(model), "config", None), "is_encoder_decoder", False):
        return None
    name = type(base_model(model)).__name__
    from transformers.models.auto import modeling_auto

    for kind, attr in _MAPPINGS.items():
        names = getattr(modeling_auto, attr, {})
        for value in names.values():
            if name == value or (isinstance(value, tuple | list) and name in value):
                return kind
    for kind, suffixes in _SUFFIXES.items():
        if name.endswith(suffixes):
            return kind
    return None


def logits_of(outputs: Any, model: nn.Module) -> Tensor:
    """``outputs.logits`` (a ``ModelOutput`` or dict), or the first element of a tuple output."""
    if isinstance(outputs, dict):
        logits = outputs.get("logits")
        if logits is None:
            raise TypeError(
                f"{type(base_model(model)).__name__} returned no 'logits' (its outputs hold "
                f"{sorted(outputs)}); override GrainTrainer.compute_per_sample_losses(model, "
                "inputs) to return ((B,) per-sample losses, outputs)"
            )
        return logits
    if isinstance(outputs, tuple | list) and outputs and isinstance(outputs[0], Tensor):
        return outputs[0]
    if isinstance(outputs, Tensor):
        return outputs
    raise TypeError(
        f"cannot read logits from a {type(outputs).__name__} output; override "
        "GrainTrainer.compute_per_sample_losses(model, inputs) to return ((B,) losses, outputs)"
    )


def problem_type(config: Any, labels: Tensor) -> str:
    """``config.problem_type``, or what the model infers when it is unset (without setting it)."""
    problem = getattr(config, "problem_type", None)
    if problem is not None:
        return str(problem)
    num_labels = getattr(config, "num_labels", 2)
    if num_labels == 1:
        return "regression"
    if labels.dtype in (torch.long, torch.int):
        return "single_label_classification"
    return "multi_label_classification"


def head_losses(
    kind: str,
    model: nn.Module,
    logits: Tensor,
    labels: Tensor,
    *,
    label_smoothing: float = 0.0,
) -> Tensor:
    """``(B,)`` per-sample losses of head ``kind`` from its logits and the batch's labels."""
    if kind == SEQUENCE:
        config = getattr(base_model(model), "config", None)
        problem = problem_type(config, labels)
        if problem == "regression":
            return per_sample.mse(logits, labels)
        if problem == "single_label_classification":
            classes = logits.shape[-1]
            return per_sample.cross_entropy(
                logits.reshape(-1, classes), labels.reshape(-1), label_smoothing=label_smoothing
            )
        if problem == "multi_label_classification":
            return per_sample.binary_cross_entropy(logits, labels)
        raise ValueError(
            f"config.problem_type={problem!r} is not one GrainTrainer knows; use "
            "'regression', 'single_label_classification' or 'multi_label_classification', or "
            "override compute_per_sample_losses"
        )
    if kind in (TOKEN, MASKED):  # (B, T, C) against (B, T), no shift
        return per_sample.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if kind == CAUSAL:  # logits at t score the label at t + 1
        if label_smoothing:
            return per_sample.cross_entropy(
                logits[:, :-1], labels[:, 1:], label_smoothing=label_smoothing
            )
        return per_sample.causal_lm(logits, labels)
    raise ValueError(f"unknown head {kind!r}")
