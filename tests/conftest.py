"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``@pytest.mark.slow`` run only with ``TORCHGRAIN_SLOW=1``."""
    if os.environ.get("TORCHGRAIN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow test: set TORCHGRAIN_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def float64() -> Iterator[None]:
    """Run the test with float64 as torch's default dtype (exact comparisons)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
