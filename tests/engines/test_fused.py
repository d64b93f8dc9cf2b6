"""The fused one-backward engine against the reference loop engine, in float64, on a zoo of
models: relative error <= 1e-6 for m in {1, 3, 8} with uneven groups and m = 4 with equal ones
in order (:attr:`GroupIndex.uniform`), and the fallback named exactly where it must be used."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor, nn

import torchgrain
from tests._models import CNN, TiedLM, lm_losses, mlp, per_sample_ce
from torchgrain.engines import FusedEngine, GroupIndex
from torchgrain.engines._hooks import reaches

pytestmark = pytest.mark.usefixtures("float64")


@dataclass
class Case:
    build: Callable[[], nn.Module]
    batch: Callable[[int], tuple[Tensor, ...]]  # B -> inputs
    losses: Callable[[nn.Module, tuple[Tensor, ...]], Tensor]  # (B,)
    fallback: set[str] = field(default_factory=set)  # parameters that must use the fallback


class Scale(nn.Module):
    """A parametrised module no rule knows."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gain


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _hf_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config).double()


def _hf_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=40,
        n_positions=16,
        n_embd=16,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).double()


def _hf_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).double()


def _lora_bert() -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        _hf_bert(),
        LoraConfig(
            r=2,
            lora_alpha=4,
            target_modules=["query", "value"],
            lora_dropout=0.0,
            modules_to_save=["classifier"],
        ),
    )


def _seq_cls_losses(model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    ids, mask, labels = batch
    logits = model(input_ids=ids, attention_mask=mask).logits
    return nn.functional.cross_entropy(logits, labels, reduction="none")


def _causal_lm_losses(model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    ids, mask = batch
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    token = nn.functional.cross_entropy(
        logits.transpose(1, 2), labels, reduction="none"
    )  # (B, T-1)
    return token.sum(1) / (labels != -100).sum(1)


def _tokens(B: int, T: int = 7, vocab: int = 40, seed: int = 0) -> tuple[Tensor, Tensor]:
    ids = torch.randint(1, vocab, (B, T), generator=_gen(seed))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[::3, -2:] = 0  # some padding
    return ids, mask


CASES: dict[str, Case] = {
    "mlp_layernorm": Case(
        lambda: mlp(),
        lambda B: (
            torch.randn(B, 5, generator=_gen(1)),
            torch.randint(0, 3, (B,), generator=_gen(2)),
        ),
        lambda m, b: per_sample_ce(m, *b),
    ),
    "mlp_inplace_relu_3d": Case(
        lambda: nn.Sequential(
            nn.Linear(4, 6),
            nn.ReLU(inplace=True),
            nn.Linear(6, 6),
            nn.ReLU(inplace=True),
            nn.Linear(6, 2),
        ),
        lambda B: (torch.randn(B, 3, 4, generator=_gen(3)),),  # a token dimension
        lambda m, b: m(b[0]).pow(2).mean((1, 2)),
    ),
    "cnn_groupnorm": Case(
        lambda: CNN(batchnorm=False),
        lambda B: (
            torch.randn(B, 1, 6, 6, generator=_gen(4)),
            torch.randint(0, 3, (B,), generator=_gen(5)),
        ),
        lambda m, b: per_sample_ce(m, *b),
    ),
    "conv1d_reflect": Case(
        lambda: nn.Sequential(
            nn.Conv1d(2, 3, 3, padding=1, padding_mode="reflect"),
            nn.Tanh(),
            nn.Conv1d(3, 2, 2, stride=2, bias=False),
            nn.Flatten(),
            nn.Linear(8, 2),
        ),
        lambda B: (torch.randn(B, 2, 8, generator=_gen(6)),),
        lambda m, b: m(b[0]).pow(2).sum(1),
    ),
    "tied_embedding_lm": Case(
        lambda: TiedLM(),
        lambda B: (torch.randint(0, 11, (B, 6), generator=_gen(7)),),
        lambda m, b: lm_losses(m, b[0]),
    ),
    "embedding_padding_idx": Case(
        lambda: nn.Sequential(nn.Embedding(9, 4, padding_idx=0), nn.Flatten(), nn.Linear(12, 1)),
        lambda B: (torch.randint(0, 9, (B, 3), generator=_gen(8)),),
        lambda m, b: m(b[0]).squeeze(1).pow(2),
    ),
    "unsupported_module": Case(
        lambda: nn.Sequential(nn.Linear(5, 4), Scale(4), nn.Tanh(), nn.Linear(4, 3)),
        lambda B: (
            torch.randn(B, 5, generator=_gen(9)),
            torch.randint(0, 3, (B,), generator=_gen(10)),
        ),
        lambda m, b: per_sample_ce(m, *b),
        fallback={"1.gain"},
    ),
    "hf_bert": Case(
        _hf_bert,
        lambda B: (*_tokens(B), torch.randint(0, 3, (B,), generator=_gen(11))),
        _seq_cls_losses,
    ),
    "hf_gpt2": Case(_hf_gpt2, lambda B: _tokens(B, seed=12), _causal_lm_losses),
    "hf_llama": Case(_hf_llama, lambda B: _tokens(B, seed=13), _causal_lm_losses),
    "peft_lora_bert": Case(
        _lora_bert,
        lambda B: (*_tokens(B, seed=14), torch.randint(0, 3, (B,), generator=_gen(15))),
        _seq_cls_losses,
    ),
}

GROUPINGS = {  # m -> (B, explicit uneven group ids or None for contiguous)
    1: (5, None),
    3: (10, None),  # sizes 4, 3, 3
    4: (12, None),  # sizes 3 in order: uniform, each group sum is one reduction
    8: (12, torch.tensor([0, 0, 0, 0, 1, 2, 3, 3, 4, 5, 6, 7])),
}


def _grads(model: nn.Module) -> list[Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.requires_grad and p.grad is not None]


def _run(
    case: Case, model: nn.Module, engine: str, m: int, **kwargs
) -> tuple[torchgrain.GrainStats, list[Tensor]]:  # type: ignore[no-untyped-def]
    B, groups = GROUPINGS[m]
    grain = torchgrain.GRAIN(model, num_groups=m, engine=engine, **kwargs)
    stats = grain.backward(case.losses(model, case.batch(B)), groups)
    grain.close()
    return stats, _grads(model)


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-300))


def _assert_grads_close(got: list[Tensor], ref: list[Tensor], tol: float = 1e-6) -> None:
    """Relative error <= tol per parameter, measured against the whole gradient's norm for
    parameters whose gradient is zero up to rounding (e.g. an unused token-type row: 1e-23)."""
    assert len(got) == len(ref)
    total = float(torch.cat([r.flatten() for r in ref]).norm())
    for a, b in zip(got, ref, strict=True):
        assert float((a - b).norm()) <= tol * max(float(b.norm()), 1e-9 * total)


@pytest.mark.parametrize("m", sorted(GROUPINGS))
@pytest.mark.parametrize("name", sorted(CASES))
def test_fused_equals_loop(name: str, m: int) -> None:
    if name.startswith(("hf_", "peft_")):
        pytest.importorskip("transformers")
        pytest.importorskip("peft")
    case = CASES[name]
    torch.manual_seed(0)
    model = case.build()
    ref_stats, ref = _run(case, copy.deepcopy(model), "loop", m)
    stats, got = _run(case, model, "fused", m)
    assert stats.engine == "fused"
    assert set(stats.fallback) == (case.fallback if m > 1 else set())
    assert _rel(stats.gram, ref_stats.gram) <= 1e-6
    _assert_grads_close(got, ref)


@pytest.mark.parametrize("budget", [0, float("inf")], ids=["bookkeeping", "keep"])
@pytest.mark.parametrize("name", ["hf_gpt2", "tied_embedding_lm", "cnn_groupnorm"])
def test_memory_modes_agree(name: str, budget: float) -> None:
    if name.startswith("hf_"):
        pytest.importorskip("transformers")
    case = CASES[name]
    torch.manual_seed(0)
    model = case.build()
    _, ref = _run(case, copy.deepcopy(model), "loop", 8)
    _, got = _run(case, model, "fused", 8, memory_budget=budget)
    _assert_grads_close(got, ref)


def test_batchnorm_routes_to_the_loop_engine_with_a_warning() -> None:
    torch.manual_seed(0)
    model = CNN(batchnorm=True)
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    ref = copy.deepcopy(model)
    torchgrain.GRAIN(ref, num_groups=4, engine="loop").backward(per_sample_ce(ref, x, y))
    grain = torchgrain.GRAIN(model, num_groups=4)
    with pytest.warns(
        UserWarning, match="BatchNorm2d in training mode mixes the samples.*loop engine"
    ):
        stats = grain.backward(per_sample_ce(model, x, y))
    assert "conv.weight" in stats.fallback
    for a, b in zip(_grads(model), _grads(ref), strict=True):
        torch.testing.assert_close(a, b)
    model.eval()  # in eval mode BatchNorm is per-sample: the fused path, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert grain.backward(per_sample_ce(model, x, y)).fallback == {
            "norm.weight": "no rule for BatchNorm2d",
            "norm.bias": "no rule for BatchNorm2d",
        }


def test_weight_used_outside_its_layer_goes_to_the_fallback() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            return nn.functional.linear(
                torch.tanh(self.proj(x)), self.proj.weight
            )  # reused functionally

    torch.manual_seed(0)
    model = Shared()
    x = torch.randn(6, 4)
    ref = copy.deepcopy(model)
    torchgrain.GRAIN(ref, num_groups=3, engine="loop").backward(ref(x).pow(2).sum(1))
    stats = torchgrain.GRAIN(model, num_groups=3).backward(model(x).pow(2).sum(1))
    assert stats.fallback == {
        "proj.weight": "used 2 times in the graph but 1 times through its layer"
    }
    for a, b in zip(_grads(model), _grads(ref), strict=True):
        assert _rel(a, b) <= 1e-10


def test_broadcast_input_without_expansion_goes_to_the_fallback() -> None:
    """A layer applied to a (1, T) input inside a batch of B: its output gradient arrives summed
    over the batch. With expand_broadcast=False the fused engine must notice and fall back."""

    class Positional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(10, 4)
            self.pos = nn.Embedding(5, 4)
            self.head = nn.Linear(4, 1)

        def forward(self, ids: Tensor) -> Tensor:
            positions = torch.arange(ids.shape[1]).unsqueeze(0)  # (1, T)
            return self.head(self.tok(ids) + self.pos(positions)).squeeze(-1).pow(2).mean(1)

    torch.manual_seed(0)
    ids = torch.randint(0, 10, (6, 5))
    model = Positional()
    ref = copy.deepcopy(model)
    torchgrain.GRAIN(ref, num_groups=3, engine="loop").backward(ref(ids))
    for expand in (True, False):
        candidate = copy.deepcopy(model)
        grain = torchgrain.GRAIN(candidate, num_groups=3)
        grain._engine.hooks.expand_broadcast = expand  # type: ignore[attr-defined]
        stats = grain.backward(candidate(ids))
        assert ("pos.weight" in stats.fallback) is (not expand)
        for a, b in zip(_grads(candidate), _grads(ref), strict=True):
            assert _rel(a, b) <= 1e-10


def test_hooks_are_removed_and_no_state_is_left_on_the_model() -> None:
    model = mlp()
    before = {name: set(vars(mod)) for name, mod in model.named_modules()}
    grain = torchgrain.GRAIN(model, num_groups=2)
    assert any(mod._forward_hooks for mod in model.modules())
    grain.close()
    assert not any(mod._forward_hooks for mod in model.modules())
    assert {name: set(vars(mod)) for name, mod in model.named_modules()} == before
    with torchgrain.GRAIN(model, num_groups=2):
        pass
    assert not any(mod._forward_hooks for mod in model.modules())


def test_bf16_autocast_stays_close_to_float32() -> None:
    torch.set_default_dtype(torch.float32)
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = _hf_bert().float()
    batch = (*_tokens(8), torch.randint(0, 3, (8,), generator=_gen(11)))
    ref = copy.deepcopy(model)
    torchgrain.GRAIN(ref, num_groups=4).backward(_seq_cls_losses(ref, batch))
    grain = torchgrain.GRAIN(model, num_groups=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = _seq_cls_losses(model, batch)
    stats = grain.backward(losses.float())
    assert not stats.fallback
    flat = torch.cat([g.flatten() for g in _grads(model)])
    flat_ref = torch.cat([g.flatten() for g in _grads(ref)])
    assert _rel(flat, flat_ref) <= 0.1
    assert float(torch.nn.functional.cosine_similarity(flat, flat_ref, dim=0)) >= 0.99


def test_dropping_grain_removes_its_hooks() -> None:
    import gc

    model = mlp()
    grain = torchgrain.GRAIN(model, num_groups=2)
    assert any(mod._forward_hooks for mod in model.modules())
    del grain
    gc.collect()
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in model.modules())


def test_forward_without_grain_backward_does_not_spoil_the_next_step() -> None:
    """A forward with grad enabled whose loss is backpropagated plainly leaves stale records; the
    next GRAIN step must ignore them, not fall back (or break) because of them. A smaller batch
    next (an epoch's last batch) must not be expanded to the old batch size either."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = _hf_bert()
    grain = torchgrain.GRAIN(model, num_groups=2)
    _seq_cls_losses(model, (*_tokens(6), torch.randint(0, 3, (6,)))).mean().backward()
    batch = (*_tokens(4), torch.randint(0, 3, (4,)))
    stats = grain.backward(_seq_cls_losses(model, batch))
    assert stats.fallback == {}


@pytest.mark.parametrize("budget", [0, float("inf")], ids=["bookkeeping", "keep"])
@pytest.mark.parametrize("name", ["hf_gpt2", "mlp_inplace_relu_3d"])
def test_group_gradient_buffers_are_reused_and_stay_exact(
    name: str, budget: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Linear (and GPT-2 Conv1D) group gradients and the embeddings' rows (GPT-2's tied with
    its output layer) go into buffers the engine reuses: from the second step on no new one is
    allocated, and every step still equals the loop engine's."""
    if name.startswith("hf_"):
        pytest.importorskip("transformers")
    case = CASES[name]
    torch.manual_seed(0)
    model = case.build()
    reference = copy.deepcopy(model)
    fused = torchgrain.GRAIN(model, num_groups=3, engine="fused", memory_budget=budget)
    loop = torchgrain.GRAIN(reference, num_groups=3, engine="loop")
    workspace = fused._engine._workspace
    kept: list[int] = []  # parameters kept at each combine
    combine = FusedEngine.combine

    def counting(self: FusedEngine, weights: Tensor) -> list[Tensor | None]:
        kept.append(len(self._kept))
        return combine(self, weights)

    monkeypatch.setattr(FusedEngine, "combine", counting)
    B = 12  # enough tokens that the cost model keeps rather than recomputes (budget allowing)
    for step in range(3):
        for net, grain in ((model, fused), (reference, loop)):
            net.zero_grad(set_to_none=True)
            batch = [t[torch.randperm(B, generator=_gen(step))] for t in case.batch(B)]
            grain.backward(case.losses(net, tuple(batch)))
        _assert_grads_close(_grads(model), _grads(reference))
        if step == 0:
            first = workspace.allocations
            assert first > 0 and workspace.nbytes > 0  # given back for the next step
    assert workspace.allocations == first
    assert all(k > 0 for k in kept) if budget else not any(kept)
    if budget == 0:  # book-keeping gives a buffer back after its Gram: same-shaped layers share
        layers = [mod for mod in model.modules() if type(mod).__name__ in ("Linear", "Conv1D")]
        embeddings = any(isinstance(mod, torch.nn.Embedding) for mod in model.modules())
        assert first <= len({mod.weight.shape for mod in layers}) + embeddings  # one rows buffer
    fused.close()
    assert workspace.nbytes == 0


def test_an_accumulation_block_after_plain_steps_stays_exact() -> None:
    """Group gradients handed to an accumulation block are never given back: the block's
    micro-batches do not share buffers, though earlier steps left some to reuse."""
    case = CASES["mlp_inplace_relu_3d"]
    torch.manual_seed(0)
    model = case.build()
    reference = copy.deepcopy(model)
    fused = torchgrain.GRAIN(model, num_groups=2, engine="fused", memory_budget=float("inf"))
    loop = torchgrain.GRAIN(reference, num_groups=2, engine="loop")
    for net, grain in ((model, fused), (reference, loop)):
        grain.backward(case.losses(net, case.batch(6)))  # leaves buffers in the workspace
        net.zero_grad(set_to_none=True)
        with grain.accumulate():
            for seed in (1, 2, 3):
                batch = tuple(t[torch.randperm(6, generator=_gen(seed))] for t in case.batch(6))
                grain.backward(case.losses(net, batch))
    _assert_grads_close(_grads(model), _grads(reference))


@pytest.mark.parametrize(
    ("budget", "asked"),
    [(float("inf"), 1), (0, 1), (1 << 30, 1), (1000, 3)],
    ids=["keep", "bookkeeping", "default", "some-fit"],
)
def test_layers_are_served_as_their_output_gradients_arrive(
    budget: float, asked: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the CPU the backward asks autograd only for the layers with no recorded layer below
    them (here the embedding); the others are served from hooks as their output gradient
    arrives, so none is held to the end of the backward. Where the budget keeps some parameters
    and not others, which ones depends on the order: every layer is then asked for and served
    in parameter order. Exact either way, the tied weight's two calls included."""
    case = CASES["tied_embedding_lm"]
    torch.manual_seed(0)
    model = case.build().double()
    ref_stats, ref = _run(case, copy.deepcopy(model), "loop", 3)
    edges: list[int] = []
    grad = torch.autograd.grad

    def counting(outputs, inputs, **kwargs):  # type: ignore[no-untyped-def]
        edges.append(len(inputs))
        return grad(outputs, inputs, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    stats, got = _run(case, model, "fused", 3, memory_budget=budget)
    assert edges == [asked]
    assert _rel(stats.gram, ref_stats.gram) <= 1e-12
    _assert_grads_close(got, ref, tol=1e-12)


def test_reaches_finds_the_nodes_above_the_targets() -> None:
    """A chain x -> a -> b -> c, and a branch d from x: the nodes from which ``a``'s node is
    reached are b's, c's and the root's; not a's own, nor d's. A target above another counts."""
    x = torch.randn(3, requires_grad=True)
    a = x * 2
    b = a.sin()
    c = b.exp()
    d = x.cos()
    root = c.sum() + d.sum()
    found = reaches(root.grad_fn, {a.grad_fn})
    assert {b.grad_fn, c.grad_fn, root.grad_fn} <= found
    assert a.grad_fn not in found and d.grad_fn not in found
    assert reaches(root.grad_fn, {a.grad_fn, c.grad_fn}) >= {c.grad_fn}  # c lies above a


@pytest.mark.parametrize("ids", [[0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 2, 2], [1, 0, 2, 1, 0, 2]])
def test_group_sums_are_the_sums_of_each_groups_samples(ids: list[int]) -> None:
    group_ids = torch.tensor(ids)
    groups = GroupIndex.build(group_ids, torch.bincount(group_ids))
    assert groups.uniform == (ids == [0, 0, 1, 1, 2, 2])
    t = torch.randn(6, 4, 5, generator=_gen(3))
    expected = torch.stack([t[group_ids == k].sum(0) for k in range(3)])
    assert _rel(groups.sums(t), expected) <= 1e-12
    assert _rel(groups.sums(t, dims=1), expected.sum(1)) <= 1e-12


@pytest.mark.parametrize("order", ["sorted", "shuffled"])
@pytest.mark.parametrize("budget", [0, float("inf")], ids=["bookkeeping", "keep"])
def test_layer_norms_take_the_saved_backward_where_it_pays(
    order: str, budget: float, monkeypatch
) -> None:
    """HF BERT's LayerNorms, served from their nodes' hooks, take their group gradients from the
    LayerNorm backward kernel per group (with the saved mean and 1/std) where the cost model says
    so (forced here, as for large calls) and the samples are sorted by group (else the
    normalised-input path); the step equals the loop engine's either way."""
    pytest.importorskip("transformers")
    from torchgrain.engines.rules import _rerun

    served: list[bool] = []
    per_group = _rerun.per_group_saved_norm

    def spy(*args):  # type: ignore[no-untyped-def]
        out = per_group(*args)
        served.append(out is not None)
        return out

    monkeypatch.setattr(_rerun, "saved_backward_pays", lambda A, m: True)
    monkeypatch.setattr(_rerun, "per_group_saved_norm", spy)
    case = CASES["hf_bert"]
    B, ids = GROUPINGS[8]
    assert ids is not None
    if order == "shuffled":
        ids = ids[torch.randperm(B, generator=_gen(1))]
    torch.manual_seed(0)
    model = case.build()
    batch = case.batch(B)
    grads = []
    for engine, net in (("loop", copy.deepcopy(model)), ("fused", model)):
        grain = torchgrain.GRAIN(net, num_groups=8, engine=engine, memory_budget=budget)
        grain.backward(case.losses(net, batch), ids)
        grain.close()
        grads.append(_grads(net))
    _assert_grads_close(grads[1], grads[0])
    assert served and all(s == (order == "sorted") for s in served)


@pytest.mark.parametrize("budget", [0, float("inf")], ids=["bookkeeping", "keep"])
def test_the_vectors_gram_blocks_are_taken_together(budget: float, monkeypatch) -> None:
    """The 1-D parameters (biases, LayerNorm scales and shifts) add their Gram blocks as one
    ``(m, sum P)`` product at the end of the backward, and, kept, take their ``d`` from one product
    too (their ``.grad`` are views of one buffer); the step still equals the loop engine's."""
    pytest.importorskip("transformers")
    from torchgrain.engines import _fused
    from torchgrain.engines.rules._base import GroupGrad, Rows

    blocks: list[tuple[int, ...]] = []
    add_gram = _fused.add_gram

    def spy(gram: Tensor, grad: GroupGrad) -> Tensor:
        blocks.append(tuple((grad.values if isinstance(grad, Rows) else grad).shape))
        return add_gram(gram, grad)

    monkeypatch.setattr(_fused, "add_gram", spy)
    case = CASES["hf_bert"]
    torch.manual_seed(0)
    model = case.build()
    _, ref = _run(case, copy.deepcopy(model), "loop", 3)
    _, got = _run(case, model, "fused", 3, memory_budget=budget)
    _assert_grads_close(got, ref)
    vectors = sum(p.numel() for p in model.parameters() if p.requires_grad and p.dim() == 1)
    assert (3, vectors) in blocks and all(
        len(shape) > 2 or shape == (3, vectors) for shape in blocks
    )
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.dim() == 1]
    buffers = {g.untyped_storage().data_ptr() for g in grads}
    assert len(buffers) == (1 if budget else len(grads))
