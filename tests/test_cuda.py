"""The accelerator path: the same checks on every device there is.

Every test takes ``device``: ``cpu`` always runs, so that the test itself is exercised by CI on a
machine without a GPU; ``cuda`` runs where torch sees one (``benchmarks/gpu_check.sh`` runs this
module with ``-m cuda``). On the device: the fused engine against the loop engine in float64 for
every aggregator, the fused engine on the device against the CPU, the masked (accelerator) solvers
against the host solvers, bfloat16 autocast against float32, and the ghost Gram.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import Tensor, nn

import torchgrain
from tests.engines.test_fused import CASES, GROUPINGS, _assert_grads_close, _grads, _rel
from tests.solvers._zoo import zoo
from tests.solvers.test_aggregators import SOLVERS, TOL, prefs, same_point
from torchgrain.engines import GroupIndex
from torchgrain.engines.rules._base import Rows, add_gram, gram_of
from torchgrain.engines.rules._linear import LinearRule, ghost_weight_gram
from torchgrain.solvers import solve

pytestmark = pytest.mark.cuda
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    ),
]
ZOO = zoo()
MODELS = ["mlp_layernorm", "tied_embedding_lm", "cnn_groupnorm", "hf_bert", "hf_llama"]


def _to(batch: tuple[Tensor, ...], device: str) -> tuple[Tensor, ...]:
    return tuple(t.to(device) for t in batch)


def _step(
    name: str, model: nn.Module, device: str, engine: str, aggregator: str, m: int = 8
) -> tuple[torchgrain.GrainStats, list[Tensor]]:
    case = CASES[name]
    B, groups = GROUPINGS[m]
    grain = torchgrain.GRAIN(model, num_groups=m, engine=engine, aggregator=aggregator)
    batch = _to(case.batch(B), device)
    stats = grain.backward(case.losses(model, batch), None if groups is None else groups.to(device))
    grain.close()
    return stats, _grads(model)


@pytest.mark.parametrize("aggregator", ["min_norm", "upgrad", "dual_proj", "cagrad"])
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("device", DEVICES)
def test_fused_equals_loop_in_float64(device: str, name: str, aggregator: str, float64) -> None:
    if name.startswith("hf_"):
        pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = CASES[name].build().double().to(device)
    ref_stats, ref = _step(name, copy.deepcopy(model), device, "loop", aggregator)
    stats, got = _step(name, model, device, "fused", aggregator)
    assert stats.engine == "fused" and not stats.fallback
    assert all(g.device.type == device for g in got)
    assert _rel(stats.gram, ref_stats.gram) <= 1e-10
    _assert_grads_close(got, ref, tol=1e-9)


@pytest.mark.parametrize("name", ["tied_embedding_lm", "hf_llama"])
@pytest.mark.parametrize("device", DEVICES)
def test_the_device_gives_the_cpu_step(device: str, name: str, float64) -> None:
    if name.startswith("hf_"):
        pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = CASES[name].build().double()
    # The model's own gap between the devices bounds what GRAIN can be held to: Hugging Face's
    # Llama computes its rotary angles in float32 whatever the model's dtype (CUDA against CPU:
    # 6e-8 relative on an H100), so its float64 gradients differ by float32 rounding.
    plain = [_plain_grads(copy.deepcopy(model).to(d), name, d) for d in ("cpu", device)]
    model_gap = max(_rel(a.cpu(), b) for a, b in zip(plain[1], plain[0], strict=True))
    _, ref = _step(name, copy.deepcopy(model), "cpu", "fused", "upgrad")
    _, got = _step(name, model.to(device), device, "fused", "upgrad")
    _assert_grads_close([g.cpu() for g in got], ref, tol=1e-10 + 1e3 * model_gap)


def _plain_grads(model: nn.Module, name: str, device: str) -> list[Tensor]:
    """The mean's gradient (no GRAIN) on the device."""
    case = CASES[name]
    case.losses(model, _to(case.batch(GROUPINGS[8][0]), device)).mean().backward()
    return _grads(model)


@pytest.mark.parametrize("aggregator", sorted(SOLVERS))
@pytest.mark.parametrize("name", [n for n in sorted(ZOO) if ZOO[n].shape[0] <= 16])
@pytest.mark.parametrize("device", DEVICES)
def test_masked_solvers_on_the_device_match_the_host(
    device: str, name: str, aggregator: str
) -> None:
    gram = ZOO[name]
    pref = prefs(gram.shape[0])["random"]
    host = SOLVERS[aggregator](gram, pref, masked=False)
    masked = SOLVERS[aggregator](gram.to(device), pref.to(device), masked=True)
    assert masked.weights.device.type == device and bool(masked.converged)
    assert float(masked.gap) <= TOL
    assert same_point(gram, host.weights, masked.weights.cpu()) <= 1e-24


@pytest.mark.parametrize("name", [n for n in sorted(ZOO) if ZOO[n].shape[0] <= 16])
@pytest.mark.parametrize("device", DEVICES)
def test_masked_min_norm_on_the_device_matches_the_host(device: str, name: str) -> None:
    gram = ZOO[name]
    host = solve(gram, masked=False)
    masked = solve(gram.to(device))  # masked by default off the CPU
    assert bool(masked.converged.all())
    assert same_point(gram, host.weights, masked.weights.cpu()) <= 1e-20


@pytest.mark.parametrize("name", ["hf_bert", "tied_embedding_lm"])
@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_stays_close_to_float32(device: str, name: str) -> None:
    """The tied LM's output layer runs in bf16 and its embedding in float32: one weight, group
    gradients of two dtypes summed."""
    if name.startswith("hf_"):
        pytest.importorskip("transformers")
    if device == "cuda" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    torch.manual_seed(0)
    case = CASES[name]
    model = case.build().float().to(device)
    batch = _to(case.batch(8), device)
    ref = copy.deepcopy(model)
    torchgrain.GRAIN(ref, num_groups=4).backward(case.losses(ref, batch))
    grain = torchgrain.GRAIN(model, num_groups=4)
    with torch.autocast(device, dtype=torch.bfloat16):
        losses = case.losses(model, batch)
        stats = grain.backward(losses)  # inside the block, as Lightning calls it
    assert stats.engine == "fused" and not stats.fallback
    assert stats.gram.dtype == torch.float64 and bool(torch.isfinite(stats.gram).all())
    flat = torch.cat([g.flatten() for g in _grads(model)])
    flat_ref = torch.cat([g.flatten() for g in _grads(ref)])
    assert flat.dtype == torch.float32
    assert float(nn.functional.cosine_similarity(flat, flat_ref, dim=0)) >= 0.99


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("device", DEVICES)
def test_ghost_gram_on_the_device(device: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 2, 1, 1, 0, 2, 2])
    groups = GroupIndex.build(ids.to(device), torch.bincount(ids).to(device))
    A = torch.randn(7, 3, 40, generator=g, dtype=dtype).to(device)  # (B, T, in)
    Bk = torch.randn(7, 3, 50, generator=g, dtype=dtype).to(device)  # (B, T, out)
    ghost = ghost_weight_gram(A, Bk, groups)
    if device != "cpu" and dtype != torch.float64:
        assert ghost is None  # off the CPU only float64 takes the ghost path (no host check)
        return
    assert ghost is not None and ghost.dtype == torch.float64 and ghost.device.type == device
    exact = gram_of(
        LinearRule().group_grads(nn.Linear(40, 50).to(device), A.double(), Bk.double(), groups)[
            "weight"
        ]
    )
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(ghost, exact, rtol=tol, atol=tol * float(exact.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_add_gram_accumulates_the_float64_gram(device: str, dtype: torch.dtype) -> None:
    """``add_gram`` adds the Gram of dense and row group gradients to a float64 ``gram`` in place
    (off the CPU as one GEMM accumulating into it), as the float64 product would."""
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(4, 6, 5, generator=g).to(dtype)
    rows = Rows(torch.tensor([1, 3]), torch.randn(4, 2, 5, generator=g).to(dtype))
    gram = torch.eye(4, dtype=torch.float64, device=device)
    before = gram.data_ptr()
    add_gram(gram, dense.to(device))
    add_gram(gram, Rows(rows.index.to(device), rows.values.to(device)))
    flat = torch.cat([dense.reshape(4, -1), rows.values.reshape(4, -1)], 1).double()
    expected = torch.eye(4, dtype=torch.float64) + flat @ flat.T
    assert gram.data_ptr() == before and gram.dtype == torch.float64
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(gram.cpu(), expected, rtol=tol, atol=tol)


def test_gpu_check_script_says_so_without_cuda() -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the script would run the whole check")
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", ["mlp_layernorm", "hf_llama"])
def test_the_fused_gram_reads_nothing_back_but_the_embedding_tokens(name: str) -> None:
    """The one-backward pass and the rules queue kernels only: no device read (sync) inside
    ``engine.gram`` beyond the documented one per embedding call (``torch.unique``)."""
    if name.startswith("hf_"):
        pytest.importorskip("transformers")
    from torchgrain.engines import FusedEngine

    torch.manual_seed(0)
    case = CASES[name]
    model = case.build().float().cuda()
    engine = FusedEngine(model)
    B, _ = GROUPINGS[8]
    ids = torch.arange(B, device="cuda") * 8 // B
    groups = GroupIndex.build(ids, torch.bincount(ids, minlength=8))
    losses = case.losses(model, _to(case.batch(B), "cuda"))
    params = [p for p in model.parameters() if p.requires_grad]
    embeddings = sum(isinstance(mod, nn.Embedding) for mod in model.modules())
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            gram = engine.gram(losses, groups, params)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # "called a synchronizing CUDA operation", once per sync; the mode's own notice that it is a
    # prototype ("does not yet detect all synchronizing operations") is not one.
    syncs = [w for w in record if "called a synchronizing" in str(w.message)]
    assert len(syncs) <= embeddings, [str(w.message) for w in syncs]
    assert gram.shape == (8, 8) and bool(torch.isfinite(gram).all())
    engine.close()
