"""What every exchange does: the collectives with their error, the agreement on the groups, the
all-to-all of packed group-gradient shards with the partial Grams, and the Gram's sum."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from torchgrain.engines.rules._base import GroupGrad, gram_of
from torchgrain.exchange._layout import touched_rows

CAPACITY = 64  # group sizes per rank that travel with the first collective; more need a second


def exchange_dtype(params: list[Tensor]) -> torch.dtype:
    """The dtype group gradients travel in: float32, or the widest parameter dtype if wider."""
    widest = max((p.dtype for p in params), key=lambda t: torch.finfo(t).bits)
    return torch.promote_types(torch.float32, widest)


@dataclass
class Agreement:
    """What every rank knows after :meth:`RankExchange.agree`, identically."""

    sizes: Tensor  # (W * slots,) every rank's group sizes, rank-major; empty slots are 0
    counts: list[int]  # groups per rank
    ok: bool  # every rank's losses and gradients are finite
    rows: dict[int, Tensor]  # parameter index -> (U,) rows some rank touched (row-sparse ones)

    @property
    def slots(self) -> int:
        return max(self.counts)


class Exchange:
    """The collectives of one GRAIN step over ``process_group``, shared by the replicated and the
    sharded exchange.

    Args:
        process_group: the ``torch.distributed`` group of the data-parallel ranks.
        row_sparse: indices of the parameters whose group gradients are exchanged on the rows
            some rank touched (embedding weights); the others are exchanged whole.
    """

    def __init__(self, process_group: Any, row_sparse: Iterable[int] = ()) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "process_group was given but torch.distributed is not initialised; call "
                "torch.distributed.init_process_group (torchrun does the rendezvous) first"
            )
        self.group = process_group
        self.world = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self.row_sparse = list(row_sparse)
        self.bytes_sent = 0  # by this rank's payload collectives (2 and 4), last step
        self.device = torch.device("cpu")  # of the group gradients, set by each step
        self._shards: list[Tensor] = []  # per bucket, (W * slots, S_b): my shard of every group

    # ---------------------------------------------------------------------------- collectives
    def _collective(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, group=self.group, **kwargs)
        except RuntimeError as error:
            raise self._failed(what, error) from error

    def _wait(self, what: str, work: Any) -> None:
        try:
            work.wait()
        except RuntimeError as error:
            raise self._failed(what, error) from error

    def _failed(self, what: str, error: Exception) -> RuntimeError:
        return RuntimeError(
            f"GRAIN: the {what} across ranks failed on rank {self.rank} of {self.world} "
            f"({error}). Another rank probably raised, stopped or is late; every rank must "
            "call grain.backward for every step (set a timeout in init_process_group)"
        )

    # ---------------------------------------------------------------------------------- agree
    def agree(
        self, grads: list[GroupGrad | None], sizes: Tensor, ok: bool, params: list[Tensor]
    ) -> Agreement:
        """One ``all_gather``: every rank's group count, finiteness, sizes ``(m_local,)`` and
        touched embedding rows."""
        device = sizes.device
        m = sizes.shape[0]
        head = torch.zeros(2 + CAPACITY, dtype=torch.int64, device=device)
        head[0], head[1] = m, int(ok)
        head[2 : 2 + min(m, CAPACITY)] = sizes[:CAPACITY]
        masks = [
            touched_rows(grads[i] if ok else None, params[i].shape[0], device)
            for i in self.row_sparse
        ]
        payload = torch.cat([head.view(torch.uint8), *masks])
        out = payload.new_empty(self.world, payload.numel())
        self._collective("agreement on the group sizes", dist.all_gather, list(out), payload)
        width = head.numel() * head.element_size()
        heads = out[:, :width].contiguous().view(torch.int64)  # (W, 2 + CAPACITY)
        # Host sync: the group counts decide the shapes of everything that follows.
        counts, oks = zip(*heads[:, :2].tolist(), strict=True)
        slots = max(counts)
        if slots <= CAPACITY:
            everyone = heads[:, 2 : 2 + slots]  # (W, slots)
        else:  # a second, rare, exchange of the sizes that did not fit
            padded = sizes.new_zeros(slots)
            padded[:m] = sizes
            everyone = padded.new_empty(self.world, slots)
            self._collective("exchange of the group sizes", dist.all_gather, list(everyone), padded)
        rows, start = {}, width
        for i in self.row_sparse:
            n = params[i].shape[0]
            rows[i] = out[:, start : start + n].ne(0).any(0).nonzero().squeeze(1)  # (U,) sorted
            start += n
        return Agreement(everyone.reshape(-1), list(counts), all(oks), rows)

    # -------------------------------------------------------------------------- the two steps
    def gram(
        self, grads: list[GroupGrad | None], agreement: Agreement, params: list[Tensor]
    ) -> Tensor:
        """This rank's group gradients per parameter -> the global ``(W * slots, W * slots)``
        float64 Gram, the same bits on every rank."""
        raise NotImplementedError

    def combine(self, weights: Tensor) -> list[Tensor | None]:
        """``(W * slots,)`` global weights -> what each parameter's ``.grad`` receives."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------- shards
    def _exchange_shards(self, sends: Iterable[Tensor], slots: int) -> Tensor:
        """Send each ``(W, slots, S_b)`` buffer's slice r to rank r (asynchronously: the next
        buffer is packed while one travels); keep what arrives, ``(W * slots, S_b)``: every rank's
        groups on my shard. Returns the partial ``(W * slots, W * slots)`` float64 Gram."""
        what = "all-to-all of the group-gradient shards"
        in_flight = []
        for send in sends:
            recv = torch.empty_like(send)
            work = self._collective(what, dist.all_to_all_single, recv, send, async_op=True)
            in_flight.append((work, send, recv))
        M = self.world * slots
        partial = torch.zeros(M, M, dtype=torch.float64, device=self.device)
        self._shards = []
        for work, _send, recv in in_flight:
            self._wait(what, work)
            shard = recv.reshape(M, -1)  # every rank's groups, my shard of them
            partial += gram_of(shard)
            self._shards.append(shard)
        return partial

    def _sum_grams(self, partial: Tensor) -> Tensor:
        """One ``all_gather`` of the partial Grams, summed in rank order on every rank: the same
        bits everywhere, so every rank solves the same problem."""
        partials = partial.new_empty(self.world, *partial.shape)
        self._collective(
            "all-gather of the partial Grams", dist.all_gather, list(partials), partial
        )
        gram = partials[0].clone()
        for r in range(1, self.world):
            gram += partials[r]
        return gram
