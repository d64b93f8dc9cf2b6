"""Empirical uniform stability: train on two datasets that differ in one example, compare.

For pair p: ``D`` is the task's training set and ``D'`` is ``D`` with example ``i_p`` replaced by
a spare example that is in neither split. Both are trained from the same seed (same head, same
data order, same dropout), once per method, and compared by

- the parameter distance ``‖θ_D − θ_D'‖`` over the trained parameters (and relative to
  ``‖θ_D − θ_0‖``, the distance travelled from the pretrained start), and
- the prediction difference on the test set: the mean absolute difference of the predicted
  rating (regression), the mean total-variation distance of the class probabilities
  (classification), or the mean absolute difference of the per-headline NLL (generation).

The paper's bound says GRAIN's difference should be no larger than the mean's, pair for pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchgrain.experiments._progress import bar
from torchgrain.experiments.presets import size_of
from torchgrain.experiments.runner import Method, train
from torchgrain.experiments.stats import paired_mean_test
from torchgrain.experiments.sweep import save_results
from torchgrain.experiments.tasks import Task, load_task

STABILITY = "stability.json"


def stability(
    task_name: str,
    preset: str,
    pairs: int,
    methods: Sequence[str],
    out: Path,
    *,
    device: torch.device,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train every method on ``pairs`` neighbouring datasets; write ``out/stability.json``."""
    parsed = [Method.parse(m) for m in dict.fromkeys(methods)]
    if pairs < 1:
        raise ValueError(f"--pairs must be at least 1, got {pairs}")
    task = load_task(task_name, size_of(preset, task_name), device)
    if pairs > len(task.spare):
        raise ValueError(f"--pairs must be at most {len(task.spare)} (spare examples)")
    records = []
    total = pairs * len(parsed) * 2
    pairs_bar = bar(range(total), progress, f"stability {task_name}")
    for p in range(pairs):
        start = {n: w.detach().cpu().clone() for n, w in task.new_model(p).named_parameters()}
        i = int(torch.randint(len(task.train), (), generator=torch.Generator().manual_seed(p)))
        neighbour = list(task.train)
        neighbour[i] = task.spare[p]
        for method in parsed:
            model_a, _ = train(task, method, seed=p, train_set=task.train)
            pairs_bar.update(1)
            model_b, _ = train(task, method, seed=p, train_set=neighbour)
            pairs_bar.update(1)
            records.append(
                {"task": task_name, "method": method.name, "pair": p, "swapped_index": i}
                | _compare(task, model_a, model_b, start)
            )
        # after every pair, atomically: an interrupted experiment keeps its finished pairs
        save_results(out, {"preset": preset, "task": task_name, "records": records}, STABILITY)
    pairs_bar.close()
    return records


def _compare(task: Task, a: torch.nn.Module, b: torch.nn.Module, start: dict) -> dict[str, float]:
    dist, travel = 0.0, 0.0
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        if pa.requires_grad:
            dist += float((pa.detach() - pb.detach()).double().pow(2).sum())
            travel += float((pa.detach().cpu() - start[name]).double().pow(2).sum())
    pred_a, pred_b = task.predictions(a, task.test), task.predictions(b, task.test)
    if task.name == "classification":
        diff = 0.5 * (pred_a - pred_b).abs().sum(1).mean()
    elif task.name == "regression":
        diff = (pred_a - pred_b).abs().mean() * task.extra["target_std"]
    else:
        diff = (pred_a - pred_b).abs().mean()
    return {
        "param_distance": dist**0.5,
        "relative_distance": (dist / travel) ** 0.5 if travel > 0 else float("nan"),
        "prediction_difference": float(diff),
    }


def stability_table(records: list[dict[str, Any]]) -> str:
    """Mean ± std over pairs per method, and each method's paired ratio to the mean's."""
    methods = list(dict.fromkeys(r["method"] for r in records))
    keys = ("param_distance", "relative_distance", "prediction_difference")
    lines = [
        f"  {'method':<20} {'pairs':>5} {'‖θ−θ′‖':>17} {'relative':>17} {'Δprediction':>19} "
        f"{'Δpred vs mean (p)':>19}"
    ]
    base = {r["pair"]: r for r in records if r["method"] == "mean"}
    for m in methods:
        rows = sorted((r for r in records if r["method"] == m), key=lambda r: r["pair"])
        cells = []
        for k in keys:
            v = np.array([r[k] for r in rows])
            cells.append(f"{v.mean():.4g} ± {v.std(ddof=1) if len(v) > 1 else 0:.2g}")
        vs = "—"
        shared = [r for r in rows if r["pair"] in base]
        if m != "mean" and shared:
            a = np.array([r["prediction_difference"] for r in shared])
            b = np.array([base[r["pair"]]["prediction_difference"] for r in shared])
            _, p = paired_mean_test(a, b)
            vs = f"{a.mean() / b.mean():.2f}x ({p:.2f})" if b.mean() > 0 else "—"
        lines.append(
            f"  {m:<20} {len(rows):>5} {cells[0]:>17} {cells[1]:>17} {cells[2]:>19} {vs:>19}"
        )
    return "\n".join(lines)
