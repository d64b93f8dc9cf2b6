"""The study's statistics: every cell against the mean baseline of its optimizer on the same
seeds, Holm-corrected across cells; ``study.json``, heat maps and a Markdown summary.

Per cell (``n`` reported seeds, paired with the baseline's by seed: the same head and data order):

- ``metric_mean``, ``metric_std`` (ddof 1) of the test metric;
- ``delta_mean`` and ``p_mean``: the mean paired difference and its sign-flip permutation p;
- ``std_ratio``: the cell's std over the baseline's, with a paired bootstrap 95% interval
  (seeds resampled jointly);
- ``p_spread``: a paired permutation test of equal spread: under the null the two runs of a seed
  are exchangeable, so swapping them at random gives the null distribution of
  ``|log(var(a) / var(b))|``;
- ``p_mean_holm``, ``p_spread_holm``: Holm's step-down adjustment over all non-baseline cells
  (each family on its own); a result is called significant when its adjusted p is below 0.05.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from torchgrain.experiments.stats import (
    finite_or_none,
    holm,
    mean_of,
    paired_mean_test,
    paired_spread_test,
    paired_std_ratio_ci,
)
from torchgrain.experiments.study import design, heads
from torchgrain.experiments.study.runner import choose_lr, run_key, val_score

ALPHA = 0.05
VERSION = 1


def analyse(preset_name: str, runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``{"version", "preset", "complete", "cells": [...]}`` for every cell with all its runs."""
    preset = design.PRESETS[preset_name]
    cells = design.cells(preset_name)
    finished: dict[str, dict[str, Any]] = {}
    for cell in cells:
        record = _cell_record(preset, cell, runs)
        if record is not None:
            finished[cell.key] = record
    compare_with_baselines(finished)
    holm_adjust([r for r in finished.values() if "p_mean" in r])
    return {
        "version": VERSION,
        "preset": preset_name,
        "complete": len(finished) == len(cells),
        "cells": list(finished.values()),
    }


def _cell_record(
    preset: design.Preset, cell: design.Cell, runs: dict[str, dict[str, Any]]
) -> dict[str, Any] | None:
    s = cell.setting
    grid = design.lr_grid(preset, s.optimizer)
    selection = [design.SELECTION_SEED0 + i for i in range(preset.selection_seeds)]
    if any(run_key(cell.key, lr, seed) not in runs for lr in grid for seed in selection):
        return None
    lr = choose_lr(cell.key, grid, selection, runs)
    reported = [runs.get(run_key(cell.key, lr, seed)) for seed in range(preset.seeds)]
    if any(r is None for r in reported):
        return None
    per_run = [r for r in reported if r is not None]
    diag = [r["diagnostics"] for r in per_run if r["diagnostics"]]
    return {
        "key": cell.key,
        "baseline": cell.baseline,
        "axis": cell.axis,
        "task": s.task,
        "metric": heads.METRIC[s.task],
        "head": s.head,
        "optimizer": s.optimizer,
        "method": s.method,
        "aggregator": None if s.method == "mean" else s.method,
        "m": heads.KEYS[s.task] if s.grouping == "key" else s.m,  # key: one group per key
        "group_size": "label" if s.grouping == "key" else s.batch // s.m,
        "grouping": s.grouping,
        "noise": s.noise,
        "average": s.average,
        "batch": s.batch,
        "epochs": s.epochs,
        "lr": lr,
        "lr_grid": list(grid),
        "val_by_lr": {
            f"{g:g}": finite_or_none(val_score(cell.key, g, selection, runs)) for g in grid
        },
        "val_metric": finite_or_none(val_score(cell.key, lr, selection, runs)),
        "selection_seeds": selection,
        "seeds": list(range(preset.seeds)),
        **test_summary(per_run),
        "conflict_share": mean_of([d["conflict"] for d in diag]),
        "differs_share": mean_of([d["differs"] for d in diag]),
        "d_over_mean": mean_of([d["d_over_mean"] for d in diag]),
        "seconds": mean_of([r["seconds"] for r in per_run]),
        "runs": [
            {k: r[k] for k in ("seed", "lr", "val", "test", "train_loss", "diverged", "seconds")}
            | {"diagnostics": r["diagnostics"]}
            for r in per_run
        ],
    }


def compare_with_baselines(finished: dict[str, dict[str, Any]]) -> None:
    """Add to every finished cell but a baseline its :func:`compare` with its baseline cell
    (``record["baseline"]``, a key of ``finished``), when that baseline has finished too."""
    for key, record in finished.items():
        base = finished.get(record["baseline"])
        if key != record["baseline"] and base is not None:
            record.update(compare(record, base))


def holm_adjust(family: list[dict[str, Any]]) -> None:
    """Add ``p_mean_holm`` and ``p_spread_holm``: Holm's adjustment across ``family``, each
    p-value on its own."""
    for name in ("p_mean", "p_spread"):
        for r, adjusted in zip(family, holm([r[name] for r in family]), strict=True):
            r[name + "_holm"] = adjusted


def test_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The diverged count and the mean and std (ddof 1) of the test metric over ``runs`` (a
    diverged run's metric is None and is left out)."""
    values = np.array([np.nan if r["test"] is None else r["test"] for r in runs])
    return {
        "diverged": int(np.isnan(values).sum()),
        "metric_mean": finite_or_none(float(np.nanmean(values))),
        "metric_std": finite_or_none(float(np.nanstd(values, ddof=1))),
    }


def compare(cell: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    a = {r["seed"]: r["test"] for r in cell["runs"]}
    b = {r["seed"]: r["test"] for r in base["runs"]}
    seeds = [s for s in a if s in b and a[s] is not None and b[s] is not None]
    va, vb = np.array([a[s] for s in seeds]), np.array([b[s] for s in seeds])
    delta, p_mean = paired_mean_test(va, vb)
    ratio, lo, hi = paired_std_ratio_ci(va, vb)
    corr = float(np.corrcoef(va, vb)[0, 1]) if len(seeds) > 2 else float("nan")
    return {
        "paired_seeds": len(seeds),
        "delta_mean": finite_or_none(delta),
        "p_mean": p_mean,
        "std_ratio": finite_or_none(ratio),
        "std_ratio_ci": [finite_or_none(lo), finite_or_none(hi)],
        "p_spread": paired_spread_test(va, vb),
        "pair_correlation": finite_or_none(corr),
    }


def write_study(out: Path, study: dict[str, Any]) -> Path:
    """``out/study.json``, atomically."""
    path = out / "study.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(study, indent=1))
    tmp.replace(path)
    return path
