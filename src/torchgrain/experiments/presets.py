"""How big each task is under each preset: examples, tokens, epochs, batch, learning rate.

``smoke`` proves the pipeline in about a minute or two on a 2-core CPU; ``default`` gives a
meaningful answer in well under half an hour there; ``full`` is sized for a GPU. ``tiny`` is for
the test suite: real data, but one MiniLM layer and a random two-layer Llama for generation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

PRESETS = ("smoke", "default", "full", "tiny")
TASKS = ("classification", "regression", "generation")


@dataclass(frozen=True)
class Size:
    """One task's size: the training subset, the fixed test set and the optimisation."""

    train: int  # training examples (a fixed subset of the task's training split)
    test: int  # test examples (a fixed held-out set)
    tokens: int  # max input tokens (for generation: of the article prompt)
    epochs: int
    batch: int  # B, the mini-batch size
    lr: float  # AdamW peak learning rate (linear warm-up over 10% of the steps, then decay)
    layers: int | None = None  # MiniLM: keep the first n layers; SmolLM2: train the last n
    tiny: bool = False  # test-only random models (see module docstring)
    seeds: int = 5  # default number of seeds
    eval_each_epoch: bool = True  # else only after the last epoch (SmolLM2's test pass is slow)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_SIZES: dict[str, dict[str, Size]] = {
    "default": {
        "classification": Size(train=256, test=500, tokens=32, epochs=3, batch=16, lr=1e-4),
        "regression": Size(train=512, test=1000, tokens=8, epochs=3, batch=16, lr=1e-4),
        "generation": Size(
            train=96,
            test=64,
            tokens=32,
            epochs=2,
            batch=8,
            lr=1e-4,
            layers=4,
            eval_each_epoch=False,
        ),
    },
    "full": {
        "classification": Size(1024, 500, 64, 5, 32, 5e-5, seeds=10),
        "regression": Size(4096, 1000, 8, 5, 32, 5e-5, seeds=10),
        "generation": Size(1024, 200, 64, 3, 16, 5e-5, layers=30, seeds=10),
    },
}
_default = _SIZES["default"]
_SIZES["smoke"] = {
    "classification": replace(_default["classification"], train=64, test=100, epochs=1, seeds=2),
    "regression": replace(_default["regression"], train=64, test=200, epochs=1, seeds=2),
    "generation": replace(_default["generation"], train=16, test=16, tokens=24, epochs=1, seeds=2),
}
_SIZES["tiny"] = {
    name: replace(
        size, train=32, test=16, tokens=12, epochs=1, batch=8, layers=1, tiny=True, seeds=2
    )
    for name, size in _SIZES["smoke"].items()
}


def size_of(preset: str, task: str) -> Size:
    """The :class:`Size` of ``task`` under ``preset``, or an error naming the choices."""
    if preset not in _SIZES:
        raise ValueError(f"unknown preset {preset!r}; choose one of {list(PRESETS)}")
    if task not in _SIZES[preset]:
        raise ValueError(f"unknown task {task!r}; choose one of {list(TASKS)}")
    return _SIZES[preset][task]
