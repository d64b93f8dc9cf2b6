"""Step time and peak memory of GRAIN's engines against plain mean-loss training, as ratios.

The model (random weights: timing does not depend on them), ``--model``:

- ``minilm`` (default): a MiniLM-size BERT encoder (6 layers, hidden 384, 12 heads, FFN 1536,
  vocab 30522: 22.7M parameters) with a classification head;
- ``bert-small``: a small BERT-like encoder (4 layers, hidden 256, 4 heads, FFN 1024), the
  regime of the reproduction's short sequences;
- ``smollm2``: a Llama of SmolLM2-135M's shape (30 layers, hidden 576, 9 heads, 3 KV heads, FFN
  1536, vocab 49152, tied embeddings), per-sample causal-LM losses.

It is trained with AdamW on B x T tokens, fully or with LoRA (r = 8 on the query and value
projections, PEFT), on ``--device`` (cpu or cuda; ``--autocast`` runs the forward under bfloat16
autocast). Every configuration runs in its own subprocess, one at a time, so that its peak
memory is its own; the plain step is measured in the same run, and every figure is a ratio to it.

    python benchmarks/step.py                    # B=32, T=128, m in 2 4 8 16 32 (CPU: ~15 min)
    python benchmarks/step.py --batch 8 --tokens 32 --groups 2 8 --steps 2   # a quick look
    python benchmarks/step.py --device cuda --model smollm2 --autocast --batch 16 --tokens 256

Columns: time = median step time / plain's; memory = peak growth during the steps (over the
memory after building the model and optimizer: resident memory on the CPU, allocated CUDA
memory on a GPU) / plain's. TorchJD (optional: pip install torchjd)
runs its autogram engine with MGDA on the same m group losses, and on the B per-sample losses.
``--aggregator dual_proj|upgrad|cagrad`` runs GRAIN with that aggregator and TorchJD with its
DualProj / UPGrad / CAGrad(c = 0.5) weighting instead of MGDA.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import time

MODELS = ("minilm", "bert-small", "smollm2")


def _build(args: argparse.Namespace, lora: bool):  # type: ignore[no-untyped-def]
    import torch
    import transformers

    torch.manual_seed(0)
    narrow = getattr(args, "narrow", False)  # same layers, tiny widths: the host's time alone
    if args.model == "smollm2":
        config = transformers.LlamaConfig(
            vocab_size=1000 if narrow else 49152, hidden_size=72 if narrow else 576,
            intermediate_size=96 if narrow else 1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
            tie_word_embeddings=True, attn_implementation="sdpa",
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(config)
        targets, save = ["q_proj", "v_proj"], None
    else:
        small = args.model == "bert-small"
        heads = 4 if small else 12
        config = transformers.BertConfig(
            vocab_size=1000 if narrow else 30522,
            hidden_size=4 * heads if narrow else 256 if small else 384,
            num_hidden_layers=4 if small else 6, num_attention_heads=heads,
            intermediate_size=96 if narrow else 1024 if small else 1536, num_labels=5,
            attn_implementation="sdpa",
        )  # fmt: skip
        model = transformers.BertForSequenceClassification(config)
        targets, save = ["query", "value"], ["classifier"]
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=8,
                lora_alpha=16,
                target_modules=targets,
                lora_dropout=0.0,
                modules_to_save=save,
            ),
        )
    model.train()
    return model


def _inputs(args: argparse.Namespace, device, low: int = 1000, high: int = 30000, seed: int = 1):  # type: ignore[no-untyped-def]
    """``(B, T)`` token ids in ``[low, high)`` and ``(B,)`` labels in ``[0, 5)``, seeded."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, high, (args.batch, args.tokens), generator=gen).to(device)
    labels = torch.randint(0, 5, (args.batch,), generator=gen).to(device)
    return ids, labels


def _losses(args: argparse.Namespace, model, ids, labels):  # type: ignore[no-untyped-def]
    """``(B,)`` per-sample losses of the model (causal LM for ``smollm2``, classification
    otherwise), the forward under bfloat16 autocast with ``--autocast``."""
    import torch

    from torchgrain import losses as per_sample

    autocast = getattr(args, "autocast", False)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        if args.model == "smollm2":
            return per_sample.causal_lm(logits, ids)
        return per_sample.cross_entropy(logits, labels)


def _grain(model, mode: str, m: int, **kwargs):  # type: ignore[no-untyped-def]
    """GRAIN keeping every group gradient (``keep``) or none (``bookkeeping``)."""
    from torchgrain import GRAIN

    budget = 0 if mode == "bookkeeping" else float("inf")
    return GRAIN(model, num_groups=m, memory_budget=budget, **kwargs)


def _memory(device) -> int:  # type: ignore[no-untyped-def]
    """Bytes in use now (CUDA: allocated) or at the peak so far (CPU: the resident set's)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _worker(args: argparse.Namespace) -> dict[str, float]:
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    method, m = args.method, args.m
    lora = method.endswith("+lora")
    base = method.removesuffix("+lora")
    model = _build(args, lora).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids, labels = _inputs(args, device)

    def losses_of() -> torch.Tensor:
        return _losses(args, model, ids, labels)  # (B,)

    step = None
    if base.startswith("grain-"):
        engine, _, mode = base.removeprefix("grain-").partition("-")
        grain = _grain(model, mode, m, engine=engine, aggregator=args.aggregator)
        step = lambda losses: grain.backward(losses)  # noqa: E731
    elif base.startswith("torchjd-"):
        from torchjd import aggregation
        from torchjd.autogram import Engine

        weighting = {
            "min_norm": aggregation.MGDAWeighting,
            "dual_proj": aggregation.DualProjWeighting,
            "upgrad": aggregation.UPGradWeighting,
            "cagrad": lambda: aggregation.CAGradWeighting(c=0.5),
        }[args.aggregator]()
        if base == "torchjd-samples":
            engine = Engine(model, batch_dim=0)

            def step(losses):  # type: ignore[no-untyped-def]
                gramian = engine.compute_gramian(losses)
                losses.backward(weighting(gramian))
        else:
            engine = Engine(model, batch_dim=None)
            group = (torch.arange(args.batch) * m // args.batch).to(device)

            def step(losses):  # type: ignore[no-untyped-def]
                group_losses = torch.zeros(m, device=device).index_add(0, group, losses.float())
                group_losses = group_losses / (args.batch / m)
                gramian = engine.compute_gramian(group_losses)
                group_losses.backward(weighting(gramian))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = _memory(device)
    times = []
    for i in range(args.steps + 1):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        losses = losses_of()
        if step is None:
            losses.float().mean().backward()
        else:
            step(losses)
        opt.step()
        sync()
        if i > 0:  # the first step is a warm-up (allocations, optimizer state)
            times.append(time.perf_counter() - start)
    peak = _memory(device)
    return {
        "seconds": statistics.median(times),
        "peak_kb": peak / 1024,
        "growth_kb": (peak - before) / 1024,
    }


CONFIGS = [
    ("plain", None),
    ("grain-fused-keep", "m"),
    ("grain-fused-bookkeeping", "m"),
    ("grain-loop", "small"),
    ("torchjd-groups", "m8"),
    ("torchjd-samples", None),
    ("plain+lora", None),
    ("grain-fused-keep+lora", "m"),
    ("grain-fused-bookkeeping+lora", "m"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=32, help="B, sequences per step")
    parser.add_argument("--tokens", type=int, default=128, help="T, tokens per sequence")
    parser.add_argument(
        "--groups", type=int, nargs="+", default=[2, 4, 8, 16, 32], help="values of m"
    )
    parser.add_argument(
        "--steps", type=int, default=3, help="timed steps per configuration (median)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--only", nargs="*", help="run only these methods")
    parser.add_argument(
        "--aggregator",
        default="min_norm",
        choices=["min_norm", "dual_proj", "upgrad", "cagrad"],
        help="GRAIN's aggregator, and TorchJD's matching weighting (default min_norm: MGDA)",
    )
    parser.add_argument("--model", default="minilm", choices=MODELS, help="the model's shape")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--autocast", action="store_true", help="the forward under bfloat16 autocast"
    )
    parser.add_argument(
        "--csv", default="docs/results/benchmarks/step.csv", help="where to write the table"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--m", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
        return 0

    rows = []
    baseline: dict[bool, dict[str, float]] = {}
    for method, grid in CONFIGS:
        if args.only and method not in args.only:
            continue
        if method.startswith("torchjd"):
            try:
                import torchjd  # noqa: F401
            except ImportError:
                print(f"{method}: torchjd is not installed, skipped", file=sys.stderr)
                continue
        ms = {
            None: [1],
            "m": args.groups,
            "small": [m for m in args.groups if m <= 8],
            "m8": [m for m in args.groups if m == 8],
        }[grid]
        for m in ms:
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                "--method",
                method,
                "--m",
                str(m),
                "--batch",
                str(args.batch),
                "--tokens",
                str(args.tokens),
                "--steps",
                str(args.steps),
                "--threads",
                str(args.threads),
                "--aggregator",
                args.aggregator,
                "--model",
                args.model,
                "--device",
                args.device,
                *(["--autocast"] if args.autocast else []),
            ]
            done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
            if done.returncode != 0:
                print(f"{method} m={m} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            lora = method.endswith("+lora")
            if method.startswith("plain"):
                baseline[lora] = result
            ref = baseline.get(lora)
            row = {
                "method": method,
                "aggregator": args.aggregator if not method.startswith("plain") else "",
                "m": m if grid else "",
                "seconds": result["seconds"],
                "peak_mb": result["peak_kb"] / 1024,
                "growth_mb": result["growth_kb"] / 1024,
                "time_ratio": result["seconds"] / ref["seconds"] if ref else float("nan"),
                "memory_ratio": result["growth_kb"] / ref["growth_kb"] if ref else float("nan"),
            }
            rows.append(row)
            print(
                f"{method:30s} m={row['m']!s:3s} {row['seconds']:7.3f} s  "
                f"time x{row['time_ratio']:.2f}  step memory x{row['memory_ratio']:.2f} "
                f"({row['growth_mb']:.0f} MB; peak {row['peak_mb']:.0f} MB)",
                flush=True,
            )

    print(
        f"\n{args.model}, B={args.batch}, T={args.tokens}, {args.device}"
        f"{' (bf16 autocast)' if args.autocast else ''}, {args.threads} threads, median of "
        f"{args.steps} steps, aggregator {args.aggregator}\n"
    )
    print(
        "| method | m | step time | time vs plain | step memory vs plain |\n|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['method']} | {r['m']} | {r['seconds']:.2f} s "
            f"| {r['time_ratio']:.2f}x | {r['memory_ratio']:.2f}x |"
        )
    if args.csv and rows:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
