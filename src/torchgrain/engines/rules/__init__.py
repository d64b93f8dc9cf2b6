"""Layer rules of the fused engine, one file per layer family; see ``_base`` for the interface.

Import order sets priority among the built-ins (later registrations are tried first)."""

from torchgrain.engines.rules import _conv, _embedding, _hf_conv1d, _linear, _rerun  # noqa: F401  (register)
from torchgrain.engines.rules._base import GroupGrad, Rows, Rule, find_rule, register_rule

__all__ = ["GroupGrad", "Rows", "Rule", "find_rule", "register_rule"]
