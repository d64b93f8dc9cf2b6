"""The three exact paths of a Linear weight, timed alone, against the engine's cost model.

    python benchmarks/step_paths.py                 # the shapes, token counts and m of the fit
    python benchmarks/step_paths.py --groups 16 --shapes 384x384 --tokens 256 1024

For each group count m, weight shape ``in x out`` and token count N (B = 16 sequences of N / 16
tokens, m groups of equal size) it times, as the fused engine runs them:

- keep: the m group GEMMs (one ``bmm``, into a buffer reused from run to run as the engine's
  workspace does), the Gram, ``d`` as the weighted sum;
- book-keeping: the same GEMMs and Gram, then ``d`` by one weight-gradient GEMM of the output
  gradient scaled per sample;
- ghost: the Gram from the tokens (``ghost_weight_gram``'s float32 products and its
  cancellation check, forced here even where the engine would decline it), then ``d`` as in
  book-keeping.

Each row gives the median of ``--repeats`` runs per path, the fastest path, and the path the
cost model (``torchgrain.engines.rules._linear.path_costs``) picks. The last table refits the
model's two constants, ``FLOPS_PER_VALUE`` (a group-gradient value moved) and
``FLOPS_PER_PRODUCT`` (a product of the Gram): for each pair, how much slower than the fastest
the worst pick over all rows was. On another machine, this says whether the constants still hold.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from torchgrain.engines._groups import GroupIndex
from torchgrain.engines._workspace import Workspace
from torchgrain.engines.rules._base import gram_of, weighted_sum
from torchgrain.engines.rules._linear import (
    FLOPS_PER_PRODUCT,
    FLOPS_PER_VALUE,
    _weight_grads,
    path_costs,
)

PATHS = ("keep", "bookkeeping", "ghost")
PER_VALUE = (4.0, 8.0, 12.0, 16.0, 22.0, 32.0)  # the candidates of the refit
PER_PRODUCT = (0.0, 1.0, 2.0, 4.0, 6.0, 8.0)


def _time(fn: Callable[[], object], repeats: int, flush: torch.Tensor | None = None) -> float:
    """Median seconds of ``repeats`` runs after two warm-up runs; ``flush``, if given, is written
    before each run (evicting the inputs from the caches)."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        if flush is not None:
            flush.add_(1.0)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _paths(d_in: int, d_out: int, tokens: int, m: int) -> dict[str, Callable[[], object]]:
    B = 16
    A, Bk = torch.randn(B, tokens // B, d_in), torch.randn(B, tokens // B, d_out)
    ids = torch.arange(B) * m // B
    groups = GroupIndex.build(ids, torch.bincount(ids, minlength=m))
    weights = torch.rand(m)
    scale = weights[ids].reshape(-1, 1, 1)
    onehot = torch.nn.functional.one_hot(groups.ids.repeat_interleave(tokens // B), m).float()
    workspace = Workspace()

    def recompute_d() -> torch.Tensor:
        return (Bk * scale).reshape(-1, d_out).T @ A.reshape(-1, d_in)

    def group_grads() -> torch.Tensor:
        with workspace.active():  # the engine's reused buffers: no page faults from step 2 on
            return _weight_grads(A, Bk, groups)

    def keep() -> object:
        grads = group_grads()
        gram_of(grads)
        d = weighted_sum(weights, grads, torch.Size((d_out, d_in)))
        workspace.give(grads)
        return d

    def bookkeeping() -> object:
        grads = group_grads()
        gram_of(grads)
        workspace.give(grads)
        return recompute_d()

    def ghost() -> object:
        a, b = A.reshape(-1, d_in), Bk.reshape(-1, d_out)
        terms = (a @ a.T).mul_(b @ b.T)
        onehot.T @ terms @ onehot
        float((onehot.T @ terms.abs() @ onehot).diagonal().max())
        return recompute_d()

    return {"keep": keep, "bookkeeping": bookkeeping, "ghost": ghost}


def _pick(tokens: int, d_in: int, d_out: int, m: int, per_value: float, per_product: float) -> str:
    costs = path_costs(tokens, d_in, d_out, m, per_value, per_product)
    return min(costs, key=costs.__getitem__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=["256x256", "256x1024", "384x1536"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[64, 128, 256, 512, 1024, 2048])
    parser.add_argument("--groups", nargs="+", type=int, default=[8, 16])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"Linear weight paths, {args.threads} threads, median of {args.repeats} runs (ms)")
    print()
    print("| m | in x out | N | keep | book-keeping | ghost | fastest | cost model picks |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for m in args.groups:
        for shape in args.shapes:
            d_in, d_out = (int(x) for x in shape.split("x"))
            for tokens in args.tokens:
                fns = _paths(d_in, d_out, tokens, m)
                ms = {p: _time(fns[p], args.repeats) * 1e3 for p in PATHS}
                fastest = min(ms, key=ms.__getitem__)
                pick = _pick(tokens, d_in, d_out, m, FLOPS_PER_VALUE, FLOPS_PER_PRODUCT)
                rows.append((d_in, d_out, tokens, m, ms))
                cells = " | ".join(f"{ms[p]:.3f}" for p in PATHS)
                print(f"| {m} | {shape} | {tokens} | {cells} | {fastest} | {pick} |")

    def worst(per_value: float, per_product: float) -> float:
        return max(
            ms[_pick(t, i, o, m, per_value, per_product)] / min(ms.values())
            for i, o, t, m, ms in rows
        )

    print()
    print(
        f"Refit: the worst pick's time over the fastest, over all {len(rows)} rows, by "
        "FLOPS_PER_VALUE (rows) and FLOPS_PER_PRODUCT (columns); "
        f"now {FLOPS_PER_VALUE:g} and {FLOPS_PER_PRODUCT:g}: "
        f"{worst(FLOPS_PER_VALUE, FLOPS_PER_PRODUCT):.2f}x"
    )
    print()
    print("| | " + " | ".join(f"{g:g}" for g in PER_PRODUCT) + " |")
    print("|---" * (len(PER_PRODUCT) + 1) + "|")
    for c in PER_VALUE:
        print(f"| {c:g} | " + " | ".join(f"{worst(c, g):.2f}x" for g in PER_PRODUCT) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
