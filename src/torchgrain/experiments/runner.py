"""One fine-tuning run: a task, a method (the mean or GRAIN) and a seed -> a result record.

Methods are named ``mean`` (``losses.mean().backward()``), ``grain-m<m>`` (GRAIN's min-norm
step with m contiguous groups of the shuffled batch), ``dualproj-m<m>``, ``upgrad-m<m>`` and
``cagrad-m<m>`` (the same groups, combined by that aggregator), and any of these with
``-rescaled`` (the direction ``d`` stretched to the mean gradient's norm, which separates the
direction from the shorter step).
Everything else is shared: AdamW (weight decay 0.01), linear warm-up over 10% of the steps then
linear decay, gradient clipping at norm 1, the last incomplete batch of an epoch dropped. The
study's generation finalists (``study/finalists.py``) change these through :class:`Recipe`: SGD
with momentum, a constant rate of their own choice, no clipping, and an EMA of the weights.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from torchgrain import GRAIN
from torchgrain.experiments.study.train import make_optimizer
from torchgrain.experiments.tasks import Example, Task

# Method-name prefix -> GRAIN's aggregator.
AGGREGATOR_OF = {
    "grain": "min_norm",
    "dualproj": "dual_proj",
    "upgrad": "upgrad",
    "cagrad": "cagrad",
}
_METHOD = re.compile(r"^(mean|(" + "|".join(AGGREGATOR_OF) + r")-m(\d+)(-rescaled)?)$")


@dataclass(frozen=True)
class Method:
    """A parsed method name."""

    name: str
    groups: int | None  # m; None for the mean
    rescaled: bool = False
    aggregator: str = "min_norm"

    @classmethod
    def parse(cls, name: str) -> Method:
        match = _METHOD.match(name)
        if match is None or (match.group(3) is not None and int(match.group(3)) < 1):
            raise ValueError(
                f"unknown method {name!r}; use 'mean', 'grain-m<m>' (the min-norm point, e.g. "
                "grain-m8), 'dualproj-m<m>', 'upgrad-m<m>' or 'cagrad-m<m>', each optionally "
                "followed by -rescaled"
            )
        if match.group(2) is None:
            return cls(name, None)
        return cls(name, int(match.group(3)), bool(match.group(4)), AGGREGATOR_OF[match.group(2)])


@dataclass(frozen=True)
class Recipe:
    """How a run optimizes: the reproduction's recipe by default.

    ``lr`` None is the size's rate; ``constant`` drops the warm-up and decay; ``clip`` None drops
    the clipping; ``ema`` also evaluates an exponential moving average of the weights, decay
    ``1 - 1 / (steps per epoch)`` (as in the study's heads), into the record's ``ema`` entry.
    """

    optimizer: str = "adamw"  # adamw (weight decay 0.01), sgdm (momentum 0.9) or sgd
    lr: float | None = None
    constant: bool = False
    clip: float | None = 1.0
    ema: bool = False


def train(
    task: Task,
    method: Method,
    seed: int,
    *,
    train_set: list[Example] | None = None,
    on_step: Callable[[], None] | None = None,
    recipe: Recipe = Recipe(),
    eval_set: list[Example] | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Fine-tune a fresh copy of ``task``'s model; returns the model and the run's record.

    Args:
        train_set: the training examples (default ``task.train``; the stability experiment
            passes a copy with one example swapped).
        on_step: called after every optimizer step (progress bars).
        recipe: the optimizer, rate, schedule, clipping and weight averaging.
        eval_set: the examples the metric is measured on (default ``task.test``; the study's
            learning-rate choice passes ``task.val``).
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
    lr = size.lr if recipe.lr is None else recipe.lr
    optimizer = make_optimizer(recipe.optimizer, params, lr)
    per_epoch = len(examples) // size.batch
    total = per_epoch * size.epochs
    warmup = max(1, total // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        (lambda s: 1.0)
        if recipe.constant
        else (lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))),
    )
    averaged = (
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(1.0 - 1.0 / max(per_epoch, 2)))
        if recipe.ema
        else None
    )
    grain = (
        GRAIN(model, num_groups=method.groups, aggregator=method.aggregator)
        if method.groups is not None
        else None
    )
    order = torch.Generator().manual_seed(seed)
    step_loss: list[float] = []
    evals: list[dict[str, float]] = []
    diag = _Diagnostics()
    start = time.perf_counter()
    diverged = False
    for epoch in range(size.epochs):
        perm = torch.randperm(len(examples), generator=order).tolist()
        for b in range(per_epoch):
            batch = task.batch([examples[i] for i in perm[b * size.batch : (b + 1) * size.batch]])
            losses = task.losses(model, batch)  # (B,)
            step_loss.append(float(losses.detach().float().mean()))
            if not math.isfinite(step_loss[-1]):  # diverged: no step on a non-finite loss
                diverged = True
                break
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
            if recipe.clip is not None:
                torch.nn.utils.clip_grad_norm_(params, recipe.clip)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if averaged is not None:
                averaged.update_parameters(model)
            if on_step is not None:
                on_step()
        if diverged:
            evals.append({"epoch": epoch + 1, task.metric: math.nan})
            break
        if size.eval_each_epoch or epoch == size.epochs - 1:
            evals.append({"epoch": epoch + 1, **task.evaluate(model, eval_set)})
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
        "diverged": diverged,
    }
    if averaged is not None:
        record["ema"] = (
            {task.metric: math.nan} if diverged else task.evaluate(averaged.module, eval_set)
        )
    return model, record


class _Diagnostics:
    """GRAIN's per-step diagnostics, summed over a run."""

    def __init__(self) -> None:
        self.steps = 0
        self.conflicts = 0
        self.differs = 0
        self.mean_distance = 0.0
        self.distances = 0
        self.d_over_mean = 0.0
        self.active = 0.0
        self.min_cos = 0.0
        self.solver_seconds = 0.0

    def add(self, stats: Any) -> None:
        if stats.skipped:
            return
        self.steps += 1
        self.conflicts += int(stats.mean_conflict)
        self.differs += int(stats.differs_from_mean)
        distance = float(stats.mean_distance)
        if math.isfinite(distance):  # NaN when the mean gradient is 0
            self.mean_distance += distance
            self.distances += 1
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
            "differs_share": self.differs / n,  # steps where the step was not the mean's
            # mean ||d - mean|| / ||mean|| over the steps where the mean gradient was not 0
            "mean_distance": self.mean_distance / max(self.distances, 1),
            "d_over_mean": self.d_over_mean / n,  # mean ||d|| / ||mean gradient||
            "active_groups": self.active / n,
            "min_cos": self.min_cos / n,
            "solver_seconds": self.solver_seconds,
        }
