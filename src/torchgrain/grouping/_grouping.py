"""Stage 1 of GRAIN: a batch of B samples -> ``(B,)`` group ids in ``[0, m)``.

Every function here returns a ``(B,)`` int64 tensor on the requested device. Sizes of the
contiguous and random splits differ by at most one; a key grouping gives one group per distinct key.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torchgrain._errors import describe


def _check_split(batch_size: int, num_groups: int) -> None:
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    if num_groups > batch_size:
        raise ValueError(
            f"num_groups={num_groups} is larger than the batch size B={batch_size}: a group would "
            f"be empty. Use a batch of at least {num_groups} samples (DataLoader(drop_last=True) "
            "avoids a short last batch) or lower num_groups"
        )


def contiguous_groups(
    batch_size: int, num_groups: int, device: torch.device | str = "cpu"
) -> Tensor:
    """Consecutive samples share a group: sample i goes to group ``floor(i m / B)``.

    Example:
        >>> contiguous_groups(8, 3)
        tensor([0, 0, 0, 1, 1, 1, 2, 2])
    """
    _check_split(batch_size, num_groups)
    # Sample i goes to group floor(i m / B): sizes floor(B/m) or ceil(B/m).
    return torch.arange(batch_size, device=device) * num_groups // batch_size


def random_groups(
    batch_size: int,
    num_groups: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """A seeded random partition into groups whose sizes differ by at most one.

    The permutation is drawn on the CPU from ``generator`` (so that a seed gives the same groups on
    every device), then moved to ``device``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> random_groups(6, 3, g).bincount().tolist()
        [2, 2, 2]
    """
    _check_split(batch_size, num_groups)
    order = torch.randperm(batch_size, generator=generator)  # (B,)
    ids = torch.empty(batch_size, dtype=torch.int64)
    ids[order] = contiguous_groups(batch_size, num_groups)
    return ids.to(device)


def key_groups(keys: Tensor) -> tuple[Tensor, int]:
    """One group per distinct key (label, domain, task, source), numbered in sorted key order.

    Returns the ``(B,)`` group ids and the number of groups. ``keys`` may be any ``(B,)`` tensor of
    integers or a ``(B, ...)`` tensor whose rows are compared whole.

    Example:
        >>> key_groups(torch.tensor([7, 3, 7, 9]))
        (tensor([1, 0, 1, 2]), 3)
    """
    if not isinstance(keys, Tensor) or keys.dim() < 1:
        raise ValueError(
            f"keys must be a (B,) tensor with one key per sample, got {describe(keys)}"
        )
    if keys.dtype.is_floating_point or keys.dtype.is_complex:
        raise TypeError(
            f"keys must be integers or bool (labels, domain ids), got {keys.dtype}; "
            "map them to integer ids first"
        )
    # Host sync on accelerators: the number of distinct keys decides m.
    unique, inverse = torch.unique(keys, dim=0 if keys.dim() > 1 else None, return_inverse=True)
    return inverse.to(torch.int64), int(unique.shape[0])
