"""The study's report: a Markdown summary and heat maps of the change of mean and of spread.

Each row of a heat map is a setting (axis, task, optimizer); each column a method. The colour of
"change of mean" is the paired mean difference to the baseline in units of the baseline's std (so
that accuracy and Pearson r share a scale; the number printed is the raw difference); the colour of
"spread" is log2 of the std ratio (the number printed is the ratio). A star marks a Holm-adjusted
p below 0.05.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torchgrain.experiments.study.analysis import ALPHA

COLUMNS = ("min_norm", "dual_proj", "upgrad", "cagrad", "mean")


AXES = (
    "base",
    "group size: per-sample",
    "group size: half",
    "group size: micro-batches",
    "grouping: by label",
    "label noise 20%",
    "plain SGD",
    "averaging: EMA",
    "averaging: SWA",
)


def _rows(study: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    """``(row label, compared cells)``: by axis (in :data:`AXES` order), task, optimizer."""
    rows: dict[tuple[int, str, str], list[dict[str, Any]]] = {}
    for cell in study["cells"]:
        if "p_mean" not in cell:
            continue
        axis = AXES.index(cell["axis"]) if cell["axis"] in AXES else len(AXES)
        rows.setdefault((axis, cell["task"], cell["optimizer"]), []).append(cell)
    return [
        (f"{cells[0]['axis']} · {task} · {optimizer}", cells)
        for (_, task, optimizer), cells in sorted(rows.items())
    ]


def _stars(p: float | None) -> str:
    return "*" if p is not None and p < ALPHA else ""


def markdown(study: dict[str, Any]) -> str:
    """Per axis, a table of every compared cell, then counts of what helped and what hurt."""
    lines = [
        f"# torchgrain study, preset `{study['preset']}`"
        + ("" if study["complete"] else " (incomplete: some cells have not run yet)"),
        "",
        "Test metric over the reported seeds (accuracy for topics, Pearson r for valence; higher "
        "is better), each cell against the plain mean of the same optimizer, noise and head on "
        "the same seeds. Δmean: paired mean difference (Holm-adjusted sign-flip p). std ratio: "
        "the cell's run-to-run std over the baseline's, paired bootstrap 95% CI (Holm-adjusted "
        "paired permutation p). `*`: adjusted p < 0.05. lr: the rate chosen on the validation "
        "split.",
    ]
    by_axis: dict[str, list[dict[str, Any]]] = {}
    for cell in study["cells"]:
        if "p_mean" in cell:
            by_axis.setdefault(cell["axis"], []).append(cell)
    base = {c["key"]: c for c in study["cells"]}
    for axis, cells in by_axis.items():
        lines += ["", f"## {axis}", "",
                  "| task | optimizer | method | lr | mean ± std | baseline | Δmean (p) "
                  "| std ratio [95% CI] (p) | steps ≠ mean |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for c in cells:
            b = base[c["baseline"]]
            method = c["method"] + (f" + {c['average']}" if c["average"] != "none" else "")
            differs = "—" if c["differs_share"] is None else f"{c['differs_share']:.0%}"
            lo, hi = c["std_ratio_ci"]
            lines.append(
                f"| {c['task']} | {c['optimizer']} | {method} | {c['lr']:g} "
                f"| {_num(c['metric_mean'])} ± {_num(c['metric_std'])} "
                f"| {_num(b['metric_mean'])} ± {_num(b['metric_std'])} "
                f"| {_signed(c['delta_mean'])} ({_p(c['p_mean_holm'])}){_stars(c['p_mean_holm'])} "
                f"| {_num(c['std_ratio'], '.2f')} [{_num(lo, '.2f')}, {_num(hi, '.2f')}] "
                f"({_p(c['p_spread_holm'])}){_stars(c['p_spread_holm'])} | {differs} |"
            )
    compared = [c for cells in by_axis.values() for c in cells]
    better_mean = [c for c in compared if _sig(c, "p_mean") and c["delta_mean"] > 0]
    worse_mean = [c for c in compared if _sig(c, "p_mean") and c["delta_mean"] < 0]
    steadier = [c for c in compared if _sig(c, "p_spread") and c["std_ratio"] < 1]
    shakier = [c for c in compared if _sig(c, "p_spread") and c["std_ratio"] > 1]
    lines += [
        "",
        "## Counts",
        "",
        f"{len(compared)} cells compared. Mean: {len(better_mean)} significantly better, "
        f"{len(worse_mean)} significantly worse. Spread: {len(steadier)} significantly steadier, "
        f"{len(shakier)} significantly less steady (Holm, α = {ALPHA}).",
    ]
    return "\n".join(lines) + "\n"


def compact_table(study: dict[str, Any]) -> str:
    """One Markdown row per setting, one column per method: ``Δmean / std ratio``, each starred
    when its Holm-adjusted p is below 0.05 (the README's table)."""
    lines = [
        "| setting | task | optimizer | " + " | ".join(COLUMNS) + " |",
        "|---|---|---|" + "---|" * len(COLUMNS),
    ]
    for label, cells in _rows(study):
        setting = label.split(" · ")[0]
        first = cells[0]
        by_method = {c["method"]: c for c in cells}
        entries = []
        for method in COLUMNS:
            c = by_method.get(method)
            if c is None:
                entries.append("")
                continue
            delta = "—" if c["delta_mean"] is None else f"{c['delta_mean']:+.3f}"
            ratio = "—" if c["std_ratio"] is None else f"{c['std_ratio']:.2f}"
            entries.append(
                f"{delta}{_stars(c['p_mean_holm'])} / {ratio}{_stars(c['p_spread_holm'])}"
            )
        lines.append(f"| {setting} | {first['task']} | {first['optimizer']} | "
                     + " | ".join(entries) + " |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _sig(cell: dict[str, Any], name: str) -> bool:
    """Holm-significant, with the effect it refers to defined."""
    p = cell.get(name + "_holm")
    effect = cell.get("delta_mean" if name == "p_mean" else "std_ratio")
    return p is not None and p < ALPHA and effect is not None


def _num(value: float | None, fmt: str = ".4f") -> str:
    return "—" if value is None else format(value, fmt)


def _signed(value: float | None) -> str:
    return "—" if value is None else f"{value:+.4f}"


def _p(value: float | None) -> str:
    return "—" if value is None else (f"{value:.2g}" if value >= 0.001 else "<0.001")


def heatmaps(study: dict[str, Any], out: Path) -> list[Path]:
    """``study_mean.png`` and ``study_spread.png``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = _rows(study)
    if not rows:
        return []
    base = {c["key"]: c for c in study["cells"]}
    written = []
    for name, title in (("mean", "change of mean (colour: Δ / baseline std)"),
                        ("spread", "std ratio (colour: log2)")):  # fmt: skip
        grid = np.full((len(rows), len(COLUMNS)), np.nan)
        fig, ax = plt.subplots(figsize=(8.5, 0.32 * len(rows) + 1.6))
        for i, (_, cells) in enumerate(rows):
            for c in cells:
                j = COLUMNS.index(c["method"])
                b = base[c["baseline"]]
                if name == "mean" and c["delta_mean"] is not None and b["metric_std"]:
                    grid[i, j] = c["delta_mean"] / b["metric_std"]
                    text = f"{c['delta_mean']:+.3f}{_stars(c['p_mean_holm'])}"
                elif name == "spread" and c["std_ratio"]:
                    grid[i, j] = np.log2(c["std_ratio"])
                    text = f"{c['std_ratio']:.2f}{_stars(c['p_spread_holm'])}"
                else:
                    continue
                ax.text(j, i, text, ha="center", va="center", fontsize=6.5)
        limit = max(1.0, float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0)
        image = ax.imshow(grid, cmap="RdBu" if name == "mean" else "RdBu_r", vmin=-limit,
                          vmax=limit, aspect="auto")  # fmt: skip
        ax.set_xticks(range(len(COLUMNS)), COLUMNS, fontsize=7)
        ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=6.5)
        ax.set_title(f"torchgrain study ({study['preset']}): {title}; * Holm p < {ALPHA}",
                     fontsize=8)  # fmt: skip
        fig.colorbar(image, ax=ax, fraction=0.03)
        fig.tight_layout()
        path = out / f"study_{name}.png"
        fig.savefig(path, dpi=130)
        plt.close(fig)
        written.append(path)
    return written


def stability_plot(study: dict[str, Any], out: Path) -> Path | None:
    """``study_stability.png``: the mean ``‖θ − θ′‖`` over the neighbouring pairs after every
    epoch, per method, one panel per (task, head)."""
    summary = study.get("stability", {}).get("summary", [])
    if not summary:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["task"], r["head"]) for r in summary})
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.8), squeeze=False)
    for ax, (task, head) in zip(axes[0], panels, strict=True):
        for r in summary:
            if (r["task"], r["head"]) == (task, head) and r["distance_by_epoch"]:
                epochs = range(1, len(r["distance_by_epoch"]) + 1)
                style = "k-" if r["method"] == "mean" else "-"
                ax.plot(epochs, r["distance_by_epoch"], style, label=r["method"], lw=1.2)
        ax.set_title(f"{task}, {head} head, plain SGD", fontsize=8)
        ax.set_xlabel("epoch", fontsize=7)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("‖θ − θ′‖ (mean over pairs)", fontsize=7)
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    path = out / "study_stability.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def stability_table(study: dict[str, Any]) -> str:
    """Markdown: per task, head and method, ``‖θ − θ′‖`` at the end and the geometric-mean ratios
    to the mean's (with sign-flip p) of the distance, the loss change on the swapped example and
    the test prediction change."""
    lines = [
        "| task | head | method | pairs | ‖θ−θ′‖ | vs mean (p) | Δloss on the swapped example "
        "vs mean (p) | Δprediction vs mean (p) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = ("mean", *COLUMNS[:-1])  # the baseline first
    rows = sorted(
        study.get("stability", {}).get("summary", []),
        key=lambda r: (r["task"], r["head"], order.index(r["method"])),
    )
    for r in rows:

        def ratio(name: str, r: dict[str, Any] = r) -> str:
            if name + "_ratio" not in r:
                return "—"
            return f"{r[name + '_ratio']:.2f}x ({_p(r[name + '_p'])})"

        lines.append(
            f"| {r['task']} | {r['head']} | {r['method']} | {r['pairs']} | {_num(r['distance'])} "
            f"| {ratio('distance')} | {ratio('loss_change')} | {ratio('prediction_change')} |"
        )
    return "\n".join(lines) + "\n"


def finalists_markdown(result: dict[str, Any]) -> str:
    """The generation finalists: what ran, then :func:`finalists_table`."""
    size = result["size"]
    lines = [
        f"# torchgrain study, generation finalists, preset `{result['preset']}`"
        + ("" if result["complete"] else " (incomplete: some cells have not run yet)"),
        "",
        f"{result['model']} writing BBC News headlines: {size['train']} training examples, "
        f"{size['epochs']} epochs of batches of {size['batch']}, last {size['layers']} layers "
        f"trained; test perplexity on {size['test']} held-out examples (lower is better). Each "
        f"cell chose its constant rate on {result['val']} validation examples from the training "
        "pool over the selection seeds, and is compared with its optimizer's plain mean on the "
        "same seeds. Δmean: paired mean difference (negative is better; Holm-adjusted sign-flip "
        "p). std ratio: run-to-run std over the baseline's, paired bootstrap 95% CI "
        "(Holm-adjusted paired permutation p). `*`: adjusted p < 0.05. `†`: the chosen rate is at "
        "the edge of the grid. Same rate: against the mean with the same averaging trained at "
        "this cell's rate on the same seeds (`Δmean / std ratio`, Holm over that column), which "
        "separates the rule from its rate.",
        "",
    ]
    return "\n".join(lines) + finalists_table(result)


def finalists_table(result: dict[str, Any]) -> str:
    """One Markdown row per finalist cell (the README's table)."""
    lines = [
        "| optimizer | method | averaging | lr | validation ppl by lr | test ppl mean ± std "
        "| Δmean (p) | std ratio [95% CI] (p) | same rate: Δmean / std ratio | steps ≠ mean |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result["cells"]:
        by_lr = ", ".join(f"{lr}: {_num(v, '.2f')}" for lr, v in c["val_by_lr"].items())
        differs = "—" if c["differs_share"] is None else f"{c['differs_share']:.0%}"
        if "p_mean" in c:
            lo, hi = c["std_ratio_ci"]
            p_mean = c["p_mean_holm"]
            delta = f"{_num(c['delta_mean'], '+.2f')} ({_p(p_mean)}){_stars(p_mean)}"
            ratio = (
                f"{_num(c['std_ratio'], '.2f')} [{_num(lo, '.2f')}, {_num(hi, '.2f')}] "
                f"({_p(c['p_spread_holm'])}){_stars(c['p_spread_holm'])}"
            )
        else:
            delta, ratio = "baseline", "baseline"
        same = "—"
        if "same_rate" in c:
            r = c["same_rate"]
            same = (
                f"{_num(r['delta_mean'], '+.2f')}{_stars(r['p_mean_holm'])} / "
                f"{_num(r['std_ratio'], '.2f')}{_stars(r['p_spread_holm'])}"
            )
        lines.append(
            f"| {c['optimizer']} | {c['method']} | {c['average']} | {c['lr']:g}"
            f"{'†' if c['lr_at_edge'] else ''} | {by_lr} "
            f"| {_num(c['metric_mean'], '.2f')} ± {_num(c['metric_std'], '.2f')} | {delta} "
            f"| {ratio} | {same} | {differs} |"
        )
    return "\n".join(lines) + "\n"


def finalists_plot(result: dict[str, Any], out: Path) -> Path | None:
    """``finalists.png``: every reported seed's test perplexity per cell, seeds joined across
    the cells of an optimizer (the pairing), with each cell's mean."""
    cells = result["cells"]
    if not cells:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    optimizers = list(dict.fromkeys(c["optimizer"] for c in cells))
    fig, axes = plt.subplots(1, len(optimizers), figsize=(4.2 * len(optimizers), 3.2),
                             squeeze=False)  # fmt: skip
    for ax, optimizer in zip(axes[0], optimizers, strict=True):
        mine = [c for c in cells if c["optimizer"] == optimizer]
        labels = [c["method"] + ("\n+ EMA" if c["average"] == "ema" else "") for c in mine]
        seeds = sorted({r["seed"] for c in mine for r in c["runs"]})
        for seed in seeds:
            ys = [next((r["test"] for r in c["runs"] if r["seed"] == seed), None) for c in mine]
            ax.plot(range(len(mine)), [float("nan") if y is None else y for y in ys], "-",
                    color="0.8", lw=0.6, zorder=1)  # fmt: skip
        for i, c in enumerate(mine):
            ys = [r["test"] for r in c["runs"] if r["test"] is not None]
            ax.scatter([i] * len(ys), ys, s=9, zorder=2)
            if c["metric_mean"] is not None:
                ax.plot([i - 0.25, i + 0.25], [c["metric_mean"]] * 2, "k-", lw=1.5, zorder=3)
        tops = [r["test"] for c in mine for r in c["runs"] if r["test"] is not None]
        if tops and min(tops) > 0 and max(tops) > 3 * min(tops):
            ax.set_yscale("log")  # a few runs far off the rest
        ax.set_xticks(range(len(mine)), labels, fontsize=6.5)
        ax.set_title(f"{optimizer}: test perplexity per seed (lower is better)", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    path = out / "finalists.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
