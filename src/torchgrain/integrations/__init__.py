"""GRAIN where training loops already live; each is imported only when used, so its library
(``transformers``, ``lightning``) is needed only then:

- :class:`GrainTrainer` (``torchgrain.integrations.hf``): a Hugging Face ``transformers.Trainer``
  whose backward is GRAIN's (accumulation, ``torchrun``/``accelerate`` ranks, FSDP2, PEFT);
- :func:`grain_step` (``torchgrain.integrations.lightning``): one call at the end of a Lightning
  ``training_step`` with manual optimization (``zero_grad``, GRAIN's backward, clipping, the
  optimizer and scheduler steps, ``grain/...`` logs).

Data parallel training and FSDP2 are not integrations: ``GRAIN(..., process_group=...)`` does
them itself (:mod:`torchgrain.exchange`), and :class:`torchgrain.LocalSGD` does local SGD.

Example:
    >>> from torchgrain.integrations import GrainTrainer, grain_step
    >>> GrainTrainer.__module__, grain_step.__module__
    ('torchgrain.integrations.hf', 'torchgrain.integrations.lightning')
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torchgrain.integrations.hf import GrainTrainer
    from torchgrain.integrations.lightning import grain_step

_WHERE = {
    "GrainTrainer": "torchgrain.integrations.hf",
    "grain_step": "torchgrain.integrations.lightning",
}
_EXTRA = {"GrainTrainer": "hf", "grain_step": "lightning"}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module(_WHERE[name])
    except ModuleNotFoundError as error:
        raise ImportError(
            f"torchgrain.integrations.{name} needs {error.name}: pip install "
            f"'torchgrain[{_EXTRA[name]}]'"
        ) from error
    return getattr(module, name)


__all__ = ["GrainTrainer", "grain_step"]
