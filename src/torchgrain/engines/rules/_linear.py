"""Linear layers, any leading dims: ``y = A W^T + b``.

Group k's weight gradient is the ordinary weight-gradient GEMM restricted to the group,
``M_k = sum_{i in S_k} Bk_i^T A_i``: the same FLOPs as one weight gradient, split m ways.
LoRA adapters (PEFT) are ``nn.Linear`` modules and use this rule.

When the call has few tokens ``N`` (rows of ``A``) for its width, the weight's Gram block comes
from the tokens instead, without forming any ``M_k`` (the "ghost" Gram):

    <M_k, M_l> = sum_{s in S_k, t in S_l} <a_s, a_t> <b_s, b_t>
    G_W = S^T ((A A^T) * (Bk Bk^T)) S        S: (N, m) one-hot token -> group

``N^2 (in + out)`` FLOPs and an ``(N, N)`` buffer, against ``N in out`` FLOPs and ``m in out``
stored values; ``d`` is then recomputed by one weighted weight-gradient GEMM (:meth:`combine`).

Which of the three exact paths a weight takes — keep the ``M_k`` (``d`` is their weighted sum),
form them for the Gram only and recompute ``d`` (book-keeping), or the ghost Gram — is decided
per call by :func:`path_costs`, a cost model of FLOPs and values moved.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from torchgrain.engines._groups import GroupIndex
from torchgrain.engines._workspace import empty
from torchgrain.engines.rules._base import GroupGrad, register_rule, trainable


def _weight_grads(A: Tensor, Bk: Tensor, groups: GroupIndex, transposed: bool = False) -> Tensor:
    """``(m, out, in)`` per-group ``sum_i Bk_i^T A_i`` over all leading (token) dims, or
    ``(m, in, out)`` (``A_i^T Bk_i``) when ``transposed``; in a buffer of the engine's workspace."""
    d_in = A.shape[-1]
    left, right = (A, Bk) if transposed else (Bk, A)
    out = empty((groups.m, left.shape[-1], right.shape[-1]), dtype=Bk.dtype, device=Bk.device)
    if len(set(groups.counts)) == 1:  # equal sizes: one batched GEMM
        n = groups.counts[0] * (A.numel() // (A.shape[0] * d_in))
        L_g = groups.sort(left).reshape(groups.m, n, left.shape[-1])
        R_g = groups.sort(right).reshape(groups.m, n, right.shape[-1])
        return torch.bmm(L_g.transpose(1, 2), R_g, out=out)
    return torch.stack(
        [
            lhs.reshape(-1, lhs.shape[-1]).T @ rhs.reshape(-1, rhs.shape[-1])
            for lhs, rhs in zip(groups.split(left), groups.split(right), strict=True)
        ],
        out=out,
    )


GHOST_MAX_TOKENS = 4096  # at most four (N, N) float32 buffers: 256 MiB
GHOST_CANCELLATION = 1e-3  # float32 keeps ~4 digits of a Gram diagonal at this cancellation

# The cost model's two constants, in FLOPs of a GEMM: the time one group-gradient value takes to
# write or read (FLOPS_PER_VALUE), and the time one product of the Gram takes (FLOPS_PER_PRODUCT:
# m^2 of them per value, in (m, P) x (P, m) GEMMs far below a square GEMM's rate). Fitted on this
# project's 2-core CPU (2 threads, float32) to the three paths timed alone
# (``benchmarks/step_paths.py``, log ``step_paths.txt``) on (in, out) = (256, 256), (256, 1024),
# (384, 1536) for N = 64 to 2,048 tokens at m = 8 and 16: with 8 and 6 the model picks the
# fastest path in all 36 cases (the ghost up to N = 128 or 256 at m = 8, up to 256 or 512 at
# m = 16; keep above). The one-constant model before it (22 per value, the Gram not counted
# apart) picked keep at m = 16 where the ghost was up to 1.29x faster, since the Gram's m^2
# products per value outgrow the m values moved. The rule before that, ghost iff
# N (in + out) < in out, kept at (256, 256), N = 128, where the ghost was 1.7x faster.
FLOPS_PER_VALUE = 8.0
FLOPS_PER_PRODUCT = 6.0


def path_costs(
    tokens: int,
    d_in: int,
    d_out: int,
    m: int,
    flops_per_value: float = FLOPS_PER_VALUE,
    flops_per_product: float = FLOPS_PER_PRODUCT,
) -> dict[str, float]:
    """Cost, in FLOPs, of each exact path for a ``(d_out, d_in)`` weight called on ``tokens``
    tokens with m groups (what the paths share — the input gradients, the bias — left out;
    ``benchmarks/step_paths.py`` times them and refits the two constants).

    - keep: the m group GEMMs (``2 N in out``), the ``m in out`` group gradients written, read
      for the Gram (``m^2 in out`` products) and read for ``d``;
    - book-keeping: the same GEMMs, written and read once for the same Gram, and ``d``'s own
      GEMM;
    - ghost: the two ``(N, N)`` token products and ``d``'s GEMM.
    """
    gemm = 2.0 * tokens * d_in * d_out
    moved = flops_per_value * m * d_in * d_out
    gram = flops_per_product * m * m * d_in * d_out
    return {
        "keep": gemm + 3 * moved + gram,
        "bookkeeping": 2 * gemm + 2 * moved + gram,
        "ghost": 2.0 * tokens**2 * (d_in + d_out) + gemm,
    }


def _tokens(A: Tensor) -> int:
    return A.numel() // A.shape[-1] if A.dim() else 0


def ghost_weight_gram(
    A: Tensor, Bk: Tensor, groups: GroupIndex, keep: bool = True
) -> Tensor | None:
    """``(m, m)`` float64 Gram of the weight's group gradients from the tokens, or ``None``
    when materialising the group gradients is cheaper by :func:`path_costs` (than keeping them,
    or, with ``keep=False``, than book-keeping).

    Off the CPU only for float64 tensors, with no check: for lower precisions the cancellation
    check would read the block on the host (a sync per layer), and the float64 redo would be slow
    on GPUs whose float64 rate is a small fraction of float32's. On a GPU the ghost path serves
    few-token batches, where its saving is small anyway."""
    if A.device.type != "cpu" and (A.dtype != torch.float64 or Bk.dtype != torch.float64):
        return None
    d_in, d_out, N = A.shape[-1], Bk.shape[-1], _tokens(A)
    if N > GHOST_MAX_TOKENS:
        return None
    costs = path_costs(N, d_in, d_out, groups.m)
    if costs["ghost"] >= min(costs["bookkeeping"], costs["keep"] if keep else math.inf):
        return None
    a, b = A.reshape(-1, d_in), Bk.reshape(-1, d_out)  # (N, in), (N, out)
    token_groups = groups.ids.repeat_interleave(N // groups.batch_size)  # (N,)
    onehot = torch.nn.functional.one_hot(token_groups, groups.m)  # (N, m)
    if a.dtype != torch.float64:
        # float32 products; redone in float64 when the token terms cancel so much (gradients
        # of a group's tokens that point against each other) that float32 would lose the block
        a32, b32 = a.float(), b.float()
        terms = (a32 @ a32.T).mul_(b32 @ b32.T)  # (N, N)
        s = onehot.float()
        block = s.T @ terms @ s  # (m, m)
        scale = s.T @ terms.abs() @ s
        diag, bound = block.diagonal(), scale.diagonal()
        top = float(bound.max())  # a free read on the CPU
        if math.isfinite(top) and top >= 1e-30 and bool((diag >= GHOST_CANCELLATION * bound).all()):
            return block.to(torch.float64)
    a64, b64, s64 = a.double(), b.double(), onehot.double()
    return s64.T @ (a64 @ a64.T).mul_(b64 @ b64.T) @ s64


def _bias_grads(Bk: Tensor, groups: GroupIndex) -> Tensor:
    """``(m, out)`` per-group sums of the output gradient."""
    return groups.sums(Bk.reshape(Bk.shape[0], -1, Bk.shape[-1]), dims=1)


@register_rule(nn.Linear)
class LinearRule:
    transposed = False  # the weight is stored (out, in); Hugging Face's Conv1D stores (in, out)

    def param_names(self, module: nn.Module) -> list[str]:
        return trainable(module, "weight", "bias")

    def ghost_gram(
        self,
        module: nn.Module,
        A: Tensor,
        Bk: Tensor,
        groups: GroupIndex,
        name: str,
        keep: bool = True,
    ) -> Tensor | None:
        """The weight's ``(m, m)`` Gram block without its group gradients, when cheaper than
        materialising them (and keeping them, if ``keep``)."""
        if name != "weight":
            return None
        return ghost_weight_gram(A.to(Bk.dtype), Bk, groups, keep)

    def keep_pays(self, module: nn.Module, A: Tensor, Bk: Tensor, m: int, name: str) -> bool:
        """Whether keeping this call's group gradients for ``d`` is cheaper than recomputing
        ``d`` by one more GEMM (book-keeping). Measured on the CPU only: elsewhere, keep."""
        if name != "weight" or A.device.type != "cpu":
            return True
        costs = path_costs(_tokens(A), A.shape[-1], Bk.shape[-1], m)
        return costs["keep"] <= costs["bookkeeping"]

    def group_grads(
        self,
        module: nn.Module,
        A: Tensor,
        Bk: Tensor,
        groups: GroupIndex,
        skip: frozenset[str] = frozenset(),
    ) -> dict[str, GroupGrad]:
        names = [n for n in self.param_names(module) if n not in skip]
        A = A.to(Bk.dtype)
        out: dict[str, GroupGrad] = {}
        if "weight" in names:
            out["weight"] = _weight_grads(A, Bk, groups, self.transposed)
        if "bias" in names:
            out["bias"] = _bias_grads(Bk, groups)
        return out

    def combine(self, module: nn.Module, A: Tensor, Bk: Tensor) -> dict[str, Tensor]:
        names = self.param_names(module)
        A = A.to(Bk.dtype)
        out = {}
        if "weight" in names:
            a, b = A.reshape(-1, A.shape[-1]), Bk.reshape(-1, Bk.shape[-1])
            out["weight"] = a.T @ b if self.transposed else b.T @ a
        if "bias" in names:
            out["bias"] = Bk.reshape(-1, Bk.shape[-1]).sum(0)
        return out
