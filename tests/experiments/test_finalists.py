"""`torchgrain study --finalists`: the generation task on the cells the cheap tasks single out.

The `tiny` preset trains a random two-layer Llama over real BBC News headlines, so the whole
pipeline (selection on the validation split, reported seeds, EMA, resume, statistics, outputs)
runs in seconds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from torchgrain.experiments.cli import main
from torchgrain.experiments.presets import size_of
from torchgrain.experiments.runner import Method, Recipe, train
from torchgrain.experiments.study import finalists
from torchgrain.experiments.study.design import SELECTION_SEED0
from torchgrain.experiments.study.runner import choose_lr, val_score
from torchgrain.experiments.tasks import Task, load_task

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_task() -> Task:
    return load_task("generation", size_of("tiny", "generation"), val=8)


def test_validation_split_is_carved_from_the_training_pool(tiny_task: Task) -> None:
    assert len(tiny_task.val) == 8
    ids = [tuple(e.ids) for e in tiny_task.val]
    for other in (tiny_task.train, tiny_task.test, tiny_task.spare):
        assert not set(ids) & {tuple(e.ids) for e in other}
    plain = load_task("generation", size_of("tiny", "generation"))
    assert plain.val == [] and [e.ids for e in plain.test] == [e.ids for e in tiny_task.test]
    with pytest.raises(ValueError, match="no examples"):
        plain.evaluate(plain.base, [])
    with pytest.raises(ValueError, match="val must be"):
        load_task("generation", size_of("tiny", "generation"), val=-1)


def test_recipe_defaults_are_the_reproduction(tiny_task: Task) -> None:
    method = Method.parse("upgrad-m4")
    _, a = train(tiny_task, method, 3)
    _, b = train(tiny_task, method, 3, recipe=Recipe("adamw", tiny_task.size.lr, clip=1.0))
    assert a["metric"] == b["metric"] and not a["diverged"] and "ema" not in a


def test_ema_and_validation(tiny_task: Task) -> None:
    recipe = Recipe("sgdm", 0.01, constant=True, clip=None, ema=True)
    model, r = train(tiny_task, Method.parse("mean"), 0, recipe=recipe, eval_set=tiny_task.val)
    assert r["metric"] == pytest.approx(tiny_task.evaluate(model, tiny_task.val)["perplexity"])
    assert math.isfinite(r["ema"]["perplexity"]) and r["ema"]["perplexity"] != r["metric"]


def test_a_diverged_run_is_recorded_not_raised(tiny_task: Task) -> None:
    recipe = Recipe("sgd", 1e20, constant=True, clip=None, ema=True)
    _, r = train(tiny_task, Method.parse("upgrad-m8"), 0, recipe=recipe)
    assert r["diverged"] and math.isnan(r["metric"]) and math.isnan(r["ema"]["perplexity"])


def test_cells_grids_and_seeds() -> None:
    cells = finalists.finalist_cells()
    assert len({c.key for c in cells}) == len(cells) == 2 * len(finalists.TRAINED)
    for c in cells:
        assert c.baseline == finalists.FinalistCell(c.optimizer, "mean", "none").key
        assert c.baseline in {x.key for x in cells}
    default = finalists.PRESETS["default"]
    assert default.seeds >= 10  # the floor for the expensive task
    for opt in ("sgdm", "adamw"):
        assert len(finalists.lr_grid(default, opt)) >= 3
        assert len(finalists.lr_grid(finalists.PRESETS["smoke"], opt)) >= 2
    assert finalists.lr_grid(default, "sgdm") == (0.003, 0.01, 0.03)
    assert finalists.lr_grid(finalists.PRESETS["tiny"], "adamw") == (3e-5, 1e-4)


def test_a_grid_grows_past_the_end_that_wins() -> None:
    preset = finalists.PRESETS["default"]
    cell = finalists.FinalistCell("adamw", "mean", "none")
    seeds = finalists.selection_seeds(preset)

    def scored(ppl: dict[float, float | None]) -> dict[str, dict]:
        return {
            f"{cell.key}|lr={lr:g}|seed={s}": {"val": v} for lr, v in ppl.items() for s in seeds
        }

    start = (3e-5, 1e-4, 3e-4)
    assert finalists.cell_grid(preset, cell, {}) == start  # nothing run yet
    inside = scored({3e-5: 90.0, 1e-4: 70.0, 3e-4: 80.0})
    assert finalists.cell_grid(preset, cell, inside) == start  # the best is inside: done
    upper = scored({3e-5: 90.0, 1e-4: 80.0, 3e-4: 70.0})
    assert finalists.cell_grid(preset, cell, upper) == (*start, 1e-3)  # 1e-3 to run next
    upper |= scored({1e-3: 75.0})
    assert finalists.cell_grid(preset, cell, upper) == (*start, 1e-3)  # 3e-4 won: done
    lower = scored({1e-5: None, 3e-5: 60.0, 1e-4: 70.0, 3e-4: 80.0})  # 1e-5 diverged
    assert finalists.cell_grid(preset, cell, lower) == (1e-5, *start)
    assert choose_lr(cell.key, (1e-5, *start), seeds, lower, higher_is_better=False) == 3e-5
    for preset in finalists.PRESETS.values():
        assert preset.seeds < SELECTION_SEED0


def test_lower_is_better_selection() -> None:
    runs = {f"c|lr={lr:g}|seed=1": {"val": v} for lr, v in ((0.1, 50.0), (0.3, 40.0), (1, None))}
    assert choose_lr("c", (0.1, 0.3, 1.0), [1], runs, higher_is_better=False) == 0.3
    assert choose_lr("c", (0.1, 0.3, 1.0), [1], runs) == 0.1  # None (diverged) is the worst
    assert val_score("c", 0.3, [1], runs, higher_is_better=False) == -40.0


def test_finalists_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, str]] = []  # (seed, split) of every evaluation
    real_train, real_evaluate = finalists.train, Task.evaluate
    current: dict[str, int] = {}

    def spy_train(task, method, seed, **kw):  # type: ignore[no-untyped-def]
        current["seed"] = seed
        return real_train(task, method, seed, **kw)

    def spy_evaluate(self, model, examples=None):  # type: ignore[no-untyped-def]
        split = "val" if examples is self.val else "test" if examples in (None, self.test) else "?"
        seen.append((current["seed"], split))
        return real_evaluate(self, model, examples)

    monkeypatch.setattr(finalists, "train", spy_train)
    monkeypatch.setattr(Task, "evaluate", spy_evaluate)
    args = ["study", "--preset", "tiny", "--finalists", "--out", str(tmp_path), "--no-progress"]
    assert main([*args, "--max-runs", "3"]) == 0
    partial = finalists.load_finalist_runs(tmp_path)
    assert len(partial) == 2 * 3  # one record per averaging of each training
    assert not json.loads((tmp_path / "finalists.json").read_text())["complete"]
    assert main(args) == 0
    runs = finalists.load_finalist_runs(tmp_path)
    assert partial.items() <= runs.items()  # resumed, nothing redone
    # fairness: selection seeds only ever saw the validation split, reported seeds the test split
    assert seen and all(
        split == ("val" if seed >= SELECTION_SEED0 else "test") for seed, split in seen
    )
    result = json.loads((tmp_path / "finalists.json").read_text())
    assert result["version"] == 1 and result["complete"] and result["task"] == "generation"
    preset = finalists.PRESETS["tiny"]
    cells = {c["key"]: c for c in result["cells"]}
    assert len(cells) == len(finalists.finalist_cells())
    for c in cells.values():
        grid = c["lr_grid"]
        assert set(finalists.lr_grid(preset, c["optimizer"])) <= set(grid)
        scores = {lr: c["val_by_lr"][f"{lr:g}"] for lr in grid}
        assert c["lr"] == min(grid, key=lambda lr: (scores[lr] or math.inf, lr))
        assert [r["seed"] for r in c["runs"]] == list(range(preset.seeds))
        if c["key"] == c["baseline"]:
            continue
        assert {"delta_mean", "p_mean", "p_spread", "std_ratio", "std_ratio_ci", "p_mean_holm",
                "p_spread_holm"} <= set(c)  # fmt: skip
        base = cells[c["baseline"]]
        deltas = [a["test"] - b["test"] for a, b in zip(c["runs"], base["runs"], strict=True)]
        assert c["delta_mean"] == pytest.approx(sum(deltas) / len(deltas))
        if c["method"] == "mean":
            continue
        # the control: the mean with the same averaging, trained at this cell's rate
        same = c["same_rate"]
        mean = finalists.FinalistCell(c["optimizer"], "mean", c["average"]).key
        assert same["baseline"] == mean and same["lr"] == c["lr"] and "p_spread_holm" in same
        control = [runs[f"{mean}|lr={c['lr']:g}|seed={s}"]["test"] for s in range(preset.seeds)]
        mine = [r["test"] for r in c["runs"]]
        assert same["delta_mean"] == pytest.approx(
            sum(a - b for a, b in zip(mine, control, strict=True)) / preset.seeds
        )
    # raw and EMA of one training share it: same time and loss, different weights scored
    raw = runs[next(k for k in runs if "/sgdm/mean/none|" in k)]
    ema = runs[raw["key"].replace("/none|", "/ema|")]
    assert (raw["seconds"], raw["train_loss"]) == (ema["seconds"], ema["train_loss"])
    assert (tmp_path / "finalists.md").read_text().startswith("# torchgrain study, generation")
    assert (tmp_path / "finalists.png").stat().st_size > 0


def test_bad_finalist_arguments(tmp_path: Path) -> None:
    args = ["study", "--preset", "tiny", "--finalists", "--out", str(tmp_path), "--no-progress"]
    assert main([*args, "--shard", "0/2"]) == 2
    with pytest.raises(ValueError, match="unknown study preset"):
        finalists.run_finalists("huge", tmp_path)
