"""Data-parallel GRAIN against DDP (or FSDP2) on the mean gradient, on Gloo processes.

    python benchmarks/distributed.py --model bert-small --world 2 --groups 1 4
    python benchmarks/distributed.py --model mlp --world 2 3 4 --groups 1 2 4
    python benchmarks/distributed.py --model bert-small --world 2 --groups 1 2 4 --fsdp
    python benchmarks/distributed.py --model bert-small --world 2 --groups 1 4 --fsdp \
        --memory-budget 0

Each of W processes (one thread each) holds one copy of the model per method, with the same
weights: DDP (the mean gradient, all-reduced in buckets during the backward) and GRAIN with m groups
per rank (``process_group=WORLD``). It times forward + backward (the exchange included) in rounds,
one step of each method per round in a rotating order, so that every method sees the same load;
each round gives one ratio per method over the same round's DDP step. The table gives rank 0's
median step time, the median ratio and the middle half of the rounds' ratios.

Models: ``bert-small`` is the BERT-like encoder of ``benchmarks/step.py`` (4 layers, hidden 256,
vocabulary 30,522, every parameter trained) on B x T tokens per rank (default 8 x 64); ``mlp`` is a
4-layer MLP of width 1024 on B = 32 samples per rank.

With ``--fsdp`` every copy is sharded by FSDP2 (each layer, then the root) and the baseline is
FSDP's own backward, which reduce-scatters the mean gradient; GRAIN's ``.grad`` is then each
rank's shard too (``--memory-budget 0``: GRAIN's low-memory mode, whose second backward
reduce-scatters as FSDP does; its bytes here count the group gradients' exchange only).

Bytes are the gradient payload each rank sends, by the algorithm: ``2 P (W-1)/W`` for a ring
all-reduce of P values, ``P (W-1)/W`` for a reduce-scatter; GRAIN counts its own as it sends
(replicated: ``(m + 1) P (W-1)/W`` with m groups per rank, less where an embedding's rows are
untouched by every rank; sharded: ``m P (W-1)/W``). The parameters' all-gathers under FSDP are the
same for both and not counted.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from _gloo import ratio_cells, rounds, spawn  # this folder is on sys.path
from step_profile import _step_module  # the models of step.py


def _mlp(width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, 10),
    )


def _problem(args: argparse.Namespace, rank: int):  # type: ignore[no-untyped-def]
    """The model (the same weights on every rank) and ``losses(model) -> (B,)`` on this rank's
    own batch."""
    if args.model == "mlp":
        model = _mlp(args.width)
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(args.batch, 64, generator=g)
        y = torch.randint(0, 10, (args.batch,), generator=g)
        return model, lambda net: torch.nn.functional.cross_entropy(net(x), y, reduction="none")
    shared = _step_module()
    model = shared._build(args, lora=False)
    ids, labels = shared._inputs(args, "cpu", seed=1 + rank)
    return model, lambda net: shared._losses(args, net, ids, labels)


def _shard(model: torch.nn.Module, kind: str, world: int) -> torch.nn.Module:
    """FSDP2 over a CPU mesh: each layer (the MLP's Linears, the encoder's BertLayers), then the
    root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    layers = model.bert.encoder.layer if kind == "bert-small" else model  # type: ignore[union-attr]
    for layer in layers:  # type: ignore[union-attr]
        if kind == "bert-small" or isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _worker(rank: int, world: int, args: argparse.Namespace, out: str) -> None:
    import torchgrain

    base, losses_of = _problem(args, rank)
    numel = sum(p.numel() for p in base.parameters())
    steps, sent = {}, {}

    if args.fsdp:  # FSDP2 shards every layer and the root; its backward reduce-scatters
        baseline = _shard(copy.deepcopy(base), args.model, world)

        def baseline_step() -> None:
            losses_of(baseline).mean().backward()

        sent["ddp"] = lambda: numel * (world - 1) // world * 4
    else:
        baseline = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(base))

        def baseline_step() -> None:
            losses_of(baseline).mean().backward()

        sent["ddp"] = lambda: 2 * numel * (world - 1) // world * 4
    steps["ddp"] = (baseline, baseline_step)
    for m in args.groups:
        model = copy.deepcopy(base)
        if args.fsdp:
            model = _shard(model, args.model, world)
        grain = torchgrain.GRAIN(
            model, num_groups=m, process_group=dist.group.WORLD, memory_budget=args.memory_budget
        )

        def grain_step(model=model, grain=grain) -> None:  # type: ignore[no-untyped-def]
            grain.backward(losses_of(model))

        steps[f"grain{m}"] = (model, grain_step)
        sent[f"grain{m}"] = lambda grain=grain: grain._exchange.bytes_sent

    def timed(name: str) -> float:
        net, step = steps[name]
        dist.barrier()
        start = time.perf_counter()
        net.zero_grad(set_to_none=True)
        step()
        return time.perf_counter() - start

    names = list(steps)  # the warm-ups in rounds() take DDP's bucket rebuild too
    seconds = rounds(timed, names, args.rounds)
    if rank == 0:
        result = {"numel": numel, "seconds": seconds, "sent": {n: sent[n]() for n in names}}
        Path(out).write_text(json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="bert-small", choices=["bert-small", "mlp"])
    parser.add_argument("--world", type=int, nargs="+", default=[2], help="process counts")
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 4], help="groups per rank")
    parser.add_argument("--width", type=int, default=1024, help="the MLP's width")
    parser.add_argument("--batch", type=int, help="samples per rank (bert-small 8, mlp 32)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per sample (bert-small)")
    parser.add_argument("--rounds", type=int, default=12, help="timed rounds (one step each)")
    parser.add_argument(
        "--fsdp", action="store_true", help="shard by FSDP2: GRAIN against FSDP's own backward"
    )
    parser.add_argument(
        "--memory-budget",
        type=float,
        default=1 << 30,
        help="GRAIN's memory_budget (with --fsdp, 0 takes the low-memory mode)",
    )
    args = parser.parse_args(argv)
    args.batch = args.batch or (8 if args.model == "bert-small" else 32)
    args.narrow = args.autocast = False
    os.environ["OMP_NUM_THREADS"] = "1"

    plain = "FSDP2" if args.fsdp else "DDP"
    print(f"| W | method | step time (rank 0) | vs {plain} (median) | middle half | bytes sent per "
          f"rank | vs {plain} |\n|---|---|---|---|---|---|---|")  # fmt: skip
    numel = 0
    for world in args.world:
        result = spawn(_worker, world, args)
        numel, seconds, sent = result["numel"], result["seconds"], result["sent"]
        for name, times in seconds.items():
            plain = "FSDP2 reduce-scatter" if args.fsdp else "DDP all-reduce"
            label = plain if name == "ddp" else f"GRAIN, {name[5:]} group(s)/rank"
            print(
                f"| {world} | {label} {ratio_cells(times, seconds['ddp'])}"
                f"| {sent[name] / 2**20:.1f} MiB | {sent[name] / sent['ddp']:.2f}x |",
                flush=True,
            )
    shape = f"{args.batch} x {args.tokens} tokens" if args.model == "bert-small" else args.batch
    print(
        f"\n{args.model}{' sharded by FSDP2' if args.fsdp else ''}: P = {numel} parameters, "
        f"B = {shape} per rank, Gloo, 1 thread per process, {args.rounds} rounds"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
