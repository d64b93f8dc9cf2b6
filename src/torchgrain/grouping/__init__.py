"""Stage 1 of GRAIN: split a batch into groups (contiguous, seeded random, by key)."""

from torchgrain.grouping._grouping import contiguous_groups, key_groups, random_groups

__all__ = ["contiguous_groups", "key_groups", "random_groups"]
