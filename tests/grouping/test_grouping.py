"""Stage 1: group ids from batch size, seed or keys."""

from __future__ import annotations

import pytest
import torch

from torchgrain import contiguous_groups, key_groups, random_groups


@pytest.mark.parametrize(("B", "m"), [(1, 1), (8, 3), (10, 4), (7, 7), (33, 8), (128, 16)])
def test_contiguous_sizes_differ_by_at_most_one(B: int, m: int) -> None:
    ids = contiguous_groups(B, m)
    assert ids.shape == (B,) and ids.dtype == torch.int64
    sizes = torch.bincount(ids, minlength=m)
    assert sizes.shape == (m,) and int(sizes.min()) >= 1 and int(sizes.max() - sizes.min()) <= 1
    assert (ids.diff() >= 0).all()  # consecutive samples share groups


@pytest.mark.parametrize(("B", "m"), [(8, 3), (10, 4), (64, 8)])
def test_random_is_a_balanced_partition_and_seeded(B: int, m: int) -> None:
    a = random_groups(B, m, torch.Generator().manual_seed(7))
    b = random_groups(B, m, torch.Generator().manual_seed(7))
    c = random_groups(B, m, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(
        torch.bincount(a, minlength=m), torch.bincount(contiguous_groups(B, m), minlength=m)
    )


def test_key_groups_dense_ids_in_sorted_key_order() -> None:
    ids, m = key_groups(torch.tensor([5, -1, 5, 3, 3, 3]))
    assert m == 3 and ids.tolist() == [2, 0, 2, 1, 1, 1]
    ids, m = key_groups(torch.tensor([[0, 1], [1, 0], [0, 1]]))  # rows as keys
    assert m == 2 and ids.tolist() == [0, 1, 0]


@pytest.mark.parametrize("fn", [contiguous_groups, random_groups])
def test_more_groups_than_samples_is_an_error(fn) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(
        ValueError, match=r"num_groups=5 is larger than the batch size B=4.*drop_last"
    ):
        fn(4, 5)
    with pytest.raises(ValueError, match="num_groups must be >= 1, got 0"):
        fn(4, 0)


def test_key_groups_bad_input() -> None:
    with pytest.raises(TypeError, match="integers or bool"):
        key_groups(torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="one key per sample"):
        key_groups(torch.tensor(3))
