"""Per-sample losses: model outputs -> ``(B,)``, the input GRAIN needs instead of a scalar.

Each helper returns one loss per sample, the per-sample form of the head's usual loss. Their mean
is the usual mean-reduced loss when every sample counts the same number of tokens: always for
sequence heads without ``ignore_index`` labels; for token and LM heads only with equal counts
(the usual token mean weights long sequences more, these weigh every sequence the same):

- :func:`cross_entropy`: sequence classification ``(B, C)`` logits and ``(B,)`` labels, or token
  classification ``(B, T, C)`` and ``(B, T)``: the mean over each sequence's counted tokens.
- :func:`mse`: regression, the mean squared error over each sample's outputs.
- :func:`binary_cross_entropy`: multi-label classification, the mean over each sample's labels.
- :func:`causal_lm`: next-token prediction, logits at position t scored against labels at
  t + 1, the mean over each sequence's counted tokens.
- :func:`masked_lm`: token prediction without the shift (masked language modelling).

Tokens whose label is ``ignore_index`` (``-100``, Hugging Face's padding and prompt label) are
not counted. A sequence with no counted token gets loss 0, and so no gradient. A group made only
of such sequences has a zero gradient, and the min-norm point is then 0 (the step is empty):
group whole sequences, or drop empty ones before the step.

Example:
    >>> import torch
    >>> from torchgrain import losses
    >>> logits = torch.randn(2, 5, 10)  # (B, T, vocab)
    >>> labels = torch.tensor([[1, 2, 3, -100, -100], [4, 5, 6, 7, 8]])
    >>> losses.causal_lm(logits, labels).shape  # one loss per sequence
    torch.Size([2])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["binary_cross_entropy", "causal_lm", "cross_entropy", "masked_lm", "mse", "token_mean"]

IGNORE_INDEX = -100


def token_mean(token_losses: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``(B, T)`` token losses over each row's ``True`` positions (bool ``mask``): ``(B,)``.

    Rows with no ``True`` position get 0 (their gradient is zero, not NaN).
    """
    counted = mask.sum(dim=1).to(token_losses.dtype)  # (B,)
    kept = torch.where(mask, token_losses, torch.zeros_like(token_losses))  # NaN at a pad: gone
    return kept.sum(dim=1) / counted.clamp(min=1)


def cross_entropy(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Per-sample cross-entropy for sequence ``(B, C)`` or token ``(B, T, C)`` classification.

    Args:
        logits: ``(B, C)`` or ``(B, T, C)``; computed in at least float32.
        labels: ``(B,)`` or ``(B, T)`` class indices; ``ignore_index`` entries are not counted.

    Returns:
        ``(B,)`` losses (for tokens, the mean over each sequence's counted tokens).
    """
    _check_batch(logits, labels, "cross_entropy")
    if logits.dim() == 2:
        if labels.shape != logits.shape[:1]:
            raise ValueError(
                f"cross_entropy: labels must have shape (B,) = {tuple(logits.shape[:1])} for "
                f"(B, C) logits, got {tuple(labels.shape)}"
            )
        return F.cross_entropy(
            _float(logits),
            labels.long(),
            reduction="none",
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
        )
    return _token_losses(logits, labels, ignore_index, label_smoothing, "cross_entropy")


def mse(predictions: Tensor, targets: Tensor) -> Tensor:
    """Per-sample mean squared error: ``(B, ...)`` predictions and targets -> ``(B,)``.

    A ``(B, 1)`` prediction against ``(B,)`` targets (a one-output regression head) is accepted.
    """
    _check_batch(predictions, targets, "mse")
    if predictions.dim() == 2 and predictions.shape[1] == 1 and targets.dim() == 1:
        predictions = predictions.squeeze(1)
    if predictions.shape != targets.shape:
        raise ValueError(
            f"mse: predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} "
            "must have the same shape"
        )
    sq = (_float(predictions) - targets.to(_float(predictions).dtype)) ** 2
    return sq.reshape(sq.shape[0], -1).mean(dim=1)


def binary_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-sample multi-label loss: ``(B, C)`` logits and 0/1 targets -> ``(B,)``."""
    _check_batch(logits, targets, "binary_cross_entropy")
    if logits.shape != targets.shape:
        raise ValueError(
            f"binary_cross_entropy: logits {tuple(logits.shape)} and targets "
            f"{tuple(targets.shape)} must have the same shape"
        )
    x = _float(logits)
    per = F.binary_cross_entropy_with_logits(x, targets.to(x.dtype), reduction="none")
    return per.reshape(per.shape[0], -1).mean(dim=1)


def causal_lm(logits: Tensor, labels: Tensor, *, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Per-sequence next-token loss: logits at t against labels at t + 1 -> ``(B,)``.

    ``labels`` are the input ids with prompt and padding positions set to ``ignore_index``, as
    Hugging Face causal-LM models take them; the shift happens here.
    """
    _check_batch(logits, labels, "causal_lm")
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"causal_lm: expected (B, T, vocab) logits and (B, T) labels, got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    return _token_losses(logits[:, :-1], labels[:, 1:], ignore_index, 0.0, "causal_lm")


def masked_lm(logits: Tensor, labels: Tensor, *, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Per-sequence masked-LM loss: ``(B, T, vocab)`` against ``(B, T)`` labels, no shift."""
    _check_batch(logits, labels, "masked_lm")
    return _token_losses(logits, labels, ignore_index, 0.0, "masked_lm")


def _token_losses(
    logits: Tensor, labels: Tensor, ignore_index: int, label_smoothing: float, name: str
) -> Tensor:
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"{name}: expected (B, T, C) logits and (B, T) labels, got {tuple(logits.shape)} "
            f"and {tuple(labels.shape)}"
        )
    B, T, C = logits.shape
    labels = labels.long()
    per_token = F.cross_entropy(
        _float(logits).reshape(B * T, C),
        labels.reshape(B * T),
        reduction="none",
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
    ).reshape(B, T)  # (B, T); 0 at ignored positions
    return token_mean(per_token, labels != ignore_index)


def _float(x: Tensor) -> Tensor:
    """Losses in at least float32, whatever autocast gave the head (bf16 logits lose digits)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_batch(outputs: Tensor, labels: Tensor, name: str) -> None:
    if not isinstance(outputs, Tensor) or not isinstance(labels, Tensor):
        raise TypeError(
            f"{name}: outputs and labels must be tensors, got {type(outputs).__name__} and "
            f"{type(labels).__name__}"
        )
    if outputs.dim() == 0 or labels.dim() == 0 or outputs.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{name}: outputs {tuple(outputs.shape)} and labels {tuple(labels.shape)} must share "
            "the batch dimension B first"
        )
