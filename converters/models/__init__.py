"""One module per architecture; importing this package registers all of them.

To add an architecture, write ``converters/models/<name>.py`` (see ``qwen3.py``) and add
its import here; then extend ``CASES`` in ``tests/helpers.py``.
"""

from converters.models import llama, qwen2, qwen3  # noqa: F401  (registration)
