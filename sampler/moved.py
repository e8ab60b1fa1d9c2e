"""Old module paths of the library, kept for one release (see CHANGELOG.md): each is a thin
module that re-exports its new home and warns once on import."""

from __future__ import annotations

import warnings


def warn(old: str, new: str) -> None:
    """Tell whoever imported ``old`` where it lives now."""
    warnings.warn(f"{old} moved to {new}; the old path works until the next release", DeprecationWarning, stacklevel=3)
