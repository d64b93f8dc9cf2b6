"""Progress bars (tqdm) for the long loops, or nothing with ``--no-progress``."""

from __future__ import annotations

from typing import Any


class _NoBar:
    """A bar that shows nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def bar(items: Any, progress: bool, desc: str, leave: bool = True) -> Any:
    """A tqdm bar over ``len(items)`` steps, or a silent stand-in when ``progress`` is False."""
    if not progress:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=len(items), desc=desc, leave=leave, dynamic_ncols=True)
