"""Buffers for group gradients, reused from one step to the next.

Keeping the group gradients means writing ``m x |p|`` values per parameter every step. Allocated
afresh on the CPU, they cost more than writing them: glibc hands the freed blocks back to the
operating system at the end of a step, and the next step faults every page in again. A
:class:`Workspace` keeps the buffers the engine is done with and hands them out again for the
same shape.

A rule asks for its output with :func:`empty`, which takes from the engine's workspace while the
engine is running its rules (:meth:`Workspace.active`) and is ``torch.empty`` otherwise. Only the
engine gives buffers back (:meth:`Workspace.give`), and only those no one else can hold: the
group gradients it kept for ``combine`` once ``d`` is formed, and those it dropped after their
Gram block (book-keeping). Group gradients handed out — to an accumulation block, to another
rank — are never given back; they are garbage-collected as usual.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

Key = tuple[tuple[int, ...], torch.dtype, torch.device]

_ACTIVE: ContextVar[Workspace | None] = ContextVar("torchgrain_workspace", default=None)


def empty(shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised tensor, from the running engine's workspace when there is one."""
    workspace = _ACTIVE.get()
    if workspace is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return workspace.take(shape, dtype, device)


class Workspace:
    """Free buffers by shape, dtype and device. What was given back during one step can be taken
    during the next; what the next step did not take is then dropped, so the workspace holds at
    most one step's worth of buffers of shapes still in use."""

    def __init__(self) -> None:
        self._free: dict[Key, list[Tensor]] = {}  # given back this step
        self._last: dict[Key, list[Tensor]] = {}  # given back last step, not yet taken
        self.allocations = 0  # buffers ``take`` had to allocate (none reused)

    @contextmanager
    def active(self) -> Iterator[None]:
        """Rules called inside take their buffers from here."""
        token = _ACTIVE.set(self)
        try:
            yield
        finally:
            _ACTIVE.reset(token)

    def begin(self) -> None:
        """A new step: what the last step gave back becomes takeable; what the step before gave
        back and the last step did not take is dropped."""
        self._last, self._free = self._free, {}

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (tuple(shape), dtype, torch.device(device))
        for pool in (self._last, self._free):
            buffers = pool.get(key)
            if buffers:
                return buffers.pop()
        self.allocations += 1
        return torch.empty(shape, dtype=dtype, device=device)

    def give(self, t: Tensor) -> None:
        """Return a buffer that nothing else references (its values are then garbage). CPU
        buffers only: CUDA's caching allocator already reuses its blocks."""
        if t.device.type == "cpu" and t._base is None and t.is_contiguous():  # a whole buffer
            self._free.setdefault((tuple(t.shape), t.dtype, t.device), []).append(t)

    def clear(self) -> None:
        self._free, self._last = {}, {}

    @property
    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for pool in (self._free, self._last)
            for buffers in pool.values()
            for t in buffers
        )
