"""The engine's buffer workspace: what it hands out again, and what it must never keep."""

from __future__ import annotations

import torch

from torchgrain.engines._workspace import FLAT_HEADROOM, Workspace, empty, empty_flat

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


def test_a_flat_buffer_serves_any_request_it_holds_and_is_given_back_through_a_view() -> None:
    """The embeddings' rows change in number from step to step: ``take_flat`` lends the head of
    a 1-D buffer with headroom, and a view of it (the rows reshaped) gives the buffer back."""
    ws = Workspace()
    head = ws.take_flat(80, torch.float32, CPU)
    assert head.shape == (80,) and head._base is not None
    buffer = head._base
    assert buffer.numel() == 80 + int(80 * FLAT_HEADROOM)
    ws.give(head.view(4, 20)[1:])  # any view of the lent buffer returns all of it
    ws.begin()
    again = ws.take_flat(85, torch.float32, CPU)  # a few more rows next step: still fits
    assert again._base is buffer and again.shape == (85,)
    ws.give(again.view(5, 17))
    assert ws.take_flat(200, torch.float32, CPU)._base is not buffer  # too short: a new one
    assert ws.take_flat(10, torch.float64, CPU)._base is not buffer  # another dtype
    assert ws.take_flat(10, torch.float32, CPU)._base is buffer
    assert ws.allocations == 3


def test_the_shortest_flat_buffer_that_fits_is_lent() -> None:
    ws = Workspace()
    short, long = ws.take_flat(10, torch.float32, CPU), ws.take_flat(100, torch.float32, CPU)
    ws.give(long)
    ws.give(short)
    assert ws.take_flat(50, torch.float32, CPU)._base is long._base
    assert ws.take_flat(5, torch.float32, CPU)._base is short._base


def test_a_flat_buffer_not_given_back_within_its_step_is_forgotten() -> None:
    """A buffer handed on (to an accumulation block, another rank) is its holder's: giving a view
    of it back in a later step, or a view of a tensor the workspace never lent, keeps nothing."""
    ws = Workspace()
    lent = ws.take_flat(8, torch.float32, CPU)
    ws.begin()
    ws.give(lent)
    ws.give(torch.empty(8)[:4])
    assert ws.nbytes == 0
    with ws.active():
        assert empty_flat(8, dtype=torch.float32, device=CPU)._base is not lent._base
    assert empty_flat(8, dtype=torch.float32, device=CPU)._base is None  # none active: a tensor
