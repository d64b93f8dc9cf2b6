"""Each layer rule against per-sample autograd, on random shapes, in float64.

For a module, an input ``A`` ``(B, ...)`` and an output gradient ``Bk``, the reference group
gradient is the sum over the group's samples of ``grad <module(A_i), Bk_i>`` taken one sample at a
time; ``combine`` must equal the same sum weighted per sample."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from torchgrain.engines import GroupIndex
from torchgrain.engines.rules import find_rule
from torchgrain.engines.rules._base import Rows, add, gram_of, to_dense, weighted_sum


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(g: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _float_input(
    shape: Callable[[torch.Generator], tuple[int, ...]],
) -> Callable[[torch.Generator, int], Tensor]:
    return lambda g, B: _rand(g, B, *shape(g))


def _randint(g: torch.Generator, low: int, high: int) -> int:
    return int(torch.randint(low, high, (), generator=g))


def _hf_conv1d(g: torch.Generator) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    return Conv1D(_randint(g, 2, 6), 5)


def _llama_rmsnorm(g: torch.Generator) -> nn.Module:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(5)
    nn.init.normal_(norm.weight, generator=g)
    return norm


# name -> (build module from a generator, build a (B, ...) input)
MODULES: dict[
    str, tuple[Callable[[torch.Generator], nn.Module], Callable[[torch.Generator, int], Tensor]]
] = {
    "linear_2d": (lambda g: nn.Linear(5, _randint(g, 1, 7)), _float_input(lambda g: (5,))),
    "linear_3d_no_bias": (
        lambda g: nn.Linear(5, 4, bias=False),
        _float_input(lambda g: (_randint(g, 1, 5), 5)),
    ),
    "linear_4d": (lambda g: nn.Linear(5, 3), _float_input(lambda g: (2, _randint(g, 1, 4), 5))),
    "hf_conv1d": (_hf_conv1d, _float_input(lambda g: (3, 5))),
    "embedding": (
        lambda g: nn.Embedding(11, _randint(g, 2, 6)),
        lambda g, B: torch.randint(0, 11, (B, 4), generator=g),
    ),
    "embedding_padding": (
        lambda g: nn.Embedding(7, 3, padding_idx=0),
        lambda g, B: torch.randint(0, 7, (B, 5), generator=g),
    ),
    "conv1d": (
        lambda g: nn.Conv1d(3, 4, 3, stride=2, padding=1, dilation=1),
        _float_input(lambda g: (3, _randint(g, 6, 11))),
    ),
    "conv2d_groups": (
        lambda g: nn.Conv2d(4, 6, (3, 2), padding=(1, 0), dilation=(2, 1), groups=2),
        _float_input(lambda g: (4, 7, 6)),
    ),
    "conv2d_circular": (
        lambda g: nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"),
        _float_input(lambda g: (2, 5, 5)),
    ),
    "conv2d_same": (
        lambda g: nn.Conv2d(2, 3, 3, padding="same"),
        _float_input(lambda g: (2, 5, 4)),
    ),
    "layernorm": (lambda g: nn.LayerNorm(5), _float_input(lambda g: (_randint(g, 1, 4), 5))),
    "layernorm_2d_shape": (lambda g: nn.LayerNorm((3, 5)), _float_input(lambda g: (3, 5))),
    "groupnorm": (lambda g: nn.GroupNorm(2, 4), _float_input(lambda g: (4, 3, 3))),
    "rmsnorm": (lambda g: nn.RMSNorm(5), _float_input(lambda g: (2, 5))),
    "hf_llama_rmsnorm": (_llama_rmsnorm, _float_input(lambda g: (3, 5))),
}


def _randomise(module: nn.Module, g: torch.Generator) -> nn.Module:
    module = module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return module


def _per_sample(
    module: nn.Module, A: Tensor, Bk: Tensor, names: list[str]
) -> list[dict[str, Tensor]]:
    params = [getattr(module, n) for n in names]
    out = []
    for i in range(A.shape[0]):
        grads = torch.autograd.grad(module(A[i : i + 1]), params, Bk[i : i + 1])
        out.append(dict(zip(names, grads, strict=True)))
    return out


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name", sorted(MODULES))
def test_rule_against_per_sample_autograd(name: str, seed: int) -> None:
    if name.startswith("hf_"):
        pytest.importorskip("transformers")
    g = _gen(seed)
    build, make_input = MODULES[name]
    module = _randomise(build(g), g)
    rule = find_rule(module)
    assert rule is not None, f"no rule for {type(module).__name__}"
    names = rule.param_names(module)
    assert names
    B = _randint(g, 3, 9)
    m = _randint(g, 1, B + 1)
    ids = torch.cat(
        [torch.arange(m), torch.randint(0, m, (B - m,), generator=g)]
    )  # every group used
    ids = ids[torch.randperm(B, generator=g)]
    groups = GroupIndex.build(ids, torch.bincount(ids, minlength=m))
    A = make_input(g, B)
    with torch.no_grad():
        out_shape = module(A).shape
    Bk = _rand(g, *out_shape)
    per_sample = _per_sample(module, A, Bk, names)

    got = rule.group_grads(module, A, Bk, groups)
    s = torch.rand(B, generator=g, dtype=torch.float64)
    combined = rule.combine(module, A, Bk * s.reshape(-1, *([1] * (Bk.dim() - 1))))
    for n in names:
        shape = getattr(module, n).shape
        expected = torch.stack(
            [
                sum(ps[n] for ps, k in zip(per_sample, ids.tolist(), strict=True) if k == j)
                for j in range(m)
            ]
        )
        torch.testing.assert_close(to_dense(got[n], shape), expected, rtol=1e-10, atol=1e-10)
        flat = expected.reshape(m, -1)
        torch.testing.assert_close(gram_of(got[n]), flat @ flat.T, rtol=1e-10, atol=1e-10)
        w = torch.rand(m, generator=g, dtype=torch.float64)
        torch.testing.assert_close(
            weighted_sum(w, got[n], shape), torch.tensordot(w, expected, dims=1)
        )
        torch.testing.assert_close(
            combined[n], sum(si * ps[n] for si, ps in zip(s.tolist(), per_sample, strict=True))
        )


def test_rows_add_coalesces_duplicate_rows() -> None:
    from torchgrain.engines.rules import Rows

    a = Rows(torch.tensor([1, 4]), torch.ones(2, 2, 3, dtype=torch.float64))
    b = Rows(torch.tensor([4, 6]), 2 * torch.ones(2, 2, 3, dtype=torch.float64))
    total = add(a, b, torch.Size([8, 3]))
    dense = to_dense(total, torch.Size([8, 3]))
    torch.testing.assert_close(
        dense, to_dense(a, torch.Size([8, 3])) + to_dense(b, torch.Size([8, 3]))
    )
    assert isinstance(total, Rows) and total.index.tolist() == [1, 4, 6]


@pytest.mark.parametrize("order", ["dense first", "rows first"])
def test_add_sums_rows_and_dense_into_the_dense_tensor(order: str) -> None:
    """A tied embedding and output layer: the embedding's rows go into the output layer's dense
    group gradients in place, with no new (m, V, d) tensor."""
    shape = torch.Size([8, 3])
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(2, *shape, generator=g, dtype=torch.float64)
    rows = Rows(torch.tensor([1, 4, 6]), torch.randn(2, 3, 3, generator=g, dtype=torch.float64))
    expected = dense + to_dense(rows, shape)
    total = add(dense, rows, shape) if order == "dense first" else add(rows, dense, shape)
    assert total is dense
    torch.testing.assert_close(total, expected, rtol=0, atol=0)
    other = torch.randn(2, *shape, generator=g, dtype=torch.float64)
    expected = total + other
    assert add(total, other, shape) is total
    torch.testing.assert_close(total, expected, rtol=0, atol=0)


def test_add_promotes_a_bf16_output_layer_tied_to_a_float32_embedding() -> None:
    """Under autocast the output layer's group gradients are bf16 and the embedding's float32:
    the sum is float32, as the sum of the two dense tensors was."""
    shape = torch.Size([8, 3])
    dense = torch.randn(2, *shape).to(torch.bfloat16)
    rows = Rows(torch.tensor([1, 4]), torch.randn(2, 2, 3))
    for total in (add(dense.clone(), rows, shape), add(rows, dense.clone(), shape)):
        assert isinstance(total, torch.Tensor) and total.dtype == torch.float32
        torch.testing.assert_close(total, dense.float() + to_dense(rows, shape))


def test_embedding_options_that_couple_samples_have_no_rule_params() -> None:
    for module in (
        nn.Embedding(5, 2, scale_grad_by_freq=True),
        nn.Embedding(5, 2, sparse=True),
        nn.Embedding(5, 2, max_norm=1.0),
    ):
        rule = find_rule(module)
        assert rule is not None and rule.param_names(module) == []


@pytest.mark.parametrize("m", [1, 3, 8, 15, 16, 20])
@pytest.mark.parametrize("P", [5, 4095, 4096, 2048 * 7 + 13])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_of_any_shape_against_float64(m: int, P: int, dtype: torch.dtype) -> None:
    """The Gram in slices of the columns (the CPU's path for m < 16, with a tail past the last
    full slice) or in one product: the float64 ``F F^T`` either way, for dense and row-sparse
    group gradients."""
    g = _gen(m * P)
    flat = _rand(g, m, P)
    expected = flat @ flat.T
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    got = gram_of(flat.to(dtype).reshape(m, P, 1))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol * P)
    rows = Rows(torch.arange(P), flat.to(dtype).reshape(m, P, 1))
    torch.testing.assert_close(gram_of(rows), expected, rtol=tol, atol=tol * P)
