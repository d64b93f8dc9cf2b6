"""What the Gloo benchmarks share: W processes on this CPU (one thread each), methods timed in
rounds in a rotating order so that every method sees the same load, and the ratio of each round's
time over the same round's baseline."""

from __future__ import annotations

import datetime
import json
import os
import socket
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def spawn(worker: Callable[..., None], world: int, args: Any) -> dict[str, Any]:
    """``worker(rank, world, args, out)`` on ``world`` Gloo processes; what rank 0 wrote to
    ``out`` (JSON)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        mp.start_processes(
            _entry,
            args=(world, _free_port(), worker, args, out),
            nprocs=world,
            join=True,
            start_method="spawn",
        )
        return dict(json.loads(Path(out).read_text()))


def _entry(
    rank: int, world: int, port: int, worker: Callable[..., None], args: Any, out: str
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )
    worker(rank, world, args, out)
    dist.barrier()  # no rank tears Gloo down while another still talks to it
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rounds(timed: Callable[[str], float], names: list[str], count: int) -> dict[str, list[float]]:
    """Two warm-up calls of ``timed(name)`` per method, then ``count`` rounds of one call each, in
    an order that rotates by one every round; the seconds, per method."""
    for name in names:
        timed(name)
        timed(name)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(count):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            seconds[name].append(timed(name))
    return seconds


def ratio_cells(times: list[float], base: list[float]) -> str:
    """``| median time | median ratio | [q1, q3] |`` of the rounds' ratios over ``base``."""
    ratios = [t / b for t, b in zip(times, base, strict=True)]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return (
        f"| {statistics.median(times) * 1e3:.1f} ms | {statistics.median(ratios):.2f}x "
        f"| [{q1:.2f}, {q3:.2f}] "
    )
