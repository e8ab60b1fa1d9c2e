"""Workarounds for google-tunix behaviour, each with a test in ``tests/test_compat.py``
that fails once it is no longer needed."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

TUNIX_VERSION = "0.1.7"
TUNIX_FIXED_ROPE_THETA = 1_000_000


def warn_tunix_rope_theta(architecture: str, rope_theta: float) -> bool:
    """Tunix 0.1.7's Qwen3 and Llama3 attention call ``apply_rope`` without the config's
    rope_theta, so they always use 1e6. A trainer built from such a model computes other
    logprobs than the engine (which follows the HF config) unless rope_theta is 1e6
    (Qwen3's own value; Llama 3 uses 5e5). Returns True when it warned."""
    if architecture in ("Qwen3ForCausalLM", "LlamaForCausalLM") and float(rope_theta) != TUNIX_FIXED_ROPE_THETA:
        logger.warning(
            "rope_theta=%s: Tunix %s's %s ignores it and uses %s, so trainer and engine logprobs will differ",
            rope_theta,
            TUNIX_VERSION,
            architecture,
            TUNIX_FIXED_ROPE_THETA,
        )
        return True
    return False
