"""The sharded exchange, for a model sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``):
every rank ends the step with its own shard of ``d``, the DTensor ``.grad`` FSDP gives it.

``fully_shard`` splits each parameter on dim 0 over the W ranks of a one-dimensional mesh: rank r
holds rows chunk r (``torch.chunk``'s split, ``ceil(rows / W)`` rows each, fewer or none at the
end). GRAIN's step on such a model:

1. the forward runs as usual; for GRAIN's backward every FSDP unit is unsharded (all-gathered)
   once and kept so until the step is done (:func:`unsharded`), then resharded;
2. the engine computes this rank's group gradients in their full shapes, exactly as without FSDP,
   and hands each parameter's to the stream as it finishes it;
3. **agree** and **Gram** as in the replicated exchange; the shards that travel are cut by rows:
   rank r receives rows chunk r of every rank's group gradients (asynchronous all-to-all, per
   bucket), so its partial Gram is over the parameter rows it owns;
4. **combine** (the keep mode) — each rank combines the rows it received. There is no
   all-gather: that is ``d``'s shard. Or, in the **low-memory mode**, the received rows are
   dropped once their partial Gram is in, and ``d`` comes from a second backward of
   ``sum_i w_{k(i)} / |S_k| l_i`` (times W) through FSDP's own reduce-scatter (the mean over the
   ranks: FSDP's default), into FSDP's own ``.grad``.

Bytes each rank sends: ``m_local * P (W-1)/W`` — with one group per rank, FSDP's reduce-scatter
(the low-memory mode adds that reduce-scatter). Memory during the step, beyond FSDP's: the
unsharded parameters, and in the keep mode the received rows of every group (``m_local x P`` per
rank); in the low-memory mode a bucket or two in flight, at the cost of one more backward. GRAIN
takes the low-memory mode when ``m_local`` full-size group gradients would exceed its
``memory_budget`` (outside :meth:`~torchgrain.GRAIN.accumulate`, whose micro-batches are kept to
the block's end). An embedding travels on the rows some rank touched, each rank receiving those it
holds (padded to the most any rank holds).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from torchgrain.engines.rules._base import GroupGrad, to_dense
from torchgrain.exchange._base import Exchange
from torchgrain.exchange._layout import BUCKET_BYTES, on_rows


def is_sharded(p: Tensor) -> bool:
    """Whether ``p`` is a DTensor (a parameter that ``fully_shard`` sharded)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without DTensor: nothing is sharded
        return False
    return isinstance(p, DTensor)


def check_sharded(names: list[str], params: list[Tensor], world: int | None) -> Any:
    """Every parameter sharded on dim 0 over one mesh dimension (``fully_shard``'s layout);
    returns that mesh's process group."""
    from torch.distributed.tensor import Shard

    plain = [n for n, p in zip(names, params, strict=True) if not is_sharded(p)]
    if plain:
        raise ValueError(
            f"parameters {plain[:3]} are not sharded while others are: GRAIN on an FSDP2 model "
            "needs every trainable parameter under fully_shard; call fully_shard on the root "
            "module too (after its submodules), then build GRAIN"
        )
    meshes = {id(p.device_mesh) for p in params}  # type: ignore[attr-defined]
    for name, p in zip(names, params, strict=True):
        mesh, placements = p.device_mesh, p.placements  # type: ignore[attr-defined]
        if mesh.ndim != 1 or tuple(placements) != (Shard(0),) or len(meshes) != 1:
            raise ValueError(
                f"{name} is sharded as {tuple(placements)} over a {mesh.ndim}-D mesh: GRAIN "
                "supports fully_shard's layout on one mesh dimension (Shard(0)), the same mesh "
                "for every parameter; HSDP and tensor parallelism are not supported yet"
            )
    mesh = params[0].device_mesh  # type: ignore[attr-defined]
    if world is not None and mesh.size() != world:
        raise ValueError(
            f"the parameters are sharded over {mesh.size()} ranks but process_group has {world}; "
            "pass the mesh's group (process_group=None uses it)"
        )
    return mesh.get_group()


@contextlib.contextmanager
def unsharded(model: nn.Module, names: list[str]) -> Iterator[list[Tensor]]:
    """Every FSDP unit of ``model`` unsharded for GRAIN's backward and rules; yields the tensors
    the autograd graph uses for the parameters ``names`` (the unsharded ones). Resharded after."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    before = [_reshard_after_backward(unit) for unit in units]
    for unit in units:  # FSDP would reshard each unit as the backward leaves it
        unit.set_reshard_after_backward(False, recurse=False)
    try:
        handles = [unit.unshard(async_op=True) for unit in units]
        for handle in handles:
            if handle is not None:
                handle.wait()
        now = dict(model.named_parameters())
        yield [now[name] for name in names]
    finally:
        for unit, value in zip(units, before, strict=True):
            unit.reshard()
            unit.set_reshard_after_backward(value, recurse=False)


def _reshard_after_backward(unit: Any) -> bool:
    """The unit's setting (FSDP2 has a setter only; its default is True)."""
    state = getattr(unit, "_get_fsdp_state", lambda: None)()
    group = getattr(state, "_fsdp_param_group", None)
    return bool(getattr(group, "reshard_after_backward", True))


@dataclass
class _Piece:
    """One parameter in a bucket: what each rank receives of it sits at columns ``[start, start +
    chunk x width)`` of that rank's shard."""

    param: int
    start: int
    rows: int  # dim 0
    owned: int  # rows each rank holds: ceil(rows / W) (torch.chunk's split), fewer at the end
    width: int  # values per row
    split: list[Tensor] | None = None  # row-sparse: per rank, the agreed rows it holds (global)

    @property
    def chunk(self) -> int:
        """Rows per rank's slot: the rows a rank holds, or the most agreed rows any rank holds."""
        return self.owned if self.split is None else max(len(rows) for rows in self.split)

    def held(self, rank: int) -> tuple[int, int]:
        """The rows ``[low, high)`` rank holds (``torch.chunk``'s split of dim 0)."""
        return min(rank * self.owned, self.rows), min((rank + 1) * self.owned, self.rows)

    def sent(self, rank: int) -> int:
        """How many of its rows rank receives."""
        low, high = self.held(rank)
        return high - low if self.split is None else len(self.split[rank])


@dataclass
class _Bucket:
    pieces: list[_Piece]
    shard: int  # S_b, columns per rank

    def __post_init__(self) -> None:
        self.where = {piece.param: piece for piece in self.pieces}

    @property
    def params(self) -> list[int]:
        return [piece.param for piece in self.pieces]


class ShardedExchange(Exchange):
    """The sharded exchange (FSDP2's place): every rank ends with its rows of ``d``. A
    row-sparse parameter (an embedding) travels on the rows some rank touched: rank r receives
    those of them it holds."""

    sharded = True

    def _plan(
        self,
        params: list[Tensor],
        which: list[int],
        slots: int,
        rows: dict[int, Tensor],
        element_size: int,
    ) -> list[_Bucket]:
        limit = max(1, BUCKET_BYTES // (slots * element_size * self.world))  # columns per rank
        buckets: list[_Bucket] = []
        pieces: list[_Piece] = []
        start = 0
        for i in which:
            p = params[i]
            n = p.shape[0] if p.dim() else 1
            piece = _Piece(i, start, n, -(-n // self.world), p.numel() // max(n, 1))
            if i in rows:  # the agreed rows, split by the rank that holds them
                index = rows[i]
                piece.split = [
                    index[(index >= low) & (index < high)]
                    for low, high in map(piece.held, range(self.world))
                ]
            columns = piece.chunk * piece.width
            if pieces and start + columns > limit:
                buckets.append(_Bucket(pieces, start))
                pieces, start, piece.start = [], 0, 0
            pieces.append(piece)
            start += columns
        if pieces:
            buckets.append(_Bucket(pieces, max(start, 1)))
        return buckets

    def _put(self, send: Tensor, bucket: _Bucket, i: int, grad: GroupGrad, m: int) -> None:
        """The rows rank r receives of the parameter's ``m`` group gradients into its slice."""
        piece, shape = bucket.where[i], self._params[i].shape
        if piece.split is None:
            values = to_dense(grad, shape).reshape(m, piece.rows, piece.width)
            offsets = [piece.held(r)[0] for r in range(self.world)]
        else:  # (m, U, width) on the agreed rows, rank-major
            values = on_rows(grad, torch.cat(piece.split), m, piece.width)
            offsets = [sum(len(rows) for rows in piece.split[:r]) for r in range(self.world)]
        for r, low in enumerate(offsets):
            n = piece.sent(r)
            if n:
                block = values[:, low : low + n].reshape(m, n * piece.width)
                send[r, :m, piece.start : piece.start + n * piece.width] = block

    def _blank(self, send: Tensor, bucket: _Bucket, written: set[int], m: int) -> None:
        """Zero the slots past ``m`` and, per parameter and rank, the columns past the rows the
        rank receives (all of them for a parameter not written)."""
        if send.shape[1] > m:
            send[:, m:].zero_()
        for piece in bucket.pieces:
            end = piece.start + piece.chunk * piece.width
            for r in range(self.world):
                n = piece.sent(r) * piece.width if piece.param in written else 0
                if piece.start + n < end:
                    send[r, :m, piece.start + n : end].zero_()
        last = bucket.pieces[-1]
        used = last.start + last.chunk * last.width
        if used < send.shape[2]:
            send[:, :m, used:].zero_()

    def combine(self, weights: Tensor) -> list[Tensor | None]:
        """``(W * slots,)`` global weights -> per parameter this rank's rows of ``d``, as the
        DTensor shard FSDP expects in ``.grad``."""
        from torch.distributed.tensor import DTensor

        out: list[Tensor | None] = [None] * len(self._params)
        for bucket, shard in zip(self._buckets, self._shards, strict=True):
            part = weights.to(shard.dtype) @ shard  # (S_b,) my rows of d
            for piece in bucket.pieces:
                p: Any = self._params[piece.param]
                local_shape = p.to_local().shape
                low, high = piece.held(self.rank)
                if local_shape[:1] != (high - low,):
                    raise RuntimeError(
                        f"FSDP holds {tuple(local_shape)} of a {tuple(p.shape)} parameter on rank "
                        f"{self.rank}, not rows {low}..{high} (torch.chunk's split of dim 0) as "
                        "GRAIN expects; please report this layout"
                    )
                n = piece.sent(self.rank)
                rows = part[piece.start : piece.start + n * piece.width].to(p.dtype)
                if piece.split is None:
                    local = rows.reshape(local_shape)
                else:  # zero on the rows no rank touched
                    local = rows.new_zeros(local_shape)
                    local.index_copy_(0, piece.split[self.rank] - low, rows.view(n, *p.shape[1:]))
                out[piece.param] = DTensor.from_local(
                    local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                    stride=p.stride(),
                )  # fmt: skip
        self._shards = []
        return out
