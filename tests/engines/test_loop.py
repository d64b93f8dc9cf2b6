"""The reference engine on its own: Gram and combination against hand-computed gradients."""

from __future__ import annotations

import torch

from torchgrain.engines import GroupIndex, LoopEngine

SAMPLES = GroupIndex.build(torch.tensor([0, 1]), torch.tensor([1, 1]))  # each sample a group


def test_gram_and_combine_of_a_linear_model() -> None:
    # losses_i = <a_i, w> + b * c_i: the gradient of sample i is (a_i, c_i).
    w = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    a = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 1.0]], dtype=torch.float64)
    c = torch.tensor([1.0, -2.0], dtype=torch.float64)
    losses = a @ w + b * c  # (2,)
    engine = LoopEngine()
    gram = engine.gram(losses, SAMPLES, [w, b])
    F = torch.cat([a, c[:, None]], dim=1)  # (m, P)
    torch.testing.assert_close(gram, F @ F.T)
    assert engine.reached() == [True, True]
    d_w, d_b = engine.combine(torch.tensor([0.25, 0.75], dtype=torch.float64))
    torch.testing.assert_close(d_w, 0.25 * a[0] + 0.75 * a[1])
    torch.testing.assert_close(d_b, 0.25 * c[0] + 0.75 * c[1])


def test_unreached_parameter_is_reported_and_gets_none() -> None:
    used = torch.ones(2, requires_grad=True)
    unused = torch.ones(2, requires_grad=True)
    partly = torch.ones(2, requires_grad=True)
    losses = torch.stack([used.sum(), used.sum() + partly.sum()])  # group 0 does not reach `partly`
    engine = LoopEngine()
    gram = engine.gram(losses, SAMPLES, [used, unused, partly])
    torch.testing.assert_close(gram, torch.tensor([[2.0, 2.0], [2.0, 4.0]], dtype=torch.float64))
    assert engine.reached() == [True, False, True]
    _, d_unused, d_partly = engine.combine(torch.tensor([0.5, 0.5]))
    assert d_unused is None
    torch.testing.assert_close(d_partly, torch.full((2,), 0.5))
