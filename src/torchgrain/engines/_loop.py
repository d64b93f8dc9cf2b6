"""The reference engine: one autograd backward per group, exact for any model.

It makes no assumption about the model: BatchNorm in training mode, in-batch contrastive losses,
shared inputs, custom autograd functions all give the exact group gradients, because each is the
true gradient of its group's loss. It costs m backward passes and keeps the m group gradients
(memory ``m x |params|``); it is the test oracle of the faster engines.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from torchgrain.engines._groups import GroupIndex
from torchgrain.engines.rules._base import GroupGrad, add_gram


class LoopEngine:
    """Per-group ``torch.autograd.grad`` over one retained graph.

    Example:
        >>> import torch
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> losses = x @ w  # (B,) with B = 2
        >>> groups = GroupIndex.build(torch.tensor([0, 1]), torch.tensor([1, 1]))
        >>> engine = LoopEngine()
        >>> engine.gram(losses, groups, [w])  # groups = samples: gradients e_1 and e_2
        tensor([[1., 0.],
                [0., 1.]], dtype=torch.float64)
        >>> engine.combine(torch.tensor([0.5, 0.5]))
        [tensor([0.5000, 0.5000])]
    """

    name = "loop"

    def __init__(self) -> None:
        self._grads: list[Tensor | None] = []  # per parameter: (m, *shape), or None if unreached
        self._reached_only: list[bool] = []  # after a gram that handed the stacks to a sink

    def gram(
        self,
        losses: Tensor,
        groups: GroupIndex,
        params: list[Tensor],
        *,
        keep_groups: bool = False,
        sink: Callable[[int, GroupGrad], None] | None = None,
        retain_graph: bool = False,
    ) -> Tensor:
        group_losses = groups.group_means(losses)  # (m,)
        m = group_losses.shape[0]
        self._grads = per_group_gradients(group_losses, params, retain_graph=retain_graph)
        gram = torch.zeros(m, m, dtype=torch.float64, device=group_losses.device)  # (m, m)
        for i, stack in enumerate(self._grads):
            if stack is not None and sink is not None:
                sink(i, stack)
            elif stack is not None:
                add_gram(gram, stack)
        if sink is not None:
            self._reached_only = [g is not None for g in self._grads]
            self._grads = []
        return gram

    def group_grads(self) -> list[GroupGrad | None]:
        """After :meth:`gram`: per parameter, the ``(m, *shape)`` group gradients."""
        out, self._grads = self._grads, []
        return list(out)

    def release(self) -> None:
        self._grads, self._reached_only = [], []

    def reached(self) -> list[bool]:
        if not self._grads and self._reached_only:
            return self._reached_only
        return [g is not None for g in self._grads]

    def combine(self, weights: Tensor) -> list[Tensor | None]:
        out = [
            None if stack is None else torch.tensordot(weights.to(stack.dtype), stack, dims=1)
            for stack in self._grads
        ]
        self._grads = []
        return out


def per_group_gradients(
    group_losses: Tensor, params: list[Tensor], retain_graph: bool
) -> list[Tensor | None]:
    """One ``torch.autograd.grad`` per group loss: per parameter the ``(m, *shape)`` stack of
    group gradients, or ``None`` where no group reaches it. The graph is kept after the last
    group only if ``retain_graph``."""
    m = group_losses.shape[0]
    per_group = [
        torch.autograd.grad(
            group_losses[k], params, retain_graph=retain_graph or k < m - 1, allow_unused=True
        )
        for k in range(m)
    ]
    out: list[Tensor | None] = []
    for i, p in enumerate(params):
        grads = [g[i] for g in per_group]
        if all(g is None for g in grads):
            out.append(None)
        else:
            out.append(torch.stack([torch.zeros_like(p) if g is None else g for g in grads]))
    return out
