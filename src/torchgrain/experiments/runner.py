"""One fine-tuning run: a task, a method (the mean or GRAIN) and a seed -> a result record.

Methods are named ``mean`` (``losses.mean().backward()``), ``grain-m<m>`` (GRAIN with m
contiguous groups of the shuffled batch) and ``grain-m<m>-rescaled`` (GRAIN's direction ``d``
stretched to the mean gradient's norm, which separates the direction from the shorter step).
Everything else is shared: AdamW (weight decay 0.01), linear warm-up over 10% of the steps then
linear decay, gradient clipping at norm 1, the last incomplete batch of an epoch dropped.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from torchgrain import GRAIN
from torchgrain.experiments.tasks import Example, Task

_METHOD = re.compile(r"^(mean|grain-m(\d+)(-rescaled)?)$")


@dataclass(frozen=True)
class Method:
    """A parsed method name."""

    name: str
    groups: int | None  # m; None for the mean
    rescaled: bool = False

    @classmethod
    def parse(cls, name: str) -> Method:
        match = _METHOD.match(name)
        if match is None or (match.group(2) is not None and int(match.group(2)) < 1):
            raise ValueError(
                f"unknown method {name!r}; use 'mean', 'grain-m<m>' (e.g. grain-m8) or "
                "'grain-m<m>-rescaled'"
            )
        groups = int(match.group(2)) if match.group(2) else None
        return cls(name, groups, bool(match.group(3)))


def train(
    task: Task,
    method: Method,
    seed: int,
    *,
    train_set: list[Example] | None = None,
    on_step: Callable[[], None] | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Fine-tune a fresh copy of ``task``'s model; returns the model and the run's record.

    Args:
        train_set: the training examples (default ``task.train``; the stability experiment
            passes a copy with one example swapped).
        on_step: called after every optimizer step (progress bars).
    """
    size = task.size
    examples = task.train if train_set is None else train_set
    if method.groups is not None and method.groups > size.batch:
        raise ValueError(
            f"{method.name} asks for {method.groups} groups but the batch has {size.batch} "
            "samples; use fewer groups"
        )
    torch.manual_seed(seed)  # dropout
    model = task.new_model(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=size.lr, weight_decay=0.01)
    per_epoch = len(examples) // size.batch
    total = per_epoch * size.epochs
    warmup = max(1, total // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))
    )
    grain = GRAIN(model, num_groups=method.groups) if method.groups is not None else None
    order = torch.Generator().manual_seed(seed)
    step_loss: list[float] = []
    evals: list[dict[str, float]] = []
    diag = _Diagnostics()
    start = time.perf_counter()
    for epoch in range(size.epochs):
        perm = torch.randperm(len(examples), generator=order).tolist()
        for b in range(per_epoch):
            batch = task.batch([examples[i] for i in perm[b * size.batch : (b + 1) * size.batch]])
            losses = task.losses(model, batch)  # (B,)
            if grain is None:
                losses.mean().backward()
            else:
                stats = grain.backward(losses)
                diag.add(stats)
                if method.rescaled and float(stats.d_norm) > 0:
                    scale = float(stats.mean_grad_norm / stats.d_norm)
                    for p in params:
                        if p.grad is not None:
                            p.grad.mul_(scale)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step_loss.append(float(losses.detach().float().mean()))
            if on_step is not None:
                on_step()
        if size.eval_each_epoch or epoch == size.epochs - 1:
            evals.append({"epoch": epoch + 1, **task.evaluate(model)})
    seconds = time.perf_counter() - start
    if grain is not None:
        grain.close()
    record = {
        "task": task.name,
        "method": method.name,
        "seed": seed,
        "metric_name": task.metric,
        "metric": evals[-1][task.metric],
        "final": evals[-1],
        "curves": {"train_loss": step_loss, "eval": evals},
        "diagnostics": diag.summary(),
        "seconds": seconds,
        "steps": total,
    }
    return model, record


class _Diagnostics:
    """GRAIN's per-step diagnostics, summed over a run."""

    def __init__(self) -> None:
        self.steps = 0
        self.conflicts = 0
        self.d_over_mean = 0.0
        self.active = 0.0
        self.min_cos = 0.0
        self.solver_seconds = 0.0

    def add(self, stats: Any) -> None:
        if stats.skipped:
            return
        self.steps += 1
        self.conflicts += int(stats.mean_conflict)
        self.d_over_mean += float(stats.d_over_mean)
        self.active += float(stats.active_groups)
        cos = float(stats.min_cos)
        self.min_cos += 0.0 if math.isnan(cos) else cos
        self.solver_seconds += stats.solver_seconds

    def summary(self) -> dict[str, float] | None:
        if self.steps == 0:
            return None
        n = self.steps
        return {
            "steps": n,
            "conflict_share": self.conflicts / n,  # steps where the mean hurt some group
            "d_over_mean": self.d_over_mean / n,  # mean ||d|| / ||mean gradient||
            "active_groups": self.active / n,
            "min_cos": self.min_cos / n,
            "solver_seconds": self.solver_seconds,
        }
