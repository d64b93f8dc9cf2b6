"""The engine's buffer workspace: what it hands out again, and what it must never keep."""

from __future__ import annotations

import torch

from torchgrain.engines._workspace import Workspace, empty

CPU = torch.device("cpu")


def test_a_buffer_given_back_is_taken_again_for_the_same_shape_only() -> None:
    ws = Workspace()
    a = ws.take((2, 3), torch.float32, CPU)
    ws.give(a)
    assert ws.take((3, 2), torch.float32, CPU) is not a  # another shape
    assert ws.take((2, 3), torch.float64, CPU) is not a  # another dtype
    assert ws.take((2, 3), torch.float32, CPU) is a
    assert ws.allocations == 3


def test_buffers_live_one_step_past_their_return() -> None:
    """Returned in step s: takeable in s and s + 1, dropped at the start of s + 2 if untaken."""
    ws = Workspace()
    a = ws.take((4,), torch.float32, CPU)
    ws.give(a)
    ws.begin()
    assert ws.nbytes == 16
    ws.begin()
    assert ws.nbytes == 0
    assert ws.take((4,), torch.float32, CPU) is not a


def test_views_and_device_buffers_are_not_kept() -> None:
    """A view may share memory with a tensor someone holds; CUDA has its own caching allocator
    (here the meta device stands for a non-CPU one)."""
    ws = Workspace()
    whole = torch.empty(4, 4)
    ws.give(whole[:2])
    ws.give(whole.T)
    ws.give(torch.empty(4, device="meta"))
    assert ws.nbytes == 0
    ws.give(whole)
    assert ws.nbytes == 64
    ws.clear()
    assert ws.nbytes == 0


def test_empty_takes_from_the_active_workspace_only() -> None:
    ws = Workspace()
    buffer = torch.empty(5)
    ws.give(buffer)
    assert empty((5,), dtype=torch.float32, device=CPU) is not buffer  # none active
    with ws.active():
        assert empty((5,), dtype=torch.float32, device=CPU) is buffer
    assert empty((5,), dtype=torch.float32, device=CPU) is not buffer
