"""GRAIN trains real models on real data (scikit-learn's bundled datasets, no download)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchgrain

datasets = pytest.importorskip("sklearn.datasets")


def _split(loader, seed: int = 0):  # type: ignore[no-untyped-def]
    x, y = loader(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    n_train = int(0.7 * len(y))
    mean, std = x[:n_train].mean(0), x[:n_train].std(0) + 1e-6
    x = (x - mean) / std
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def _fit(train, num_classes: int, epochs: int, grain_kwargs) -> nn.Module:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    x, y = train
    model = nn.Sequential(nn.Linear(x.shape[1], 32), nn.GELU(), nn.Linear(32, num_classes))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * (len(y) // 32))
    grain = torchgrain.GRAIN(model, **grain_kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for batch in order[: len(y) // 32 * 32].split(32):  # drop_last
            opt.zero_grad()
            losses = nn.functional.cross_entropy(model(x[batch]), y[batch], reduction="none")
            if "grouping" in grain_kwargs and grain_kwargs["grouping"] == "key":
                stats = grain.backward(losses, keys=y[batch])
            else:
                stats = grain.backward(losses)
            assert float(stats.min_inner) >= float(stats.d_norm) ** 2 * (1 - 1e-4) - 1e-12
            opt.step()
            sched.step()
    return model


@pytest.mark.parametrize(
    "grain_kwargs",
    [{"num_groups": 4, "grouping": "random", "seed": 0}, {"grouping": "key"}],
    ids=["random4", "by_label"],
)
def test_breast_cancer_classification(grain_kwargs) -> None:  # type: ignore[no-untyped-def]
    train, (x_test, y_test) = _split(datasets.load_breast_cancer)
    model = _fit(train, 2, epochs=5, grain_kwargs=grain_kwargs)
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean()
    assert float(accuracy) >= 0.93


def test_wine_classification_eight_groups() -> None:
    train, (x_test, y_test) = _split(datasets.load_wine)
    model = _fit(train, 3, epochs=20, grain_kwargs={"num_groups": 8})
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean()
    assert float(accuracy) >= 0.9
