"""Helpers that run a function on W processes (spawned by the tests): Gloo on this CPU, or NCCL
with one GPU each."""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(
    rank: int,
    world: int,
    port: int,
    fn: Callable[..., Any],
    out: str,
    timeout: float,
    args: tuple[Any, ...],
    backend: str,
) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if backend == "nccl":
        torch.cuda.set_device(rank)  # one GPU per rank, as torchrun's LOCAL_RANK does
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout),
    )
    try:
        result: Any = fn(rank, world, *args)
    except Exception as error:  # report to the parent: the message and the trace
        result = {"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()}
    torch.save(result, Path(out) / f"rank{rank}.pt")
    if not (isinstance(result, dict) and "error" in result):
        # No rank tears Gloo down while another still talks to it (a rank once died with
        # SIGABRT, "terminate called without an active exception", at the end of an FSDP2
        # test). A rank that failed skips it: the others' collectives have failed too.
        with contextlib.suppress(RuntimeError):  # a peer failed after all: its result says why
            dist.barrier()
    dist.destroy_process_group()


def run(
    fn: Callable[..., Any],
    world: int,
    tmp_path: Path,
    *args: Any,
    timeout: float = 30.0,
    backend: str = "gloo",
) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` processes (Gloo on the CPU; ``"nccl"``: rank r on
    ``cuda:r``); their return values, by rank."""
    mp.start_processes(
        _entry,
        args=(world, free_port(), fn, str(tmp_path), timeout, args, backend),
        nprocs=world,
        join=True,
        start_method="spawn",
    )
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
