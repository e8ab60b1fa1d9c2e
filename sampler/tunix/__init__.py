"""Tunix integration: ``SglangJaxRollout`` for Tunix's ``RLCluster`` (``rollout``), the
sampler/trainer mismatch measured inside it (``mismatch``) and corrected by truncated
importance sampling (``truncated_is``), Tunix's ``SglangJaxConfig`` and
rollout config mapped onto ``SamplerConfig`` (``config``), and Tunix trainers built from the
directory the engine serves (``models``).

``sampler.tunix.rollout``, ``mismatch`` and ``truncated_is`` import ``tunix.rl`` (slow); importing
this package alone does not.
"""

import importlib
from typing import Any

#: Public name -> the module of this package that defines it (imported on first use).
_LAZY = {
    "SglangJaxRollout": "rollout",
    "SyncRecord": "rollout",
    "MismatchMonitor": "mismatch",
    "StepMismatch": "mismatch",
    "measure_mismatch": "mismatch",
    "TruncatedISGRPOLearner": "truncated_is",
    "truncated_is_weights": "truncated_is",
    "load_tunix_model": "models",
    "random_tunix_model": "models",
    "tunix_model_config": "models",
    "check_trainer": "models",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)


__all__ = sorted(_LAZY)
