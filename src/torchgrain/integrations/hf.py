r"""Hugging Face ``transformers.Trainer`` with GRAIN's backward: :class:`GrainTrainer`.

``GrainTrainer`` is a ``Trainer`` whose training step computes the per-sample losses ``(B,)``
itself and calls :meth:`torchgrain.GRAIN.backward` where ``Trainer`` calls ``loss.backward()``:
``.grad`` holds the combination ``d`` of the group gradients (the min-norm point by default) when
``Trainer`` clips (``max_grad_norm``), steps the optimizer and the LR scheduler. Everything else
is ``Trainer``'s.

Gradient accumulation (``gradient_accumulation_steps = M``): the micro-batches of one optimizer
step are groups of one GRAIN step (:meth:`GRAIN.accumulate`), ``M x num_groups`` groups in all,

.. math::
    d = \sum_{j, k} w^*_{jk}\, g_{jk}, \qquad
    w^* = \arg\min_{w \ge 0,\ \sum w = 1} w^\top G w \quad\text{over every micro-batch's groups,}

where plain ``Trainer`` adds ``g_j / M`` per micro-batch. A window ends on the micro-batch after
which ``Trainer`` steps: ``self.accelerator.sync_gradients``, which ``Trainer``'s loop sets before
each micro-batch (true on every ``M``-th one and on the last of the epoch, so the last, shorter
window of an epoch is a GRAIN step of its own).

A skipped step (``grain_nonfinite="skip"`` and NaN/Inf losses or gradients) sets ``.grad = None``
for every trained parameter: ``optimizer.step()`` then leaves them all as they are (every
``torch.optim`` optimizer skips a parameter without ``.grad``: no momentum, no weight decay), while
``Trainer`` counts the step (``global_step``, the LR scheduler). ``grain/skipped`` is logged.

Several processes (``torchrun`` or ``accelerate launch``, plain multi-process DDP): every rank's
groups are global groups of one GRAIN step (``process_group=WORLD``: ``num_groups`` per rank and
micro-batch, ``world_size x`` as many in all); GRAIN exchanges the group gradients itself, so the
forward runs on the model Trainer wrapped in DDP, not through the wrapper, whose all-reduce never
runs. Every rank ends each step with the same ``.grad`` and the same parameters; Trainer logs and
saves from the main process, and ``grain_state.pt`` is written there.

FSDP2 (``fsdp="full_shard"``; transformers 5 uses FSDP2 by default): ``Trainer`` shards the model
when training starts, and GRAIN is rebuilt on the sharded parameters at the first step (its state
carried over); each rank's ``.grad`` is then its DTensor shard of ``d``
(:class:`torchgrain.exchange.ShardedExchange`).

Refused at construction, each with the setting to change: DeepSpeed, FSDP1, ``nn.DataParallel``,
``fp16`` (its GradScaler's overflow handling would fight GRAIN's NaN check: use ``bf16``),
``torch_compile`` with the fused engine (``grain_engine="loop"`` compiles), LOMO optimizers (they
fuse the update into ``backward``), a ``compute_loss_func`` (it returns a mean: override
:meth:`GrainTrainer.compute_per_sample_losses`).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
import transformers
from torch import Tensor, nn
from transformers import Trainer

from torchgrain._grain import GRAIN, Accumulation
from torchgrain._stats import GrainStats
from torchgrain.engines import DEFAULT_MEMORY_BUDGET
from torchgrain.integrations import _hf_heads
from torchgrain.integrations._hf_checks import refuse_unsupported
from torchgrain.solvers import AggregatorLike, check_aggregator

__all__ = ["GrainTrainer"]

_STATE_FILE = "grain_state.pt"

if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(
        f"GrainTrainer needs transformers >= 5 (found {transformers.__version__}): it ends an "
        "accumulation window on the sync_gradients flag that Trainer 5 sets before each "
        "micro-batch; pip install -U 'torchgrain[hf]'"
    )


class GrainTrainer(Trainer):
    """``transformers.Trainer`` whose backward is GRAIN's combination of group gradients (the
    min-norm point, or another aggregator).

    Takes every argument ``Trainer`` takes, plus:

    Args:
        num_groups: m, groups per micro-batch (``None`` only with ``grain_grouping="key"``).
            ``num_groups=1`` without accumulation is plain ``Trainer``, step for step (for LM and
            token heads: when every sequence counts as many tokens). A batch of
            fewer than m samples (an epoch's short last batch) gets one group per sample.
        grain_grouping: ``"contiguous"``, ``"random"`` or ``"key"`` (see :class:`GRAIN`).
        grain_key: with ``"key"``: the batch field holding one integer key per sample (a dataset
            column such as ``"labels"`` or ``"domain"``; it is kept out of the model's inputs
            unless it is a label field).
        grain_aggregator: how the group gradients are combined (``GRAIN``'s ``aggregator``):
            ``"min_norm"`` (default), ``"mean"``, ``"dual_proj"``, ``"upgrad"``, ``"cagrad"`` or a
            callable ``(gram, pref) -> weights``.
        grain_seed: ``GRAIN``'s ``seed``.
        grain_engine: ``GRAIN``'s ``engine``.
        grain_memory_budget: ``GRAIN``'s ``memory_budget``.
        grain_nonfinite: ``GRAIN``'s ``nonfinite``.
        grain_allow_unused: ``GRAIN``'s ``allow_unused``.

    The per-sample losses of the standard heads are built in (sequence classification:
    single-label, regression, multi-label by ``config.problem_type``; token classification; causal
    and masked LM; ``label_smoothing_factor`` honoured); for any other model override
    :meth:`compute_per_sample_losses`. Diagnostics are logged under ``grain/...`` keys, averaged
    over the optimizer steps since the last log; ``self.grain_stats`` is the last step's
    :class:`~torchgrain.GrainStats`. ``self.grain`` is the :class:`~torchgrain.GRAIN` object; its
    state is saved with each checkpoint (``grain_state.pt``) and restored on resume.

    Example:
        >>> import tempfile, torch
        >>> from transformers import BertConfig, BertForSequenceClassification, TrainingArguments
        >>> from torchgrain.integrations.hf import GrainTrainer
        >>> config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
        ...                     num_attention_heads=2, intermediate_size=32, num_labels=3)
        >>> data = [{"input_ids": torch.randint(0, 50, (6,)), "labels": i % 3} for i in range(16)]
        >>> args = TrainingArguments(tempfile.mkdtemp(), max_steps=2, use_cpu=True,
        ...     per_device_train_batch_size=8, save_strategy="no", report_to="none")
        >>> trainer = GrainTrainer(BertForSequenceClassification(config), args,
        ...                        train_dataset=data, num_groups=4)
        >>> _ = trainer.train()  # doctest: +ELLIPSIS
        {'train_runtime': ...}
        >>> trainer.grain_stats.num_groups
        4
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: Any = None,
        *trainer_args: Any,
        num_groups: int | None = None,
        grain_grouping: str = "contiguous",
        grain_key: str | None = None,
        grain_seed: int | None = None,
        grain_engine: str = "auto",
        grain_memory_budget: float = DEFAULT_MEMORY_BUDGET,
        grain_nonfinite: str = "raise",
        grain_allow_unused: bool = False,
        grain_aggregator: AggregatorLike = "min_norm",
        **trainer_kwargs: Any,
    ) -> None:
        if num_groups is None and grain_grouping != "key":
            raise ValueError(
                "GrainTrainer needs num_groups=m, the number of groups per micro-batch "
                "(num_groups=1 is plain Trainer), or grain_grouping='key' with grain_key=..."
            )
        if (grain_grouping == "key") != (grain_key is not None):
            raise ValueError(
                f"grain_key={grain_key!r} with grain_grouping={grain_grouping!r}: pass both "
                "grain_grouping='key' and grain_key='<batch field with one key per sample>', "
                "or neither"
            )
        if trainer_kwargs.get("compute_loss_func") is not None:
            raise ValueError(
                "compute_loss_func returns one mean loss, and GRAIN needs one loss per sample: "
                "drop it and override GrainTrainer.compute_per_sample_losses(model, inputs) to "
                "return ((B,) losses, outputs)"
            )
        check_aggregator(grain_aggregator)
        if args is not None:
            refuse_unsupported(args, grain_engine)
        self._grain_options: dict[str, Any] = {
            "num_groups": num_groups,
            "grouping": grain_grouping,
            "seed": grain_seed,
            "engine": grain_engine,
            "memory_budget": grain_memory_budget,
            "nonfinite": grain_nonfinite,
            "allow_unused": grain_allow_unused,
            "aggregator": grain_aggregator,
        }
        self.grain_key = grain_key
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        refuse_unsupported(self.args, grain_engine)
        if getattr(self, "is_deepspeed_enabled", False):
            raise ValueError(
                "GrainTrainer does not run under DeepSpeed (the accelerate config enables it): "
                "ZeRO partitions and reduces the gradients GRAIN combines; use FSDP2 or DDP"
            )
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if plugin is not None and getattr(plugin, "fsdp_version", 1) != 2:
            raise ValueError(
                "GrainTrainer runs under FSDP2 only, and the accelerate config enables FSDP1: set "
                "fsdp_version: 2 (fully_shard) in the config, or launch without FSDP"
            )
        overridden = (
            type(self).compute_per_sample_losses is not GrainTrainer.compute_per_sample_losses
        )
        if not overridden and _hf_heads.head_kind(self._grain_model) is None:
            raise TypeError(
                f"GrainTrainer does not know the per-sample loss of "
                f"{type(_hf_heads.base_model(self._grain_model)).__name__} (not a sequence/token "
                "classification, causal-LM or masked-LM head): subclass GrainTrainer and override "
                "compute_per_sample_losses(model, inputs) to return ((B,) losses, outputs)"
            )
        if self.args.world_size > 1:  # torchrun / accelerate DDP: GRAIN exchanges across ranks
            self._grain_options["process_group"] = dist.group.WORLD
        self.grain = GRAIN(self._grain_model, **self._grain_options)
        self.grain_stats: GrainStats | None = None
        self._grain_logged: list[GrainStats] = []  # the steps since the last log
        self._grain_window: contextlib.ExitStack | None = None  # an open accumulation window
        self._grain_acc: Accumulation | None = None

    @property
    def _grain_model(self) -> nn.Module:
        """The model as Trainer holds it (unwrapped: no compile or accelerate wrapper)."""
        model = self.model
        if not isinstance(model, nn.Module):
            raise TypeError(f"GrainTrainer needs a model (or model_init), got {model!r}")
        return model

    # ------------------------------------------------------------------------------- losses
    def compute_per_sample_losses(
        self, model: nn.Module, inputs: dict[str, Any]
    ) -> tuple[Tensor, Any]:
        """``(B,)`` per-sample losses of the batch and the model's outputs. Override for custom
        models; the forward runs inside ``Trainer``'s autocast context (``bf16``).

        The default pops the labels (``args.label_names``, else ``"labels"``) so the model does
        not also compute its mean loss, runs the model and scores its logits by its head.
        """
        names = self.label_names if len(self.label_names) == 1 else ["labels"]
        inputs = dict(inputs)
        labels = inputs.pop(names[0], None)
        if labels is None:
            raise ValueError(
                f"the batch has no {names[0]!r} field (it has {sorted(inputs)}); GrainTrainer "
                "scores each sample against its labels: add them, set "
                "TrainingArguments(label_names=[...]), or override compute_per_sample_losses"
            )
        outputs = model(**inputs)
        logits = _hf_heads.logits_of(outputs, self._grain_model)
        kind = _hf_heads.head_kind(self._grain_model) or ""  # unwrapped, as constructed
        losses = _hf_heads.head_losses(
            kind,
            self._grain_model,
            logits,
            labels,
            label_smoothing=self.args.label_smoothing_factor,
        )  # (B,)
        return losses, outputs

    # --------------------------------------------------------------------------- the step
    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> Tensor:
        """One micro-batch: per-sample losses, then GRAIN's backward (or its part of a window)."""
        same = self.grain._module is self._grain_model  # model_init gives Trainer a new model
        if not same or self.grain._stale():  # FSDP2 shards the model when Trainer prepares it
            state = self.grain.state_dict() if same else None  # the same model's: carried over
            self.grain.close()
            self.grain = GRAIN(self._grain_model, **self._grain_options)
            if state is not None:
                self.grain.load_state_dict(state)
        model.train()
        optimizer: Any = self.optimizer
        if hasattr(optimizer, "train") and callable(optimizer.train):
            optimizer.train()
        inputs = self._prepare_inputs(inputs)
        keys = None
        if self.grain_key is not None:
            if self.grain_key not in inputs:
                raise ValueError(
                    f"grain_key={self.grain_key!r} is not in the batch (it has {sorted(inputs)})"
                )
            keys = inputs[self.grain_key]
            if self.grain_key not in self.label_names and self.grain_key != "labels":
                inputs = {k: v for k, v in inputs.items() if k != self.grain_key}
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module  # GRAIN, not DDP's reducer, combines the ranks' gradients
        with self.compute_loss_context_manager():
            losses, _ = self.compute_per_sample_losses(model, inputs)  # (B,)
        groups = None
        m = self.grain.num_groups
        if keys is None and isinstance(losses, Tensor) and m is not None and len(losses) < m:
            # The epoch's short last batch: one sample per group, the other groups empty (dropped).
            groups = torch.arange(len(losses), device=losses.device)  # (B,)
        # Trainer sets sync_gradients before each micro-batch: true when it will clip and step
        # after this one (every M-th micro-batch and the epoch's last).
        last = bool(self.accelerator.sync_gradients)
        if self._grain_window is None and last:  # a window of one micro-batch
            self._grain_finish(self.grain.backward(losses, groups, keys=keys))
        else:
            if self._grain_window is None:
                self._grain_window = contextlib.ExitStack()
                self._grain_acc = self._grain_window.enter_context(self.grain.accumulate())
            try:
                self.grain.backward(losses, groups, keys=keys)
            except BaseException:
                self._grain_discard(*sys.exc_info())
                raise
            if last:
                window, self._grain_window = self._grain_window, None
                window.close()  # .grad += d over the window's groups (or skip / raise)
                assert self._grain_acc is not None and self._grain_acc.stats is not None
                self._grain_finish(self._grain_acc.stats)
        steps = max(int(getattr(self, "current_gradient_accumulation_steps", 1)), 1)
        return losses.detach().mean() / steps  # Trainer sums these over the window to log

    def _grain_finish(self, stats: GrainStats) -> None:
        if stats.skipped:  # no optimizer update at all for these parameters (see module doc)
            for p in self.grain.params:
                p.grad = None
        self.grain_stats = stats
        self._grain_logged.append(stats)

    def _grain_discard(self, *exc: Any) -> None:
        """Drop an open accumulation window (its kept gradients); ``.grad`` stays untouched."""
        window, self._grain_window = self._grain_window, None
        if window is not None:
            if exc[0] is None:
                exc = (RuntimeError, RuntimeError("accumulation window discarded"), None)
            window.__exit__(*exc)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; a window still open at the end (data ran out) is discarded."""
        try:
            return super().train(*args, **kwargs)
        finally:
            self._grain_discard(None, None, None)

    def _set_signature_columns_if_needed(self) -> None:
        """Keep ``grain_key`` when ``remove_unused_columns`` drops what the model does not take."""
        super()._set_signature_columns_if_needed()
        columns = self._signature_columns
        if self.grain_key is not None and columns is not None and self.grain_key not in columns:
            columns.append(self.grain_key)

    # ------------------------------------------------------------------------------- logs
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """``Trainer.log`` with GRAIN's diagnostics (``grain/...``, NaN-skipping means over the
        steps since the last training log) added to each training log."""
        if self._grain_logged and "loss" in logs:
            logs = {**logs, **_mean_stats(self._grain_logged)}
            self._grain_logged = []
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------------ checkpoints
    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        if self.args.should_save:  # the same state on every rank: the main process writes it
            torch.save(self.grain.state_dict(), os.path.join(output_dir, _STATE_FILE))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is not None and os.path.isfile(os.path.join(checkpoint, _STATE_FILE)):
            # Tensors and builtins only: an untrusted checkpoint cannot run code when it loads.
            state = torch.load(os.path.join(checkpoint, _STATE_FILE), weights_only=True)
            self.grain.load_state_dict(state)


def _mean_stats(history: list[GrainStats]) -> dict[str, float]:
    """Per key, the mean over the steps where it is a number (a skipped step's are NaN)."""
    rows = [stats.to_dict() for stats in history]
    out: dict[str, float] = {}
    for key in rows[0]:
        values = [row[key] for row in rows if not math.isnan(row[key])]
        out[key] = sum(values) / len(values) if values else math.nan
    return out
