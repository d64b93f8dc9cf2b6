"""Errors torchgrain raises beyond the built-in ones, and how bad values are named in messages."""

from __future__ import annotations

from torch import Tensor


class NonFiniteError(FloatingPointError):
    """Losses or gradients contain NaN/Inf; ``.grad`` was left untouched."""


def describe(value: object) -> str:
    """Name a bad value for an error message: a tensor by its shape and dtype."""
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"{type(value).__name__} {value!r}"[:120]


def shorten(names: list[str], limit: int = 5) -> str:
    """``a, b, c, d, e and 7 more``."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
