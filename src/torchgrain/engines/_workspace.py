"""Buffers for group gradients, reused from one step to the next.

Keeping the group gradients means writing ``m x |p|`` values per parameter every step. Allocated
afresh on the CPU, they cost more than writing them: glibc hands the freed blocks back to the
operating system at the end of a step, and the next step faults every page in again. A
:class:`Workspace` keeps the buffers the engine is done with and hands them out again for the
same shape. Outputs whose size changes from step to step (an embedding's rows: as many as the
batch's distinct tokens) take the head of a longer 1-D buffer instead (:func:`empty_flat`).

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
FlatKey = tuple[torch.dtype, torch.device]

# A 1-D buffer is allocated this much longer than asked, so that the next step's slightly larger
# request (a few more distinct tokens) still fits it.
FLAT_HEADROOM = 1 / 8

_ACTIVE: ContextVar[Workspace | None] = ContextVar("torchgrain_workspace", default=None)


def empty(shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised tensor, from the running engine's workspace when there is one."""
    workspace = _ACTIVE.get()
    if workspace is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return workspace.take(shape, dtype, device)


def empty_flat(numel: int, *, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``numel`` uninitialised values as a 1-D tensor: from the running engine's workspace (the
    head of a buffer that may be longer) when there is one, ``torch.empty`` otherwise."""
    workspace = _ACTIVE.get()
    if workspace is None:
        return torch.empty(numel, dtype=dtype, device=device)
    return workspace.take_flat(numel, dtype, device)


class Workspace:
    """Free buffers by shape, dtype and device. What was given back during one step can be taken
    during the next; what the next step did not take is then dropped, so the workspace holds at
    most one step's worth of buffers of shapes still in use."""

    def __init__(self) -> None:
        self._free: dict[Key, list[Tensor]] = {}  # given back this step
        self._last: dict[Key, list[Tensor]] = {}  # given back last step, not yet taken
        self._free_flat: dict[FlatKey, list[Tensor]] = {}  # the same for the 1-D buffers
        self._last_flat: dict[FlatKey, list[Tensor]] = {}
        self._lent: dict[int, Tensor] = {}  # 1-D buffers handed out this step, by id
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
        self._last_flat, self._free_flat = self._free_flat, {}
        self._lent = {}  # not given back within their step: the holder keeps them

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (tuple(shape), dtype, torch.device(device))
        for pool in (self._last, self._free):
            buffers = pool.get(key)
            if buffers:
                return buffers.pop()
        self.allocations += 1
        return torch.empty(shape, dtype=dtype, device=device)

    def take_flat(self, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The first ``numel`` values of the shortest free 1-D buffer that holds them, or of a new
        one ``FLAT_HEADROOM`` longer. A view: give it (or any view of it) back with :meth:`give`
        within the step."""
        key = (dtype, torch.device(device))
        best: tuple[list[Tensor], int] | None = None
        for pool in (self._last_flat, self._free_flat):
            for j, buffer in enumerate(pool.get(key, [])):
                if buffer.numel() >= numel and (
                    best is None or buffer.numel() < best[0][best[1]].numel()
                ):
                    best = (pool[key], j)
        if best is None:
            self.allocations += 1
            buffer = torch.empty(numel + int(numel * FLAT_HEADROOM), dtype=dtype, device=device)
        else:
            buffer = best[0].pop(best[1])
        self._lent[id(buffer)] = buffer
        return buffer[:numel]

    def give(self, t: Tensor) -> None:
        """Return a buffer that nothing else references (its values are then garbage): a whole
        contiguous tensor, or a view of a 1-D buffer :meth:`take_flat` lent this step. Other
        views are ignored (they may share memory with a tensor someone holds), and so are
        device buffers: CUDA's caching allocator already reuses its blocks."""
        if t.device.type != "cpu":
            return
        if t._base is not None:
            base = self._lent.pop(id(t._base), None)
            if base is not None:
                self._free_flat.setdefault((base.dtype, base.device), []).append(base)
        elif t.is_contiguous():  # a whole buffer
            self._free.setdefault((tuple(t.shape), t.dtype, t.device), []).append(t)

    def clear(self) -> None:
        self._free, self._last = {}, {}
        self._free_flat, self._last_flat, self._lent = {}, {}, {}

    @property
    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for pool in (self._free, self._last, self._free_flat, self._last_flat)
            for buffers in pool.values()
            for t in buffers
        )
