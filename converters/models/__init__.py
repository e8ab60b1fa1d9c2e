"""One module per architecture; importing this package imports (and so registers) every
module in it.

To add an architecture, write ``converters/models/<name>.py`` (see ``qwen3.py``): it is found
here by itself. Then extend ``CASES`` (and ``TP_CASES`` / ``TP_ENGINES``) in ``tests/helpers.py``.
"""

import importlib
import pkgutil

#: Every module of this package, imported in name order (shared-table modules register nothing).
MODULES = tuple(
    importlib.import_module(f"{__name__}.{info.name}")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name)
)
