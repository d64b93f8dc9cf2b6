"""One run of the study: a head trained on cached features with one optimizer, learning rate,
aggregation rule, grouping, label noise and weight averaging, from one seed.

The seed draws the head's initialisation and the data order; runs of two methods with the same
seed share both, so they pair. The learning rate is constant (what SWA expects; there is no
schedule to tune). The last incomplete batch of an epoch is dropped.

Groupings of a batch of B: ``contiguous`` (m groups of B/m consecutive samples of the shuffled
batch; m = B is per-sample), ``key`` (one group per label, or per rating quartile), ``micro``
(gradient accumulation over m micro-batches of B/m, one group each: the paper's "across
mini-batches"). Averaging: ``ema`` evaluates an exponential moving average of the weights,
updated every step with decay ``1 - 1 / (steps per epoch)`` (a horizon of about one epoch: runs
here are a few epochs long, and a fixed 0.99 would still weigh the first steps), ``swa`` the equal
average of the weights over the last epoch's steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from torchgrain import GRAIN
from torchgrain.experiments.study.heads import Data, evaluate, new_head, per_sample_losses

OPTIMIZERS = ("adamw", "sgdm", "sgd")
METHODS = ("mean", "min_norm", "dual_proj", "upgrad", "cagrad")
GROUPINGS = ("contiguous", "key", "micro")
AVERAGES = ("none", "ema", "swa")


@dataclass(frozen=True)
class Setting:
    """Everything about a run but its learning rate and seed (a cell of the study)."""

    task: str
    optimizer: str
    method: str  # an aggregator name; "mean" is plain losses.mean().backward()
    m: int  # groups per batch (contiguous), micro-batches (micro); key: the number of keys
    grouping: str = "contiguous"
    noise: float = 0.0
    average: str = "none"
    head: str = "mlp"
    batch: int = 32
    epochs: int = 4

    def __post_init__(self) -> None:
        for value, choices in (
            (self.optimizer, OPTIMIZERS),
            (self.method, METHODS),
            (self.grouping, GROUPINGS),
            (self.average, AVERAGES),
        ):
            if value not in choices:
                raise ValueError(f"{value!r} is not one of {choices}")
        if self.grouping != "key" and (self.m < 1 or self.batch % self.m):
            raise ValueError(f"m = {self.m} must divide the batch {self.batch}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_optimizer(name: str, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    if name == "sgdm":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.SGD(params, lr=lr)


def train(
    setting: Setting,
    data: Data,
    lr: float,
    seed: int,
    *,
    keep_model: bool = False,
    on_epoch: Callable[[nn.Module], None] | None = None,
) -> dict[str, Any]:
    """Train one head; returns its validation and test metric, the training curve and GRAIN's
    diagnostics averaged over the run (``model`` too with ``keep_model``). ``on_epoch`` sees the
    trained (not averaged) model after every epoch."""
    s = setting
    model = new_head(s.head, data.x_train.shape[1], data.classes, seed)
    params = list(model.parameters())
    optimizer = make_optimizer(s.optimizer, params, lr)
    grain = None
    if s.method != "mean":
        m = int(data.keys_train.max()) + 1 if s.grouping == "key" else s.m
        groups = 1 if s.grouping == "micro" else m
        grain = GRAIN(model, num_groups=groups, aggregator=s.method, nonfinite="skip")
    order = torch.Generator().manual_seed(seed)
    per_epoch = len(data.y_train) // s.batch
    averaged = _averaged(model, s.average, decay=1.0 - 1.0 / max(per_epoch, 2))
    losses_curve: list[float] = []
    diag = {"conflict": 0.0, "differs": 0.0, "d_over_mean": 0.0, "steps": 0.0}
    diverged = False
    start = time.perf_counter()
    for epoch in range(s.epochs):
        perm = torch.randperm(len(data.y_train), generator=order)
        for b in range(per_epoch):
            idx = perm[b * s.batch : (b + 1) * s.batch]  # (B,)
            x, y = data.x_train[idx], data.y_train[idx]
            loss = _backward(s, grain, data, model, x, y, data.keys_train[idx], diag)
            if not math.isfinite(loss):
                diverged = True
                break
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses_curve.append(loss)
            if averaged is not None and (s.average == "ema" or epoch == s.epochs - 1):
                averaged.update_parameters(model)
        if diverged:
            break
        if on_epoch is not None:
            on_epoch(model)
    if grain is not None:
        grain.close()
    final = averaged.module if averaged is not None else model
    nan = float("nan")
    steps = max(diag.pop("steps"), 1.0)
    record: dict[str, Any] = {
        "val": nan if diverged else evaluate(data, final, data.x_val, data.y_val),
        "test": nan if diverged else evaluate(data, final, data.x_test, data.y_test),
        "diverged": diverged,
        "train_loss": losses_curve[-1] if losses_curve else nan,
        "seconds": time.perf_counter() - start,
        "diagnostics": {k: v / steps for k, v in diag.items()} if grain is not None else None,
    }
    if keep_model:
        record["model"] = final
    return record


def _averaged(model: nn.Module, average: str, decay: float) -> AveragedModel | None:
    if average == "ema":
        return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
    if average == "swa":
        return AveragedModel(model)
    return None


def _backward(
    s: Setting,
    grain: GRAIN | None,
    data: Data,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    keys: Tensor,
    diag: dict[str, float],
) -> float:
    """Fill ``.grad`` for one batch; returns the batch's mean loss (NaN when it diverged)."""
    if grain is None:
        losses = per_sample_losses(data, model, x, y)  # (B,)
        loss = float(losses.detach().mean())
        if math.isfinite(loss):
            losses.mean().backward()
        return loss
    if s.grouping == "micro":
        size = s.batch // s.m
        total = 0.0
        with grain.accumulate() as acc:
            for j in range(s.m):
                part = slice(j * size, (j + 1) * size)
                losses = per_sample_losses(data, model, x[part], y[part])
                total += float(losses.detach().sum())
                grain.backward(losses, groups=torch.zeros(size, dtype=torch.long))
        stats = acc.stats
        loss = total / s.batch
    else:
        losses = per_sample_losses(data, model, x, y)
        loss = float(losses.detach().mean())
        stats = grain.backward(losses, groups=keys if s.grouping == "key" else None)
    if stats is None or stats.skipped:
        return float("nan")
    diag["steps"] += 1
    diag["conflict"] += float(stats.mean_conflict)
    diag["differs"] += float(stats.differs_from_mean)
    ratio = float(stats.d_over_mean)
    diag["d_over_mean"] += ratio if math.isfinite(ratio) else 0.0  # NaN when the mean is 0
    return loss
