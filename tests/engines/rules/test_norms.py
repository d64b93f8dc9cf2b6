"""Normalisation layers: the closed form (one re-run with each parameter set to 1, the others 0)
against the per-group re-run with autograd, in float64, for every layer family it serves; the
layouts it does not serve fall back to the per-group re-run."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from torchgrain.engines._groups import GroupIndex
from torchgrain.engines.rules import _rerun, find_rule
from torchgrain.engines.rules._rerun import (
    closed_form_pays,
    per_group_saved_norm,
    per_sample_closed_form,
    per_sample_stock_norm,
    rerun_grads,
    saved_backward_pays,
)

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
    groups = _groups([2, 0, 1, 1, 0, 3, 2])
    assert closed_form_pays(A, groups.m)  # few elements: the closed form is chosen
    assert per_sample_closed_form(norm, A, Bk) is not None  # and serves this layer
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
    assert per_sample_closed_form(norm, A, Bk) is None
    got = find_rule(norm).group_grads(norm, A, Bk, groups)
    for k in range(groups.m):
        mask = groups.ids == k
        for pname, g in rerun_grads(norm, A[mask], Bk[mask]).items():
            torch.testing.assert_close(got[pname][k], g, rtol=1e-12, atol=1e-12)


def test_the_closed_form_leaves_the_parameters_alone() -> None:
    norm = _layer_norm(4)
    before = {n: p.detach().clone() for n, p in norm.named_parameters()}
    per_sample_closed_form(norm, torch.randn(2, 4), torch.randn(2, 4))
    for n, p in norm.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None


def test_the_cost_model_reruns_per_group_on_large_cpu_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On the CPU the per-group re-run wins once the call is large (fewer passes over A); the
    closed form wins on small calls and on accelerators (host-bound)."""
    small, large = torch.empty(8, 4, 16), torch.empty(32, 128, 384)
    assert closed_form_pays(small, 8) and not closed_form_pays(large, 8)
    assert not closed_form_pays(small, 1)  # one group: one re-run is already the cheapest
    norm, groups = OnePlusScaleRMSNorm(384), _groups([k % 8 for k in range(32)])
    A, Bk = torch.randn(32, 128, 384), torch.randn(32, 128, 384)
    calls = []
    original = _rerun.per_sample_closed_form

    def spy(*args):  # type: ignore[no-untyped-def]
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(_rerun, "per_sample_closed_form", spy)
    got = find_rule(norm).group_grads(norm, A, Bk, groups)
    assert not calls  # the per-group re-run served it
    ref = rerun_grads(norm, A[groups.ids == 3], Bk[groups.ids == 3])
    torch.testing.assert_close(got["weight"][3], ref["weight"], rtol=1e-12, atol=1e-12)


STOCK = ["layer_norm", "layer_norm_no_bias", "layer_norm_2d", "rms_norm"]


def _norm_with_frozen(name: str, frozen: str | None) -> nn.Module:
    """``NORMS[name](6)`` (seeded), with the ``frozen`` parameter not trainable; skips the test
    when no trainable parameter is left."""
    torch.manual_seed(0)
    norm = NORMS[name](6)
    if frozen is not None and getattr(norm, frozen, None) is not None:
        getattr(norm, frozen).requires_grad_(False)
    if not any(p.requires_grad for p in norm.parameters()):
        pytest.skip("no trainable parameter left")
    return norm


@pytest.mark.parametrize("name", STOCK)
@pytest.mark.parametrize("frozen", [None, "weight", "bias"])
def test_torch_norms_take_the_normalised_input_at_any_size(
    name: str, frozen: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PyTorch's own LayerNorm and RMSNorm: group gradients from ``n(A)`` and ``Bk`` alone, on
    calls too large for the closed form, with neither the re-run nor the closed form run; equal
    to the per-group re-run, for the trainable parameters only."""
    norm = _norm_with_frozen(name, frozen)
    A = torch.randn(32, 3, 6) * 2 - 1
    Bk = torch.randn(32, 3, 6)
    groups = _groups([k % 5 for k in range(32)])
    monkeypatch.setattr(_rerun, "closed_form_pays", lambda A, m: False)  # as for a large call
    refs = [rerun_grads(norm, A[groups.ids == k], Bk[groups.ids == k]) for k in range(groups.m)]
    whole = rerun_grads(norm, A, Bk)

    def refuse(*args):  # type: ignore[no-untyped-def]
        raise AssertionError("the re-run or the closed form ran")

    monkeypatch.setattr(_rerun, "rerun_grads", refuse)
    monkeypatch.setattr(_rerun, "per_sample_closed_form", refuse)
    rule = find_rule(norm)
    got = rule.group_grads(norm, A, Bk, groups)
    combined = rule.combine(norm, A, Bk)
    assert set(got) == set(combined) == set(whole) == set(rule.param_names(norm))
    for pname in whole:
        for k in range(groups.m):
            torch.testing.assert_close(got[pname][k], refs[k][pname], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(combined[pname], whole[pname], rtol=1e-12, atol=1e-12)


def test_the_normalised_input_path_is_for_torch_forwards_only() -> None:
    """A subclass that changes ``forward`` (or a Hugging Face norm) is not PyTorch's formula."""

    class Shifted(nn.LayerNorm):
        def forward(self, x: Tensor) -> Tensor:
            return super().forward(x + 1.0)

    class Plain(nn.LayerNorm):
        pass

    A, Bk = torch.randn(4, 6), torch.randn(4, 6)
    assert per_sample_stock_norm(Shifted(6), A, Bk) is None
    assert per_sample_stock_norm(OnePlusScaleRMSNorm(6), A, Bk) is None
    assert per_sample_stock_norm(Plain(6), A, Bk) is not None


def test_the_normalised_input_is_taken_in_float32_for_half_precision_inputs() -> None:
    """A bfloat16 input under autocast reaches LayerNorm's float32 kernel: the float32 output
    gradient meets ``n(A)`` computed from the same float32 copy of ``A``."""
    torch.manual_seed(0)
    norm = _layer_norm(8).float()
    A = torch.randn(6, 5, 8).to(torch.bfloat16)
    Bk = torch.randn(6, 5, 8, dtype=torch.float32)
    got = per_sample_stock_norm(norm, A, Bk)
    assert got is not None and got["weight"].dtype == torch.float32
    ref = rerun_grads(norm, A.float(), Bk)
    torch.testing.assert_close(got["weight"].sum(0), ref["weight"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["bias"].sum(0), ref["bias"], rtol=1e-5, atol=1e-5)


SAVED = ["layer_norm", "layer_norm_no_bias", "layer_norm_2d"]


@pytest.mark.parametrize("name", SAVED)
@pytest.mark.parametrize("frozen", [None, "weight", "bias"])
def test_the_saved_backward_gives_each_groups_gradients(
    name: str, frozen: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PyTorch's LayerNorm on the CPU, large calls: the LayerNorm backward kernel on each group's
    slice, with the mean and 1/std the call's autograd node saved, gives every group's gradients
    (uneven groups, frozen parameters, 2-d shapes) without the normalised copy of the input."""
    norm = _norm_with_frozen(name, frozen)
    A = (torch.randn(11, 3, 6) * 2 - 1).requires_grad_()
    node = norm(A).grad_fn
    Bk = torch.randn(11, 3, 6)
    groups = _groups([0, 0, 0, 0, 1, 1, 2, 2, 2, 3, 4])  # sorted, uneven: each group a slice
    refs = [rerun_grads(norm, A[groups.ids == k], Bk[groups.ids == k]) for k in range(groups.m)]

    def refuse(*args):  # type: ignore[no-untyped-def]
        raise AssertionError("the normalised-input path ran")

    monkeypatch.setattr(_rerun, "saved_backward_pays", lambda A, m: True)  # as for a large call
    monkeypatch.setattr(_rerun, "per_sample_stock_norm", refuse)
    rule = find_rule(norm)
    got = rule.group_grads(norm, A.detach(), Bk, groups, node=node)
    assert set(got) == set(rule.param_names(norm))
    for pname, grads in got.items():
        for k in range(groups.m):
            torch.testing.assert_close(grads[k], refs[k][pname], rtol=1e-12, atol=1e-12)


def test_the_saved_backward_declines_what_it_cannot_serve() -> None:
    """``None`` (the normalised-input path serves instead) for samples not sorted by group, for
    another norm's node, for a subclass that changes ``forward``, for a bfloat16 call and for a
    node that has run."""

    class Shifted(nn.LayerNorm):
        def forward(self, x: Tensor) -> Tensor:
            return super().forward(x + 1.0)

    sorted_, shuffled = _groups([0, 0, 1, 1]), _groups([0, 1, 0, 1])
    Bk = torch.randn(4, 6)
    norm, A = _layer_norm(6), torch.randn(4, 6, requires_grad=True)
    out = norm(A)
    assert per_group_saved_norm(norm, out.grad_fn, Bk, sorted_) is not None
    assert per_group_saved_norm(norm, out.grad_fn, Bk, shuffled) is None
    assert per_group_saved_norm(norm, out.grad_fn, Bk[:, :5], sorted_) is None
    rms = nn.RMSNorm(6)
    assert per_group_saved_norm(rms, rms(A).grad_fn, Bk, sorted_) is None
    shifted = Shifted(6)
    assert per_group_saved_norm(shifted, shifted(A).grad_fn, Bk, sorted_) is None
    half = _layer_norm(6).to(torch.bfloat16)
    assert per_group_saved_norm(half, half(A.bfloat16()).grad_fn, Bk.bfloat16(), sorted_) is None
    out.backward(Bk)  # the node runs and frees what it saved
    assert per_group_saved_norm(norm, out.grad_fn, Bk, sorted_) is None


def test_the_saved_backward_pays_on_large_cpu_calls_only() -> None:
    """The measured crossover: near 300k elements of the input at m = 8, 500k at m = 16."""
    encoder, minilm = torch.empty(16, 64, 256), torch.empty(32, 128, 384)
    assert saved_backward_pays(minilm, 8) and saved_backward_pays(minilm, 16)
    assert not saved_backward_pays(encoder, 8)
    assert saved_backward_pays(torch.empty(32, 32, 384), 8)
    assert not saved_backward_pays(torch.empty(32, 32, 384), 16)
    assert not saved_backward_pays(torch.empty(32, 128, 384, device="meta"), 8)
