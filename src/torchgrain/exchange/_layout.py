"""Where every parameter's group gradients sit in the flat vectors the ranks exchange.

The flat vector of one group gradient is cut into *buckets* (consecutive parameters, a few MiB
each) so that one bucket travels while the next is packed; each bucket is cut into W equal
*shards*, shard r going to rank r. A dense parameter takes ``numel`` columns. A row-sparse one (an
embedding's weight) takes only the rows some rank's batch touched, ``len(rows) x width`` columns:
the union of the ranks' rows is agreed first, so that every rank lays the bucket out alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from torchgrain.engines.rules._base import GroupGrad, Rows, to_dense

BUCKET_BYTES = 16 << 20  # of one rank's send buffer; DDP's default bucket is 25 MiB


@dataclass
class Segment:
    """One parameter's columns ``[start, start + numel)`` in its bucket."""

    param: int  # index into the parameters
    start: int
    numel: int
    rows: Tensor | None  # (U,) the agreed rows of a row-sparse parameter; None: dense


@dataclass
class Bucket:
    segments: list[Segment]
    numel: int  # P_b, columns in all
    shard: int  # S_b = ceil(P_b / W), columns per rank

    def __post_init__(self) -> None:
        self.where = {seg.param: seg for seg in self.segments}

    @property
    def params(self) -> list[int]:
        return [seg.param for seg in self.segments]


def plan(
    params: list[Tensor],
    which: list[int],
    rows: dict[int, Tensor],
    world: int,
    slots: int,
    element_size: int,
) -> list[Bucket]:
    """Buckets over the parameters ``which``, in order; ``rows``: the agreed rows of the
    row-sparse ones."""
    limit = max(1, BUCKET_BYTES // (slots * element_size))  # columns per bucket
    buckets: list[Bucket] = []
    segments: list[Segment] = []
    start = 0
    for i in which:
        p, index = params[i], rows.get(i)
        numel = p.numel() if index is None else index.numel() * (p.numel() // p.shape[0])
        if segments and start + numel > limit:
            buckets.append(Bucket(segments, start, -(-start // world)))
            segments, start = [], 0
        segments.append(Segment(i, start, numel, index))
        start += numel
    if segments:
        buckets.append(Bucket(segments, start, max(1, -(-start // world))))
    return buckets


def touched_rows(grad: GroupGrad | None, rows: int, device: torch.device) -> Tensor:
    """``(rows,)`` uint8: 1 where some group gradient of a 2-D parameter is non-zero."""
    if grad is None:
        return torch.zeros(rows, dtype=torch.uint8, device=device)
    if isinstance(grad, Rows):
        mask = torch.zeros(rows, dtype=torch.uint8, device=device)
        mask[grad.index] = 1
        return mask
    return grad.reshape(grad.shape[0], rows, -1).ne(0).any(2).any(0).to(torch.uint8)


def put(send: Tensor, seg: Segment, grad: GroupGrad, shape: torch.Size, m: int) -> None:
    """Write one parameter's ``m`` group gradients into its columns of the bucket's send buffer
    ``(W, slots, S_b)`` (rank r's slice: shard r), across the shards it spans: one copy."""
    _span(send, seg.start, seg.numel, m, _columns(grad, seg, shape, m, send.dtype))


def blank(send: Tensor, bucket: Bucket, written: set[int], m: int) -> None:
    """Zero what ``put`` did not write: slots past ``m``, the columns past ``P_b`` and the
    parameters not in ``written``."""
    if send.shape[1] > m:
        send[:, m:].zero_()
    _span(send, bucket.numel, send.shape[0] * send.shape[2] - bucket.numel, m, None)
    for seg in bucket.segments:
        if seg.param not in written:
            _span(send, seg.start, seg.numel, m, None)


def _span(send: Tensor, start: int, numel: int, m: int, block: Tensor | None) -> None:
    """``block`` ``(m, numel)``, or zeros, at the bucket's columns ``[start, start + numel)``,
    across the shards they span."""
    S, done = send.shape[2], 0
    while done < numel:
        rank, offset = divmod(start + done, S)
        take = min(S - offset, numel - done)
        target = send[rank, :m, offset : offset + take]
        if block is None:
            target.zero_()
        else:
            target.copy_(block[:, done : done + take])
        done += take


def unpack(bucket: Bucket, flat: Tensor, params: list[Tensor], out: list[Tensor | None]) -> None:
    """Scatter the bucket's ``(P_b,)`` combined vector into ``out`` (per parameter, its shape and
    dtype; a view of ``flat`` where the layout allows)."""
    for seg in bucket.segments:
        p = params[seg.param]
        piece = flat[seg.start : seg.start + seg.numel]
        if seg.rows is None:
            out[seg.param] = piece.view(p.shape).to(p.dtype)
        else:
            full = piece.new_zeros(p.shape, dtype=p.dtype)
            out[seg.param] = full.index_copy_(0, seg.rows, piece.view(-1, *p.shape[1:]).to(p.dtype))


def _columns(grad: GroupGrad, seg: Segment, shape: torch.Size, m: int, dtype: Any) -> Tensor:
    """``(m, numel)`` this parameter's group gradients in its layout (a view where possible)."""
    if seg.rows is None:
        return to_dense(grad, shape).reshape(m, -1).to(dtype)
    return on_rows(grad, seg.rows, m, shape[1:].numel()).reshape(m, -1).to(dtype)


def on_rows(grad: GroupGrad, index: Tensor, m: int, width: int) -> Tensor:
    """``(m, U, width)``: a 2-D parameter's group gradients on the rows ``index`` (sorted), from
    its rows (an embedding's) or from dense group gradients."""
    if isinstance(grad, Rows):
        values = grad.values.new_zeros(m, index.numel(), width)
        values[:, torch.searchsorted(index, grad.index)] = grad.values.reshape(m, -1, width)
        return values
    return grad.reshape(m, -1, width)[:, index]
