"""The ``transformers.TrainingArguments`` that GrainTrainer refuses, each with the fix."""

from __future__ import annotations

from typing import Any


def refuse_unsupported(args: Any, engine: str) -> None:
    """Raise for the ``TrainingArguments`` GRAIN cannot honour, naming the setting and the fix."""
    ddp_hint = (
        "for data parallel launch GrainTrainer with torchrun or accelerate's plain multi-process "
        "DDP (no FSDP or DeepSpeed config): it then exchanges the ranks' group gradients itself"
    )
    if getattr(args, "deepspeed", None):
        raise ValueError(
            f"GrainTrainer does not run under DeepSpeed (deepspeed={args.deepspeed!r}): ZeRO "
            f"partitions and reduces the gradients GRAIN combines; drop deepspeed= (FSDP2 "
            f"shards too: fsdp='full_shard'), or {ddp_hint}"
        )
    if getattr(args, "fsdp", None):
        version = int((getattr(args, "fsdp_config", None) or {}).get("version", 2))
        if version != 2:
            raise ValueError(
                f"GrainTrainer runs under FSDP2 only, got fsdp_config version {version}: FSDP1 "
                "flattens the parameters into buffers GRAIN cannot split by parameter; set "
                "fsdp_config={'version': 2} (fully_shard), or drop fsdp= and " + ddp_hint
            )
    if args.n_gpu > 1:
        raise ValueError(
            f"GrainTrainer runs one device per process, got n_gpu={args.n_gpu} "
            f"(nn.DataParallel); set CUDA_VISIBLE_DEVICES to one GPU, and {ddp_hint}"
        )
    if getattr(args, "fp16", False):
        raise ValueError(
            "fp16=True uses a GradScaler whose overflow handling (steps silently skipped, scale "
            "lowered) GRAIN's NaN check would defeat; use bf16=True (no scaler), or fp16=False"
        )
    if getattr(args, "torch_compile", False) and engine != "loop":
        raise ValueError(
            "torch_compile=True with the fused engine: its forward hooks break the compiled graph "
            "at every layer and exhaust dynamo's recompile limit (correct, but no faster than "
            "eager); set torch_compile=False, or grain_engine='loop' (compiles whole)"
        )
    optim = str(getattr(args, "optim", "")).lower()
    if "lomo" in optim:
        raise ValueError(
            f"optim={args.optim!r} fuses the update into backward(), so there is no .grad for "
            "GRAIN to fill; use an optimizer that steps on .grad (e.g. optim='adamw_torch')"
        )
