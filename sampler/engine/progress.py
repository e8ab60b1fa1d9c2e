"""Progress bars for long work (checkpoint loads, engine start-up) on a terminal."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


class _Quiet:
    """The no-op bar (not a terminal, or asked to be quiet)."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int, description: str, enabled: bool | None = None, *, unit: str = "leaf") -> Any:
    """A tqdm bar when ``enabled`` (None: only when stderr is a terminal), else a no-op."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return _Quiet()
    return tqdm(total=total, desc=description, unit=unit, leave=False)
