"""Stability in the theory's own setting: plain SGD, neighbouring training sets.

The paper's uniform-stability bound is about SGD on a convex loss. For each of ``pairs`` pairs, one
training example is replaced by a spare one (from the training pool, never the test set), and the
head is trained on both sets from the same seed (the same initialisation and data order), once per
method. Recorded per pair and method: ``‖θ − θ′‖`` after every epoch (the curve), the change of
the loss on the swapped example, and the mean change of the test predictions. The convex case is a
linear head (logistic regression for topics, least squares for valence); the same comparison runs
on the MLP head (non-convex). The learning rate is fixed per task (1.0 for topics, 0.1 for valence,
where plain SGD at 1.0 diverges), the same for every method: the bound compares step for step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from torchgrain.experiments.stats import paired_mean_test
from torchgrain.experiments.study import design
from torchgrain.experiments.study.heads import Data, per_sample_losses
from torchgrain.experiments.study.train import Setting, train

HEADS = ("linear", "mlp")


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def neighbour(data: Data, index: int, spare: int) -> Data:
    """``data`` with training example ``index`` replaced by validation example ``spare``."""
    x, y = data.x_train.clone(), data.y_train.clone()
    x[index], y[index] = data.x_val[spare], data.y_val[spare]
    return dataclasses.replace(data, x_train=x, y_train=y)


def stability_pair(setting: Setting, data: Data, lr: float, pair: int) -> dict[str, Any]:
    """One neighbouring pair for one setting: the distance curve and the loss and prediction
    changes. The pair's seed draws the swapped index, the spare, the head and the data order."""
    g = torch.Generator().manual_seed(pair)
    index = int(torch.randint(len(data.y_train), (1,), generator=g))
    spare = int(torch.randint(len(data.y_val), (1,), generator=g))
    other = neighbour(data, index, spare)
    curves: list[list[Tensor]] = [[], []]
    results = [
        _train_recording(setting, d, lr, pair, curve)
        for d, curve in zip((data, other), curves, strict=True)
    ]
    model_a, model_b = results[0]["model"], results[1]["model"]
    if results[0]["diverged"] or results[1]["diverged"]:
        return {"pair": pair, "diverged": True}
    x, y = data.x_train[index : index + 1], data.y_train[index : index + 1]
    with torch.no_grad():
        loss_change = abs(
            float(per_sample_losses(data, model_a, x, y))
            - float(per_sample_losses(data, model_b, x, y))
        )
        pa, pb = model_a(data.x_test), model_b(data.x_test)
        if data.classes > 1:
            pa, pb = pa.softmax(1), pb.softmax(1)
        prediction_change = float((pa - pb).abs().mean())
    distance = [float((a - b).norm()) for a, b in zip(curves[0], curves[1], strict=True)]
    return {
        "pair": pair,
        "diverged": False,
        "swapped_index": index,
        "distance_by_epoch": distance,
        "distance": distance[-1],
        "loss_change": loss_change,
        "prediction_change": prediction_change,
    }


def _train_recording(
    setting: Setting, data: Data, lr: float, seed: int, curve: list[Tensor]
) -> dict[str, Any]:
    """:func:`train`, appending the flat parameters to ``curve`` after every epoch."""

    def record(model: nn.Module) -> None:
        curve.append(_flat(model))

    return train(setting, data, lr, seed, keep_model=True, on_epoch=record)


def stability_setting(task: str, head: str, method: str, epochs: int) -> Setting:
    return Setting(task, "sgd", method, 8, head=head, epochs=epochs)


STABILITY_LR = {"topics": 1.0, "valence": 0.1}  # plain SGD, stable on both heads (measured)


def stability_lr(task: str) -> float:
    return STABILITY_LR[task]


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (task, head, method): mean distances and changes over pairs, and the paired ratio of
    each to the mean's with a sign-flip p on the log ratios."""
    out = []
    groups: dict[tuple[str, str], dict[str, dict[int, dict[str, Any]]]] = {}
    for r in records:
        if not r.get("diverged"):
            groups.setdefault((r["task"], r["head"]), {}).setdefault(r["method"], {})[r["pair"]] = r
    for (task, head), by_method in groups.items():
        base = by_method.get("mean", {})
        for method, pairs in by_method.items():
            row: dict[str, Any] = {"task": task, "head": head, "method": method,
                                   "pairs": len(pairs)}  # fmt: skip
            for name in ("distance", "loss_change", "prediction_change"):
                values = np.array([p[name] for p in pairs.values()])
                row[name] = float(values.mean()) if len(values) else None
                common = [
                    i for i in pairs if i in base and base[i][name] > 0 and pairs[i][name] > 0
                ]
                if method != "mean" and len(common) >= 2:
                    logs = np.log([pairs[i][name] / base[i][name] for i in common])
                    mean_log, p = paired_mean_test(logs, np.zeros(len(logs)))
                    row[name + "_ratio"] = math.exp(mean_log)  # geometric mean over pairs
                    row[name + "_p"] = p
            curve = np.array([p["distance_by_epoch"] for p in pairs.values()])
            row["distance_by_epoch"] = curve.mean(axis=0).tolist() if len(curve) else []
            out.append(row)
    return out


def stability_cells(preset: design.Preset) -> list[tuple[str, str, str]]:
    """``(task, head, method)`` for every stability comparison of the preset."""
    methods = design.METHODS[:2] if preset.name in ("smoke", "tiny") else design.METHODS
    return [(t, h, m) for t in design.TASKS for h in HEADS for m in methods]
