"""The public API in one place: every name in ``torchgrain.__all__`` exists, the integrations are
found under ``torchgrain.integrations`` without importing their libraries up front, and a missing
extra names the install command."""

from __future__ import annotations

import subprocess
import sys

import pytest

import torchgrain


def test_every_public_name_exists() -> None:
    for name in torchgrain.__all__:
        assert getattr(torchgrain, name) is not None, name
    assert {"GRAIN", "LocalSGD", "Aggregator", "register_rule", "register_aggregator"} <= set(
        torchgrain.__all__
    )


def test_importing_torchgrain_imports_no_integration_library() -> None:
    code = (
        "import sys, torchgrain; print('transformers' in sys.modules, 'lightning' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]


def test_integrations_are_found_where_users_look() -> None:
    from torchgrain.integrations import GrainTrainer, grain_step
    from torchgrain.integrations.hf import GrainTrainer as hf_trainer
    from torchgrain.integrations.lightning import grain_step as lightning_step

    assert GrainTrainer is hf_trainer and grain_step is lightning_step
    with pytest.raises(AttributeError, match="has no attribute 'Trainer'"):
        torchgrain.integrations.Trainer  # noqa: B018


def test_a_missing_extra_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torchgrain.integrations.hf", raising=False)
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"needs transformers: pip install 'torchgrain\[hf\]'"):
        torchgrain.integrations.GrainTrainer  # noqa: B018
