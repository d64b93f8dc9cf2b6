"""Tiny models and batches the engine and GRAIN tests share (built in the tests, no downloads)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def mlp(d_in: int = 5, hidden: int = 8, d_out: int = 3, norm: bool = True) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(d_in, hidden)]
    if norm:
        layers.append(nn.LayerNorm(hidden))
    layers += [nn.Tanh(), nn.Linear(hidden, d_out)]
    return nn.Sequential(*layers)


class CNN(nn.Module):
    """Conv + BatchNorm: BatchNorm in training mode mixes the samples of a batch."""

    def __init__(self, batchnorm: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4) if batchnorm else nn.GroupNorm(2, 4)
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.norm(self.conv(x))).flatten(1))


class TiedLM(nn.Module):
    """An embedding LM whose output layer shares the embedding matrix."""

    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.out(torch.tanh(self.mix(self.embed(tokens))))


def classification_batch(
    B: int = 12, d_in: int = 5, classes: int = 3, seed: int = 0
) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, d_in, generator=g), torch.randint(0, classes, (B,), generator=g)


def per_sample_ce(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(model(x), y, reduction="none")  # (B,)


def lm_losses(model: nn.Module, tokens: Tensor) -> Tensor:
    logits = model(tokens[:, :-1])  # (B, T-1, V)
    token_losses = nn.functional.cross_entropy(
        logits.transpose(1, 2), tokens[:, 1:], reduction="none"
    )
    return token_losses.mean(dim=1)  # (B,)


def group_gradients(model: nn.Module, losses_fn, groups: Tensor, m: int) -> Tensor:  # type: ignore[no-untyped-def]
    """The slow, obvious oracle: ``(m, P)`` flat gradients, one fresh forward and backward per
    group's mean loss (independent of every engine)."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for k in range(m):
        losses = losses_fn()
        grads = torch.autograd.grad(losses[groups == k].mean(), params, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).flatten()
                    for g, p in zip(grads, params, strict=True)
                ]
            )
        )
    return torch.stack(rows)


def flat_grad(model: nn.Module) -> Tensor:
    return torch.cat(
        [p.grad.flatten() for p in model.parameters() if p.requires_grad and p.grad is not None]
    )
