"""GRAIN's step time over a plain step, measured in pairs: the noise-resistant ratio.

    python benchmarks/step_paired.py --model bert-small --batch 16 --tokens 64 --groups 8
    python benchmarks/step_paired.py --model smollm2 --narrow --batch 8 --tokens 8   # host time

``benchmarks/step.py`` times each configuration in its own process, minutes apart; on a shared
2-core machine the plain step alone moved by 30% between runs, so its ratios carry that noise.
Here each method (plain, keep, book-keeping; the same weights) runs in a process of its own,
started once, and they are timed in rounds, one step of each per round in a rotating order while
the others wait. Each round gives one ratio per method (its step over the same round's plain
step); the table gives the median ratio and the middle half of the rounds' ratios [25%, 75%],
and the median of each method's minor page faults per step (memory the allocator had handed back
to the OS and touched again). ``--one-process`` runs them all in this process instead, as this
script did before 2026-11-27: they then share one allocator, and one method's frees can cost
another's step. No memory figures: ``step.py`` has them.

``--modes deferred`` adds a diagnostic: plain training's gradients computed in the fused
engine's order (one backward to the layers' outputs, one weight-gradient GEMM per layer over the
whole batch as its output gradient arrives), with no groups and no Gram. Its ratio is the part
of GRAIN's cost that comes from the engine's structure: the weight-gradient GEMMs taken outside
autograd's own nodes, from a hook per layer.

``--narrow`` keeps the model's layers and shrinks its widths (hidden 16-72, vocabulary 1,000):
the kernels then cost next to nothing and the step is the host's time alone (Python, dispatch),
the cost that bounds a GRAIN step on a GPU (``benchmarks/gpu_profile.sh``). On the CPU a
narrow SmolLM2 (B = 8, T = 8) took 70 ms plain and 1.78x that with GRAIN keeping its group
gradients (``docs/results/benchmarks/step_paired_narrow.txt``); on the H100 the full-size step
was 2.4x.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import resource
import statistics
import sys
import time
from typing import Any

import torch

from step_profile import _step_module  # the models of step.py (this folder is on sys.path)

MODES = ("plain", "keep", "bookkeeping", "deferred")


def _deferred_backward(grain, losses) -> None:  # type: ignore[no-untyped-def]
    """Plain training's gradients in the fused engine's order: one backward to the recorded
    layers' outputs (no weight gradients), each layer's parameter gradients summed over the
    whole batch by its rule's ``combine`` (for a Linear, one weight-gradient GEMM over all its
    tokens) as its output gradient arrives, as the engine serves its rules on the CPU. No
    groups, no Gram: the floor of the engine's structure."""
    from torchgrain.engines._hooks import backward_to_outputs

    engine = grain._engine
    calls, _ = engine.hooks.take()

    def serve(call, bk) -> None:  # type: ignore[no-untyped-def]
        if bk is None:
            return
        with torch.no_grad():
            rule = engine.hooks.rules[call.module]
            for name, grad in rule.combine(call.module, call.A, bk.reshape(call.out_shape)).items():
                param = call.module._parameters[name]
                param.grad = grad if param.grad is None else param.grad + grad

    backward_to_outputs(losses.mean(), calls, serve, stream=True)


def _stepper(args: argparse.Namespace, mode: str, base):  # type: ignore[no-untyped-def]
    """One training step of ``mode`` on a copy of ``base``: its seconds and minor page faults."""
    shared = _step_module()
    ids, labels = shared._inputs(args, "cpu", low=0, high=base.config.vocab_size)
    model = copy.deepcopy(base)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    # deferred: GRAIN's hooks record the layers, and the step is _deferred_backward's
    grain = None if mode == "plain" else shared._grain(model, mode, args.groups)

    def step() -> tuple[float, int]:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        losses = shared._losses(args, model, ids, labels)
        if grain is None:
            losses.mean().backward()
        elif mode == "deferred":
            _deferred_backward(grain, losses)
        else:
            grain.backward(losses)
        opt.step()
        elapsed = time.perf_counter() - start
        return elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults

    return step


def _worker(args: argparse.Namespace, mode: str, pipe) -> None:  # type: ignore[no-untyped-def]
    """A process holding one method's model: a step each time it is asked, until ``None``."""
    torch.set_num_threads(args.threads)
    step = _stepper(args, mode, _step_module()._build(args, lora=False))  # seeded: same weights
    pipe.send("ready")
    while pipe.recv() is not None:
        pipe.send(step())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="bert-small", choices=["minilm", "bert-small", "smollm2"]
    )
    parser.add_argument("--narrow", action="store_true", help="tiny widths: host time alone")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=12, help="timed rounds (one step each)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=list(MODES[1:]), choices=MODES[1:])
    parser.add_argument(
        "--one-process",
        action="store_true",
        help="all methods in this process (one allocator, shared: one method's frees can cost "
        "another's step) instead of a process per method",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    modes = ["plain", *args.modes]
    if args.one_process:
        shared = _step_module()
        base = shared._build(args, lora=False)
        run = {mode: _stepper(args, mode, base) for mode in modes}
        workers: list[tuple[Any, Any]] = []
    else:  # one process per method, each with its own allocator; the parent says when to step
        context = multiprocessing.get_context("spawn")
        pipes = {}
        workers = []
        for mode in modes:
            parent, child = context.Pipe()
            process = context.Process(target=_worker, args=(args, mode, child), daemon=True)
            process.start()
            pipes[mode] = parent
            workers.append((process, parent))
        for mode in modes:
            assert pipes[mode].recv() == "ready"

        def remote(mode: str):  # type: ignore[no-untyped-def]
            def step() -> tuple[float, int]:
                pipes[mode].send("step")
                return pipes[mode].recv()  # type: ignore[no-any-return]

            return step

        run = {mode: remote(mode) for mode in modes}
    try:
        for step in run.values():  # warm-up: allocations, optimizer state
            step()
            step()
        seconds: dict[str, list[float]] = {mode: [] for mode in modes}
        paged: dict[str, list[int]] = {mode: [] for mode in modes}  # minor page faults per step
        for r in range(args.rounds):
            order = modes[r % len(modes) :] + modes[: r % len(modes)]
            for mode in order:
                elapsed, faults = run[mode]()
                seconds[mode].append(elapsed)
                paged[mode].append(faults)
    finally:
        for process, pipe in workers:
            pipe.send(None)
            process.join()
    plain = seconds["plain"]
    shape = f"{args.model}{' (narrow)' if args.narrow else ''}"
    print(
        f"{shape}, B={args.batch}, T={args.tokens}, m={args.groups}, {args.threads} threads, "
        f"{args.rounds} rounds, {'one process' if args.one_process else 'a process per method'}; "
        f"plain step median {statistics.median(plain) * 1e3:.1f} ms\n"
    )
    print(
        "| method | time vs plain (median) | middle half of the rounds | page faults per step |"
        "\n|---|---|---|---|"
    )
    faults = {mode: statistics.median(paged[mode]) for mode in modes}
    print(f"| plain | | | {faults['plain']:.0f} |")
    for mode in args.modes:
        ratios = sorted(t / p for t, p in zip(seconds[mode], plain, strict=True))
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        print(
            f"| {mode} | {statistics.median(ratios):.2f}x | [{q1:.2f}, {q3:.2f}] "
            f"| {faults[mode]:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
