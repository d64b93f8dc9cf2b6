"""The two group-gradient paths of PyTorch's LayerNorm, timed alone, against the engine's choice.

    python benchmarks/norm_paths.py                 # the shapes and m of the fit
    python benchmarks/norm_paths.py --groups 16 --shapes 32x128x384

For each group count m and input shape ``B x T x H`` (m groups of equal size, the samples sorted
by group) it times, as the fused engine runs them on a LayerNorm call:

- normalised input: ``F.layer_norm`` of the input without parameters, times the output gradient,
  summed per group (``per_sample_stock_norm`` and ``GroupIndex.sums``);
- saved backward: the LayerNorm backward kernel on each group's slice, with the mean and 1/std the
  call's autograd node saved (``per_group_saved_norm``).

Each row gives the median of ``--repeats`` runs per path, the faster one, and the path the cost
model (``torchgrain.engines.rules._rerun.saved_backward_pays``) picks. Before each run a
``--flush``-MiB buffer is written, as a step's other work does between the forward that made the
input and the rule that reads it (``--flush 0``: warm caches, where the per-group kernel wins
earlier). On another machine, this says whether the model's constants still hold.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import nn

from step_paths import _time  # this folder is on sys.path
from torchgrain.engines._groups import GroupIndex
from torchgrain.engines.rules._rerun import (
    per_group_saved_norm,
    per_sample_stock_norm,
    saved_backward_pays,
)

PATHS = ("normalised input", "saved backward")


def _paths(B: int, T: int, H: int, m: int) -> dict[str, Callable[[], object]]:
    norm = nn.LayerNorm(H)
    A = (torch.randn(B, T, H) * 3 + 1).requires_grad_()
    node = norm(A).grad_fn  # held: its saved input, mean and 1/std stay readable
    Bk = torch.randn(B, T, H)
    ids = torch.arange(m).repeat_interleave(B // m)
    groups = GroupIndex.build(ids, torch.bincount(ids, minlength=m))
    A = A.detach()

    def normalised_input() -> object:
        per_sample = per_sample_stock_norm(norm, A, Bk)
        assert per_sample is not None
        return {n: groups.sums(g) for n, g in per_sample.items()}

    def saved_backward() -> object:
        out = per_group_saved_norm(norm, node, Bk, groups)
        assert out is not None
        return out

    return dict(zip(PATHS, (normalised_input, saved_backward), strict=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=["16x16x256", "16x64x256", "32x32x384", "16x128x384", "32x128x384", "16x128x768"],
        help="B x T x H, B a multiple of every m",
    )
    parser.add_argument("--groups", nargs="+", type=int, default=[8, 16])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--flush", type=int, default=64, help="MiB written before each run")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    flush = torch.zeros(args.flush * 2**18)  # float32: 4 bytes each
    print(
        f"LayerNorm group-gradient paths, {args.threads} threads, median of {args.repeats} "
        f"(ms), {args.flush} MiB written before each run"
    )
    print()
    print("| m | B x T x H | elements | normalised input | saved backward | faster | picked |")
    print("|---|---|---|---|---|---|---|")
    worst = 1.0
    for m in args.groups:
        for shape in args.shapes:
            B, T, H = (int(x) for x in shape.split("x"))
            fns = _paths(B, T, H, m)  # the forward with autograd on; the rules run without
            with torch.no_grad():
                ms = {p: _time(fns[p], args.repeats, flush) * 1e3 for p in PATHS}
            faster = min(ms, key=ms.__getitem__)
            picked = PATHS[1] if saved_backward_pays(torch.empty(B, T, H), m) else PATHS[0]
            worst = max(worst, ms[picked] / ms[faster])
            cells = " | ".join(f"{ms[p]:.3f}" for p in PATHS)
            print(f"| {m} | {shape} | {B * T * H} | {cells} | {faster} | {picked} |")
    print()
    print(f"The picked path's time over the faster one's, at worst: {worst:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
