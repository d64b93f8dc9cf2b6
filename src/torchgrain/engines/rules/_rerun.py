"""Normalisation layers (LayerNorm, RMSNorm, GroupNorm, InstanceNorm, and the Hugging Face
``*LayerNorm``/``*RMSNorm`` classes).

A normalisation's output is elementwise affine in each of its parameters:
``y = n(x) * (c + w) + b`` (``c`` is 0, or 1 for the ``1 + w`` scales of some Hugging Face
models). When its parameters act on the trailing dims of the input (LayerNorm and RMSNorm, the
transformer case), the derivative ``J_p = dy/dp`` is one re-run of the layer with ``p = 1`` and
the others 0, minus one with all of them 0 (no autograd), and group k's gradient is
``sum_{i in S_k} sum_tokens Bk_i * J_p``: two or three element-wise forwards of the layer and one
``index_add``, however many groups there are.

Otherwise (GroupNorm's per-channel parameters, any other layout), the layer is re-run on each
group's samples and its parameters' gradient taken with that group's output gradient: exact for
any layer that treats samples independently, at m small forward and backward passes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

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


def _derivatives(module: nn.Module, A: Tensor, Bk: Tensor) -> dict[str, Tensor] | None:
    """Per trainable parameter ``p``, ``J_p = dy/dp`` elementwise, shaped like the output; or
    ``None`` when the closed form does not apply (parameters other than ``weight``/``bias``, or
    not acting on the trailing dims of an output shaped like the input)."""
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
    with paused(), torch.no_grad():
        A = A.detach()
        base = torch.func.functional_call(module, zeros, (A,))
        if base.shape != A.shape:
            return None
        return {
            n: torch.func.functional_call(module, {**zeros, n: torch.ones_like(p)}, (A,)) - base
            for n, p in params.items()
        }


def _reduce(values: Tensor, shape: torch.Size) -> Tensor:
    """``(B, ..., *shape)`` -> ``(B, *shape)``: summed over the dims between."""
    return values.reshape(values.shape[0], -1, *shape).sum(1)


def _wide(t: Tensor) -> Tensor:
    """At least float32: a parameter's gradient sums over every token of the batch."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


class RerunRule:
    def param_names(self, module: nn.Module) -> list[str]:
        return own_trainable(module)

    def group_grads(
        self, module: nn.Module, A: Tensor, Bk: Tensor, groups: GroupIndex
    ) -> dict[str, GroupGrad]:
        J = _derivatives(module, A, Bk)
        if J is not None:
            out: dict[str, GroupGrad] = {}
            for n, jac in J.items():
                per_sample = _reduce(_wide(Bk) * _wide(jac), getattr(module, n).shape)
                out[n] = per_sample.new_zeros(groups.m, *per_sample.shape[1:]).index_add_(
                    0, groups.ids, per_sample
                )
            return out
        per_group = [
            rerun_grads(module, a, b)
            for a, b in zip(groups.split(A), groups.split(Bk), strict=True)
        ]
        return {n: torch.stack([g[n] for g in per_group]) for n in self.param_names(module)}

    def combine(self, module: nn.Module, A: Tensor, Bk: Tensor) -> dict[str, Tensor]:
        J = _derivatives(module, A, Bk)
        if J is None:
            return rerun_grads(module, A, Bk)
        return {
            n: _reduce(_wide(Bk) * _wide(jac), getattr(module, n).shape).sum(0)
            for n, jac in J.items()
        }


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
