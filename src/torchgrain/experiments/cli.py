"""The ``torchgrain`` command.

``torchgrain reproduce``: fine-tune real pretrained models on real data, offline, with the mean
baseline and with GRAIN over several seeds; print mean ± std, the run-to-run spread and tests per
task; write ``results.json``, CSV files and PNG plots. ``torchgrain stability``: train on
datasets that differ in one example and compare. ``torchgrain bench``: step time and peak memory
of each engine against plain mean training (``benchmarks/step.py`` from a source checkout).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from torchgrain.experiments.presets import PRESETS, TASKS, size_of
from torchgrain.experiments.study import design as study_design

DEFAULT_METHODS = ("mean", "grain-m4", "grain-m8")
SMOKE_METHODS = ("mean", "grain-m4")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"] and argv[1:2] not in (["-h"], ["--help"]):
        try:  # every option goes to benchmarks/step.py as it is
            return _bench(argv[1:])
        except FileNotFoundError as err:
            print(f"torchgrain bench: error: {err}", file=sys.stderr)
            return 2
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.threads is not None:
        if args.threads < 1:
            print(f"torchgrain: error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args))
    except (ValueError, ModuleNotFoundError, FileNotFoundError) as err:
        print(f"torchgrain {args.command}: error: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchgrain", description="GRAIN for PyTorch: the paper's claims, measured offline."
    )
    sub = parser.add_subparsers(dest="command")

    rep = sub.add_parser(
        "reproduce",
        help="fine-tune with the mean and with GRAIN over seeds; tables, JSON/CSV, plots",
        description="Fine-tune real pretrained models on real data (all read from installed "
        "packages) with the mean baseline and with GRAIN over several seeds, then report the "
        "mean, the run-to-run spread and tests per task. Interrupted sweeps resume.",
    )
    what = rep.add_argument_group("what to run")
    what.add_argument("--task", choices=[*TASKS, "all"], default="all")
    what.add_argument(
        "--preset", choices=PRESETS, default="smoke",
        help="smoke: ~2 min on a 2-core CPU; default: < 30 min there; full: sized for a GPU; "
        "tiny: random small models, for tests (default: smoke)",
    )  # fmt: skip
    what.add_argument("--seeds", type=int, help="seeds 0..N-1 (default: the preset's)")
    what.add_argument(
        "--methods", nargs="+",
        help="mean, grain-m<m> (the min-norm point), dualproj-m<m>, upgrad-m<m>, cagrad-m<m>, "
        "each optionally with -rescaled (default: mean grain-m4 grain-m8; smoke: mean grain-m4)",
    )  # fmt: skip
    _common(rep, "runs/reproduce")
    rep.add_argument("--max-runs", type=int, help="stop after N new runs (resume later)")
    rep.add_argument(
        "--markdown", action="store_true", help="also print the results as one Markdown table"
    )
    rep.set_defaults(func=_reproduce)

    stab = sub.add_parser(
        "stability",
        help="train on datasets that differ in one example; compare mean vs GRAIN",
        description="For each pair, train the same seed on the training set and on a copy with "
        "one example replaced, per method, and report the parameter distance and the test "
        "prediction difference.",
    )
    stab.add_argument("--task", choices=TASKS, default="regression")
    stab.add_argument("--preset", choices=PRESETS, default="smoke")
    stab.add_argument("--pairs", type=int, default=5, help="neighbouring dataset pairs (default 5)")
    stab.add_argument("--methods", nargs="+", default=["mean", "grain-m8"])
    _common(stab, "runs/stability")
    stab.set_defaults(func=_stability)

    study = sub.add_parser(
        "study",
        help="where does group aggregation help? a fair, powered study on cheap real tasks",
        description="Heads on frozen MiniLM features of BBC News and VADER, every aggregator "
        "against the mean with its own learning rate (chosen on a validation split), over "
        "optimizers, group sizes, groupings, label noise and weight averaging, with enough "
        "seeds to see a change of spread; plus neighbouring-dataset stability under plain SGD. "
        "Writes DIR/study.json, DIR/summary.md and heat maps. Resumable; --shard i/n runs a "
        "piece, and a run without --shard merges the pieces.",
    )
    study.add_argument(
        "--preset",
        choices=list(study_design.PRESETS),
        default="smoke",
        help="(default smoke; tiny: the test suite's)",
    )
    study.add_argument(
        "--shard", default=None, help="i/n: run only the cells i, i+n, ... (a piece of the study)"
    )
    study.add_argument("--max-runs", type=int, help="stop after this many new runs")
    study.add_argument(
        "--finalists",
        action="store_true",
        help="instead of the cheap tasks, fine-tune SmolLM2 (the generation task) on the cells "
        "they single out: DIR/finalists.json, finalists.md and finalists.png",
    )
    _common(study, "runs/study")
    study.set_defaults(func=_study)

    sub.add_parser(
        "bench",
        help="step time and peak memory of each engine vs plain training (benchmarks/step.py)",
        description="Runs benchmarks/step.py of a source checkout with every option passed on "
        "(e.g. torchgrain bench --steps 5 --groups 2 8); see python benchmarks/step.py --help.",
    )
    return parser


def _common(p: argparse.ArgumentParser, out: str) -> None:
    run = p.add_argument_group("where and how")
    run.add_argument("--out", type=Path, default=Path(out), help=f"output folder (default {out})")
    run.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if present)")
    run.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no bars")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _reproduce(args: argparse.Namespace) -> int:
    from torchgrain.experiments import report
    from torchgrain.experiments.sweep import sweep

    tasks = list(TASKS) if args.task == "all" else [args.task]
    methods = list(
        dict.fromkeys(
            args.methods or (SMOKE_METHODS if args.preset == "smoke" else DEFAULT_METHODS)
        )
    )
    n_seeds = (
        args.seeds if args.seeds is not None else max(size_of(args.preset, t).seeds for t in tasks)
    )
    if n_seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {n_seeds}")
    device = _device(args.device)
    print(
        f"torchgrain reproduce: preset {args.preset}, tasks {', '.join(tasks)}, methods "
        f"{', '.join(methods)}, seeds 0..{n_seeds - 1}, device {device}, out {args.out}",
        flush=True,
    )
    start = time.perf_counter()
    runs = sweep(
        tasks, args.preset, range(n_seeds), methods, args.out,
        device=device, progress=args.progress, max_runs=args.max_runs,
    )  # fmt: skip
    rows = report.summarize(runs)
    print()
    for task in tasks:
        described = [r["config"]["description"] for r in runs if r["task"] == task]
        print(report.table(rows, task, described[0] if described else ""), end="\n\n")
    print(report.LEGEND)
    if args.markdown:
        print("\n" + report.markdown(rows))
    if runs:
        report.write_csv(runs, rows, args.out)
        plots = report.plot(runs, args.out)
        print(f"\nwrote {args.out / 'results.json'}, runs.csv, summary.csv and {len(plots)} plots")
    missing = len(tasks) * n_seeds * len(methods) - len(runs)
    print(f"{time.perf_counter() - start:.0f} s; {missing} runs still to do" if missing else
          f"{time.perf_counter() - start:.0f} s")  # fmt: skip
    return 0


def _stability(args: argparse.Namespace) -> int:
    from torchgrain.experiments.stability import stability, stability_table

    device = _device(args.device)
    print(
        f"torchgrain stability: task {args.task}, preset {args.preset}, {args.pairs} pairs, "
        f"methods {', '.join(args.methods)}, device {device}",
        flush=True,
    )
    records = stability(
        args.task, args.preset, args.pairs, args.methods, args.out,
        device=device, progress=args.progress,
    )  # fmt: skip
    print(stability_table(records))
    print(
        "\n‖θ−θ′‖: distance of the trained parameters; relative: over the distance travelled "
        "from the start; Δprediction: mean test prediction difference; vs mean: ratio of "
        "Δprediction to the mean baseline's over the same pairs, sign-flip permutation p."
    )
    print(f"wrote {args.out / 'stability.json'}")
    return 0


def _study(args: argparse.Namespace) -> int:
    from torchgrain.experiments.study import analysis, report
    from torchgrain.experiments.study.runner import load_stability, run_study
    from torchgrain.experiments.study.stability import summarize

    if args.finalists:
        return _finalists(args)
    shard = (0, 1)
    if args.shard is not None:
        try:
            index, count = (int(part) for part in args.shard.split("/"))
        except ValueError:
            raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {args.shard!r}") from None
        shard = (index, count)
    print(
        f"torchgrain study: preset {args.preset}, shard {shard[0]}/{shard[1]}, out {args.out}",
        flush=True,
    )
    start = time.perf_counter()
    runs = run_study(
        args.preset, args.out, shard=shard, progress=args.progress, max_runs=args.max_runs
    )
    study = analysis.analyse(args.preset, runs)
    records = load_stability(args.out)
    study["stability"] = {"summary": summarize(records), "pairs": records}
    path = analysis.write_study(args.out, study)
    (args.out / "summary.md").write_text(report.markdown(study))
    plots = report.heatmaps(study, args.out)
    stability_png = report.stability_plot(study, args.out)
    plots += [stability_png] if stability_png is not None else []
    done = len(study["cells"])
    total = len(study_design.cells(args.preset))
    print(report.markdown(study))
    print(
        f"wrote {path}, {args.out / 'summary.md'} and {len(plots)} plots; {done}/{total} "
        f"cells finished ({time.perf_counter() - start:.0f} s)"
    )
    return 0


def _finalists(args: argparse.Namespace) -> int:
    from torchgrain.experiments.study import finalists

    if args.shard is not None:
        raise ValueError("--shard splits the cheap tasks; the finalists run in one piece (resume)")
    device = _device(args.device)
    print(
        f"torchgrain study --finalists: preset {args.preset}, device {device}, out {args.out}",
        flush=True,
    )
    start = time.perf_counter()
    runs = finalists.run_finalists(
        args.preset, args.out, device=device, progress=args.progress, max_runs=args.max_runs
    )
    result = finalists.analyse_finalists(args.preset, runs)
    written = finalists.write_finalists(args.out, result)
    print((args.out / "finalists.md").read_text())
    print(
        f"wrote {', '.join(str(p) for p in written)}; {len(result['cells'])}/"
        f"{len(finalists.finalist_cells())} cells finished ({time.perf_counter() - start:.0f} s)"
    )
    return 0


def _bench(options: list[str]) -> int:
    script = Path(__file__).resolve().parents[3] / "benchmarks" / "step.py"
    if not script.exists():
        raise FileNotFoundError(
            f"{script} not found: `torchgrain bench` runs the benchmarks of a source checkout "
            "(git clone, then pip install -e .)"
        )
    return subprocess.call([sys.executable, str(script), *options], env=os.environ.copy())


if __name__ == "__main__":
    raise SystemExit(main())
