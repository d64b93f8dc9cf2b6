"""The README's promises: its two opening commands and its usage example, which runs here; and the
examples of the documentation's guides (docs/), which run here too."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"


def _code_blocks(section: str, language: str, text: str = README) -> list[str]:
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", body, flags=re.S)


def _page_blocks(page: str, language: str, section: str | None = None) -> list[str]:
    text = (DOCS / page).read_text()
    if section is not None:
        return _code_blocks(section, language, text)
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_readme_opens_with_the_two_commands() -> None:
    first = re.search(r"```bash\n(.*?)```", README, flags=re.S)
    assert first is not None and README.index("```bash") < README.index("\n## ")
    commands = [line for line in first.group(1).splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2
    test_command = commands[1]
    assert test_command.endswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert (
        'pip install -q torch==2.13.0 -e ".[test,lint,docs]"' in ci and "\npython -m pytest\n" in ci
    )


def test_usage_example_runs(capsys) -> None:  # type: ignore[no-untyped-def]
    (example,) = _code_blocks("Usage", "python")
    assert len(example.strip().splitlines()) <= 16
    exec(compile(example, "README.md:Usage", "exec"), {})
    ratio = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= ratio <= 1.0 + 1e-6


def test_getting_started_shows_the_readme_example() -> None:
    (usage,) = _code_blocks("Usage", "python")
    (example,) = _page_blocks("getting_started.md", "python", "The first example")
    assert example == usage


def test_accumulation_and_local_sgd_examples_run(capsys) -> None:  # type: ignore[no-untyped-def]
    (accumulation,) = _page_blocks("guides/accumulation.md", "python")
    exec(compile(accumulation, "docs/guides/accumulation.md", "exec"), {})
    assert capsys.readouterr().out.strip().splitlines()[-1] == "8"
    (local_sgd,) = _page_blocks("local_sgd.md", "python", "In short")
    exec(compile(local_sgd, "docs/local_sgd.md:In short", "exec"), {})
    assert capsys.readouterr().out.strip().splitlines()[-1] == "4"


def test_readme_torchrun_command_is_the_tested_one() -> None:
    assert "torchrun --standalone --nproc_per_node=2 examples/ddp_train.py" in README


def test_integration_examples_run(capsys, monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    (hf,) = _page_blocks("guides/hf_trainer.md", "python")
    (lightning,) = _page_blocks("guides/lightning.md", "python")
    (helpers,) = _page_blocks("guides/plain_loop.md", "python", "Per-sample loss helpers")
    monkeypatch.chdir(tmp_path)  # the examples write out/ and logs/ in the working directory
    exec(compile(hf, "docs/guides/hf_trainer.md", "exec"), {})
    ratio = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 < ratio <= 1.0 + 1e-6
    exec(compile(lightning, "docs/guides/lightning.md", "exec"), {})
    log_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    header = (log_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"grain/d_over_mean", "grain/active_groups"} <= set(header)
    exec(compile(helpers, "docs/guides/plain_loop.md", "exec"), {})
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("torch.Size([4])")


def test_readme_links_reach_files_and_anchors() -> None:
    """Every relative link of the README (into docs/, mostly) names a file that exists, and an
    anchor names one of its headings (the site's slugs: lower case, punctuation dropped)."""
    links = re.findall(r"\]\(([^)\s]+)\)", README)
    assert links
    for link in links:
        if "://" in link:
            continue
        path, _, anchor = link.partition("#")
        target = ROOT / (path or "README.md")
        assert target.is_file(), link
        if anchor:
            headings = re.findall(r"^#+ (.+)$", target.read_text(), flags=re.M)
            slugs = {
                re.sub(r"[\s]+", "-", re.sub(r"[^\w\s-]", "", h).strip().lower()) for h in headings
            }
            assert anchor in slugs, link
