"""Doctest collection over ``src/torchgrain``: skip the integrations whose library is absent.

``torchgrain.integrations.hf`` and ``.lightning`` import ``transformers`` / ``lightning`` at the
top (the package itself never imports them); without the ``hf`` / ``lightning`` extras their
doctests cannot run, so they are not collected.
"""

from __future__ import annotations

import importlib.util

collect_ignore = [
    f"src/torchgrain/integrations/{module}.py"
    for module, needs in (
        ("hf", "transformers"),
        ("lightning", "lightning"),
    )
    if importlib.util.find_spec(needs) is None
]
