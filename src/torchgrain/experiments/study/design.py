"""The study's cells: which settings each preset runs, with how many seeds and which learning
rates.

The axes vary one at a time around a base setting (AdamW and SGD with momentum 0.9, m = 8
contiguous groups of a batch of 32, clean labels, no weight averaging), so that every cell has a
mean baseline with the same optimizer, noise and head on the same seeds:

- base: every method at the base setting;
- group size: per-sample groups (m = 32), m = 2 (half the batch), and across micro-batches
  (accumulation over 4 micro-batches of 8, one group each);
- grouping by label (by rating quartile for valence);
- 20% label noise (with its own mean baseline);
- plain SGD, the setting of the paper's stability theory (with its own baseline);
- weight averaging, what a practitioner would pick for steadier runs: EMA and SWA of the mean,
  and EMA of every aggregator.

``smoke`` keeps one level of every axis with few seeds, to prove the pipeline in minutes;
``default`` is the study; ``full`` has more seeds and data. Seeds: see ``docs/study.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torchgrain.experiments.study.train import Setting

AGGREGATORS = ("min_norm", "dual_proj", "upgrad", "cagrad")
METHODS = ("mean", *AGGREGATORS)
TASKS = ("topics", "valence")
# Constant learning rates; each method picks its own on the validation split. The grids bracket
# the mean's best rate on both tasks (measured: AdamW 3e-3 valence / 1e-2 topics, SGD with
# momentum 0.1-0.3 / 0.3-1, plain SGD 0.3 (1.0 diverges on valence) / 3).
LR_GRIDS = {
    "adamw": (1e-3, 3e-3, 1e-2, 3e-2),
    "sgdm": (0.03, 0.1, 0.3, 1.0),
    "sgd": (0.1, 0.3, 1.0, 3.0),
}


@dataclass(frozen=True)
class Preset:
    name: str
    train: int  # training examples per task
    val: int  # validation examples (from the training pool)
    epochs: int
    selection_seeds: int  # seeds per learning rate for the choice (distinct from reported ones)
    seeds: int  # reported seeds per cell
    lr_points: int  # learning rates per grid (the middle ones when fewer than the grid's)
    stability_pairs: int


PRESETS = {
    "smoke": Preset("smoke", train=256, val=128, epochs=3, selection_seeds=2, seeds=4,
                    lr_points=2, stability_pairs=3),
    "default": Preset("default", train=512, val=256, epochs=5, selection_seeds=3, seeds=60,
                      lr_points=4, stability_pairs=30),
    "full": Preset("full", train=1024, val=512, epochs=8, selection_seeds=5, seeds=100,
                   lr_points=4, stability_pairs=60),
    # The test suite's: smoke's cells on small splits, in seconds.
    "tiny": Preset("tiny", train=64, val=32, epochs=1, selection_seeds=2, seeds=3,
                   lr_points=2, stability_pairs=2),
}  # fmt: skip
SELECTION_SEED0 = 10_000  # selection seeds are 10_000, 10_001, ...: never a reported seed


@dataclass(frozen=True)
class Cell:
    """A setting and the axis it belongs to (for the report); ``baseline`` is the key of its
    mean cell (its own for a mean cell)."""

    axis: str
    setting: Setting
    baseline: str

    @property
    def key(self) -> str:
        return cell_key(self.setting)


def cell_key(s: Setting) -> str:
    return (
        f"{s.task}/{s.head}/{s.optimizer}/{s.method}/{s.grouping}-m{s.m}/noise{s.noise:g}/"
        f"{s.average}/b{s.batch}e{s.epochs}"
    )


def lr_grid(preset: Preset, optimizer: str) -> tuple[float, ...]:
    """The optimizer's grid, or its middle ``lr_points`` values."""
    grid = LR_GRIDS[optimizer]
    start = (len(grid) - preset.lr_points) // 2
    return grid[max(start, 0) : max(start, 0) + preset.lr_points]


def cells(preset_name: str) -> list[Cell]:
    """Every cell of the preset, baselines first; no duplicates."""
    if preset_name not in PRESETS:
        raise ValueError(f"unknown study preset {preset_name!r}; choose one of {list(PRESETS)}")
    preset = PRESETS[preset_name]
    smoke = preset_name in ("smoke", "tiny")
    out: dict[str, Cell] = {}

    def add(axis: str, s: Setting) -> None:
        """``s`` and its baseline: the plain mean with the same task, optimizer and noise."""
        base = replace(s, method="mean", m=8, grouping="contiguous", average="none")
        if cell_key(base) not in out:
            out[cell_key(base)] = Cell(axis if s == base else "base", base, cell_key(base))
        out.setdefault(cell_key(s), Cell(axis, s, cell_key(base)))

    optimizers = ("adamw",) if smoke else ("adamw", "sgdm")
    for task in TASKS:
        for opt in optimizers:
            base = Setting(task, opt, "mean", 8, epochs=preset.epochs)
            for method in METHODS:
                add("base", replace(base, method=method))
            for method in AGGREGATORS[:1] if smoke else AGGREGATORS:
                levels = [("per-sample", 32, "contiguous"), ("half", 2, "contiguous"),
                          ("micro-batches", 4, "micro")]  # fmt: skip
                for axis, m, grouping in levels[:1] + levels[2:] if smoke else levels:
                    add(f"group size: {axis}", replace(base, method=method, m=m, grouping=grouping))
                add("grouping: by label", replace(base, method=method, grouping="key"))
                add("averaging: EMA", replace(base, method=method, average="ema"))
            for method in METHODS[:2] if smoke else METHODS:
                add("label noise 20%", replace(base, method=method, noise=0.2))
            add("averaging: EMA", replace(base, average="ema"))
            add("averaging: SWA", replace(base, average="swa"))
        sgd = Setting(task, "sgd", "mean", 8, epochs=preset.epochs)
        for method in METHODS[:2] if smoke else METHODS:
            add("plain SGD", replace(sgd, method=method))
    return sorted(out.values(), key=lambda c: c.setting.method != "mean")
