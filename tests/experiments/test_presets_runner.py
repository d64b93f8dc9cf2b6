"""Presets and method names: the choices, and errors that name them."""

from __future__ import annotations

import pytest

from torchgrain.experiments.presets import PRESETS, TASKS, size_of
from torchgrain.experiments.runner import Method


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("task", TASKS)
def test_every_preset_sizes_every_task(preset, task):
    size = size_of(preset, task)
    assert size.train >= size.batch >= 8  # at least one full batch, room for 8 groups
    assert size.seeds >= 2


def test_unknown_preset_or_task_names_the_choices():
    with pytest.raises(ValueError, match="smoke"):
        size_of("huge", "regression")
    with pytest.raises(ValueError, match="classification"):
        size_of("smoke", "ranking")


@pytest.mark.parametrize(
    ("name", "groups", "rescaled", "aggregator"),
    [
        ("mean", None, False, "min_norm"),
        ("grain-m8", 8, False, "min_norm"),
        ("grain-m4-rescaled", 4, True, "min_norm"),
        ("dualproj-m8", 8, False, "dual_proj"),
        ("upgrad-m2", 2, False, "upgrad"),
        ("cagrad-m8-rescaled", 8, True, "cagrad"),
    ],
)
def test_method_names_parse(name, groups, rescaled, aggregator):
    method = Method.parse(name)
    assert (method.groups, method.rescaled, method.aggregator) == (groups, rescaled, aggregator)


@pytest.mark.parametrize(
    "name", ["grain", "grain-m0", "mgda", "grain-m8-scaled", "dual_proj-m8", "upgrad"]
)
def test_bad_method_name_says_what_is_accepted(name):
    with pytest.raises(ValueError, match="grain-m<m>"):
        Method.parse(name)


def test_bench_passes_its_options_to_the_step_benchmark(capfd):
    from torchgrain.experiments.cli import main

    with pytest.raises(SystemExit) as help_exit:  # the subcommand's own help
        main(["bench", "--help"])
    assert help_exit.value.code == 0
    assert main(["bench", "--only", "plain", "--bogus"]) == 2  # step.py's argparse rejects it
    assert "--bogus" in capfd.readouterr().err
