"""GRAIN across data-parallel ranks, on top of ``torch.distributed`` (NCCL on GPUs, Gloo on CPUs).

Every rank's local groups are global groups. The Gram needs inner products between different
ranks' group gradients, so the flat group gradients are sharded over the ranks:

1. ``all_gather`` a few integers: each rank's number of groups and whether its step is finite
   (a NaN on one rank makes every rank skip or raise together);
2. ``all_to_all``: rank r receives shard r (a 1/W slice of the parameters) of every rank's groups;
3. each rank computes the partial ``(M, M)`` Gram of its shard; ``all_reduce`` sums them, and rank
   0's sum is broadcast so that every rank solves the QP on the same bits;
4. each rank combines its shard with the weights; ``all_gather`` assembles ``d`` everywhere.

Bytes each rank sends, for P parameters and W ranks: ``m_local * P (W-1)/W`` in step 2 and
``P (W-1)/W`` in step 4 — with one group per rank, the ``2 P (W-1)/W`` of DDP's ring all-reduce;
with ``m_local`` groups per rank, ``(m_local + 1) / 2`` times it. The flat group gradients are dense
(an embedding's group gradients are scattered into full rows here).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from torchgrain.engines.rules._base import GroupGrad, gram_of, to_dense


class RankExchange:
    """The cross-rank collectives of one GRAIN step over ``process_group``."""

    def __init__(self, process_group: Any) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "process_group was given but torch.distributed is not initialised; call "
                "torch.distributed.init_process_group (torchrun does the rendezvous) first"
            )
        self.group = process_group
        self.world = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self.root = (
            dist.get_global_rank(process_group, 0) if process_group is not dist.group.WORLD else 0
        )
        self.bytes_sent = 0  # by this rank's payload collectives, last step (the accounting above)
        self._shard: Tensor | None = None
        self._numel = 0

    def _collective(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args, group=self.group)
        except RuntimeError as error:
            raise RuntimeError(
                f"GRAIN: the {what} across ranks failed on rank {self.rank} of {self.world} "
                f"({error}). Another rank probably raised, stopped or is late; every rank must "
                "call grain.backward for every step (set a timeout in init_process_group)"
            ) from error

    def agree(self, sizes: Tensor, ok: bool) -> tuple[Tensor, list[int], bool]:
        """All ranks' group sizes ``(M,)`` (rank-major), group counts, whether all are finite."""
        device = sizes.device
        head = torch.tensor([sizes.shape[0], int(ok)], dtype=torch.int64, device=device)
        heads = [torch.empty_like(head) for _ in range(self.world)]
        self._collective("group count exchange", dist.all_gather, heads, head)
        counts = [int(h[0]) for h in heads]
        all_ok = all(int(h[1]) for h in heads)
        slots = max(counts)
        padded = torch.zeros(slots, dtype=torch.int64, device=device)
        padded[: sizes.shape[0]] = sizes
        gathered = [torch.empty_like(padded) for _ in range(self.world)]
        self._collective("group size exchange", dist.all_gather, gathered, padded)
        return torch.cat(gathered), counts, all_ok  # (W * slots,): empty slots have size 0

    def gram(self, flat: Tensor, slots: int) -> Tensor:
        """Local ``(m_local, P)`` flat group gradients -> global ``(W * slots, W * slots)`` Gram."""
        m_local, P = flat.shape
        shard = -(-P // self.world)  # ceil
        padded = flat.new_zeros(slots, shard * self.world)
        padded[:m_local, :P] = flat
        send = (
            padded.reshape(slots, self.world, shard).transpose(0, 1).contiguous()
        )  # (W, slots, S)
        recv = torch.empty_like(send)
        self._collective(
            "all-to-all of the group-gradient shards", dist.all_to_all_single, recv, send
        )
        self._shard = recv.reshape(self.world * slots, shard)  # every rank's groups, my shard
        self._numel = P
        size = flat.element_size()
        self.bytes_sent = slots * shard * (self.world - 1) * size + shard * (self.world - 1) * size
        gram = gram_of(self._shard)  # (M, M) partial, float64
        self._collective("all-reduce of the partial Grams", dist.all_reduce, gram)
        self._collective("broadcast of the Gram", dist.broadcast, gram, self.root)
        return gram

    def combine(self, weights: Tensor) -> Tensor:
        """``(M,)`` global weights -> the flat ``(P,)`` combination ``d``, equal on all ranks."""
        assert self._shard is not None
        part = weights.to(self._shard.dtype) @ self._shard  # (S,)
        pieces = [torch.empty_like(part) for _ in range(self.world)]
        self._collective("all-gather of the combined shards", dist.all_gather, pieces, part)
        self._shard = None
        return torch.cat(pieces)[: self._numel]


def flatten(grads: list[GroupGrad | None], params: list[Tensor], m: int) -> Tensor:
    """Per-parameter ``(m, ...)`` group gradients -> one dense ``(m, P)`` matrix (float32 or
    wider, the widest parameter dtype)."""
    dtype = torch.promote_types(
        torch.float32, max((p.dtype for p in params), key=lambda t: torch.finfo(t).bits)
    )
    cols = [
        params[i].new_zeros(m, params[i].numel(), dtype=dtype)
        if g is None
        else to_dense(g, params[i].shape).reshape(m, -1).to(dtype)
        for i, g in enumerate(grads)
    ]
    return torch.cat(cols, dim=1)


def unflatten(flat: Tensor, params: list[Tensor]) -> list[Tensor]:
    """``(P,)`` -> one tensor per parameter, in its shape and dtype."""
    out, start = [], 0
    for p in params:
        out.append(flat[start : start + p.numel()].reshape(p.shape).to(p.dtype))
        start += p.numel()
    return out
