"""Normalisation layers: the closed form (one re-run with each parameter set to 1, the others 0)
against the per-group re-run with autograd, in float64, for every layer family it serves; the
layouts it does not serve fall back to the per-group re-run."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from torchgrain.engines._groups import GroupIndex
from torchgrain.engines.rules import find_rule
from torchgrain.engines.rules._rerun import _derivatives, rerun_grads

pytestmark = pytest.mark.usefixtures("float64")


class OnePlusScaleRMSNorm(nn.Module):
    """A Gemma-style norm: ``n(x) * (1 + w)``, the scale starting at 0."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + self.weight)


OnePlusScaleRMSNorm.__module__ = "transformers.models.fake"  # found as a Hugging Face norm


def _llama_rms(d: int) -> nn.Module:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(d)
    nn.init.normal_(norm.weight)
    return norm


def _layer_norm(d: int) -> nn.Module:
    norm = nn.LayerNorm(d)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    return norm


NORMS = {
    "layer_norm": _layer_norm,
    "layer_norm_no_bias": lambda d: nn.LayerNorm(d, bias=False),
    "layer_norm_2d": lambda d: nn.LayerNorm((3, d)),
    "rms_norm": lambda d: nn.RMSNorm(d),
    "llama_rms_norm": _llama_rms,
    "one_plus_scale": OnePlusScaleRMSNorm,
}


def _groups(ids: list[int]) -> GroupIndex:
    t = torch.tensor(ids)
    return GroupIndex.build(t, torch.bincount(t))


@pytest.mark.parametrize("name", sorted(NORMS))
def test_the_closed_form_equals_the_per_group_rerun(name: str) -> None:
    if name == "llama_rms_norm":
        pytest.importorskip("transformers")
    torch.manual_seed(0)
    norm = NORMS[name](5)
    A = torch.randn(7, 3, 5) * 3 + 1
    Bk = torch.randn(7, 3, 5)
    groups = _groups([2, 0, 1, 1, 0, 2, 2])
    assert _derivatives(norm, A, Bk) is not None  # the closed form serves this layer
    rule = find_rule(norm)
    got = rule.group_grads(norm, A, Bk, groups)
    for k in range(groups.m):
        mask = groups.ids == k
        ref = rerun_grads(norm, A[mask], Bk[mask])
        for pname, g in ref.items():
            torch.testing.assert_close(got[pname][k], g, rtol=1e-12, atol=1e-12)
    combined = rule.combine(norm, A, Bk)
    for pname, g in rerun_grads(norm, A, Bk).items():
        torch.testing.assert_close(combined[pname], g, rtol=1e-12, atol=1e-12)


def test_channel_first_norms_use_the_per_group_rerun() -> None:
    torch.manual_seed(0)
    norm = nn.GroupNorm(2, 4)
    A, Bk = torch.randn(5, 4, 3, 3), torch.randn(5, 4, 3, 3)
    groups = _groups([0, 1, 0, 1, 1])
    assert _derivatives(norm, A, Bk) is None
    got = find_rule(norm).group_grads(norm, A, Bk, groups)
    for k in range(groups.m):
        mask = groups.ids == k
        for pname, g in rerun_grads(norm, A[mask], Bk[mask]).items():
            torch.testing.assert_close(got[pname][k], g, rtol=1e-12, atol=1e-12)


def test_the_closed_form_leaves_the_parameters_alone() -> None:
    norm = _layer_norm(4)
    before = {n: p.detach().clone() for n, p in norm.named_parameters()}
    _derivatives(norm, torch.randn(2, 4), torch.randn(2, 4))
    for n, p in norm.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None
