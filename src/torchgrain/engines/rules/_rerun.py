"""Normalisation layers (LayerNorm, RMSNorm, GroupNorm, InstanceNorm, and the Hugging Face
``*LayerNorm``/``*RMSNorm`` classes): two exact paths, chosen per call by a cost model.

- The per-group re-run: the layer is re-run on each group's samples and its parameters' gradient
  taken with that group's output gradient. Exact for any layer that treats samples
  independently; m small forward and backward passes (host time grows with m).
- The closed form, for parameters that act on the trailing dims of the input (LayerNorm and
  RMSNorm, the transformer case). A normalisation's output is elementwise affine in each of its
  parameters, ``y = n(x) * (c + w) + b`` (``c`` is 0, or 1 for the ``1 + w`` scales of some
  Hugging Face models), so ``J_p = dy/dp`` is one re-run of the layer with ``p = 1`` and the
  others 0, minus one with all of them 0 (no autograd), and group k's gradient is
  ``sum_{i in S_k} sum_tokens Bk_i * J_p``: a fixed host cost whatever m, but more passes over
  the activations.

The closed form is used on accelerators (host-bound) and on the CPU for small calls; see
:func:`closed_form_pays`. ``combine`` (the book-keeping mode) is one re-run on the whole batch.

PyTorch's own ``nn.LayerNorm`` and ``nn.RMSNorm`` (Hugging Face's BERT and GPT-2 use the former)
skip both: ``J_weight`` is the normalised input, one ``F.layer_norm``/``F.rms_norm`` without
parameters, and ``J_bias`` is 1, so group k's gradients are ``sum Bk * n(A)`` and ``sum Bk`` over
its samples and tokens — a third of the re-run's time at BERT's sizes on the CPU
(:func:`per_sample_stock_norm`). On large CPU calls of ``nn.LayerNorm`` served from its output's
autograd node, with the samples sorted by group, PyTorch's LayerNorm backward kernel runs on each
group's slice instead, with the mean and 1/std the node saved: one pass over the input and ``Bk``
(:func:`per_group_saved_norm`, chosen by :func:`saved_backward_pays`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from torchgrain.engines._groups import GroupIndex
from torchgrain.engines._hooks import paused
from torchgrain.engines.rules._base import GroupGrad, register_rule


def own_trainable(module: nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]


def rerun_grads(module: nn.Module, A: Tensor, Bk: Tensor) -> dict[str, Tensor]:
    """Gradient of ``<module(A), Bk>`` with respect to the module's own trainable parameters."""
    names = own_trainable(module)
    params: list[Tensor] = [getattr(module, n) for n in names]
    with paused(), torch.enable_grad():
        out = module(A.detach())
    grads = torch.autograd.grad(out, params, Bk.to(out.dtype), allow_unused=True)
    return {
        n: torch.zeros_like(p) if g is None else g
        for n, p, g in zip(names, params, grads, strict=True)
    }


def per_sample_stock_norm(module: nn.Module, A: Tensor, Bk: Tensor) -> dict[str, Tensor] | None:
    """Per trainable parameter, the per-sample gradients ``(B, *p.shape)`` of ``<module(A), Bk>``
    for PyTorch's own ``nn.LayerNorm`` and ``nn.RMSNorm`` (a subclass qualifies if it keeps their
    ``forward``): ``Bk * n(A)`` (weight) and ``Bk`` (bias) summed over each sample's tokens, with
    ``n(A)`` the parameter-free normalisation. ``None`` for any other module."""
    normalize: Any  # the parameter-free normalisation, n(A)
    if isinstance(module, nn.LayerNorm) and type(module).forward is nn.LayerNorm.forward:
        shape = tuple(module.normalized_shape)
        normalize = functools.partial(F.layer_norm, normalized_shape=shape, eps=module.eps)
    elif (
        hasattr(nn, "RMSNorm")  # torch >= 2.4
        and isinstance(module, nn.RMSNorm)
        and type(module).forward is nn.RMSNorm.forward
    ):
        shape = tuple(module.normalized_shape)
        normalize = functools.partial(F.rms_norm, normalized_shape=shape, eps=module.eps)
    else:
        return None
    wide = _wide(Bk)
    normalized = normalize(A.detach().to(torch.promote_types(_wide(A).dtype, wide.dtype)))
    out = {}
    for n in own_trainable(module):
        per_token = normalized.mul_(wide) if n == "weight" else wide
        out[n] = per_token.reshape(A.shape[0], -1, *shape).sum(1)
    return out


def per_sample_closed_form(module: nn.Module, A: Tensor, Bk: Tensor) -> dict[str, Tensor] | None:
    """Per trainable parameter ``p``, the per-sample gradients ``(B, *p.shape)`` of
    ``<module(A), Bk>`` from ``J_p = dy/dp``; or ``None`` when the closed form does not apply
    (parameters other than ``weight``/``bias``, or not acting on the trailing dims of an output
    shaped like the input)."""
    names = own_trainable(module)
    params = {n: getattr(module, n) for n in names}
    if (
        not names
        or set(names) - {"weight", "bias"}
        or Bk.shape != A.shape
        or any(p.dim() > A.dim() - 1 or A.shape[A.dim() - p.dim() :] != p.shape
               for p in params.values())
    ):  # fmt: skip
        return None
    zeros = {n: torch.zeros_like(p) for n, p in params.items()}
    out = {}
    with paused(), torch.no_grad():
        A = A.detach()
        base = _call_with(module, zeros, A)
        if base.shape != A.shape:
            return None
        wide = _wide(Bk)
        for n, p in params.items():
            jac = _wide(_call_with(module, {**zeros, n: torch.ones_like(p)}, A) - base)
            jac.mul_(wide)  # jac is a fresh tensor of the output's shape
            out[n] = jac.reshape(jac.shape[0], -1, *p.shape).sum(1)
    return out


def _call_with(module: nn.Module, values: dict[str, Tensor], A: Tensor) -> Tensor:
    """``module(A)`` with its own parameters ``values`` in place of the real ones, restored
    after. (``torch.func.functional_call`` does this for any module tree, at ~10x the host time:
    on a GPU the step is bound by the host.)"""
    slots: dict[str, Any] = module._parameters  # plain tensors stand in for the Parameters
    saved = {n: slots[n] for n in values}
    try:
        slots.update(values)
        return module(A)
    finally:
        slots.update(saved)


def _wide(t: Tensor) -> Tensor:
    """At least float32: a parameter's gradient sums over every token of the batch."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


# The cost model, measured on a 2-core CPU (LayerNorm, 2 threads, m = 8): the per-group re-run
# costs ~110 us of host time per group and ~1-2 ns per element of A; the closed form ~330 us and
# ~8 ns per element, ~6 ns more (three element-wise forwards, a difference, a product:
# memory-bound once A leaves the cache). They meet near 100k elements: 1.5 against 1.4 ms at
# (8, 32, 384); at (32, 128, 384) the re-run takes 2.7 ms and the closed form 14. Off the CPU
# the step is bound by the host (an H100 was busy a third of a GRAIN step), so the closed form
# pays there.
RERUN_HOST_US, CLOSED_HOST_US, EXTRA_NS_PER_ELEMENT = 110.0, 330.0, 6.0


def closed_form_pays(A: Tensor, m: int) -> bool:
    """Whether the closed form is cheaper than m per-group re-runs for this call."""
    if A.device.type != "cpu":
        return True
    saved_us = m * RERUN_HOST_US - CLOSED_HOST_US
    return A.numel() * EXTRA_NS_PER_ELEMENT * 1e-3 < saved_us


# PyTorch's own LayerNorm backward kernel, run on each group's slice with the mean and 1/std its
# autograd node saved, gives the group's weight and bias gradients in one pass over the input and
# Bk, with no normalised copy of the input; against ``per_sample_stock_norm``'s layer norm, product
# and sums. Fitted on a 2-core CPU (2 threads, float32, m = 8 and 16) to the two paths timed with
# the caches flushed between runs, as in a step: the normalised input costs ~100 us + ~1.4 ns per
# element of A, the per-group kernel ~200 us + ~25 us per group + ~0.4 ns per element; they meet
# near 300k elements at m = 8 and 500k at m = 16. In the step (one process, the paths
# alternating): the encoder's (16, 64, 256) calls at m = 8 tie (0.60 against 0.58 ms); MiniLM's
# (32, 128, 384) take 1.14 instead of 2.58 ms at m = 8 and 1.39 instead of 2.00 at m = 16.
# ``benchmarks/norm_paths.py`` times the two alone and refits (log ``norm_paths.txt``).
# Off the CPU the m kernels' launches cost more than they save.
SAVED_FIXED_US, SAVED_GROUP_US, SAVED_NS_PER_ELEMENT = 100.0, 25.0, 1.0


def saved_backward_pays(A: Tensor, m: int) -> bool:
    """Whether the per-group LayerNorm backward (:func:`per_group_saved_norm`) is cheaper than
    :func:`per_sample_stock_norm` for this call."""
    if A.device.type != "cpu":
        return False
    return A.numel() * SAVED_NS_PER_ELEMENT * 1e-3 > SAVED_FIXED_US + m * SAVED_GROUP_US


def per_group_saved_norm(
    module: nn.Module, node: Any, Bk: Tensor, groups: GroupIndex
) -> dict[str, GroupGrad] | None:
    """Per trainable parameter of PyTorch's own ``nn.LayerNorm``, its ``(m, *shape)`` group
    gradients from the LayerNorm backward kernel on each group's samples, with the input, mean and
    1/std that the call's autograd ``node`` saved (read before the node runs and frees them).
    ``None`` when that does not apply: another module or node, a node that already ran, samples
    not sorted by group (each group a slice), an output gradient unlike the saved input, or a
    half-precision input (whose gradients the other path sums in float32)."""
    if (
        not isinstance(module, nn.LayerNorm)
        or type(module).forward is not nn.LayerNorm.forward
        or type(node).__name__ != "NativeLayerNormBackward0"
        or not groups.contiguous
    ):
        return None
    try:
        A, mean, rstd = node._saved_input, node._saved_result1, node._saved_result2
        weight, bias = node._saved_weight, node._saved_bias
    except RuntimeError:  # the node has run: its saved tensors are freed
        return None
    if A.shape != Bk.shape or A.dtype != Bk.dtype or A.dtype not in (torch.float32, torch.float64):
        return None  # half precision: the kernel's gradients would be rounded to it (_wide)
    names = own_trainable(module)
    mask = [False, "weight" in names, "bias" in names]
    shape = tuple(module.normalized_shape)
    parts: dict[str, list[Tensor]] = {n: [] for n in names}
    for a, b, mu, r in zip(  # slices: the samples are sorted by group
        groups.split(A), groups.split(Bk), groups.split(mean), groups.split(rstd), strict=True
    ):
        _, grad_weight, grad_bias = torch.ops.aten.native_layer_norm_backward(
            b, a, shape, mu, r, weight, bias, mask
        )
        for n, g in (("weight", grad_weight), ("bias", grad_bias)):
            if n in parts:
                parts[n].append(g)
    return {n: torch.stack(g) for n, g in parts.items()}


class RerunRule:
    reads_node = True  # group_grads may read the saved tensors of the call's autograd node

    def param_names(self, module: nn.Module) -> list[str]:
        return own_trainable(module)

    def group_grads(
        self,
        module: nn.Module,
        A: Tensor,
        Bk: Tensor,
        groups: GroupIndex,
        node: Any = None,
    ) -> dict[str, GroupGrad]:
        if node is not None and saved_backward_pays(A, groups.m):
            saved = per_group_saved_norm(module, node, Bk, groups)
            if saved is not None:
                return saved
        per_sample = per_sample_stock_norm(module, A, Bk)
        if per_sample is None and closed_form_pays(A, groups.m):
            per_sample = per_sample_closed_form(module, A, Bk)
        if per_sample is not None:
            return {n: groups.sums(g) for n, g in per_sample.items()}
        per_group = [
            rerun_grads(module, a, b)
            for a, b in zip(groups.split(A), groups.split(Bk), strict=True)
        ]
        return {n: torch.stack([g[n] for g in per_group]) for n in self.param_names(module)}

    def combine(self, module: nn.Module, A: Tensor, Bk: Tensor) -> dict[str, Tensor]:
        per_sample = per_sample_stock_norm(module, A, Bk)
        if per_sample is not None:
            return {n: g.sum(0) for n, g in per_sample.items()}
        return rerun_grads(module, A, Bk)  # one re-run: never dearer than the closed form


_NORMS: tuple[type, ...] = (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
if hasattr(nn, "RMSNorm"):
    _NORMS += (nn.RMSNorm,)


def _is_per_sample_norm(module: nn.Module) -> bool:
    if isinstance(module, _NORMS):
        return True
    cls = type(module)
    return cls.__module__.startswith("transformers") and cls.__name__.endswith(
        ("LayerNorm", "RMSNorm")
    )


register_rule(_is_per_sample_norm)(RerunRule)
