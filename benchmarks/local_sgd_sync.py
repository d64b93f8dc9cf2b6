"""LocalSGD's sync against the mean's all-reduce sync, on Gloo processes.

    python benchmarks/local_sgd_sync.py --model bert-small --world 2 4
    python benchmarks/local_sgd_sync.py --model mlp --width 2048 --world 2 4

Each of W processes (one thread each) holds one copy of the model per method, with the same
weights, and before every timed sync moves its parameters to ``anchor + noise_r`` (a fixed,
rank-dependent perturbation: what H inner steps would leave). The syncs timed, each ending with
every rank holding the new anchor:

- ``allreduce``: the mean's sync as DiLoCo implementations do it: the deltas ``anchor - theta``
  packed into 16 MiB buckets, each all-reduced asynchronously as soon as it is packed, divided by
  W, written to ``.grad``; parameters back to the anchor; the outer optimizer's step; new anchor.
- ``average``: torch's own model averaging (``torch.distributed.algorithms.model_averaging.utils.
  average_parameters``: one flat buffer, one all-reduce), which has no outer optimizer or anchor.
- ``localsgd-<aggregator>``: ``torchgrain.LocalSGD.sync()``: the same, with the Gram of the
  deltas computed from sharded all-to-alls and the combination all-gathered (its checks, Gram,
  solve and statistics included).

The outer optimizer is SGD with Nesterov momentum 0.9, lr 0.7, for ``allreduce`` and LocalSGD.
Methods run in rounds, one sync of each per round in a rotating order; each round gives one ratio
per method over the same round's ``allreduce`` sync. The table gives rank 0's median sync time, the
median ratio and the middle half of the rounds' ratios, and the payload bytes each rank sends: a
ring all-reduce's ``2 P (W-1)/W`` values, and what LocalSGD counts as it sends.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from _gloo import ratio_cells, rounds, spawn  # this folder is on sys.path

BUCKET_BYTES = 16 << 20


def _model(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    if args.model == "mlp":
        w = args.width
        return torch.nn.Sequential(
            torch.nn.Linear(64, w), torch.nn.ReLU(), torch.nn.Linear(w, w), torch.nn.ReLU(),
            torch.nn.Linear(w, w), torch.nn.ReLU(), torch.nn.Linear(w, 10),
        )  # fmt: skip
    from step_profile import _step_module  # the models of step.py

    args.narrow = args.autocast = False
    args.batch, args.tokens = 1, 8
    return _step_module()._build(args, lora=False)


class AllReduceSync:
    """The mean's sync, as DiLoCo implementations do it (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, world: int) -> None:
        self.params = list(model.parameters())
        self.anchor = [p.detach().clone() for p in self.params]
        self.outer = torch.optim.SGD(self.params, lr=0.7, momentum=0.9, nesterov=True)
        self.world = world
        self.buckets: list[list[int]] = [[]]
        size = 0
        for i, p in enumerate(self.params):
            if self.buckets[-1] and size + p.numel() * 4 > BUCKET_BYTES:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(i)
            size += p.numel() * 4

    @torch.no_grad()
    def sync(self) -> None:
        in_flight = []
        for bucket in self.buckets:
            flat = torch.cat([(self.anchor[i] - self.params[i]).flatten() for i in bucket])
            in_flight.append((bucket, flat, dist.all_reduce(flat, async_op=True)))
        for bucket, flat, work in in_flight:
            work.wait()
            flat /= self.world
            start = 0
            for i in bucket:
                p = self.params[i]
                p.copy_(self.anchor[i])
                p.grad = flat[start : start + p.numel()].view_as(p)
                start += p.numel()
        self.outer.step()
        for a, p in zip(self.anchor, self.params, strict=True):
            a.copy_(p)


def _worker(rank: int, world: int, args: argparse.Namespace, out: str) -> None:
    from torch.distributed.algorithms.model_averaging.utils import average_parameters

    import torchgrain

    base = _model(args)
    numel = sum(p.numel() for p in base.parameters())
    g = torch.Generator().manual_seed(rank)
    noise = [1e-3 * torch.randn(p.shape, generator=g) for p in base.parameters()]
    syncs, anchors, sent = {}, {}, {}

    reduce_model = copy.deepcopy(base)
    reduce = AllReduceSync(reduce_model, world)
    syncs["allreduce"], anchors["allreduce"] = (reduce_model, reduce.sync), reduce.anchor
    sent["allreduce"] = lambda: 2 * -(-numel // world) * (world - 1) * 4
    average_model = copy.deepcopy(base)
    average_anchor = [p.detach().clone() for p in average_model.parameters()]
    syncs["average"] = (
        average_model,
        lambda: average_parameters(average_model.parameters(), dist.group.WORLD),
    )
    anchors["average"], sent["average"] = average_anchor, sent["allreduce"]
    for aggregator in args.aggregators:
        model = copy.deepcopy(base)
        outer = torch.optim.SGD(model.parameters(), lr=0.7, momentum=0.9, nesterov=True)
        local = torchgrain.LocalSGD(model, 1_000_000, aggregator, outer)
        name = f"localsgd-{aggregator}"
        syncs[name], anchors[name] = (model, local.sync), local.anchor
        sent[name] = lambda local=local: local._exchange.bytes_sent

    @torch.no_grad()
    def timed(name: str) -> float:
        model, sync = syncs[name]
        for p, a, n in zip(model.parameters(), anchors[name], noise, strict=True):
            p.copy_(a).add_(n)  # where H inner steps would have left this rank
        dist.barrier()
        start = time.perf_counter()
        sync()
        return time.perf_counter() - start

    seconds = rounds(timed, list(syncs), args.rounds)
    if rank == 0:
        result = {"numel": numel, "seconds": seconds, "sent": {n: sent[n]() for n in syncs}}
        Path(out).write_text(json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="bert-small", choices=["bert-small", "mlp"])
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4], help="process counts")
    parser.add_argument("--width", type=int, default=2048, help="the MLP's width")
    parser.add_argument(
        "--aggregators", nargs="+", default=["mean", "min_norm", "upgrad"], help="LocalSGD's"
    )
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (one sync each)")
    args = parser.parse_args(argv)
    print(
        "| W | sync | time (rank 0) | vs allreduce (median) | middle half | bytes sent per rank |"
    )
    print("|---|---|---|---|---|---|")
    numel = 0
    for world in args.world:
        result = spawn(_worker, world, args)
        numel, seconds = result["numel"], result["seconds"]
        for name, times in seconds.items():
            print(
                f"| {world} | {name} {ratio_cells(times, seconds['allreduce'])}"
                f"| {result['sent'][name] / 2**20:.1f} MiB |",
                flush=True,
            )
    print(
        f"\n{args.model}: P = {numel:,} float32 parameters; {args.rounds} rounds, one thread per "
        "rank"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
