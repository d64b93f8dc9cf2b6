"""What ``GRAIN`` takes in, checked: the parameters, the per-sample losses and the group ids;
and two helpers of its step (autocast off, an FSDP2 parameter's local shard)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from torchgrain._errors import describe
from torchgrain.exchange._sharded import is_sharded
from torchgrain.grouping import contiguous_groups, key_groups, random_groups

ParamsLike = nn.Module | Iterable[Tensor] | Iterable[tuple[str, Tensor]] | Iterable[dict[str, Any]]


def check_losses(losses: Tensor) -> None:
    """The ``(B,)`` per-sample losses ``GRAIN.backward`` takes, or an error naming the fix."""
    if not isinstance(losses, Tensor):
        raise TypeError(f"losses must be a torch.Tensor of shape (B,), got {type(losses).__name__}")
    if losses.dim() != 1:
        hint = (
            "a scalar: compute the loss with reduction='none'"
            if losses.dim() == 0
            else "reduce the other dims per sample, e.g. losses.flatten(1).mean(dim=1)"
        )
        raise ValueError(
            f"losses must have shape (B,), one loss per sample, got {tuple(losses.shape)}; {hint}"
        )
    if losses.shape[0] == 0:
        raise ValueError("losses is empty (B = 0); pass a batch with at least one sample")
    if not losses.dtype.is_floating_point:
        raise TypeError(f"losses must be floating point, got {losses.dtype}")
    if not losses.requires_grad:
        raise ValueError(
            "losses do not require grad: compute them from the model's output outside "
            "torch.no_grad(), and check that the model has trainable parameters"
        )


def group_ids(
    losses: Tensor,
    groups: Tensor | None,
    keys: Tensor | None,
    num_groups: int | None,
    grouping: str,
    generator: torch.Generator,
) -> tuple[Tensor, int]:
    """``(B,)`` group ids and m: the explicit ``groups``, or the configured grouping's."""
    B, device = losses.shape[0], losses.device
    if groups is not None:
        if not isinstance(groups, Tensor) or groups.dim() != 1 or groups.shape[0] != B:
            raise ValueError(
                f"groups must be a (B,) = ({B},) tensor of group ids, got "
                f"{describe(groups)}; pass one id per sample"
            )
        if groups.dtype.is_floating_point or groups.dtype.is_complex or groups.dtype == torch.bool:
            raise TypeError(f"groups must hold integer ids, got {groups.dtype}; use groups.long()")
        groups = groups.to(device=device, dtype=torch.int64)
        # Host sync only when num_groups is unset: m comes from the ids.
        m = num_groups if num_groups is not None else int(groups.max()) + 1
        return groups, m
    if grouping == "key":
        if keys is None:
            raise ValueError(
                "grouping='key' needs backward(losses, keys=...) with one key per sample"
            )
        if not isinstance(keys, Tensor) or keys.shape[:1] != (B,):
            raise ValueError(f"keys must have B = {B} rows, got {describe(keys)}")
        ids, m = key_groups(keys)
        return ids.to(device), m
    if num_groups is None:
        raise ValueError(
            "num_groups is not set: build GRAIN(..., num_groups=m) for "
            f"grouping={grouping!r} "
            "or pass explicit groups to backward"
        )
    if grouping == "random":
        return random_groups(B, num_groups, generator, device), num_groups
    return contiguous_groups(B, num_groups, device), num_groups


def autocast_off(like: Tensor) -> Any:
    device = like.device.type if isinstance(like, Tensor) else "cpu"
    available = getattr(torch.amp, "is_autocast_available", None)  # torch >= 2.4
    if not (available(device) if available is not None else device in ("cpu", "cuda")):
        return contextlib.nullcontext()
    return torch.autocast(device, enabled=False)


def local(p: Tensor) -> Tensor:
    """A plain tensor on ``p``'s device and dtype (an FSDP2 parameter's local shard)."""
    return p.to_local() if is_sharded(p) else p  # type: ignore[attr-defined]


def collect_params(source: ParamsLike) -> tuple[list[str], list[Tensor]]:
    named: list[tuple[str, Any]]
    if isinstance(source, nn.Module):
        named = [(n, p) for n, p in source.named_parameters() if p.requires_grad]
    elif isinstance(source, Tensor):
        raise TypeError(
            "pass an nn.Module or an iterable of parameters, not a single tensor: [param]"
        )
    else:
        named = []
        for i, item in enumerate(source):
            if isinstance(item, dict):  # optimizer-style param group
                params = item.get("params", [])
                params = [params] if isinstance(params, Tensor) else list(params)
                named += [(f"group{i}.{j}", p) for j, p in enumerate(params)]
            elif isinstance(item, tuple) and len(item) == 2:
                named.append((str(item[0]), item[1]))
            else:
                named.append((f"param{i}", item))
        for name, p in named:
            if not isinstance(p, Tensor):
                raise TypeError(f"{name} is a {type(p).__name__}, not a tensor; pass parameters")
            if not p.requires_grad:
                raise ValueError(
                    f"parameter {name} is frozen (requires_grad=False); GRAIN cannot give it a "
                    "gradient: leave it out, or pass the model to use its trainable parameters"
                )
            if not p.is_leaf:
                raise ValueError(f"{name} is not a leaf tensor; pass the parameters themselves")
    unique: dict[int, tuple[str, Tensor]] = {}
    for name, p in named:
        unique.setdefault(id(p), (name, p))  # a tied weight counts once, under its first name
    if not unique:
        raise ValueError(
            "no trainable parameters: every parameter has requires_grad=False or the list is "
            "empty; unfreeze some (p.requires_grad_(True)) before building GRAIN"
        )
    return [n for n, _ in unique.values()], [p for _, p in unique.values()]
