"""The statistics of the local SGD experiment (:mod:`.local_sgd`), as the study computes them.

Per (task, H, method), over the reported seeds at the method's chosen outer lr: the test metric's
mean and std (ddof 1). Every aggregator against the mean of the same task and H, each at its own
chosen lr, paired by seed (:func:`torchgrain.experiments.study.analysis.compare`): the mean paired
difference with its sign-flip permutation p, the std ratio with its paired bootstrap 95% interval
and the paired permutation spread test's p; both p-values Holm-adjusted over all the comparisons
(each family on its own). The spread test is miscalibrated when the two means differ (issue 26):
read its p beside the mean's.
"""

from __future__ import annotations

from typing import Any

from torchgrain.experiments.stats import finite_or_none, mean_of
from torchgrain.experiments.study import local_sgd as ex
from torchgrain.experiments.study.analysis import compare, holm_adjust, test_summary
from torchgrain.experiments.study.heads import METRIC
from torchgrain.experiments.study.runner import run_key, val_score

VERSION = 1


def analyse(
    preset: ex.Preset,
    name: str,
    runs: dict[str, dict[str, Any]],
    world: int,
    shards: dict[str, list[dict[str, Any]]],
) -> dict[str, Any]:
    """``results.json``: the setup, each rank's shard and one record per finished cell."""
    finished: dict[tuple[str, int, str], dict[str, Any]] = {}
    for task, h, method in ex.cells(preset):
        record = _cell(preset, task, h, method, runs)
        if record is not None:
            finished[task, h, method] = record
    family = []
    for (task, h, method), record in finished.items():
        base = finished.get((task, h, "mean"))
        if method != "mean" and base is not None:
            record.update(compare(record, base))
            family.append(record)
    holm_adjust(family)
    return {
        "version": VERSION,
        "preset": name,
        "complete": len(finished) == len(ex.cells(preset)),
        "setup": {
            "world": world,
            "inner": {"optimizer": "AdamW", "lr": ex.INNER_LR, "weight_decay": ex.WEIGHT_DECAY},
            "outer": {"optimizer": "SGD", "momentum": ex.MOMENTUM, "nesterov": True},
            "steps": preset.steps,
            "batch": preset.batch,
            "train": preset.train,
            "val": preset.val,
            "home_share": ex.HOME_SHARE,
            "ladder": list(ex.LADDER),
            "grid": list(preset.grid),
            "selection_seeds": ex.selection_seeds(preset),
            "seeds": list(range(preset.seeds)),
        },
        "shards": shards,
        "cells": list(finished.values()),
    }


def _cell(
    preset: ex.Preset, task: str, h: int, method: str, runs: dict[str, dict[str, Any]]
) -> dict[str, Any] | None:
    cell = ex.cell_key(preset, task, h, method)
    grid, lr, reason = ex.select(preset, cell, runs)
    if lr is None:
        return None
    reported = [runs.get(run_key(cell, lr, s)) for s in range(preset.seeds)]
    per_run = [r for r in reported if r is not None]
    if len(per_run) < preset.seeds:
        return None
    seeds = ex.selection_seeds(preset)
    return {
        "key": cell,
        "task": task,
        "metric": METRIC[task],
        "H": h,
        "method": method,
        "lr": lr,
        "lr_grid": sorted(grid),
        "lr_edge_reason": reason,
        "val_by_lr": {f"{g:g}": finite_or_none(val_score(cell, g, seeds, runs)) for g in grid},
        **test_summary(per_run),
        "conflict_share": mean_of([r["conflict"] for r in per_run]),
        "d_over_mean": mean_of([r["d_over_mean"] for r in per_run]),
        "seconds": mean_of([r["seconds"] for r in per_run]),
        "runs": [
            {k: r[k] for k in ("seed", "lr", "val", "test", "diverged", "conflict", "d_over_mean")}
            for r in per_run
        ],
    }


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(results: dict[str, Any]) -> str:
    """One table row per cell; p-values with their Holm adjustment in brackets."""
    lines = [
        "| task (metric) | H | method | outer lr | test mean ± std | Δ vs mean | p [Holm] | "
        "std ratio [95% CI] | spread p [Holm] | mean conflicts | ‖d‖/‖mean‖ |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in results["cells"]:
        lr = f"{c['lr']:g}" + ("*" if c["lr_edge_reason"] else "")
        row = [f"{c['task']} ({c['metric']})", str(c["H"]), c["method"], lr,
               f"{_num(c['metric_mean'])} ± {_num(c['metric_std'])}"]  # fmt: skip
        if "p_mean" in c:
            lo, hi = c["std_ratio_ci"]
            row += [
                f"{c['delta_mean']:+.4f}",
                f"{c['p_mean']:.3f} [{c['p_mean_holm']:.3f}]",
                f"{_num(c['std_ratio'], 2)} [{_num(lo, 2)}, {_num(hi, 2)}]",
                f"{c['p_spread']:.3f} [{c['p_spread_holm']:.3f}]",
            ]
        else:
            row += ["(baseline)", "", "", ""]
        row += [_num(c["conflict_share"], 2), _num(c["d_over_mean"], 2)]
        if c["diverged"]:
            row[4] += f" ({c['diverged']} diverged)"
        lines.append("| " + " | ".join(row) + " |")
    notes = [f"- {c['key']} at {c['lr']:g}: {c['lr_edge_reason']}"
             for c in results["cells"] if c["lr_edge_reason"]]  # fmt: skip
    if notes:
        lines += ["", "\\* the best outer lr was at an edge of the grid, which grew:", *notes]
    return "\n".join(lines) + "\n"
