"""Data-parallel GRAIN against DDP's all-reduce of the mean gradient, on Gloo processes.

Each of W processes (one thread each) trains the same MLP on its own batch of B samples; DDP
all-reduces the mean gradient, GRAIN (``process_group=WORLD``) exchanges sharded group gradients
(all-to-all), all-reduces the (M, M) Gram and all-gathers the combined shards. Bytes are the
payload each rank sends, by the algorithm: ``2 P (W-1)/W`` for a ring all-reduce of P values, and
``(m + 1) P (W-1)/W`` for GRAIN with m groups per rank (counted by GRAIN as it sends).

    python benchmarks/distributed.py [--world 2 3 4] [--groups 1 2 4] [--width 1024] [--steps 10]
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _model(width: int) -> torch.nn.Module:
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


def _worker(
    rank: int, world: int, port: int, method: str, m: int, args: argparse.Namespace, out: str
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    model = _model(args.width)
    numel = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(rank)
    x, y = (
        torch.randn(args.batch, 64, generator=g),
        torch.randint(0, 10, (args.batch,), generator=g),
    )
    if method == "ddp":
        net = torch.nn.parallel.DistributedDataParallel(model)

        def backward() -> int:
            torch.nn.functional.cross_entropy(net(x), y).backward()
            return 2 * numel * (world - 1) // world * 4
    else:
        import torchgrain

        grain = torchgrain.GRAIN(model, num_groups=m, process_group=dist.group.WORLD)

        def backward() -> int:
            grain.backward(torch.nn.functional.cross_entropy(model(x), y, reduction="none"))
            return grain._exchange.bytes_sent  # type: ignore[union-attr]

    times, sent = [], 0
    for step in range(args.steps + 1):
        dist.barrier()
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        sent = backward()
        if step:
            times.append(time.perf_counter() - start)
    if rank == 0:
        Path(out).write_text(f"{statistics.median(times)} {sent} {numel}")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world", type=int, nargs="+", default=[2, 3, 4], help="process counts")
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4], help="groups per rank")
    parser.add_argument("--width", type=int, default=1024, help="MLP width (P grows as width^2)")
    parser.add_argument("--batch", type=int, default=32, help="samples per rank")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"

    print("| W | method | step time | vs DDP | bytes sent per rank | vs DDP |")
    print("|---|---|---|---|---|---|")
    for world in args.world:
        results = {}
        for method, m in [("ddp", 1)] + [("grain", m) for m in args.groups]:
            with tempfile.TemporaryDirectory() as tmp:
                out = str(Path(tmp) / "result")
                mp.start_processes(
                    _worker,
                    args=(world, _free_port(), method, m, args, out),
                    nprocs=world,
                    join=True,
                    start_method="spawn",
                )
                seconds, sent, numel = Path(out).read_text().split()
            results[(method, m)] = (float(seconds), int(sent))
            base_t, base_b = results[("ddp", 1)]
            label = "DDP all-reduce" if method == "ddp" else f"GRAIN, {m} group(s)/rank"
            print(
                f"| {world} | {label} | {float(seconds) * 1e3:.1f} ms "
                f"| {float(seconds) / base_t:.2f}x "
                f"| {int(sent) / 2**20:.1f} MiB | {int(sent) / base_b:.2f}x |",
                flush=True,
            )
    print(f"\nP = {numel} parameters, B = {args.batch} per rank, Gloo, 1 thread per process")
    return 0


if __name__ == "__main__":
    sys.exit(main())
