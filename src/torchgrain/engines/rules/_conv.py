"""Conv1d/Conv2d/Conv3d: group k's weight gradient is the convolution's weight-gradient kernel
(``aten.convolution_backward`` with only the weight output) on the group's samples."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchgrain.engines._groups import GroupIndex
from torchgrain.engines.rules._base import GroupGrad, register_rule, trainable
from torchgrain.engines.rules._rerun import RerunRule


def _weight_grad(module: nn.Module, A: Tensor, Bk: Tensor) -> Tensor:
    assert isinstance(module, nn.modules.conv._ConvNd)
    padding = module.padding
    if module.padding_mode != "zeros":
        A = F.pad(A, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = (0,) * len(module.kernel_size)
    return torch.ops.aten.convolution_backward(
        Bk,
        A.to(Bk.dtype),
        module.weight.to(Bk.dtype),
        None,
        module.stride,
        padding,
        module.dilation,
        False,
        [0] * len(module.kernel_size),
        module.groups,
        [False, True, False],
    )[1]


@register_rule(lambda m: isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)))
class ConvRule:
    _rerun = RerunRule()

    def param_names(self, module: nn.Module) -> list[str]:
        return trainable(module, "weight", "bias")

    def group_grads(
        self, module: nn.Module, A: Tensor, Bk: Tensor, groups: GroupIndex
    ) -> dict[str, GroupGrad]:
        assert isinstance(module, nn.modules.conv._ConvNd)
        if isinstance(module.padding, str):  # "same"/"valid": let the layer pad itself
            return self._rerun.group_grads(module, A, Bk, groups)
        names = self.param_names(module)
        out: dict[str, GroupGrad] = {}
        if "weight" in names:
            out["weight"] = torch.stack(
                [
                    _weight_grad(module, a, b)
                    for a, b in zip(groups.split(A), groups.split(Bk), strict=True)
                ]
            )
        if "bias" in names:
            out["bias"] = groups.sums(Bk.flatten(2).sum(2))  # of (B, out_channels)
        return out

    def combine(self, module: nn.Module, A: Tensor, Bk: Tensor) -> dict[str, Tensor]:
        if isinstance(module.padding, str):
            return self._rerun.combine(module, A, Bk)
        names = self.param_names(module)
        out = {}
        if "weight" in names:
            out["weight"] = _weight_grad(module, A, Bk)
        if "bias" in names:
            out["bias"] = Bk.flatten(2).sum((0, 2))
        return out
