"""The replicated (DDP-style) exchange on 2 Gloo processes, where its layout is not trivial:
embeddings exchanged on the rows some rank touched, parameters split across buckets and shards,
and more groups per rank than travel with the first collective. Every rank ends with the same
bits, equal in float64 to single-process GRAIN on the joined batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

import torchgrain
from tests import _dist
from tests._models import mlp, per_sample_ce
from torchgrain.exchange import _base, _layout

VOCAB, T = 40, 5


class Bag(nn.Module):
    """Token and position embeddings, mean-pooled, and a linear head. The position embedding
    sees T positions, not B samples: the fused engine serves it by its exact fallback (dense
    group gradients on a row-sparse parameter)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 6)
        self.pos = nn.Embedding(T, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens) + self.pos(torch.arange(tokens.shape[1]))
        return self.head(torch.tanh(h).mean(dim=1))


def _bag_data(rank: int) -> tuple[Tensor, Tensor]:
    """Rank r's tokens come from [12 r, 12 r + 16): the ranks' rows overlap a little, and rows
    from 28 on are touched by none."""
    g = torch.Generator().manual_seed(rank)
    B = 6 + 2 * rank
    return torch.randint(12 * rank, 12 * rank + 16, (B, T), generator=g), torch.randint(
        0, 3, (B,), generator=g
    )


def _bag() -> nn.Module:
    torch.manual_seed(0)
    return Bag().double()


def _bag_worker(rank: int, world: int, engine: str, m: int, bucket: int) -> dict[str, object]:
    _layout.BUCKET_BYTES = bucket
    tokens, y = _bag_data(rank)
    model = _bag()
    grain = torchgrain.GRAIN(model, num_groups=m, engine=engine, process_group=dist.group.WORLD)
    stats = grain.backward(per_sample_ce(model, tokens, y))
    exchange = grain._exchange
    assert exchange is not None
    return {
        "grads": [p.grad.clone() for p in model.parameters()],
        "sizes": stats.group_sizes.tolist(),
        "bytes": exchange.bytes_sent,
        "buckets": len(exchange._buckets),
    }


def _bag_reference(world: int, m: int) -> list[Tensor]:
    data = [_bag_data(r) for r in range(world)]
    model = _bag()
    ids = torch.cat([torch.arange(len(y)) * m // len(y) + m * r for r, (_, y) in enumerate(data)])
    grain = torchgrain.GRAIN(model, num_groups=m * world, engine="loop")
    tokens = torch.cat([d[0] for d in data])
    grain.backward(per_sample_ce(model, tokens, torch.cat([d[1] for d in data])), ids)
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize("bucket", [1 << 20, 256])
@pytest.mark.parametrize(("engine", "m"), [("fused", 3), ("fused", 1), ("loop", 2)])
def test_embeddings_travel_on_their_touched_rows(
    engine: str, m: int, bucket: int, tmp_path: Path
) -> None:
    """Rows, dense and mixed embedding gradients (fused rule, fallback, loop engine), in one
    bucket or in many small ones whose shards split parameters."""
    results = _dist.run(_bag_worker, 2, tmp_path, engine, m, bucket)
    for r in results:
        assert "error" not in r, r.get("trace")
        for got, first in zip(r["grads"], results[0]["grads"], strict=True):
            assert torch.equal(got, first)  # bit-identical across ranks
    for got, ref in zip(results[0]["grads"], _bag_reference(2, m), strict=True):
        assert float((got - ref).norm() / ref.norm()) <= 1e-12
    assert results[0]["grads"][0][28:].abs().max() == 0  # rows no rank touched
    if bucket == 256:
        assert results[0]["buckets"] > 2
    # 28 touched token rows of 40, 5 position rows, the head: 28*6 + 5*6 + 21 = 219 values
    shards = -(-219 // 2) if bucket > 1000 else None
    if shards is not None:
        assert results[0]["bytes"] == shards * (m + 1) * 1 * 8


def _crowded_worker(rank: int, world: int, m: int) -> dict[str, object]:
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(m, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (m,), generator=g)
    torch.manual_seed(0)
    model = mlp().double()
    grain = torchgrain.GRAIN(model, num_groups=m, process_group=dist.group.WORLD)
    stats = grain.backward(per_sample_ce(model, x, y))
    return {"grads": [p.grad.clone() for p in model.parameters()], "m": stats.num_groups}


def test_more_groups_per_rank_than_the_first_collective_carries(tmp_path: Path) -> None:
    m = _base.CAPACITY + 6  # one sample per group
    results = _dist.run(_crowded_worker, 2, tmp_path, m)
    for r in results:
        assert "error" not in r, r.get("trace")
        assert r["m"] == 2 * m
        for got, first in zip(r["grads"], results[0]["grads"], strict=True):
            assert torch.equal(got, first)
    torch.manual_seed(0)
    model = mlp().double()
    xs, ys = [], []
    for rank in range(2):
        g = torch.Generator().manual_seed(rank)
        xs.append(torch.randn(m, 5, generator=g, dtype=torch.float64))
        ys.append(torch.randint(0, 3, (m,), generator=g))
    grain = torchgrain.GRAIN(model, num_groups=2 * m, engine="loop")
    grain.backward(per_sample_ce(model, torch.cat(xs), torch.cat(ys)))
    # 140 groups in 83 parameters: a singular Gram, whose min-norm point moves by ~1e-9 when
    # its entries are summed in another order (per shard here, per parameter there)
    for got, p in zip(results[0]["grads"], model.parameters(), strict=True):
        assert float((got - p.grad).norm() / p.grad.norm()) <= 1e-8


class _WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.used = mlp().double()
        self.unused = nn.Linear(3, 4).double()  # reached by no loss: its columns are zeroed

    def forward(self, x: Tensor) -> Tensor:
        return self.used(x)


def _unused_worker(rank: int, world: int, bucket: int) -> dict[str, object]:
    _layout.BUCKET_BYTES = bucket
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=g)
    model = _WithUnused()
    grain = torchgrain.GRAIN(model, num_groups=2, allow_unused=True, process_group=dist.group.WORLD)
    grain.backward(per_sample_ce(model, x, y))
    return {"grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()]}


@pytest.mark.parametrize("bucket", [1 << 20, 128])
def test_a_parameter_no_rank_reaches_travels_as_zeros(bucket: int, tmp_path: Path) -> None:
    results = _dist.run(_unused_worker, 2, tmp_path, bucket)
    model = _WithUnused()
    xs, ys = [], []
    for rank in range(2):
        g = torch.Generator().manual_seed(rank)
        xs.append(torch.randn(6, 5, generator=g, dtype=torch.float64))
        ys.append(torch.randint(0, 3, (6,), generator=g))
    grain = torchgrain.GRAIN(model, num_groups=4, allow_unused=True, engine="loop")
    grain.backward(per_sample_ce(model, torch.cat(xs), torch.cat(ys)))
    for r in results:
        assert "error" not in r, r.get("trace")
        for got, p in zip(r["grads"], model.parameters(), strict=True):  # type: ignore[call-overload]
            if p.grad is None:  # the unused Linear: d is zero there
                assert got is None or got.abs().max() == 0
            else:
                assert float((got - p.grad).norm() / p.grad.norm()) <= 1e-12
