"""Per-sample losses: their mean is the library's mean-reduced loss; masking; bad shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from torchgrain import losses


def test_sequence_cross_entropy_mean_is_torch_mean():
    logits, labels = torch.randn(6, 4), torch.randint(0, 4, (6,))
    per = losses.cross_entropy(logits, labels)  # (B,)
    assert per.shape == (6,)
    torch.testing.assert_close(per.mean(), F.cross_entropy(logits, labels))


def test_token_cross_entropy_is_mean_over_counted_tokens():
    logits, labels = torch.randn(3, 5, 7), torch.randint(0, 7, (3, 5))
    labels[0, 3:] = -100
    per = losses.cross_entropy(logits, labels)
    for b in range(3):
        keep = labels[b] != -100
        torch.testing.assert_close(per[b], F.cross_entropy(logits[b][keep], labels[b][keep]))


def test_causal_lm_matches_hugging_face_shift_per_sequence():
    logits, labels = torch.randn(2, 6, 11), torch.randint(0, 11, (2, 6))
    labels[1, :2] = -100  # a prompt that is not scored
    per = losses.causal_lm(logits, labels)
    for b in range(2):
        expect = F.cross_entropy(logits[b, :-1], labels[b, 1:], ignore_index=-100)
        torch.testing.assert_close(per[b], expect)


def test_causal_lm_equal_lengths_mean_is_the_models_loss():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=20, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 20, (3, 7))
    out = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(losses.causal_lm(out.logits, ids).mean(), out.loss)


def test_sequence_without_counted_tokens_has_zero_loss_and_gradient():
    logits = torch.randn(2, 4, 5, requires_grad=True)
    labels = torch.full((2, 4), -100)
    labels[1] = torch.tensor([1, 2, 3, 4])
    per = losses.masked_lm(logits, labels)
    assert per[0].item() == 0.0
    (g,) = torch.autograd.grad(per[0], logits)
    assert torch.count_nonzero(g) == 0


def test_nan_at_a_padded_position_does_not_leak():
    token_losses = torch.tensor([[1.0, float("nan")], [2.0, 4.0]])  # (B, T)
    mask = torch.tensor([[True, False], [True, True]])
    assert losses.token_mean(token_losses, mask).tolist() == [1.0, 3.0]


def test_mse_accepts_one_output_head_and_multi_output():
    pred, y = torch.randn(5, 1), torch.randn(5)
    torch.testing.assert_close(losses.mse(pred, y), (pred.squeeze(1) - y) ** 2)
    pred, y = torch.randn(5, 3), torch.randn(5, 3)
    torch.testing.assert_close(losses.mse(pred, y).mean(), F.mse_loss(pred, y))


def test_binary_cross_entropy_mean_is_torch_mean():
    logits, y = torch.randn(4, 3), torch.randint(0, 2, (4, 3)).float()
    torch.testing.assert_close(
        losses.binary_cross_entropy(logits, y).mean(), F.binary_cross_entropy_with_logits(logits, y)
    )


def test_bf16_logits_give_float32_losses():
    logits = torch.randn(4, 3).bfloat16()
    assert losses.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).dtype == torch.float32


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: losses.cross_entropy(torch.randn(4, 3), torch.zeros(5, dtype=torch.long)), "B"),
        (lambda: losses.cross_entropy(torch.randn(4, 3), torch.zeros(4, 2).long()), r"\(B,\)"),
        (lambda: losses.mse(torch.randn(4, 2), torch.randn(4)), "same shape"),
        (lambda: losses.causal_lm(torch.randn(4, 3), torch.zeros(4, 3).long()), "vocab"),
        (lambda: losses.mse([1.0], torch.randn(1)), "tensors"),
        (lambda: losses.binary_cross_entropy(torch.randn(2, 3), torch.ones(2, 2)), "same shape"),
    ],
)
def test_bad_shapes_name_the_shapes(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
