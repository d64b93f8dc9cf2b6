"""What a layer rule is, how group gradients are represented, and the rule registry.

A rule turns one call of a module — its input ``A`` ``(B, ...)`` and the gradient ``Bk``
``(B, ...)`` of the summed group losses with respect to its output — into:

- ``group_grads``: per parameter, the m group gradients (a dense ``(m, *shape)`` tensor, or
  :class:`Rows` for an embedding, whose group gradients touch only the batch's tokens);
- ``combine``: per parameter, ``sum_i grad_i`` for an output gradient already scaled per sample
  (``Bk_i * w_{k(i)}``), which is ``d`` without materialising the group gradients.

Both are exact when the module treats the samples of the batch independently. Rules register by
module type with :func:`register_rule`; :func:`find_rule` looks a module up.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, Union

import torch
from torch import Tensor, nn

from torchgrain.engines._groups import GroupIndex


@dataclass
class Rows:
    """Group gradients of a matrix parameter that are zero outside some rows (embeddings).

    Attributes:
        index: ``(U,)`` distinct row indices.
        values: ``(m, U, d)`` the group gradients on those rows.
    """

    index: Tensor
    values: Tensor


GroupGrad = Union[Tensor, Rows]  # noqa: UP007 - a runtime alias


class Rule(Protocol):
    def param_names(self, module: nn.Module) -> list[str]:
        """The module's own trainable parameters this rule covers."""
        ...

    def group_grads(
        self, module: nn.Module, A: Tensor, Bk: Tensor, groups: GroupIndex
    ) -> dict[str, GroupGrad]:
        """Per covered parameter, the ``(m, *shape)`` group gradients of this call. A rule with
        ``reads_node = True`` is also passed ``node=``, the autograd node of the call's output.
        Where the engine serves the rule from that node's hook, the node has not run yet and its
        saved tensors are readable; elsewhere it may have run and freed them (reading them then
        raises ``RuntimeError``), so the rule must have another path."""
        ...

    def combine(self, module: nn.Module, A: Tensor, Bk: Tensor) -> dict[str, Tensor]:
        """Per covered parameter, the gradient of this call summed over samples."""
        ...


_RULES: list[tuple[Callable[[nn.Module], bool], Rule]] = []


def register_rule(match: type | Callable[[nn.Module], bool]) -> Callable[[type], type]:
    """Class decorator: register a rule for a module type (exact type or subclass) or predicate.
    Later registrations win, so a user's rule can override a built-in one."""

    def predicate(module: nn.Module) -> bool:
        if isinstance(match, type):
            return isinstance(module, match)
        return bool(match(module))

    def decorate(cls: type) -> type:
        _RULES.insert(0, (predicate, cls()))
        return cls

    return decorate


def find_rule(module: nn.Module) -> Rule | None:
    for predicate, rule in _RULES:
        if predicate(module):
            return rule
    return None


def trainable(module: nn.Module, *names: str) -> list[str]:
    """The names among ``names`` that are trainable parameters of the module itself."""
    out = []
    for name in names:
        p = module._parameters.get(name)
        if p is not None and p.requires_grad:
            out.append(name)
    return out


def to_dense(grad: GroupGrad, shape: torch.Size) -> Tensor:
    """``(m, *shape)`` dense group gradients."""
    if isinstance(grad, Tensor):
        return grad
    m, _, d = grad.values.shape
    dense = grad.values.new_zeros(m, shape[0], d)
    return dense.index_add_(1, grad.index, grad.values)


def add(a: GroupGrad | None, b: GroupGrad, shape: torch.Size) -> GroupGrad:
    """The sum of two calls' group gradients of one parameter (tied or reused weights).

    A dense operand is summed into in place (the engine owns what rules return), so a tied
    embedding and output layer cost no new ``(m, V, d)`` tensor; two :class:`Rows` give new rows.
    """
    if a is None:
        return b
    if isinstance(a, Rows) and isinstance(b, Rows):
        index, inverse = torch.unique(torch.cat([a.index, b.index]), return_inverse=True)
        values = a.values.new_zeros(a.values.shape[0], index.shape[0], a.values.shape[2])
        values.index_add_(1, inverse, torch.cat([a.values, b.values], dim=1))
        return Rows(index, values)
    dense, other = (b, a) if isinstance(a, Rows) else (a, b)
    assert isinstance(dense, Tensor)
    values = other.values if isinstance(other, Rows) else other
    if values.dtype != dense.dtype:  # autocast: a bf16 output layer tied to a float32 embedding
        dtype = torch.promote_types(dense.dtype, values.dtype)
        dense, values = dense.to(dtype), values.to(dtype)
    if isinstance(other, Rows):
        return dense.index_add_(1, other.index, values)
    return dense.add_(values)


def cat(
    parts: list[GroupGrad | None], counts: list[int], shape: torch.Size, like: Tensor
) -> GroupGrad:
    """Stack the group gradients of several batches along the group axis: ``(sum counts, ...)``.

    ``None`` (a batch that did not reach the parameter) stands for ``counts[j]`` zero gradients.
    Rows stay rows (on the union of their indices); anything else becomes dense.
    """
    if all(isinstance(p, Rows) or p is None for p in parts):
        rows = [p for p in parts if isinstance(p, Rows)]
        if rows:
            index, inverse = torch.unique(torch.cat([r.index for r in rows]), return_inverse=True)
            d = rows[0].values.shape[2]
            values = rows[0].values.new_zeros(sum(counts), index.shape[0], d)
            start, offset = 0, 0
            for part, count in zip(parts, counts, strict=True):
                if isinstance(part, Rows):
                    n = part.index.shape[0]
                    values[start : start + count].index_add_(
                        1, inverse[offset : offset + n], part.values
                    )
                    offset += n
                start += count
            return Rows(index, values)
    return torch.cat(
        [
            like.new_zeros(count, *shape) if part is None else to_dense(part, shape)
            for part, count in zip(parts, counts, strict=True)
        ]
    )


# The CPU's BLAS multiplies an (m, P) by a (P, m) matrix 3-5x below memory speed for m < 16
# (2-core CPU, 2 threads: 1.6 ms for m = 8, P = 262,144, against 0.4 ms as a batch of 2,048-long
# slices); from m = 16 its own kernel is faster. See ``_self_product``.
SPLIT_K_BELOW_M, SPLIT_K = 16, 2048


def _self_product(flat: Tensor) -> Tensor:
    """``flat @ flat.T`` for ``(m, P)`` ``flat``; on the CPU for m < 16, as a batched GEMM over
    ``SPLIT_K``-long slices of the columns, summed (the same products, in another order)."""
    m, P = flat.shape
    if flat.device.type != "cpu" or m >= SPLIT_K_BELOW_M or P < 2 * SPLIT_K:
        return flat @ flat.T
    c = P // SPLIT_K
    head = flat[:, : c * SPLIT_K].reshape(m, c, SPLIT_K).transpose(0, 1)  # (c, m, SPLIT_K) view
    block = torch.bmm(head, head.transpose(1, 2)).sum(0)
    if c * SPLIT_K < P:
        tail = flat[:, c * SPLIT_K :]
        block.addmm_(tail, tail.T)
    return block


def gram_of(grad: GroupGrad) -> Tensor:
    """``(m, m)`` float64 Gram of the group gradients.

    On the CPU, float32 (and half-precision) gradients are multiplied in float32 — a float64 copy
    of ``m x |p|`` values and a float64 GEMM cost more than the rest of the engine — and the block
    is redone in float64 when float32 cannot hold it: a squared norm that overflows (gradients
    above ~1e19) or falls below 1e-30 (gradients below ~1e-15, or exactly zero). Elsewhere, and for
    float64 gradients, the product is in float64.
    """
    values = grad.values if isinstance(grad, Rows) else grad
    flat = values.reshape(values.shape[0], -1)  # (m, P)
    if flat.dtype != torch.float64 and flat.device.type == "cpu":
        low = flat.float()
        block = _self_product(low)
        top = float(block.max())  # a free read on the CPU; a Gram's largest entry is diagonal
        if math.isfinite(top) and top >= 1e-30:
            return block.to(torch.float64)
    return _self_product(flat.to(torch.float64))


def add_gram(gram: Tensor, grad: GroupGrad) -> Tensor:
    """``gram += gram_of(grad)`` in place, for the ``(m, m)`` float64 ``gram``. Off the CPU, where
    the step is bound by the host's kernel launches, the float64 product accumulates straight into
    ``gram`` (one GEMM, no separate sum)."""
    values = grad.values if isinstance(grad, Rows) else grad
    if values.device.type == "cpu":
        return gram.add_(gram_of(grad))
    wide = values.reshape(values.shape[0], -1).to(torch.float64)  # (m, P)
    return gram.addmm_(wide, wide.T)


def weighted_sum(weights: Tensor, grad: GroupGrad, shape: torch.Size) -> Tensor:
    """``sum_k w_k g_k`` as a dense tensor of the parameter's shape: one ``(m,) x (m, P)``
    product (``tensordot`` would do the same product behind a few more ops and Python)."""
    values = grad.values if isinstance(grad, Rows) else grad
    m = values.shape[0]
    flat = weights.to(values.dtype) @ values.reshape(m, -1)  # (P,)
    if isinstance(grad, Tensor):
        return flat.reshape(shape)
    rows = flat.reshape(values.shape[1:])  # (U, d)
    return rows.new_zeros(shape).index_add_(0, grad.index, rows)


def nbytes(grad: GroupGrad) -> int:
    values = grad.values if isinstance(grad, Rows) else grad
    return values.numel() * values.element_size()
