"""The benchmark scripts run end to end on a tiny configuration and print their tables (their
figures are not checked: performance is measured by running them, never asserted in tests)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--threads", "1", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.parametrize("where", [[], ["--one-process"]], ids=["a process each", "one process"])
def test_step_paired_prints_a_ratio_per_mode(where: list[str]) -> None:
    out = _run(
        "step_paired.py", "--model", "bert-small", "--narrow", "--batch", "4", "--tokens", "4",
        "--groups", "2", "--rounds", "4", "--modes", "keep", "bookkeeping", "deferred", *where,
    )  # fmt: skip
    assert "bert-small (narrow), B=4, T=4, m=2" in out
    assert ("one process" if where else "a process per method") in out
    assert re.search(r"\| plain \| \| \| \d+ \|", out), out
    for mode in ("keep", "bookkeeping", "deferred"):
        row = rf"\| {mode} \| \d+\.\d\dx \| \[\d+\.\d\d, \d+\.\d\d\] \| \d+ \|"
        assert re.search(row, out), out


def test_step_profile_prints_time_by_kind() -> None:
    out = _run(
        "step_profile.py", "--model", "bert-small", "--batch", "4", "--tokens", "4",
        "--groups", "2", "--steps", "1", "--top", "3",
    )  # fmt: skip
    rows = [line for line in out.splitlines() if line.startswith(("| plain", "| keep", "| book"))]
    assert len(rows) == 3 and "| GEMM |" in out


def test_step_profile_stages_time_grains_backward() -> None:
    out = _run(
        "step_profile.py", "--model", "bert-small", "--batch", "4", "--tokens", "4",
        "--groups", "2", "--steps", "1", "--top", "1", "--stages",
    )  # fmt: skip
    stages = (
        "backward (all)",
        "backward to the layers' outputs, rules and Gram",
        "Gram products",
        "the backward itself (the rest)",
        "solve",
    )
    for stage in stages:
        assert re.search(rf"\| +{re.escape(stage)} \| -?\d+\.\d \| -?\d+\.\d \|", out), out
    assert "LinearRule.group_grads" in out and "d (combine)" in out


def test_step_paths_prints_each_path_and_the_model_pick() -> None:
    out = _run(
        "step_paths.py",
        "--shapes",
        "16x32",
        "--tokens",
        "32",
        "64",
        "--groups",
        "2",
        "4",
        "--repeats",
        "2",
    )
    rows = re.findall(r"\| (\d) \| 16x32 \| (\d+) \|( \d+\.\d+ \|){3} (\w+) \| (\w+) \|", out)
    assert [(r[0], r[1]) for r in rows] == [("2", "32"), ("2", "64"), ("4", "32"), ("4", "64")], out
    assert all(r[3] in ("keep", "bookkeeping", "ghost") for r in rows)
    assert "now 8 and 6:" in out
    assert len(re.findall(r"^\| \d+ \|( \d+\.\d+x \|){6}$", out, re.M)) == 6, out  # the refit


def test_norm_paths_prints_each_path_and_the_pick() -> None:
    out = _run(
        "norm_paths.py", "--shapes", "4x3x8", "8x2x16", "--groups", "2", "4", "--repeats", "2"
    )
    rows = re.findall(
        r"^\| (\d) \| (\d+x\d+x\d+) \| \d+ \|( \d+\.\d+ \|){2} ([\w ]+) \| ([\w ]+) \|$", out, re.M
    )
    assert [(r[0], r[1]) for r in rows] == [
        ("2", "4x3x8"), ("2", "8x2x16"), ("4", "4x3x8"), ("4", "8x2x16")
    ], out  # fmt: skip
    assert all(r[4] == "normalised input" for r in rows)  # small calls: no per-group kernels
    assert "at worst:" in out


def test_gpu_profile_script_says_so_without_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the script would profile")
    done = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_profile.sh")],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
    )
    assert done.returncode == 0 and "no CUDA device" in done.stdout, done.stderr


def test_gpu_ab_script_says_so_without_cuda_and_checks_its_base(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the script would run the comparison")
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}
    script = str(BENCHMARKS / "gpu_ab.sh")
    done = subprocess.run(["bash", script, str(tmp_path)], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "holds no torchgrain package" in done.stderr, done.stderr
    (tmp_path / "torchgrain").mkdir()
    (tmp_path / "torchgrain" / "__init__.py").write_text("")
    done = subprocess.run(["bash", script, str(tmp_path)], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "no CUDA device" in done.stdout, done.stderr


def test_the_deferred_mode_gives_plain_trainings_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """``step_paired.py``'s floor diagnostic computes the same gradients as ``backward()``."""
    import argparse
    import copy

    import torch

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from step_paired import _deferred_backward
    from step_profile import _step_module

    args = argparse.Namespace(model="bert-small", narrow=True, batch=4, tokens=6, autocast=False)
    shared = _step_module()
    base = shared._build(args, lora=False).eval()  # no dropout: the same forward twice
    ids, labels = shared._inputs(args, "cpu", low=0, high=base.config.vocab_size)
    plain, deferred = copy.deepcopy(base), copy.deepcopy(base)
    shared._losses(args, plain, ids, labels).mean().backward()
    grain = shared._grain(deferred, "keep", 2)
    _deferred_backward(grain, shared._losses(args, deferred, ids, labels))
    for p, q in zip(plain.parameters(), deferred.parameters(), strict=True):
        if p.grad is None:
            assert q.grad is None
            continue
        assert q.grad is not None
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6)


def _run_gloo(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_local_sgd_sync_prints_a_ratio_and_bytes_per_sync() -> None:
    out = _run_gloo(
        "local_sgd_sync.py", "--model", "mlp", "--width", "32", "--world", "2", "--rounds", "4",
        "--aggregators", "mean", "upgrad",
    )  # fmt: skip
    for name in ("allreduce", "average", "localsgd-mean", "localsgd-upgrad"):
        ratio = r"\d+\.\d\dx \| \[\d+\.\d\d, \d+\.\d\d\]"
        assert re.search(rf"\| 2 \| {name} \| [\d.]+ ms \| {ratio} \| [\d.]+ MiB \|", out), out
    assert "mlp: P = 4,522 float32 parameters; 4 rounds" in out


def test_distributed_prints_grain_against_ddp() -> None:
    out = _run_gloo(
        "distributed.py", "--model", "mlp", "--width", "16", "--world", "2", "--groups", "2",
        "--rounds", "4",
    )  # fmt: skip
    assert re.search(r"\| 2 \| DDP all-reduce \| [\d.]+ ms \| 1\.00x", out), out
    assert re.search(r"\| 2 \| GRAIN, 2 group\(s\)/rank \| [\d.]+ ms \| \d+\.\d\dx", out), out
