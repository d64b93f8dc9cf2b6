"""Local SGD across W workers with heterogeneous data: is the mean of the workers'
pseudo-gradients the outer step to take, or an aggregator's combination? (issue 28, item 5)

W Gloo processes (one thread each) are spawned once; every run happens inside that one process
group, each with a fresh head, inner optimizer, outer optimizer and :class:`~torchgrain.LocalSGD`.

- Data: the study's fixed splits (:func:`heads.make_data`, clean labels, ``train`` examples).
  Key ``k`` (the topic, or the valence rating quartile) belongs to rank ``k mod W``; each
  training example goes to its key's rank with probability 4/5, else to a rank drawn uniformly.
  With W = 4, topics' fifth key (tech) joins rank 0's business, so rank 0 holds two topics and
  about twice the examples. The deal is fixed (one seed) and the same in every run; each rank's
  size and share of its own keys go to ``results.json`` (80-90%). Validation and test are
  the uniform splits: the score is the global model's.
- Inner: AdamW (lr 3e-3, weight decay 0.01, its state kept across syncs), batch ``batch``,
  ``steps`` inner steps per worker for every H. Outer: SGD with Nesterov momentum 0.9 (DiLoCo's)
  on the aggregator's combination of the deltas, every H inner steps. In both presets ``steps`` is
  a multiple of every H, so the last inner step syncs and the ranks agree (a final ``sync()`` runs
  only when it does not: a sync of zero deltas would still take a momentum step).
- The outer learning rate is chosen per (task, H, method) as the study chooses its rates: the
  best mean validation metric over the selection seeds (a diverged run is the worst; ties go to
  the smaller rate). The grid is the middle of :data:`LADDER`; when the best rate is at an edge
  the next rung is run too, until the ladder's end (the cap), and ``lr_edge_reason`` says so.
- The reported seeds run at the chosen rate. A seed draws the head's initialisation and every
  rank's batch order, the same for every method: comparisons pair by seed.

Then the mean is rerun at every aggregator's chosen lr on the reported seeds, to compare the two
at the same lr too. Recorded per run (``runs.jsonl``, appended as each run ends, so a restart
resumes): rank 0's val and test metric after the last sync, the share of syncs whose mean delta
conflicts with some rank's (``SyncStats.mean_conflict``), the mean ``||d|| / ||mean delta||``.

    python -m torchgrain.experiments.study.local_sgd --preset default --out docs/results/local_sgd
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from torchgrain import LocalSGD, NonFiniteError
from torchgrain.experiments.stats import finite_or_none
from torchgrain.experiments.study.design import SELECTION_SEED0
from torchgrain.experiments.study.features import load_features
from torchgrain.experiments.study.heads import Data, evaluate, make_data, new_head
from torchgrain.experiments.study.heads import per_sample_losses as losses_of
from torchgrain.experiments.study.runner import JsonlAppender, choose_lr, read_jsonl, run_key

METHODS = ("mean", "min_norm", "dual_proj", "upgrad", "cagrad")
LADDER = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # outer lrs; the ends are the caps
INNER_LR, WEIGHT_DECAY, MOMENTUM = 3e-3, 0.01, 0.9
HOME_SHARE, DEAL_SEED = 0.8, 0
RUNS = "runs.jsonl"


@dataclass(frozen=True)
class Preset:
    tasks: tuple[str, ...]
    sync_every: tuple[int, ...]  # the H values
    methods: tuple[str, ...]
    train: int  # training examples, dealt to the ranks
    val: int
    steps: int  # inner steps per worker, the same for every H
    batch: int
    grid: tuple[float, ...]  # the first outer lrs tried: consecutive rungs of LADDER
    selection_seeds: int
    seeds: int  # reported seeds 0, 1, ...

    def __post_init__(self) -> None:
        if not set(self.grid) <= set(LADDER):
            raise ValueError(f"the grid {self.grid} must be rungs of the ladder {LADDER}")


PRESETS = {
    "smoke": Preset(("topics", "valence"), (4,), ("mean", "upgrad"), train=256, val=64,
                    steps=8, batch=8, grid=(0.5, 1.0), selection_seeds=1, seeds=3),
    "default": Preset(("topics", "valence"), (8, 32), METHODS, train=1024, val=256, steps=256,
                      batch=16, grid=(0.25, 0.5, 1.0, 2.0), selection_seeds=3, seeds=20),
}  # fmt: skip


def cells(preset: Preset) -> list[tuple[str, int, str]]:
    """Every (task, H, method) of ``preset``, the mean first within each (task, H)."""
    return [(t, h, m) for t in preset.tasks for h in preset.sync_every for m in preset.methods]


def cell_key(preset: Preset, task: str, sync_every: int, method: str) -> str:
    return f"{task}/H{sync_every}/{method}/steps{preset.steps}b{preset.batch}"


def selection_seeds(preset: Preset) -> list[int]:
    return [SELECTION_SEED0 + i for i in range(preset.selection_seeds)]


def select(
    preset: Preset, cell: str, runs: dict[str, dict[str, Any]]
) -> tuple[list[float], float | None, str | None]:
    """The outer lrs tried so far, the choice (None while a selection run is missing) and why
    the grid grew or stopped at a cap (None when the choice is inside the first grid)."""
    grid, seeds, notes = list(preset.grid), selection_seeds(preset), list[str]()
    while True:
        if any(run_key(cell, lr, s) not in runs for lr in grid for s in seeds):
            return grid, None, None
        best = choose_lr(cell, tuple(grid), seeds, runs)
        rung, step = LADDER.index(best), (-1 if best == grid[0] else 1)
        if best not in (grid[0], grid[-1]):
            return grid, best, "; ".join(notes) or None
        if not 0 <= rung + step < len(LADDER):
            notes.append(f"best at {best:g}, the ladder's cap: the optimum may lie beyond")
            return grid, best, "; ".join(notes)
        notes.append(f"best at the edge {best:g}: ran {LADDER[rung + step]:g}")
        grid = [LADDER[rung + step], *grid] if step < 0 else [*grid, LADDER[rung + step]]


def pending(preset: Preset, cell: str, runs: dict[str, dict[str, Any]]) -> tuple[float, int] | None:
    """The next (outer lr, seed) to run for ``cell``, or None when it is done."""
    grid, best, _ = select(preset, cell, runs)
    if best is None:
        return next((lr, s) for lr in grid for s in selection_seeds(preset)
                    if run_key(cell, lr, s) not in runs)  # fmt: skip
    return next(
        ((best, s) for s in range(preset.seeds) if run_key(cell, best, s) not in runs), None
    )


def next_job(
    preset: Preset, runs: dict[str, dict[str, Any]]
) -> tuple[str, int, str, float, int] | None:
    """The next (task, H, method, outer lr, seed) to run, or None when all are done: each cell's
    selection and reported runs, cell by cell; then the mean at every aggregator's chosen lr on
    the reported seeds (the comparison at the same lr)."""
    for task, h, method in cells(preset):
        job = pending(preset, cell_key(preset, task, h, method), runs)
        if job is not None:
            return task, h, method, *job
    for task, h, method in cells(preset):
        lr = select(preset, cell_key(preset, task, h, method), runs)[1]
        assert lr is not None  # every cell's selection is done
        for seed in range(preset.seeds):
            if run_key(cell_key(preset, task, h, "mean"), lr, seed) not in runs:
                return task, h, "mean", lr, seed
    return None


def deal(keys: Tensor, world: int) -> list[Tensor]:
    """The training indices of each rank: key ``k``'s examples go to rank ``k mod world`` with
    probability :data:`HOME_SHARE`, else to a uniformly drawn rank."""
    g = torch.Generator().manual_seed(DEAL_SEED)
    stay = torch.rand(len(keys), generator=g) < HOME_SHARE
    anywhere = torch.randint(0, world, (len(keys),), generator=g)
    rank_of = torch.where(stay, keys % world, anywhere)  # (N,)
    return [torch.nonzero(rank_of == r).flatten() for r in range(world)]


def one_run(
    preset: Preset, data: Data, shard: Tensor, sync_every: int, method: str, lr: float, seed: int
) -> dict[str, Any]:
    """Train one head on this rank's ``shard`` with LocalSGD (every rank calls it alike); the
    metrics are rank 0's (NaN elsewhere, and when the run diverged)."""
    model = new_head("mlp", data.x_train.shape[1], data.classes, seed)
    inner = torch.optim.AdamW(model.parameters(), lr=INNER_LR, weight_decay=WEIGHT_DECAY)
    outer = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, nesterov=True)
    local = LocalSGD(model, sync_every, aggregator=method, outer_optimizer=outer)
    order = torch.Generator().manual_seed(1_000 * seed + dist.get_rank())
    per_epoch = len(shard) // preset.batch
    batches: list[Tensor] = []
    while len(batches) < preset.steps:  # epochs over the shard, the last partial batch dropped
        perm = shard[torch.randperm(len(shard), generator=order)]
        batches += [perm[i * preset.batch : (i + 1) * preset.batch] for i in range(per_epoch)]
    conflict, ratio, diverged, start = [], [], False, time.perf_counter()
    try:
        for step, idx in enumerate(batches[: preset.steps]):
            inner.zero_grad(set_to_none=True)
            losses_of(data, model, data.x_train[idx], data.y_train[idx]).mean().backward()
            inner.step()
            stats = local.step()
            if stats is None and step == preset.steps - 1:
                stats = local.sync()  # the ranks agree at the end
            if stats is not None:
                conflict.append(float(stats.mean_conflict))
                ratio.append(float(stats.d_over_mean))
    except NonFiniteError:  # raised on every rank alike, before anything moved
        diverged = True
    nan, rank0 = math.nan, dist.get_rank() == 0
    ratio = [r for r in ratio if math.isfinite(r)]  # NaN when the mean delta is 0
    return {
        "val": evaluate(data, model, data.x_val, data.y_val) if rank0 and not diverged else nan,
        "test": evaluate(data, model, data.x_test, data.y_test) if rank0 and not diverged else nan,
        "diverged": diverged,
        "syncs": local.syncs,
        "conflict": sum(conflict) / len(conflict) if conflict else nan,
        "d_over_mean": sum(ratio) / len(ratio) if ratio else nan,
        "seconds": time.perf_counter() - start,
    }


def load_runs(out: Path) -> dict[str, dict[str, Any]]:
    return {r["key"]: r for r in read_jsonl(out, RUNS)}


def _worker(rank: int, world: int, port: int, name: str, out: Path, cache: Path, cap: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(minutes=5))  # fmt: skip
    try:
        preset, features = PRESETS[name], load_features(cache)
        data = {t: make_data(t, features, preset.train, preset.val, 0.0) for t in preset.tasks}
        shards = {t: deal(d.keys_train, world)[rank] for t, d in data.items()}
        runs = load_runs(out)
        dist.barrier()  # every rank has read the runs before rank 0 appends to them
        new = 0
        with JsonlAppender(out / RUNS) as sink:
            while new < cap and (job := next_job(preset, runs)) is not None:
                task, h, method, lr, seed = job
                record = one_run(preset, data[task], shards[task], h, method, lr, seed)
                box = [record]
                dist.broadcast_object_list(box, src=0)  # rank 0's metrics, on every rank
                cell = cell_key(preset, task, h, method)
                record = {"key": run_key(cell, lr, seed), "cell": cell, "task": task, "H": h,
                          "method": method, "lr": lr, "seed": seed,
                          "selection": seed >= SELECTION_SEED0,
                          **{k: finite_or_none(v) for k, v in box[0].items()}}  # fmt: skip
                runs[record["key"]], new = record, new + 1
                if rank == 0:
                    sink.write(record)
                    _progress(new, record)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _progress(new: int, r: dict[str, Any]) -> None:
    val, test = (f"{v:.4f}" if v is not None else "diverged" for v in (r["val"], r["test"]))
    print(f"[{new}] {r['key']}: val {val} test {test} ({r['seconds']:.2f} s)", file=sys.stderr,
          flush=True)  # fmt: skip


def run(
    name: str, out: Path, features: Path, world: int = 4, max_runs: int | None = None
) -> dict[str, Any]:
    """Run (or resume) the preset on ``world`` Gloo ranks; write and return ``results.json``."""
    from torchgrain.experiments.study import local_sgd_report as report

    preset = PRESETS[name]
    out.mkdir(parents=True, exist_ok=True)
    cache = load_features(features)  # computed there when missing, before the ranks read it
    shards = {t: report.composition(make_data(t, cache, preset.train, preset.val, 0.0), world)
              for t in preset.tasks}  # fmt: skip
    smallest = min(r["examples"] for ranks in shards.values() for r in ranks)
    if smallest < preset.batch:
        raise ValueError(f"a rank's shard has {smallest} examples, fewer than the batch "
                         f"{preset.batch}; use fewer ranks than {world}")  # fmt: skip
    if next_job(preset, load_runs(out)) is not None:
        with socket.socket() as s:  # a free port for the ranks' rendezvous
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        cap = sys.maxsize if max_runs is None else max_runs
        mp.start_processes(_worker, args=(world, port, name, out, features, cap), nprocs=world,
                           join=True, start_method="spawn")  # fmt: skip
    results = report.analyse(preset, name, load_runs(out), world, shards)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "summary.md").write_text(report.markdown(results))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m torchgrain.experiments.study.local_sgd",
        description="LocalSGD on the study's cheap tasks, the training data split by key over "
        "W Gloo ranks: every aggregator against the mean, each with its outer lr chosen on "
        "validation. Writes OUT/runs.jsonl (resumable), OUT/results.json and OUT/summary.md.",
    )
    parser.add_argument("--preset", choices=list(PRESETS), default="smoke")
    parser.add_argument("--out", type=Path, default=Path("runs/local_sgd"))
    parser.add_argument(
        "--features",
        type=Path,
        default=Path(tempfile.gettempdir()) / "torchgrain" / "features.pt",
        help="the MiniLM features cache (computed there in about a minute when missing; 15 MB, "
        "keep it out of git)",
    )
    parser.add_argument("--world", type=int, default=4, help="Gloo ranks, one thread each")
    parser.add_argument("--max-runs", type=int, help="stop after this many new runs")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = run(args.preset, args.out, args.features, args.world, args.max_runs)
    from torchgrain.experiments.study import local_sgd_report as report

    print(report.markdown(results))
    print(f"wrote {args.out / 'results.json'} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
