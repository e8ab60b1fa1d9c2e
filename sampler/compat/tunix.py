"""Workarounds for google-tunix behaviour, each with a test in ``tests/test_compat.py``
that fails once it is no longer needed."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger(__name__)

TUNIX_VERSION = "0.1.7"
TUNIX_FIXED_ROPE_THETA = 1_000_000
#: Tunix's Gemma (1/2) attention calls ``apply_rope`` with its default max_wavelength.
TUNIX_GEMMA_ROPE_THETA = 10_000
#: The rope_theta each Tunix model class uses whatever its config says.
TUNIX_ROPE_THETA = {
    "Qwen3ForCausalLM": TUNIX_FIXED_ROPE_THETA,
    "Qwen3MoeForCausalLM": TUNIX_FIXED_ROPE_THETA,
    "LlamaForCausalLM": TUNIX_FIXED_ROPE_THETA,
    "Gemma2ForCausalLM": TUNIX_GEMMA_ROPE_THETA,
}


def warn_tunix_rope_theta(architecture: str, rope_theta: float) -> bool:
    """Tunix 0.1.7's Qwen3 (dense and MoE) and Llama3 attention call ``apply_rope`` without the
    config's rope_theta, so they always use 1e6 (Gemma: 1e4). A trainer built from such a model
    computes other logprobs than the engine (which follows the HF config) unless rope_theta is
    that value (Qwen3's own; Llama 3 uses 5e5). Returns True when it warned."""
    fixed = TUNIX_ROPE_THETA.get(architecture)
    if fixed is not None and float(rope_theta) != fixed:
        logger.warning(
            "rope_theta=%s: Tunix %s's %s ignores it and uses %s, so trainer and engine logprobs will differ",
            rope_theta,
            TUNIX_VERSION,
            architecture,
            fixed,
        )
        return True
    return False


def warn_tunix_query_scale(hf_config: Mapping[str, Any]) -> bool:
    """Tunix 0.1.7's Gemma scales queries by ``head_dim**-0.5`` and has no
    ``query_pre_attn_scalar`` (tunix/models/gemma/model.py:420); the engine and HF use
    ``query_pre_attn_scalar**-0.5``. Equal for Gemma 2 2B/9B (256 = head_dim), not for 27B
    (144 vs 128). Returns True when it warned."""
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // hf_config["num_attention_heads"]
    scalar = hf_config.get("query_pre_attn_scalar", head_dim)
    if scalar != head_dim:
        logger.warning(
            "query_pre_attn_scalar=%s: Tunix %s's Gemma scales queries by head_dim=%s instead, so trainer "
            "and engine logprobs will differ",
            scalar,
            TUNIX_VERSION,
            head_dim,
        )
        return True
    return False


def warn_tunix_moe_routing(hf_config: Mapping[str, Any]) -> bool:
    """Tunix 0.1.7's Qwen3 MoE layer always renormalises the top-k routing weights
    (tunix/models/qwen3/model.py:741) and makes every layer an MoE layer; the engine follows
    ``norm_topk_prob`` and ``mlp_only_layers``. Returns True when it warned."""
    problems = []
    if not hf_config.get("norm_topk_prob", False):
        problems.append("norm_topk_prob=False (Tunix renormalises the top-k weights anyway)")
    if hf_config.get("mlp_only_layers"):
        problems.append(f"mlp_only_layers={hf_config['mlp_only_layers']} (Tunix has no dense layers)")
    if problems:
        logger.warning(
            "Tunix %s's Qwen3-MoE differs from the engine for this model: %s; trainer and engine logprobs will differ",
            TUNIX_VERSION,
            "; ".join(problems),
        )
        return True
    return False
