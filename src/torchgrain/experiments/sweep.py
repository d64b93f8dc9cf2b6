"""The reproduction sweep: tasks x methods x seeds, saved run by run so it can resume.

``DIR/results.json`` holds ``{"version": 1, "runs": [...]}``: one record per finished run with
its task, method, seed, test metric, curves, GRAIN diagnostics and config. It is rewritten
atomically (a temporary file, then ``os.replace``) after every run, so an interrupted sweep loses
at most the run in progress, and a rerun with the same ``--out`` skips every run whose task,
method, seed and config are already there. Runs of another preset stay in the file untouched.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from torchgrain import __version__
from torchgrain.experiments._progress import bar
from torchgrain.experiments.presets import size_of
from torchgrain.experiments.runner import Method, train
from torchgrain.experiments.tasks import load_task

VERSION = 1


def load_results(out: Path) -> dict[str, Any]:
    """``out/results.json``, or an empty result set."""
    path = out / "results.json"
    if not path.exists():
        return {"version": VERSION, "runs": []}
    data = json.loads(path.read_text())
    if data.get("version") != VERSION or not isinstance(data.get("runs"), list):
        raise ValueError(
            f"{path} is not a torchgrain results file of version {VERSION}; pass another --out"
        )
    return data


def save_results(out: Path, data: dict[str, Any], name: str = "results.json") -> None:
    """Write ``out/name`` atomically (a temporary file, then ``os.replace``)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"{name}.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, out / name)


def run_config(preset: str, task: str, device: torch.device) -> dict[str, Any]:
    """What a run's result depends on; runs resume only into the same config."""
    return {"preset": preset, "size": size_of(preset, task).to_dict(), "device": device.type}


def sweep(
    tasks: Sequence[str],
    preset: str,
    seeds: Sequence[int],
    methods: Sequence[str],
    out: Path,
    *,
    device: torch.device,
    progress: bool = True,
    max_runs: int | None = None,
) -> list[dict[str, Any]]:
    """Run what is missing and return every matching run record (finished earlier or now).

    Args:
        max_runs: stop after this many new runs (a budget; the rest resume next time).
    """
    methods = list(dict.fromkeys(methods))  # a method named twice runs once
    parsed = [Method.parse(m) for m in methods]
    data = load_results(out)
    done = 0
    for task_name in tasks:
        config = run_config(preset, task_name, device)
        have = {(r["method"], r["seed"]) for r in data["runs"] if _matches(r, task_name, config)}
        todo = [(m, s) for s in seeds for m in parsed if (m.name, s) not in have]
        if not todo or (max_runs is not None and done >= max_runs):
            continue
        task = load_task(task_name, size_of(preset, task_name), device)
        size = task.size
        steps = (len(task.train) // size.batch) * size.epochs
        runs_bar = bar(todo, progress, f"{task_name} runs")
        for method, seed in todo:
            if max_runs is not None and done >= max_runs:
                break
            step_bar = bar(range(steps), progress, f"{method.name} seed {seed}", leave=False)
            try:
                _, record = train(task, method, seed, on_step=step_bar.update)
            finally:
                step_bar.close()
            record["config"] = {
                **config,
                "description": task.description,
                "torch": torch.__version__,
                "torchgrain": __version__,
                "machine": platform.machine(),
            }
            data["runs"].append(record)
            save_results(out, data)
            done += 1
            runs_bar.update(1)
            runs_bar.set_postfix_str(
                f"{method.name} seed {seed}: {task.metric} {record['metric']:.4f}"
            )
        runs_bar.close()
        del task
    return [
        r
        for r in data["runs"]
        if r["task"] in tasks
        and r["method"] in methods
        and r["seed"] in seeds
        and _matches(r, r["task"], run_config(preset, r["task"], device))
    ]


def _matches(record: dict[str, Any], task: str, config: dict[str, Any]) -> bool:
    c = record.get("config", {})
    return record["task"] == task and all(c.get(k) == v for k, v in config.items())
