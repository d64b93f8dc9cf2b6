"""Tables, CSV files and PNG plots made from ``results.json``'s run records."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

from torchgrain.experiments.stats import paired_mean_test, spread_test, std_ratio_ci

BASELINE = "mean"
_DIAG = ("conflict_share", "d_over_mean", "active_groups")


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, method): mean ± std, spread ratio and tests against the mean baseline."""
    rows = []
    for task in dict.fromkeys(r["task"] for r in runs):
        of_task = [r for r in runs if r["task"] == task]
        by_method: dict[str, dict[int, float]] = {}
        for r in of_task:
            by_method.setdefault(r["method"], {})[r["seed"]] = r["metric"]
        base = by_method.get(BASELINE, {})
        for method, per_seed in by_method.items():
            values = np.array([per_seed[s] for s in sorted(per_seed)])
            row: dict[str, Any] = {
                "task": task,
                "method": method,
                "metric_name": of_task[0]["metric_name"],
                "seeds": len(values),
                "mean": float(values.mean()),
                "std": float(values.std(ddof=1)) if len(values) > 1 else float("nan"),
                "seconds": float(np.mean([r["seconds"] for r in of_task if r["method"] == method])),
            }
            if method != BASELINE and base:
                shared = sorted(set(per_seed) & set(base))
                a = np.array([per_seed[s] for s in shared])
                b = np.array([base[s] for s in shared])
                row["std_ratio"], row["std_ratio_lo"], row["std_ratio_hi"] = std_ratio_ci(a, b)
                row["spread_p"] = spread_test(a, b)
                row["mean_diff"], row["mean_p"] = paired_mean_test(a, b)
            diags = [
                r["diagnostics"] for r in of_task if r["method"] == method and r["diagnostics"]
            ]
            for key in _DIAG:
                row[key] = float(np.mean([d[key] for d in diags])) if diags else float("nan")
            rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], task: str, description: str = "") -> str:
    """The printed table of one task."""
    of_task = [r for r in rows if r["task"] == task]
    if not of_task:
        return ""
    metric = of_task[0]["metric_name"]
    better = "lower" if metric == "perplexity" else "higher"
    lines = [
        f"{task}: {description}".rstrip(": "),
        f"  test {metric} ({better} is better), mean ± std over seeds; tests against '{BASELINE}'",
        f"  {'method':<20} {'seeds':>5} {'mean ± std':>17} {'std ratio [95% CI]':>22} "
        f"{'spread p':>8} {'Δmean (p)':>17} {'conflict':>8} {'‖d‖/‖ḡ‖':>8} {'active':>6} "
        f"{'s/run':>6}",
    ]
    for r in of_task:
        c = _cells(r)
        lines.append(
            f"  {r['method']:<20} {r['seeds']:>5} {r['mean']:>8.4f} ± {c['std']:<6} "
            f"{c['ratio']:>22} {c['spread']:>8} {c['diff']:>17} {c['conflict']:>8} "
            f"{c['d']:>8} {c['active']:>6} {r['seconds']:>6.1f}"
        )
    return "\n".join(lines)


def markdown(rows: list[dict[str, Any]]) -> str:
    """All tasks as one Markdown table (the README's), made from :func:`summarize`'s rows."""
    lines = [
        "| task (test metric) | method | seeds | mean ± std | std ratio [95% CI] | spread p "
        "| Δmean (p) | conflict | ‖d‖/‖ḡ‖ | active groups |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = _cells(r)
        lines.append(
            f"| {r['task']} ({r['metric_name']}) | {r['method']} | {r['seeds']} "
            f"| {r['mean']:.4f} ± {c['std']} | {c['ratio']} | {c['spread']} | {c['diff']} "
            f"| {c['conflict']} | {c['d']} | {c['active']} |"
        )
    return "\n".join(lines)


LEGEND = (
    "std ratio: run-to-run std of the method / of 'mean' (< 1: less seed-dependent), bootstrap "
    "95% CI. spread p: permutation test (Brown–Forsythe) that the spreads differ. Δmean (p): mean "
    "paired difference to 'mean' over seeds, sign-flip permutation p-value. conflict: share of "
    "steps where the mean gradient had a negative inner product with some group's gradient. "
    "‖d‖/‖ḡ‖: GRAIN's step norm over the mean gradient's. active: groups with positive weight."
)


def write_csv(runs: list[dict[str, Any]], rows: list[dict[str, Any]], out: Path) -> None:
    """``runs.csv`` (one line per run) and ``summary.csv`` (one line per task and method)."""
    run_fields = ["task", "method", "seed", "metric_name", "metric", "seconds", "steps"]
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(run_fields + list(_DIAG))
        for r in runs:
            d = r["diagnostics"] or {}
            writer.writerow([r[k] for k in run_fields] + [d.get(k, "") for k in _DIAG])
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(out / "summary.csv", "w", newline="") as f:
        dict_writer = csv.DictWriter(f, fieldnames=fields)
        dict_writer.writeheader()
        dict_writer.writerows(rows)


def plot(runs: list[dict[str, Any]], out: Path) -> list[Path]:
    """Per task: learning curves per seed (``<task>_curves.png``) and spread (``_spread.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for task in dict.fromkeys(r["task"] for r in runs):
        of_task = [r for r in runs if r["task"] == task]
        methods = list(dict.fromkeys(r["method"] for r in of_task))
        colors = {m: f"C{i}" for i, m in enumerate(methods)}
        fig, ax = plt.subplots(figsize=(7, 4))
        for r in of_task:
            loss = np.array(r["curves"]["train_loss"])
            ax.plot(_smooth(loss), color=colors[r["method"]], alpha=0.6, lw=1)
        for m in methods:
            ax.plot([], [], color=colors[m], label=m)
        ax.set(xlabel="step", ylabel="training loss (moving average)", title=f"{task}: each seed")
        ax.legend()
        fig.tight_layout()
        path = out / f"{task}_curves.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

        fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(methods), 4))
        for i, m in enumerate(methods):
            values = [r["metric"] for r in of_task if r["method"] == m]
            ax.boxplot([values], positions=[i], widths=0.5, showfliers=False)
            jitter = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else [0.0]
            ax.scatter(np.full(len(values), i) + jitter, values, color=colors[m], zorder=3)
        ax.set_xticks(range(len(methods)), methods, rotation=20)
        ax.set(ylabel=f"test {of_task[0]['metric_name']}", title=f"{task}: spread over seeds")
        fig.tight_layout()
        path = out / f"{task}_spread.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _cells(r: dict[str, Any]) -> dict[str, str]:
    """A summary row's formatted cells, shared by the printed and the Markdown tables."""
    ratio = (
        f"{r['std_ratio']:.2f} [{r['std_ratio_lo']:.2f}, {r['std_ratio_hi']:.2f}]"
        if "std_ratio" in r and not math.isnan(r["std_ratio"])
        else "—"
    )
    return {
        "std": _num(r["std"], ".4f"),
        "ratio": ratio,
        "spread": _num(r.get("spread_p"), ".2f"),
        "diff": f"{r['mean_diff']:+.4f} ({r['mean_p']:.2f})" if "mean_diff" in r else "—",
        "conflict": _num(r["conflict_share"], ".0%"),
        "d": _num(r["d_over_mean"], ".2f"),
        "active": _num(r["active_groups"], ".1f"),
    }


def _smooth(x: np.ndarray, width: int = 8) -> np.ndarray:
    if len(x) < width:
        return x
    return np.convolve(x, np.ones(width) / width, mode="valid")


def _num(x: float | None, fmt: str) -> str:
    return "—" if x is None or math.isnan(x) else format(x, fmt)
