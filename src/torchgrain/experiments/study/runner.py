"""Run the study's cells: choose each cell's learning rate, then run the reported seeds.

For every cell, each learning rate of its optimizer's grid is run on the selection seeds; the rate
with the best mean validation metric (a diverged run counts as the worst) is then run on the
reported seeds, whose test metric is what the analysis compares. Every finished run is appended to
``DIR/runs-<shard>.jsonl`` at once, so an interrupted study resumes where it stopped; with
``shard=(i, n)`` only the cells ``i, i + n, i + 2n, ...`` run, so that pieces can run at different
times (or places) and a last run without a shard merges them into ``DIR/study.json``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torchgrain.experiments._progress import bar
from torchgrain.experiments.stats import finite_or_none
from torchgrain.experiments.study import design
from torchgrain.experiments.study.features import load_features
from torchgrain.experiments.study.heads import Data, make_data
from torchgrain.experiments.study.stability import (
    stability_cells,
    stability_lr,
    stability_pair,
    stability_setting,
)
from torchgrain.experiments.study.train import Setting, train


def read_jsonl(out: Path, pattern: str) -> list[dict[str, Any]]:
    """The records of every file under ``out`` matching ``pattern``, in file order."""
    records = []
    for path in sorted(out.glob(pattern)):
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a crash: that run is redone
                    continue
    return records


class JsonlAppender:
    """Appends records to a JSON-lines file, one flushed line each. The file is created with the
    first record, so a run with nothing left to do leaves no empty file behind."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: Any = None

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            self._file = self.path.open("a")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()


def run_key(cell: str, lr: float, seed: int) -> str:
    return f"{cell}|lr={lr:g}|seed={seed}"


def load_runs(out: Path) -> dict[str, dict[str, Any]]:
    """Every finished run under ``out`` (all shards), by :func:`run_key`."""
    return {r["key"]: r for r in read_jsonl(out, "runs-*.jsonl")}


def load_stability(out: Path) -> list[dict[str, Any]]:
    """Every finished stability pair under ``out`` (all shards), one record per key."""
    return list({r["key"]: r for r in read_jsonl(out, "stability-*.jsonl")}.values())


class _Data:
    """Each (task, noise)'s tensors, built once."""

    def __init__(self, preset: design.Preset, out: Path) -> None:
        self.preset, self.out = preset, out
        self._features: Any = None
        self._data: dict[tuple[str, float], Data] = {}

    def __call__(self, s: Setting) -> Data:
        if (s.task, s.noise) not in self._data:
            if self._features is None:
                self._features = load_features(self.out / "features.pt")
            self._data[s.task, s.noise] = make_data(
                s.task, self._features, self.preset.train, self.preset.val, s.noise
            )
        return self._data[s.task, s.noise]


def run_study(
    preset_name: str,
    out: Path,
    *,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
    max_runs: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Run (or resume) this shard's cells; returns every finished run under ``out``."""
    cells = design.cells(preset_name)  # an unknown preset raises here, naming the choices
    preset = design.PRESETS[preset_name]
    index, count = shard
    if not (count >= 1 and 0 <= index < count):
        raise ValueError(f"--shard must be i/n with 0 <= i < n, got {index}/{count}")
    mine = cells[index::count]
    out.mkdir(parents=True, exist_ok=True)
    runs = load_runs(out)
    data = _Data(preset, out)
    log = out / f"runs-{index}of{count}.jsonl"
    todo = sum(_planned(preset, c) for c in mine) - sum(
        1 for c in mine for k in runs if k.startswith(c.key + "|")
    )
    shown = bar(range(max(todo, 0)), progress, f"study {preset_name} {index}/{count}")
    new = 0
    try:
        with JsonlAppender(log) as sink:
            for cell in mine:
                for lr, seed in _pending(preset, cell, runs):
                    if max_runs is not None and new >= max_runs:
                        return runs
                    record = _one(cell, data, lr, seed)
                    runs[record["key"]] = record
                    sink.write(record)
                    new += 1
                    shown.update(1)
    finally:
        shown.close()
    _run_stability(preset, out, data, shard, progress)
    return runs


def _run_stability(
    preset: design.Preset, out: Path, data: _Data, shard: tuple[int, int], progress: bool
) -> None:
    """This shard's share of the neighbouring-pair comparisons, resumable like the runs."""
    index, count = shard
    done = {r["key"] for r in load_stability(out)}
    mine = stability_cells(preset)[index::count]
    todo = [(c, p) for c in mine for p in range(preset.stability_pairs)
            if f"{'/'.join(c)}|pair={p}" not in done]  # fmt: skip
    shown = bar(todo, progress, f"stability {index}/{count}")
    try:
        with JsonlAppender(out / f"stability-{index}of{count}.jsonl") as sink:
            for (task, head, method), pair in todo:
                setting = stability_setting(task, head, method, preset.epochs)
                record = stability_pair(setting, data(setting), stability_lr(task), pair)
                record.update({"key": f"{task}/{head}/{method}|pair={pair}", "task": task,
                               "head": head, "method": method})  # fmt: skip
                sink.write(record)
                shown.update(1)
    finally:
        shown.close()


def _planned(preset: design.Preset, cell: design.Cell) -> int:
    return (
        len(design.lr_grid(preset, cell.setting.optimizer)) * preset.selection_seeds + preset.seeds
    )


def _pending(
    preset: design.Preset, cell: design.Cell, runs: dict[str, dict[str, Any]]
) -> Iterator[tuple[float, int]]:
    """The (learning rate, seed) pairs still to run for ``cell``: the selection runs first, then
    the reported seeds at the chosen rate (known once the selection runs are in ``runs``)."""
    grid = design.lr_grid(preset, cell.setting.optimizer)
    selection = [design.SELECTION_SEED0 + i for i in range(preset.selection_seeds)]
    for lr in grid:
        for seed in selection:
            if run_key(cell.key, lr, seed) not in runs:
                yield lr, seed
    lr = choose_lr(cell.key, grid, selection, runs)
    for seed in range(preset.seeds):
        if run_key(cell.key, lr, seed) not in runs:
            yield lr, seed


def choose_lr(
    cell: str,
    grid: tuple[float, ...],
    seeds: list[int],
    runs: dict[str, dict[str, Any]],
    higher_is_better: bool = True,
) -> float:
    """The rate with the best mean validation metric over the selection seeds; a diverged run
    scores minus infinity; ties go to the smaller rate."""
    return max(grid, key=lambda lr: (val_score(cell, lr, seeds, runs, higher_is_better), -lr))


def val_score(
    cell: str,
    lr: float,
    seeds: list[int],
    runs: dict[str, dict[str, Any]],
    higher_is_better: bool = True,
) -> float:
    """The mean validation metric over ``seeds``, negated when lower is better (so that higher
    is always better); minus infinity when a run is missing or diverged."""
    values = [runs[run_key(cell, lr, s)]["val"] for s in seeds if run_key(cell, lr, s) in runs]
    if not values or any(v is None or not math.isfinite(v) for v in values):
        return -math.inf
    mean = sum(values) / len(values)
    return mean if higher_is_better else -mean


def _one(cell: design.Cell, data: _Data, lr: float, seed: int) -> dict[str, Any]:
    s = cell.setting
    result = train(s, data(s), lr, seed)
    return {
        "key": run_key(cell.key, lr, seed),
        "cell": cell.key,
        "lr": lr,
        "seed": seed,
        "selection": seed >= design.SELECTION_SEED0,
        **{k: finite_or_none(v) for k, v in result.items() if k != "diagnostics"},
        "diagnostics": result["diagnostics"],
    }
