"""Normalisation layers (LayerNorm, RMSNorm, GroupNorm, InstanceNorm, and the Hugging Face
``*LayerNorm``/``*RMSNorm`` classes): re-run the layer on each group's samples and take its
parameters' gradient with that group's output gradient. Exact for any layer that treats samples
independently; the cost is one more forward and backward of the (elementwise) layer."""

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


class RerunRule:
    def param_names(self, module: nn.Module) -> list[str]:
        return own_trainable(module)

    def group_grads(
        self, module: nn.Module, A: Tensor, Bk: Tensor, groups: GroupIndex
    ) -> dict[str, GroupGrad]:
        per_group = [
            rerun_grads(module, a, b)
            for a, b in zip(groups.split(A), groups.split(Bk), strict=True)
        ]
        return {n: torch.stack([g[n] for g in per_group]) for n in self.param_names(module)}

    def combine(self, module: nn.Module, A: Tensor, Bk: Tensor) -> dict[str, Tensor]:
        return rerun_grads(module, A, Bk)


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
