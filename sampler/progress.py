"""Progress bars for long work (checkpoint loads, engine start-up) on a terminal."""

from __future__ import annotations

import sys
from typing import Any


class _Quiet:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int, description: str, enabled: bool | None = None) -> Any:
    """A tqdm bar when ``enabled`` (None: only when stderr is a terminal), else a no-op."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return _Quiet()
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="leaf", leave=False)
