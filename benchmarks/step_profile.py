"""Where a step's time goes: torch.profiler over a few steps of plain training and of GRAIN.

    python benchmarks/step_profile.py --model bert-small --batch 16 --tokens 64 --groups 8

For each configuration (plain, GRAIN keep, GRAIN book-keeping) it times the steps, then profiles
them and sums the self CPU time of the operators by kind: the GEMMs (``mm``, ``addmm``, ``bmm``,
...), copies and gathers, element-wise work, reductions, and the rest; then the operators that
GRAIN adds most time to, against plain. The models are those of ``benchmarks/step.py``.

On a GPU (``--device cuda``, optionally ``--autocast``) it sums the kernels' device time by kind
instead, and counts per step the kernel launches, the host syncs (``cudaStreamSynchronize``,
``cudaDeviceSynchronize``, reads of a device value) and the time the device is busy: a step much
longer than its busy time is bound by the host (Python, launches, syncs), not by the kernels.
``--gemm`` also times, for each weight shape of the small encoder, the one weight-gradient ``mm``
over all B x T tokens against the ``bmm`` of the m groups' GEMMs that the fused engine runs.
``--stages`` also times GRAIN's backward by stage (wall time per step, CPU): the backward to the
layers' outputs with the rules it serves (each rule's group gradients, the Gram products, the
backward itself), the solve, ``d``, the rest.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

KINDS = {
    "GEMM": ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_scaled_dot_product", "einsum"),
    "copy/gather": ("copy_", "index_select", "index_add", "cat", "clone", "contiguous", "to",
                    "_to_copy", "gather", "scatter", "expand", "index", "stack", "repeat"),
    "element-wise": ("mul", "add", "sub", "div", "gelu", "tanh", "softmax", "exp", "where",
                     "fill_", "zero_", "masked", "neg", "sqrt", "pow", "rsqrt", "silu"),
    "reduction": ("sum", "mean", "norm", "max", "amax", "layer_norm", "native_layer_norm"),
}  # fmt: skip


KERNELS = {
    "GEMM": ("gemm", "xmma", "nvjet", "cutlass", "cublas", "matmul", "flash", "attention", "fmha"),
    "copy/gather": ("copy", "index", "gather", "scatter", "cat", "memcpy", "memset", "fill"),
    "element-wise": ("elementwise", "vectorized", "pointwise"),
    "reduction": ("reduce", "norm", "softmax"),
}  # fmt: skip


def _kind(name: str, kernel: bool = False) -> str:
    """The kind of an aten operator, or of a CUDA kernel (``kernel``) by words in its name."""
    if kernel:
        low = name.lower()
        for kind, words in KERNELS.items():
            if any(w in low for w in words):
                return kind
    op = name.removeprefix("aten::").removesuffix("_backward")
    for kind, ops in KINDS.items():
        if any(op == o or op.startswith(o + "_") or op.endswith(o) for o in ops):
            return kind
    return "other"


def _step_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("step", Path(__file__).with_name("step.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(
    args: argparse.Namespace, mode: str
) -> tuple[float, dict[str, float], dict[str, float], dict[str, float]]:
    """Median step seconds; seconds per step by kind and by operator; per-step counts."""
    shared = _step_module()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    model = shared._build(args, lora=False).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids, labels = shared._inputs(args, device)
    grain = None if mode == "plain" else shared._grain(model, mode, args.groups)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        losses = shared._losses(args, model, ids, labels)
        if grain is None:
            losses.float().mean().backward()
        else:
            grain.backward(losses)
        opt.step()
        if cuda:
            torch.cuda.synchronize(device)

    step()  # warm-up
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
    by_kind: dict[str, float] = defaultdict(float)
    by_op: dict[str, float] = defaultdict(float)
    counts: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx"):
            counts["launches"] += event.count / args.steps
        if "Synchronize" in event.key or event.key == "aten::_local_scalar_dense":
            counts["syncs"] += event.count / args.steps
        micros = event.self_device_time_total if cuda else event.self_cpu_time_total
        if cuda and event.key.startswith("aten::"):
            continue  # the kernels carry the device time; aten ops would count it twice
        seconds = micros / 1e6 / args.steps
        by_kind[_kind(event.key, kernel=cuda)] += seconds
        by_op[event.key] += seconds
        if cuda:
            counts["busy"] += seconds
    return statistics.median(times), dict(by_kind), dict(by_op), dict(counts)


def _ms(fn: Callable[[], torch.Tensor], repeat: int = 20) -> float:
    """Mean milliseconds of ``fn`` after one warm-up call."""
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1e3


def _gemm(args: argparse.Namespace) -> None:
    """The weight gradient as one ``mm`` against the m group GEMMs as one ``bmm``."""
    n = args.batch * args.tokens // args.groups  # tokens per group
    print(f"\nweight-gradient GEMM, {args.batch * args.tokens} tokens, m={args.groups} (ms)")
    for d_in, d_out in ((256, 256), (256, 1024), (1024, 256)):
        a = torch.randn(args.groups, n, d_in)
        b = torch.randn(args.groups, n, d_out)
        a_all, b_all = a.reshape(-1, d_in), b.reshape(-1, d_out)
        timings = {
            "mm": _ms(lambda a=a_all, b=b_all: b.T @ a),
            "bmm": _ms(lambda a=a, b=b: torch.bmm(b.transpose(1, 2), a)),
        }
        print(f"  {d_in} -> {d_out}: mm {timings['mm']:.2f}, bmm {timings['bmm']:.2f}")


def _stages(args: argparse.Namespace, mode: str) -> dict[str, float]:
    """Milliseconds per step of GRAIN's backward by stage, from timers wrapped around the
    engine's functions for the timed steps (nested stages are not subtracted from their
    parent: the backward to the layers' outputs contains the rules, served from its hooks, and
    the Gram products; what is left of it is the backward itself)."""
    import torchgrain._grain as grain_module
    import torchgrain.engines._fused as fused
    from torchgrain.engines.rules._base import _RULES

    seconds: dict[str, float] = defaultdict(float)
    patched: list[tuple[object, str, object]] = []

    def timed(owner: object, attr: str, stage: str) -> None:
        original = getattr(owner, attr)

        def wrapper(*a, **k):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                seconds[stage] += time.perf_counter() - start

        patched.append((owner, attr, original))
        setattr(owner, attr, wrapper)

    shared = _step_module()
    model = shared._build(args, lora=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids, labels = shared._inputs(args, "cpu")
    grain = shared._grain(model, mode, args.groups)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        losses = shared._losses(args, model, ids, labels)
        start = time.perf_counter()
        grain.backward(losses)
        seconds["backward (all)"] += time.perf_counter() - start
        opt.step()

    step()
    step()
    rules = {type(rule) for _, rule in _RULES}
    timed(fused.FusedEngine, "gram", "engine.gram")
    # the rules run from autograd's hooks, inside the backward: its own time is what is left
    timed(fused.FusedEngine, "_rule_grams", "  backward to the layers' outputs, rules and Gram")
    for rule in sorted(rules, key=lambda r: r.__name__):
        if "group_grads" in vars(rule):  # a subclass that inherits it counts under its parent
            timed(rule, "group_grads", f"    {rule.__name__}.group_grads")
    timed(fused, "add_gram", "    Gram products")
    timed(grain_module.GRAIN, "_solve", "solve")
    timed(fused.FusedEngine, "combine", "d (combine)")
    seconds.clear()
    try:
        for _ in range(args.steps):
            step()
    finally:
        for owner, attr, original in reversed(patched):
            setattr(owner, attr, original)
    per_step = {k: v / args.steps * 1e3 for k, v in seconds.items()}
    nested = [k for k in per_step if k.startswith("    ")]
    per_step["    the backward itself (the rest)"] = per_step.get(
        "  backward to the layers' outputs, rules and Gram", 0.0
    ) - sum(per_step[k] for k in nested)
    inside = ("engine.gram", "solve", "d (combine)")
    per_step["rest (checks, stats, writes)"] = per_step["backward (all)"] - sum(
        per_step.get(k, 0.0) for k in inside
    )
    return per_step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="bert-small", choices=["minilm", "bert-small", "smollm2"]
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=12, help="operators listed")
    parser.add_argument("--gemm", action="store_true", help="also time mm against bmm")
    parser.add_argument("--stages", action="store_true", help="also time GRAIN's stages (CPU)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--autocast", action="store_true", help="the forward under bfloat16 autocast"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cuda = torch.device(args.device).type == "cuda"
    results = {mode: _run(args, mode) for mode in ("plain", "keep", "bookkeeping")}
    plain_time, _, plain_op, _ = results["plain"]
    print(
        f"{args.model}, B={args.batch}, T={args.tokens}, m={args.groups}, {args.device}"
        f"{' (bf16 autocast)' if args.autocast else ''}, {args.threads} threads, "
        f"median of {args.steps} steps\n"
    )
    extra = ["busy", "launches", "syncs"] if cuda else []
    print("| | step | vs plain | " + " | ".join([*KINDS, "other", *extra]) + " |")
    print("|---|---|---|" + "---|" * (len(KINDS) + 1 + len(extra)))
    for mode, (seconds, kinds, _, counts) in results.items():
        cells = [f"{kinds.get(k, 0.0) * 1e3:.1f} ms" for k in [*KINDS, "other"]]
        if cuda:
            cells += [f"{counts.get('busy', 0.0) * 1e3:.1f} ms"]
            cells += [f"{counts.get(k, 0.0):.0f}" for k in ("launches", "syncs")]
        print(f"| {mode} | {seconds * 1e3:.1f} ms | {seconds / plain_time:.2f}x | "
              + " | ".join(cells) + " |")  # fmt: skip
    what = "kernel time on the device" if cuda else "self CPU time"
    print(f"\n(profiled {what} per step, by kind of operator; counts per step)")
    for mode in ("keep", "bookkeeping"):
        _, _, ops, _ = results[mode]
        extra = sorted(((ops[k] - plain_op.get(k, 0.0), k) for k in ops), reverse=True)
        print(f"\n{mode}: the operators with the most time over plain (ms per step)")
        for delta, name in extra[: args.top]:
            print(f"  {name[:60]:60s} {delta * 1e3:+7.1f}   ({ops[name] * 1e3:.1f} vs "
                  f"{plain_op.get(name, 0.0) * 1e3:.1f})")  # fmt: skip
    if args.gemm:
        _gemm(args)
    if args.stages and not cuda:
        stages = {mode: _stages(args, mode) for mode in ("keep", "bookkeeping")}
        first = [
            "backward (all)",
            "engine.gram",
            "  backward to the layers' outputs, rules and Gram",
        ]
        found = [k for table in stages.values() for k in table]
        rest = "    the backward itself (the rest)"
        rows = sorted({k for k in found if k.startswith("    ") and k != rest})
        names = [*first, *rows, rest, "solve", "d (combine)"]
        names.append("rest (checks, stats, writes)")
        print(f"\nGRAIN's backward by stage (ms per step, mean of {args.steps} steps)")
        print("| stage | keep | bookkeeping |\n|---|---|---|")
        for name in names:
            cells = " | ".join(f"{stages[m].get(name, 0.0):.1f}" for m in stages)
            print(f"| {name} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
