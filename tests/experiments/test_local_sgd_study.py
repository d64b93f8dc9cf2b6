"""The local SGD experiment (issue 28, item 5): the committed results, the deal of the data, the
choice of the outer lr, and the smoke preset end to end on 4 real Gloo ranks over faked features,
resumed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.experiments.test_study import fake_features
from torchgrain.experiments.study import features, heads
from torchgrain.experiments.study import local_sgd as ex
from torchgrain.experiments.study import local_sgd_report as report
from torchgrain.experiments.study.runner import run_key

COMMITTED = Path(__file__).resolve().parents[2] / "docs" / "results" / "local_sgd"


def test_committed_results_are_their_runs_analysed_and_tabled() -> None:
    results = json.loads((COMMITTED / "results.json").read_text())
    runs = ex.load_runs(COMMITTED)
    again = report.analyse(ex.PRESETS["default"], "default", runs, 4, results["shards"])
    assert json.loads(json.dumps(again)) == results and results["complete"]
    table = report.markdown(results)
    assert (COMMITTED / "summary.md").read_text() == table
    assert table in (COMMITTED / "README.md").read_text()


def test_deal_gives_each_rank_mostly_its_own_keys() -> None:
    keys = torch.arange(5).repeat(400)  # 5 topics, 400 each
    shards = ex.deal(keys, world=4)
    assert sorted(torch.cat(shards).tolist()) == list(range(len(keys)))  # a partition
    for r, shard in enumerate(shards):
        own = (keys[shard] % 4 == r).float().mean()
        assert 0.75 < own < 0.95  # 4/5 stay home, plus a share of the uniform fifth
    assert len(shards[0]) > 1.6 * len(shards[1])  # rank 0 holds two topics


def test_select_extends_the_grid_at_an_edge_up_to_the_cap() -> None:
    preset = ex.PRESETS["smoke"]  # grid (0.5, 1.0), one selection seed
    seed = ex.selection_seeds(preset)[0]

    def runs(val: dict[float, float]) -> dict[str, dict[str, float]]:
        return {run_key("c", lr, seed): {"val": v} for lr, v in val.items()}

    assert ex.select(preset, "c", runs({0.5: 0.1})) == ([0.5, 1.0], None, None)
    assert ex.pending(preset, "c", runs({0.5: 0.1})) == (1.0, seed)
    grid, lr, reason = ex.select(preset, "c", runs({0.25: 0.2, 0.5: 0.9, 1.0: 0.3}))
    assert (lr, reason) == (0.5, "best at the edge 0.5: ran 0.25")
    assert ex.pending(preset, "c", runs({0.5: 0.5, 1.0: 0.9})) == (2.0, seed)
    rising = runs({lr: lr for lr in ex.LADDER if lr >= 0.5})
    grid, lr, reason = ex.select(preset, "c", rising)
    assert lr == ex.LADDER[-1] and grid == [lr for lr in ex.LADDER if lr >= 0.5]
    assert reason is not None and reason.endswith("the ladder's cap: the optimum may lie beyond")
    assert ex.pending(preset, "c", rising) == (ex.LADDER[-1], 0)  # then the reported seeds


# The faked topics are learnt perfectly by every run: the pair correlation divides by a zero std.
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
def test_smoke_preset_on_four_gloo_ranks_resumes(tmp_path: Path) -> None:
    cache = tmp_path / "features.pt"
    tasks = {k: {"x": x, "y": y} for k, (x, y) in fake_features().items()}
    torch.save({"version": features.VERSION, "tasks": tasks}, cache)
    out = tmp_path / "out"
    results = ex.run("smoke", out, cache, world=4)
    preset = ex.PRESETS["smoke"]

    assert results["complete"] and results["setup"]["world"] == 4
    assert json.loads((out / "results.json").read_text()) == results
    assert (out / "summary.md").read_text().startswith("| task (metric) | H | method |")
    assert {(c["task"], c["H"], c["method"]) for c in results["cells"]} == set(ex.cells(preset))
    for task, shards in results["shards"].items():
        assert sum(s["examples"] for s in shards) == preset.train
        assert all(s["own_share"] > 0.5 for s in shards), task
    for c in results["cells"]:
        assert c["metric"] == heads.METRIC[c["task"]]
        assert c["lr"] in c["lr_grid"] and set(preset.grid) <= set(c["lr_grid"]) <= set(ex.LADDER)
        assert set(c["val_by_lr"]) == {f"{lr:g}" for lr in c["lr_grid"]}
        assert [r["seed"] for r in c["runs"]] == list(range(preset.seeds))
        assert all(r["lr"] == c["lr"] for r in c["runs"])
        assert c["diverged"] == 0 and c["metric_std"] >= 0
        assert 0 <= c["conflict_share"] <= 1 and c["d_over_mean"] > 0
        if c["method"] == "mean":
            assert "p_mean" not in c and abs(c["d_over_mean"] - 1) < 1e-6
        else:
            assert c["paired_seeds"] == preset.seeds
            assert 0 < c["p_mean"] <= c["p_mean_holm"] <= 1
            assert 0 < c["p_spread"] <= c["p_spread_holm"] <= 1
            lo, hi = c["std_ratio_ci"]
            if c["std_ratio"] is not None:  # None when the mean's std is 0 (fake topics: 100%)
                assert lo <= c["std_ratio"] <= hi
            same = c["same_lr"]  # the mean rerun at this method's lr
            assert same["lr"] == c["lr"] and same["paired_seeds"] == preset.seeds
            assert 0 < same["p_mean"] <= same["p_mean_holm"] <= 1
    lines = (out / ex.RUNS).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len({r["key"] for r in records}) == len(records)
    assert {r["selection"] for r in records} == {True, False}
    assert ex.next_job(preset, ex.load_runs(out)) is None

    again = ex.run("smoke", out, cache, world=4)  # nothing left to run: no ranks spawned
    assert (out / ex.RUNS).read_text().splitlines() == lines
    assert again == results
