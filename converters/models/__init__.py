"""One module per architecture; importing this package registers all of them.

To add an architecture, write ``converters/models/<name>.py`` (see ``qwen3.py``) and add
its import here; then extend ``CASES`` (and ``TP_CASES`` / ``TP_ENGINES``) in ``tests/helpers.py``.
"""

from converters.models import gemma2, gemma4, llama, qwen2, qwen3, qwen3_moe  # noqa: F401  (registration)
