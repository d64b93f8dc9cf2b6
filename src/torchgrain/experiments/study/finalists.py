"""The study's expensive task: the cells that the cheap tasks single out, on SmolLM2.

The cheap tasks (``docs/study.md``) found group aggregation worth having only where the mean's
runs were unsteady: SGD with momentum, per-sample or small groups, where UPGrad and DualProj
were steadier and better, and where an EMA of the mean's weights did as well. AdamW was the
other side: no aggregator was worth it there. The finalists put exactly those cells to the
generation task of ``torchgrain reproduce`` (SmolLM2-135M-Instruct fine-tuned to write BBC News
headlines, its last layers trained), with the study's protocol:

- every (optimizer, method) trains once per rate and seed, and is scored both as trained and as
  an EMA of its weights (decay ``1 - 1 / (steps per epoch)``), so that "mean + EMA" is the mean's
  own runs averaged, paired seed by seed;
- each cell (optimizer, method, averaging) chooses its constant rate on a validation split
  carved from the training pool (``Task.val``), over selection seeds 10000+, from a grid that
  grows past whichever end wins (:func:`cell_grid`), then runs the reported seeds 0..n-1 on the
  test split;
- no warm-up, decay or clipping (as for the heads: the rate is each method's own, and clipping
  would hide the length of a shorter step);
- every cell is compared with its optimizer's plain mean on the same seeds (paired tests, Holm
  across the finalists' cells), and each aggregator's cell also with the mean of the same
  averaging trained at its rate (``same_rate``: the rule apart from its rate). Perplexity: lower
  is better.

Runs are appended to ``DIR/finalists-runs.jsonl`` as they finish, so an interrupted run resumes;
``DIR/finalists.json``, ``finalists.md`` and ``finalists.png`` are the results.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from torchgrain.experiments._progress import bar
from torchgrain.experiments.presets import size_of
from torchgrain.experiments.runner import Method, Recipe, train
from torchgrain.experiments.stats import finite_or_none, mean_of
from torchgrain.experiments.study.analysis import (
    compare,
    compare_with_baselines,
    holm_adjust,
    test_summary,
)
from torchgrain.experiments.study.design import SELECTION_SEED0
from torchgrain.experiments.study.runner import (
    JsonlAppender,
    choose_lr,
    read_jsonl,
    run_key,
    val_score,
)
from torchgrain.experiments.tasks import Task, load_task

VERSION = 1
TASK = "generation"
# What trains: (optimizer, reproduce method); every one is scored raw and with EMA. m = 8 is the
# batch of 8: per-sample groups, the cheap tasks' clearest case.
TRAINED = (
    ("sgdm", "mean"),
    ("sgdm", "upgrad-m8"),
    ("sgdm", "dualproj-m8"),
    ("adamw", "mean"),
    ("adamw", "upgrad-m8"),
)
OPTIMIZERS = tuple(dict.fromkeys(opt for opt, _ in TRAINED))
AVERAGES = ("none", "ema")
# Constant rates, in order. Each cell starts from ``lr_points`` of them around ``CENTRE`` and,
# while its best rate is at an end of what it tried and a further rate exists, tries that one too
# (so that no cell's rate is cut off by the grid). SGD with momentum, unclipped, is narrow on this
# task: a probe of the mean on selection seed 10000 gave validation perplexity 83 at 0.003, 78 at
# 0.01 and 3e4 (diverged) at 0.03. AdamW's centre is the reproduction's 1e-4.
LR_GRIDS = {
    "sgdm": (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1),
    "adamw": (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3),
}
CENTRE = {"sgdm": 0.01, "adamw": 1e-4}


@dataclass(frozen=True)
class FinalistPreset:
    size: str  # the reproduce preset that sizes the generation task
    val: int  # validation examples carved from the training pool
    selection_seeds: int
    seeds: int  # reported seeds
    lr_points: int


PRESETS = {
    "smoke": FinalistPreset("smoke", val=16, selection_seeds=1, seeds=2, lr_points=2),
    "default": FinalistPreset("default", val=64, selection_seeds=2, seeds=10, lr_points=3),
    "full": FinalistPreset("full", val=200, selection_seeds=2, seeds=20, lr_points=4),
    # The test suite's: a random two-layer Llama, in seconds.
    "tiny": FinalistPreset("tiny", val=8, selection_seeds=1, seeds=3, lr_points=2),
}


@dataclass(frozen=True)
class FinalistCell:
    optimizer: str
    method: str  # a reproduce method name
    average: str

    @property
    def key(self) -> str:
        return f"{TASK}/{self.optimizer}/{self.method}/{self.average}"

    @property
    def baseline(self) -> str:
        return FinalistCell(self.optimizer, "mean", "none").key


def finalist_cells() -> list[FinalistCell]:
    """Every cell, each optimizer's baseline first."""
    return [FinalistCell(opt, method, avg) for opt, method in TRAINED for avg in AVERAGES]


def lr_grid(preset: FinalistPreset, optimizer: str) -> tuple[float, ...]:
    """The rates every cell of ``optimizer`` starts from: ``lr_points`` of the grid, the centre
    and its neighbours (one more below than above when even)."""
    grid = LR_GRIDS[optimizer]
    start = grid.index(CENTRE[optimizer]) - preset.lr_points // 2
    return grid[start : start + preset.lr_points]


def cell_grid(
    preset: FinalistPreset, cell: FinalistCell, runs: dict[str, dict[str, Any]]
) -> tuple[float, ...]:
    """The rates ``cell`` tries: :func:`lr_grid`, extended one rate at a time past whichever end
    holds the best validation score, while the optimizer's grid goes on. Returns as soon as a
    rate's selection runs are missing (those are the next to run)."""
    full = LR_GRIDS[cell.optimizer]
    start = lr_grid(preset, cell.optimizer)
    lo, hi = full.index(start[0]), full.index(start[-1]) + 1
    chosen = selection_seeds(preset)
    while True:
        grid = full[lo:hi]
        if any(run_key(cell.key, lr, s) not in runs for lr in grid for s in chosen):
            return grid
        best = choose_lr(cell.key, grid, chosen, runs, higher_is_better=False)
        if best == grid[0] and lo > 0:
            lo -= 1
        elif best == grid[-1] and hi < len(full):
            hi += 1
        else:
            return grid


def selection_seeds(preset: FinalistPreset) -> list[int]:
    return [SELECTION_SEED0 + i for i in range(preset.selection_seeds)]


def load_finalist_runs(out: Path) -> dict[str, dict[str, Any]]:
    return {r["key"]: r for r in read_jsonl(out, "finalists-runs.jsonl")}


def run_finalists(
    preset_name: str,
    out: Path,
    *,
    device: torch.device | str = "cpu",
    progress: bool = True,
    max_runs: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Run (or resume) the finalists; returns every finished run record, by key."""
    if preset_name not in PRESETS:
        raise ValueError(f"unknown study preset {preset_name!r}; choose one of {list(PRESETS)}")
    preset = PRESETS[preset_name]
    out.mkdir(parents=True, exist_ok=True)
    runs = load_finalist_runs(out)
    task: Task | None = None
    new = 0
    shown = bar(range(_planned(preset)), progress, f"finalists {preset_name}")
    shown.update(min(sum(1 for _ in _done_trainings(runs)), _planned(preset)))
    jobs = [
        (opt, method, functools.partial(_pending, preset, opt, method)) for opt, method in TRAINED
    ]
    jobs += [(opt, "mean", functools.partial(_controls, preset, opt)) for opt in OPTIMIZERS]
    try:
        with JsonlAppender(out / "finalists-runs.jsonl") as sink:
            for optimizer, method, pending in jobs:
                # The selection runs exist before a cell's reported rate can be known: pending
                # is recomputed after each run.
                while (todo := next(pending(runs), None)) is not None:
                    if max_runs is not None and new >= max_runs:
                        return runs
                    if task is None:
                        task = load_task(TASK, size_of(preset.size, TASK), device, val=preset.val)
                    lr, seed = todo
                    for record in _one(task, optimizer, method, lr, seed):
                        runs[record["key"]] = record
                        sink.write(record)
                    new += 1
                    shown.update(1)
    finally:
        shown.close()
    return runs


def _planned(preset: FinalistPreset) -> int:
    """Trainings at least (more when a grid is extended, or raw and EMA choose different
    rates)."""
    return sum(
        len(lr_grid(preset, opt)) * preset.selection_seeds + preset.seeds for opt, _ in TRAINED
    )


def _done_trainings(runs: dict[str, dict[str, Any]]) -> Iterator[str]:
    for key in runs:
        if key.split("|")[0].endswith("/none"):
            yield key


def _pending(
    preset: FinalistPreset, optimizer: str, method: str, runs: dict[str, dict[str, Any]]
) -> Iterator[tuple[float, int]]:
    """(rate, seed) trainings still to run for ``optimizer``/``method``: selection first (each
    averaging's grid, extended as :func:`cell_grid` says), then the reported seeds at each
    averaging's chosen rate."""
    cells = [FinalistCell(optimizer, method, avg) for avg in AVERAGES]
    chosen = selection_seeds(preset)
    grids = [cell_grid(preset, cell, runs) for cell in cells]
    for lr in sorted({lr for grid in grids for lr in grid}):
        for seed in chosen:
            if any(run_key(c.key, lr, seed) not in runs for c in cells):
                yield lr, seed
    for cell, grid in zip(cells, grids, strict=True):
        lr = choose_lr(cell.key, grid, chosen, runs, higher_is_better=False)
        for seed in range(preset.seeds):
            if run_key(cell.key, lr, seed) not in runs:
                yield lr, seed


def chosen_rate(
    preset: FinalistPreset, cell: FinalistCell, runs: dict[str, dict[str, Any]]
) -> float | None:
    """The cell's rate, or None while its selection runs are missing."""
    grid = cell_grid(preset, cell, runs)
    chosen = selection_seeds(preset)
    if any(run_key(cell.key, lr, s) not in runs for lr in grid for s in chosen):
        return None
    return choose_lr(cell.key, grid, chosen, runs, higher_is_better=False)


def _controls(
    preset: FinalistPreset, optimizer: str, runs: dict[str, dict[str, Any]]
) -> Iterator[tuple[float, int]]:
    """The mean's trainings at every rate an aggregator's cell of ``optimizer`` chose, on the
    reported seeds: the mean with the same averaging at the same rate separates the effect of
    the rule from the effect of its rate."""
    for opt, method in TRAINED:
        if opt != optimizer or method == "mean":
            continue
        for average in AVERAGES:
            rate = chosen_rate(preset, FinalistCell(opt, method, average), runs)
            if rate is None:
                continue
            mean = FinalistCell(opt, "mean", average).key
            for seed in range(preset.seeds):
                if run_key(mean, rate, seed) not in runs:
                    yield rate, seed


def _one(task: Task, optimizer: str, method: str, lr: float, seed: int) -> list[dict[str, Any]]:
    """One training, scored raw and with EMA: on the validation split for a selection seed,
    else on the test split; one record per averaging."""
    selection = seed >= SELECTION_SEED0
    recipe = Recipe(optimizer, lr, constant=True, clip=None, ema=True)
    _, result = train(
        task, Method.parse(method), seed, recipe=recipe, eval_set=task.val if selection else None
    )
    scores = {"none": result["metric"], "ema": result["ema"][task.metric]}
    records = []
    for average in AVERAGES:
        cell = FinalistCell(optimizer, method, average)
        metric = finite_or_none(scores[average])
        records.append({
            "key": run_key(cell.key, lr, seed),
            "cell": cell.key,
            "lr": lr,
            "seed": seed,
            "selection": selection,
            "val": metric if selection else None,
            "test": None if selection else metric,
            "diverged": result["diverged"],
            "train_loss": finite_or_none(result["curves"]["train_loss"][-1]),
            "seconds": result["seconds"],
            "diagnostics": result["diagnostics"],
        })  # fmt: skip
    return records


# ---------------------------------------------------------------------------------- analysis
def analyse_finalists(preset_name: str, runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``{"version", "preset", "task", "complete", "cells": [...]}``; cells as in study.json,
    perplexity lower is better (a negative ``delta_mean`` is an improvement)."""
    preset = PRESETS[preset_name]
    cells = finalist_cells()
    finished = {}
    for cell in cells:
        record = _cell_record(preset, cell, runs)
        if record is not None:
            finished[cell.key] = record
    compare_with_baselines(finished)
    for record in finished.values():
        if record["method"] != "mean":
            control = _same_rate(preset, record, runs)
            if control is not None:
                record["same_rate"] = control
    holm_adjust([r for r in finished.values() if "p_mean" in r])
    holm_adjust([r["same_rate"] for r in finished.values() if "same_rate" in r])  # own family
    size = size_of(preset.size, TASK)
    return {
        "version": VERSION,
        "preset": preset_name,
        "task": TASK,
        "model": "a random two-layer Llama (test only)" if size.tiny else "SmolLM2-135M-Instruct",
        "size": size.to_dict(),
        "val": preset.val,
        "complete": len(finished) == len(cells),
        "cells": list(finished.values()),
    }


def _cell_record(
    preset: FinalistPreset, cell: FinalistCell, runs: dict[str, dict[str, Any]]
) -> dict[str, Any] | None:
    grid = cell_grid(preset, cell, runs)
    chosen = selection_seeds(preset)
    lr = chosen_rate(preset, cell, runs)
    if lr is None:
        return None
    reported = [runs.get(run_key(cell.key, lr, seed)) for seed in range(preset.seeds)]
    if any(r is None for r in reported):
        return None
    per_run = [r for r in reported if r is not None]
    diag = [r["diagnostics"] for r in per_run if r["diagnostics"]]
    method = Method.parse(cell.method)

    def score(rate: float) -> float | None:  # mean validation perplexity (None: diverged)
        value = val_score(cell.key, rate, chosen, runs, higher_is_better=False)
        return finite_or_none(-value)

    return {
        "key": cell.key,
        "baseline": cell.baseline,
        "task": TASK,
        "metric": "perplexity",
        "optimizer": cell.optimizer,
        "method": cell.method,
        "aggregator": None if method.groups is None else method.aggregator,
        "m": method.groups,
        "group_size": None
        if method.groups is None
        else size_of(preset.size, TASK).batch // method.groups,
        "grouping": "contiguous",
        "noise": 0.0,
        "average": cell.average,
        "lr": lr,
        "lr_grid": list(grid),
        # at an end of the optimizer's whole grid (cell_grid extends past any other end)
        "lr_at_edge": lr in (LR_GRIDS[cell.optimizer][0], LR_GRIDS[cell.optimizer][-1]),
        "val_by_lr": {f"{g:g}": score(g) for g in grid},
        "val_metric": score(lr),
        "selection_seeds": chosen,
        "seeds": list(range(preset.seeds)),
        **test_summary(per_run),
        "differs_share": mean_of([d["differs_share"] for d in diag]),
        "mean_distance": mean_of([d["mean_distance"] for d in diag]),
        "seconds": mean_of([r["seconds"] for r in per_run]),
        "runs": [
            {k: r[k] for k in ("seed", "lr", "test", "train_loss", "diverged", "seconds")}
            | {"diagnostics": r["diagnostics"]}
            for r in per_run
        ],
    }


def _same_rate(
    preset: FinalistPreset, record: dict[str, Any], runs: dict[str, dict[str, Any]]
) -> dict[str, Any] | None:
    """``record`` against the mean with the same averaging at the same rate (its control runs),
    or None while those are missing."""
    mean = FinalistCell(record["optimizer"], "mean", record["average"]).key
    control = [runs.get(run_key(mean, record["lr"], seed)) for seed in range(preset.seeds)]
    if any(r is None for r in control):
        return None
    summary = test_summary([r for r in control if r is not None])
    del summary["diverged"]
    return {"baseline": mean, "lr": record["lr"], **summary, **compare(record, {"runs": control})}


def write_finalists(out: Path, result: dict[str, Any]) -> list[Path]:
    """``finalists.json`` (atomically), ``finalists.md`` and ``finalists.png``."""
    from torchgrain.experiments.study import report

    path = out / "finalists.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    (out / "finalists.md").write_text(report.finalists_markdown(result))
    written = [path, out / "finalists.md"]
    plot = report.finalists_plot(result, out)
    return written + ([plot] if plot is not None else [])
