r"""GRAIN in a Lightning ``LightningModule`` with manual optimization: :func:`grain_step`.

GRAIN replaces ``backward``, so the module steps its optimizer itself
(``self.automatic_optimization = False``) and its ``training_step`` ends with one call::

    def training_step(self, batch, batch_idx):
        x, y = batch
        losses = F.cross_entropy(self(x), y, reduction="none")  # (B,)
        grain_step(self, self.grain, losses)  # zero_grad, GRAIN backward, step, log grain/...

:func:`grain_step` does, in order: ``optimizer.zero_grad()``; ``grain.backward(losses)`` (which
turns autocast off for its own arithmetic, so a ``bf16-mixed`` forward leaves the Gram in
float32/64); optional norm clipping by ``module.clip_gradients``; ``optimizer.step()`` and the LR
scheduler's ``step()`` unless GRAIN skipped the step (``nonfinite="skip"``: then ``.grad`` is
left as ``zero_grad`` made it, neither steps and ``trainer.global_step`` does not advance);
``module.log_dict`` of ``stats.to_dict()`` (``grain/...`` keys, so TensorBoard, W&B and
``CSVLogger`` get them).

It does not go through ``self.manual_backward``: GRAIN's backward is ``torch.autograd.grad`` on
the per-sample losses, not ``loss.backward()``, so the ``on_before_backward`` /
``on_after_backward`` hooks are not called. Precision: ``32``, ``64`` and ``bf16-mixed`` work;
``16-mixed`` is refused (its GradScaler would need GRAIN to scale the losses and to report overflow
to the scaler rather than skip).

Several devices or nodes: under Lightning's DDP strategies (``strategy="ddp"``, ``ddp_spawn``,
...) every rank's groups are global groups of one GRAIN step; a GRAIN built without
``process_group`` (in ``__init__``, before Lightning starts the process group) is bound to
``WORLD`` at the first ``grain_step``, and DDP's own all-reduce never runs. Other multi-device
strategies (FSDP, DeepSpeed) are refused.

Example:
    >>> import lightning, torch
    >>> import torchgrain
    >>> from torchgrain.integrations.lightning import grain_step
    >>> class Net(lightning.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.automatic_optimization = False
    ...         self.net = torch.nn.Linear(4, 2)
    ...         self.grain = torchgrain.GRAIN(self.net, num_groups=2)
    ...     def training_step(self, batch, batch_idx):
    ...         x, y = batch
    ...         losses = torch.nn.functional.cross_entropy(self.net(x), y, reduction="none")
    ...         grain_step(self, self.grain, losses)
    ...     def configure_optimizers(self):
    ...         return torch.optim.SGD(self.parameters(), lr=0.1)
    >>> data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
    >>> trainer = lightning.Trainer(max_steps=2, accelerator="cpu", logger=False,
    ...     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    >>> trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=8))
    >>> trainer.global_step
    2
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import Tensor

from torchgrain._grain import GRAIN
from torchgrain._stats import GrainStats

__all__ = ["grain_step"]


def grain_step(
    module: Any,
    grain: GRAIN,
    losses: Tensor,
    optimizer: Any = None,
    *,
    groups: Tensor | None = None,
    keys: Tensor | None = None,
    scheduler: Any = None,
    gradient_clip_val: float | None = None,
    log: bool = True,
    prefix: str = "grain/",
) -> GrainStats:
    """One GRAIN optimizer step inside a ``LightningModule.training_step`` (manual optimization).

    Args:
        module: the ``LightningModule`` (``automatic_optimization = False``).
        grain: the :class:`~torchgrain.GRAIN` built on the module's trained model.
        losses: ``(B,)`` per-sample losses of the batch.
        optimizer: the optimizer to step (default: ``module.optimizers()``, which must be one).
        groups: passed to :meth:`GRAIN.backward`.
        keys: passed to :meth:`GRAIN.backward`.
        scheduler: an LR scheduler to step after each performed optimizer step (e.g.
            ``module.lr_schedulers()``), or ``None`` to step it yourself.
        gradient_clip_val: clip ``.grad`` (GRAIN's ``d``) to this total norm before stepping.
        log: ``module.log_dict(stats.to_dict(prefix), on_step=True)``.
        prefix: the logged keys' prefix.

    Returns:
        The step's :class:`~torchgrain.GrainStats` (``stats.skipped``: nothing was stepped).
    """
    trainer = _check(module)
    if optimizer is None:
        optimizer = module.optimizers()
        if isinstance(optimizer, list | tuple):
            raise ValueError(
                f"the module has {len(optimizer)} optimizers; pass grain_step(..., optimizer=...) "
                "with the one that trains the parameters GRAIN was built on"
            )
    if trainer is not None and trainer.world_size > 1 and grain.process_group is None:
        grain._bind(dist.group.WORLD)  # DDP: every rank's groups are global groups, not averaged
    optimizer.zero_grad()
    # Lightning runs training_step under autocast with bf16-mixed; GRAIN.backward turns it off
    # for the Gram and d itself.
    stats = grain.backward(losses, groups, keys=keys)
    if not stats.skipped:
        if gradient_clip_val is not None:
            module.clip_gradients(
                optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm="norm"
            )
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    if log and trainer is not None:
        module.log_dict(
            stats.to_dict(prefix), on_step=True, on_epoch=False, batch_size=int(losses.shape[0])
        )
    return stats


def _check(module: Any) -> Any:
    """The module's Lightning trainer after the checks, or ``None`` outside ``fit``."""
    if getattr(module, "automatic_optimization", False):
        raise RuntimeError(
            "grain_step steps the optimizer itself: set self.automatic_optimization = False in "
            "the LightningModule's __init__ (GRAIN replaces backward, so Lightning's automatic "
            "loss.backward() cannot run)"
        )
    trainer = getattr(module, "_trainer", None)
    if trainer is None:
        return None
    if trainer.world_size > 1:
        from lightning.pytorch.strategies import DDPStrategy

        if not isinstance(trainer.strategy, DDPStrategy):
            raise RuntimeError(
                f"grain_step runs under Lightning's DDP strategies (ddp, ddp_spawn, ...), got "
                f"{type(trainer.strategy).__name__}: GRAIN exchanges the ranks' group gradients "
                "itself; use strategy='ddp', or build GRAIN on an FSDP2 model in a torchrun loop"
            )
    if getattr(trainer.precision_plugin, "scaler", None) is not None:
        raise RuntimeError(
            f"precision={trainer.precision!r} uses a GradScaler, which GRAIN does not drive "
            "(scaled losses, overflow reported to the scaler); use precision='bf16-mixed' or "
            "'32-true'"
        )
    return trainer
