"""The catalog of registered architectures: name -> ``Architecture`` record.

It imports nothing of this package, so every module can look an architecture up (``spec``
does, when it reads a config) without an import circle; ``architecture.register_architecture``
fills it as each ``converters/models/<name>.py`` is imported.
"""

from __future__ import annotations

from typing import Any

_ARCHITECTURES: dict[str, Any] = {}


def add(name: str, record: Any) -> None:
    """Catalog ``record`` under ``name`` (once)."""
    if name in _ARCHITECTURES:
        raise ValueError(f"architecture {name!r} is already registered")
    _ARCHITECTURES[name] = record


def find_architecture(name: str) -> Any:
    """The ``Architecture`` registered as ``name``, or None."""
    return _ARCHITECTURES.get(name)


def get_architecture(name: str) -> Any:
    """The ``Architecture`` registered as ``name``; KeyError naming the known ones otherwise."""
    arch = _ARCHITECTURES.get(name)
    if arch is None:
        raise KeyError(f"unknown architecture {name!r}; registered: {sorted(_ARCHITECTURES)}")
    return arch


def architectures() -> list[str]:
    """Names of every registered architecture."""
    return sorted(_ARCHITECTURES)
