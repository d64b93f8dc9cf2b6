"""The statistics of the local SGD experiment (:mod:`.local_sgd`), as the study computes them.

Per (task, H, method), over the reported seeds at the method's chosen outer lr: the test metric's
mean and std (ddof 1). Every aggregator against the mean of the same task and H, paired by seed
(:func:`torchgrain.experiments.study.analysis.compare`), twice: with each at its own chosen lr,
and (``same_lr``) with the mean rerun at the aggregator's lr. Each comparison gives the mean
paired difference with its sign-flip permutation p, the std ratio with its paired bootstrap 95%
interval, and the paired permutation spread test's p; p-values are Holm-adjusted over the
comparisons of one kind (four families: mean and spread, own lr and same lr). The spread test is
the study's :func:`~torchgrain.experiments.stats.paired_spread_test` (since issue 26 a
Pitman-Morgan permutation test, which holds its level when the two means differ).
"""

from __future__ import annotations

from typing import Any

from torchgrain.experiments.stats import finite_or_none, mean_of
from torchgrain.experiments.study import local_sgd as ex
from torchgrain.experiments.study.analysis import compare, holm_adjust, test_summary
from torchgrain.experiments.study.heads import KEYS, METRIC, Data
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
    same = [_same_lr(preset, record, runs) for record in family]
    holm_adjust([c for c in same if c is not None])
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


def composition(data: Data, world: int) -> list[dict[str, Any]]:
    """Each rank's shard: its size, its own keys and their share of it."""
    out = []
    for r, shard in enumerate(ex.deal(data.keys_train, world)):
        own = [k for k in range(KEYS[data.task]) if k % world == r]
        share = float((data.keys_train[shard] % world == r).float().mean())
        out.append({"rank": r, "examples": len(shard), "own_keys": own, "own_share": share})
    return out


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


def _same_lr(
    preset: ex.Preset, record: dict[str, Any], runs: dict[str, dict[str, Any]]
) -> dict[str, Any] | None:
    """``record["same_lr"]``: the aggregator against the mean at the aggregator's chosen lr."""
    mean = ex.cell_key(preset, record["task"], record["H"], "mean")
    at_lr = [runs.get(run_key(mean, record["lr"], s)) for s in range(preset.seeds)]
    if any(r is None for r in at_lr):
        return None
    base = {"runs": [r for r in at_lr if r is not None]}
    summary = test_summary(base["runs"])
    record["same_lr"] = {
        "lr": record["lr"],
        "mean_metric_mean": summary["metric_mean"],
        "mean_metric_std": summary["metric_std"],
        **compare(record, base),
    }
    return record["same_lr"]


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _compared(q: dict[str, Any]) -> list[str]:
    """Δ, p [Holm], std ratio [95% CI] and spread p [Holm] of one comparison."""
    lo, hi = q["std_ratio_ci"]
    return [
        f"{q['delta_mean']:+.4f}",
        f"{q['p_mean']:.3f} [{q['p_mean_holm']:.3f}]",
        f"{_num(q['std_ratio'], 2)} [{_num(lo, 2)}, {_num(hi, 2)}]",
        f"{q['p_spread']:.3f} [{q['p_spread_holm']:.3f}]",
    ]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown(results: dict[str, Any]) -> str:
    """Two tables, one row per cell (p-values with their Holm adjustment in brackets): against
    the mean at its own chosen lr, then against the mean rerun at the aggregator's lr."""
    lines = [
        "| task (metric) | H | method | outer lr | test mean ± std | Δ vs mean | p [Holm] | "
        "std ratio [95% CI] | spread p [Holm] | mean conflicts | ‖d‖/‖mean‖ |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in results["cells"]:
        lr = f"{c['lr']:g}" + ("*" if c["lr_edge_reason"] else "")
        test = f"{_num(c['metric_mean'])} ± {_num(c['metric_std'])}"
        test += f" ({c['diverged']} diverged)" if c["diverged"] else ""
        compared = _compared(c) if "p_mean" in c else ["(baseline)", "", "", ""]
        diag = [_num(c["conflict_share"], 2), _num(c["d_over_mean"], 2)]
        lines.append(_row([f"{c['task']} ({c['metric']})", str(c["H"]), c["method"], lr, test,
                           *compared, *diag]))  # fmt: skip
    same = [c for c in results["cells"] if "same_lr" in c]
    if same:
        lines += [
            "",
            "Against the mean rerun at the aggregator's outer lr:",
            "",
            "| task | H | method | outer lr | the mean there | the method | Δ | p [Holm] | "
            "std ratio [95% CI] | spread p [Holm] |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
    for c in same:
        q = c["same_lr"]
        there = f"{_num(q['mean_metric_mean'])} ± {_num(q['mean_metric_std'])}"
        mine = f"{_num(c['metric_mean'])} ± {_num(c['metric_std'])}"
        lines.append(_row([c["task"], str(c["H"]), c["method"], f"{c['lr']:g}", there, mine,
                           *_compared(q)]))  # fmt: skip
    notes = [f"- {c['key']} at {c['lr']:g}: {c['lr_edge_reason']}"
             for c in results["cells"] if c["lr_edge_reason"]]  # fmt: skip
    if notes:
        lines += ["", "\\* the best outer lr was at an edge of the grid, which grew:", *notes]
    return "\n".join(lines) + "\n"
