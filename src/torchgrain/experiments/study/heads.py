"""The study's cheap tasks: a head on frozen MiniLM features of real data.

========  ===========================================  ===========  ============================
task      data                                         metric       splits (fixed)
========  ===========================================  ===========  ============================
topics    BBC News title + lead -> 5 topics            accuracy     625 test; pool: train, val
valence   VADER word -> mean human valence (-4..4)     Pearson r    1,000 test; pool: train, val
========  ===========================================  ===========  ============================

The test set is carved first and never seen by training or by the choice of learning rate; the
validation split comes from the training pool. Label noise (``noise`` > 0) corrupts a fixed share
of the pool's labels (the training and validation labels a practitioner would have), never the
test labels: a topic becomes another topic, a rating another word's rating. The head is an MLP
(384 -> 64 -> out, GELU) or, for the convex setting of the stability theory, a linear layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

SPLIT_SEED, NOISE_SEED = 0, 1
TEST = {"topics": 625, "valence": 1000}
METRIC = {"topics": "accuracy", "valence": "pearson"}
KEYS = {"topics": 5, "valence": 4}  # groups of the by-label grouping: topics, rating quartiles
HIDDEN = 64


@dataclass(frozen=True)
class Data:
    """One task's tensors at one noise level; ``keys_*`` is each example's group key (its label,
    or for ratings its quartile among the training ratings)."""

    task: str
    x_train: Tensor  # (N, 384)
    y_train: Tensor  # (N,) long labels or float standardized ratings
    keys_train: Tensor  # (N,) long
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    classes: int  # output width: 5 topics, or 1 rating

    @property
    def metric(self) -> str:
        return METRIC[self.task]


def make_data(
    task: str, features: dict[str, tuple[Tensor, Tensor]], train: int, val: int, noise: float
) -> Data:
    """Fixed splits of ``task`` with ``train`` and ``val`` examples from the pool, ``noise`` of
    their labels corrupted."""
    if task not in TEST:
        raise ValueError(f"unknown study task {task!r}; choose one of {sorted(TEST)}")
    if not 0.0 <= noise < 1.0:
        raise ValueError(f"label noise must be in [0, 1), got {noise}")
    x, y = features[task]
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = TEST[task]
    if n_test + train + val > len(y):
        raise ValueError(f"{task} has {len(y)} examples; {n_test} test + {train} + {val} is more")
    test, pool = order[:n_test], order[n_test : n_test + train + val]
    y_pool = y[pool].clone()
    if noise > 0:
        y_pool = _corrupt(y_pool, noise, classes=5 if task == "topics" else None)
    x_pool = x[pool]
    if task == "topics":
        y_test, classes = y[test], 5
        keys = y_pool[:train]
    else:
        mean, std = y_pool[:train].mean(), y_pool[:train].std()  # standardize on what is seen
        y_pool, y_test, classes = (y_pool - mean) / std, (y[test] - mean) / std, 1
        quartiles = torch.quantile(y_pool[:train], torch.tensor([0.25, 0.5, 0.75]))
        keys = torch.bucketize(y_pool[:train], quartiles)
    return Data(
        task, x_pool[:train], y_pool[:train], keys.long(), x_pool[train:], y_pool[train:],
        x[test], y_test, classes,
    )  # fmt: skip


def _corrupt(y: Tensor, share: float, classes: int | None) -> Tensor:
    """A fixed ``share`` of the labels changed: to another class, or to another example's rating."""
    g = torch.Generator().manual_seed(NOISE_SEED)
    chosen = torch.randperm(len(y), generator=g)[: round(share * len(y))]
    y = y.clone()
    if classes is not None:
        shift = torch.randint(1, classes, (len(chosen),), generator=g)
        y[chosen] = (y[chosen] + shift) % classes  # never the true class
    else:
        y[chosen] = y[chosen[torch.randperm(len(chosen), generator=g)]]
    return y


def new_head(kind: str, d_in: int, out: int, seed: int) -> nn.Module:
    """A freshly initialised head, its weights drawn from ``seed`` (torch's default init)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "linear":
            return nn.Linear(d_in, out)
        if kind == "mlp":
            return nn.Sequential(nn.Linear(d_in, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, out))
    raise ValueError(f"unknown head {kind!r}; use 'mlp' or 'linear'")


def per_sample_losses(data: Data, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """``(B,)`` cross-entropy or squared error."""
    out = model(x)
    if data.classes > 1:
        return nn.functional.cross_entropy(out, y, reduction="none")
    return (out.squeeze(1) - y) ** 2


@torch.no_grad()
def evaluate(data: Data, model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Accuracy or Pearson r of ``model`` on ``(x, y)``."""
    out = model(x)
    if data.classes > 1:
        return float((out.argmax(1) == y).float().mean())
    pred = out.squeeze(1)
    return float(torch.corrcoef(torch.stack([pred, y.to(pred.dtype)]))[0, 1])
