"""What every exchange does: the collectives with their error, the agreement on the groups, the
stream of group-gradient shards (:class:`Stream`), and the Gram's sum in rank order."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from torchgrain.engines.rules._base import GroupGrad, add_gram
from torchgrain.exchange._layout import touched_rows

CAPACITY = 64  # group sizes per rank that travel with the first collective; more need a second


def exchange_dtype(params: list[Tensor]) -> torch.dtype:
    """The dtype group gradients travel in: float32, or the widest parameter dtype if wider."""
    widest = max((p.dtype for p in params), key=lambda t: torch.finfo(t).bits)
    return torch.promote_types(torch.float32, widest)


@dataclass
class Agreement:
    """What every rank knows after :meth:`Exchange.agree`, identically."""

    sizes: Tensor  # (W * slots,) every rank's group sizes, rank-major; empty slots are 0
    counts: list[int]  # groups per rank
    ok: bool  # every rank reported a finite step so far

    @property
    def slots(self) -> int:
        return max(self.counts)


class Exchange:
    """The collectives of one GRAIN step over ``process_group``, shared by the replicated and the
    sharded exchange. A subclass lays the buckets out (``_plan``), writes one parameter's group
    gradients into its bucket's send buffer (``_put``) and combines (``combine``).

    Args:
        process_group: the ``torch.distributed`` group of the data-parallel ranks.
        row_sparse: indices of the parameters whose group gradients are exchanged on the rows
            some rank touched (embedding weights); the others are exchanged whole.
    """

    sharded = False  # whether each rank ends with its shard of d only (no all-gather)
    # Who runs the collectives, and what every rank must do for them to match (error messages).
    owner = "GRAIN"
    contract = "every rank must call grain.backward for every step"

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
        self.bytes_sent = 0  # by this rank's payload collectives, last step
        self._buckets: list[Any] = []  # the last stream's, for combine
        self._shards: list[Tensor] = []  # per bucket, (W * slots, S_b): my shard of every group
        self._params: list[Tensor] = []

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
            f"{self.owner}: the {what} across ranks failed on rank {self.rank} of {self.world} "
            f"({error}). Another rank probably raised, stopped or is late; {self.contract} "
            "(set a timeout in init_process_group)"
        )

    # ---------------------------------------------------------------------------------- agree
    def agree(self, sizes: Tensor, ok: bool) -> Agreement:
        """One ``all_gather`` of a few bytes: every rank's group count, whether its step is
        finite so far, and its group sizes ``(m_local,)``."""
        m = sizes.shape[0]
        head = torch.zeros(2 + CAPACITY, dtype=torch.int64, device=sizes.device)
        head[0], head[1] = m, int(ok)
        head[2 : 2 + min(m, CAPACITY)] = sizes[:CAPACITY]
        heads = head.new_empty(self.world, head.numel())
        self._collective("agreement on the group sizes", dist.all_gather, list(heads), head)
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
        return Agreement(everyone.reshape(-1), list(counts), all(oks))

    def agree_rows(self, grads: dict[int, GroupGrad], params: list[Tensor]) -> dict[int, Tensor]:
        """One ``all_gather`` of the row-sparse parameters' touched rows: per parameter, the
        sorted ``(U,)`` rows some rank touched."""
        device = params[0].device
        masks = [touched_rows(grads.get(i), params[i].shape[0], device) for i in self.row_sparse]
        mine = torch.cat(masks)
        everyone = mine.new_empty(self.world, mine.numel())
        self._collective("agreement on the embedding rows", dist.all_gather, list(everyone), mine)
        rows, start = {}, 0
        for i in self.row_sparse:
            n = params[i].shape[0]
            rows[i] = everyone[:, start : start + n].ne(0).any(0).nonzero().squeeze(1)
            start += n
        return rows

    def stream(self, agreement: Agreement, params: list[Tensor], keep: bool = True) -> Stream:
        """A :class:`Stream` for this step's group gradients; ``keep``: hold the received shards
        for :meth:`combine` (else only their partial Gram is computed)."""
        self._params = params
        return Stream(self, agreement, params, keep)

    # ------------------------------------------------------------------------ for subclasses
    def _plan(
        self,
        params: list[Tensor],
        which: list[int],
        slots: int,
        rows: dict[int, Tensor],
        element_size: int,
    ) -> list[Any]:
        """Buckets (each with ``.params``, indices, and ``.shard``, columns per rank) over the
        parameters ``which``, in order, for values of ``element_size`` bytes."""
        raise NotImplementedError

    def _put(self, send: Tensor, bucket: Any, i: int, grad: GroupGrad, m: int) -> None:
        """Write parameter i's ``m`` group gradients into ``send`` ``(W, slots, S_b)``."""
        raise NotImplementedError

    def _blank(self, send: Tensor, bucket: Any, written: set[int], m: int) -> None:
        """Zero what :meth:`_put` did not write in ``send``: slots past ``m``, padding, and the
        parameters not in ``written``."""
        raise NotImplementedError

    def combine(self, weights: Tensor) -> list[Tensor | None]:
        """``(W * slots,)`` global weights -> what each parameter's ``.grad`` receives."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------- the Gram
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


_SHARDS = "all-to-all of the group-gradient shards"


class Stream:
    """One step's group gradients on their way to the other ranks, parameter by parameter.

    :meth:`add` writes a parameter's group gradients into its bucket's send buffer as soon as the
    engine has them (and the engine drops them); a bucket whose parameters are all in travels at
    once, by an asynchronous ``all_to_all``, while the engine goes on. Buckets travel in bucket
    order on every rank, whatever order the parameters arrive in, so the collectives match.
    :meth:`close` sends the rest (a parameter never added is zero), waits for the shards, sums
    their partial Grams and returns the global Gram. Row-sparse parameters travel last, after
    one collective agrees on their rows.
    """

    def __init__(
        self, exchange: Exchange, agreement: Agreement, params: list[Tensor], keep: bool
    ) -> None:
        self.x, self.params, self.keep = exchange, params, keep
        self.slots, self.m = agreement.slots, agreement.counts[exchange.rank]
        self.dtype = exchange_dtype(params)
        self.size = torch.empty((), dtype=self.dtype).element_size()
        self.device = params[0].device
        sparse = set(exchange.row_sparse)
        dense = [i for i in range(len(params)) if i not in sparse]
        self.buckets = exchange._plan(params, dense, self.slots, {}, self.size)
        self._owner = {i: b for b, bucket in enumerate(self.buckets) for i in bucket.params}
        self._missing = [set(bucket.params) for bucket in self.buckets]
        self._sends: dict[int, Tensor] = {}
        self._written: dict[int, set[int]] = {}  # bucket -> the parameters written into it
        self._deferred: dict[int, GroupGrad] = {}
        self._in_flight: list[tuple[Any, Tensor, Tensor]] = []

    def add(self, i: int, grad: GroupGrad | None) -> None:
        """Parameter i's ``(m_local, ...)`` group gradients."""
        if grad is None:
            return
        b = self._owner.get(i)
        if b is None:  # row-sparse: waits for the rows' agreement in close()
            self._deferred[i] = grad
            return
        self.x._put(self._send(b), self.buckets[b], i, grad, self.m)
        self._written.setdefault(b, set()).add(i)
        self._missing[b].discard(i)
        while len(self._in_flight) < len(self.buckets) and not self._missing[len(self._in_flight)]:
            self._launch(len(self._in_flight))

    def close(self) -> Tensor:
        """Send what is left, wait, and return the global ``(W * slots, W * slots)`` Gram."""
        while len(self._in_flight) < len(self.buckets):
            self._launch(len(self._in_flight))
        if self.x.row_sparse:
            rows = self.x.agree_rows(self._deferred, self.params)
            extra = self.x._plan(self.params, self.x.row_sparse, self.slots, rows, self.size)
            self.buckets += extra
            for bucket in extra:
                for i in bucket.params:
                    if i in self._deferred:
                        b = len(self._in_flight)
                        self.x._put(self._send(b), bucket, i, self._deferred[i], self.m)
                        self._written.setdefault(b, set()).add(i)
                self._launch(len(self._in_flight))
            self._deferred = {}
        M = self.x.world * self.slots
        partial = torch.zeros(M, M, dtype=torch.float64, device=self.device)
        shards = []
        for work, _send, recv in self._in_flight:
            self.x._wait(_SHARDS, work)
            shard = recv.reshape(M, -1)  # every rank's groups, my shard of them
            add_gram(partial, shard)
            if self.keep:
                shards.append(shard)
        self._in_flight = []
        columns = sum(bucket.shard for bucket in self.buckets)
        combined = columns if self.keep and not self.x.sharded else 0  # the all-gather of d
        self.x.bytes_sent = (columns * self.slots + combined) * (self.x.world - 1) * self.size
        self.x._buckets, self.x._shards = self.buckets, shards
        return self.x._sum_grams(partial)

    def _send(self, b: int) -> Tensor:
        """Bucket b's ``(W, slots, S_b)`` send buffer (what nothing writes is zeroed at launch:
        zeroing it all first would touch every page twice)."""
        if b not in self._sends:
            shape = (self.x.world, self.slots, self.buckets[b].shard)
            self._sends[b] = torch.empty(shape, dtype=self.dtype, device=self.device)
        return self._sends[b]

    def _launch(self, b: int) -> None:
        send = self._send(b)
        del self._sends[b]
        self.x._blank(send, self.buckets[b], self._written.pop(b, set()), self.m)
        recv = torch.empty_like(send)
        work = self.x._collective(_SHARDS, dist.all_to_all_single, recv, send, async_op=True)
        self._in_flight.append((work, send, recv))
