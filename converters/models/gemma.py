"""Pieces shared by the Gemma families (Gemma 2, Gemma 4): Tunix's einsum attention
layouts, the engine's float32 norms, and tiny-model helpers.

Tunix (``tunix.models.gemma`` / ``gemma4``): ``q_einsum.w`` (N, H, D), fused
``kv_einsum.w`` (2, K, H, D), ``qkv_einsum.w`` (3, N, H, D) when N == K (Gemma 2),
``attn_vec_einsum.w`` (N, D, H); norms ``<name>.scale``.
Engine (sglang-jax): separate q/k/v/o linears (in, out); norms ``<name>.weight`` held in
float32 whatever the model dtype (GemmaRMSNorm).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from converters.ops import MergeAxes, ReplicateKVHeads, Take, Transpose
from converters.rules import LeafRule, Table

L = "model.layers.{}"
#: sglang-jax's GemmaRMSNorm keeps its weight in float32.
NORM_DTYPE = "float32"
#: (N, H, D) -> (H, N, D) -> (H, N*D): Tunix einsum heads to the engine's (in, out) linear.
HEADS_TO_LINEAR = (Transpose((1, 0, 2)), MergeAxes(1, 3))
KV_HEADS_TO_LINEAR = (Transpose((1, 0, 2)), ReplicateKVHeads(1), MergeAxes(1, 3))


def norm(source: str, target: str) -> LeafRule:
    return LeafRule(source, target, dtype=NORM_DTYPE)


def tunix_attention(*, replicate_kv: bool = True, fused_qkv: bool = True) -> Table:
    """Tunix einsum attention -> engine q/k/v/o. ``replicate_kv=False`` where the engine does
    not replicate KV heads (Gemma 4's sliding layers); ``fused_qkv``: also accept Gemma 2's
    ``qkv_einsum`` (N == K), an alternative source for q/k/v."""
    kv = KV_HEADS_TO_LINEAR if replicate_kv else HEADS_TO_LINEAR
    rules = [
        LeafRule("layers.{}.attn.q_einsum.w", f"{L}.self_attn.q_proj.weight", HEADS_TO_LINEAR),
        LeafRule("layers.{}.attn.kv_einsum.w", f"{L}.self_attn.k_proj.weight", (Take(0, 0),) + kv),
        LeafRule("layers.{}.attn.kv_einsum.w", f"{L}.self_attn.v_proj.weight", (Take(0, 1),) + kv),
        LeafRule("layers.{}.attn.attn_vec_einsum.w", f"{L}.self_attn.o_proj.weight", (MergeAxes(0, 2),)),
    ]
    if fused_qkv:
        rules += [
            LeafRule("layers.{}.attn.qkv_einsum.w", f"{L}.self_attn.q_proj.weight", (Take(0, 0),) + HEADS_TO_LINEAR),
            LeafRule("layers.{}.attn.qkv_einsum.w", f"{L}.self_attn.k_proj.weight", (Take(0, 1),) + kv),
            LeafRule("layers.{}.attn.qkv_einsum.w", f"{L}.self_attn.v_proj.weight", (Take(0, 2),) + kv),
        ]
    return tuple(rules)


TUNIX_MLP: Table = (
    LeafRule("layers.{}.mlp.gate_proj.kernel", f"{L}.mlp.gate_proj.weight"),
    LeafRule("layers.{}.mlp.up_proj.kernel", f"{L}.mlp.up_proj.weight"),
    LeafRule("layers.{}.mlp.down_proj.kernel", f"{L}.mlp.down_proj.weight"),
)

#: The four per-layer norms: (Tunix name in Gemma 2, in Gemma 4, HF/engine name).
LAYER_NORMS = (
    ("pre_attention_norm", "pre_attention_norm", "input_layernorm"),
    ("post_attn_norm", "post_attention_norm", "post_attention_layernorm"),
    ("pre_ffw_norm", "pre_ffw_norm", "pre_feedforward_layernorm"),
    ("post_ffw_norm", "post_ffw_norm", "post_feedforward_layernorm"),
)


def hf_layer(prefix: str, *, kv_layers: str | None = None, k_eq_v_layers: str | None = None) -> Table:
    """HF (torch layout) -> engine rules of one Gemma layer under ``prefix`` ("model." or
    "model.language_model."): norms, q/k/v/o and the dense MLP. Without ``k_eq_v_layers``
    k/v replicate KV heads like every dense decoder; with it (Gemma 4) only the k of those
    layers does, and the other layers' k/v (``kv_layers``) are taken as they are."""
    t2 = (Transpose((1, 0)),)
    tk = (Transpose((1, 0)), ReplicateKVHeads(1, merged=True))
    p = f"{prefix}layers.{{}}"
    rules = [norm(f"{p}.{hf}.weight", f"{L}.{hf}.weight") for _, _, hf in LAYER_NORMS]
    rules += [
        LeafRule(f"{p}.self_attn.q_proj.weight", f"{L}.self_attn.q_proj.weight", t2),
        LeafRule(f"{p}.self_attn.o_proj.weight", f"{L}.self_attn.o_proj.weight", t2),
        LeafRule(f"{p}.mlp.gate_proj.weight", f"{L}.mlp.gate_proj.weight", t2),
        LeafRule(f"{p}.mlp.up_proj.weight", f"{L}.mlp.up_proj.weight", t2),
        LeafRule(f"{p}.mlp.down_proj.weight", f"{L}.mlp.down_proj.weight", t2),
    ]
    if k_eq_v_layers is None:
        rules += [
            LeafRule(f"{p}.self_attn.k_proj.weight", f"{L}.self_attn.k_proj.weight", tk),
            LeafRule(f"{p}.self_attn.v_proj.weight", f"{L}.self_attn.v_proj.weight", tk),
        ]
    else:
        rules += [
            LeafRule(f"{p}.self_attn.k_proj.weight", f"{L}.self_attn.k_proj.weight", t2, layers=kv_layers),
            LeafRule(f"{p}.self_attn.k_proj.weight", f"{L}.self_attn.k_proj.weight", tk, layers=k_eq_v_layers),
            LeafRule(f"{p}.self_attn.v_proj.weight", f"{L}.self_attn.v_proj.weight", t2),
        ]
    return tuple(rules)


def random_matrix(rng: np.random.Generator, dtype, scale: float, *shape: int) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(dtype)


def random_norm(rng: np.random.Generator, dtype, n: int, center: float) -> np.ndarray:
    """Norm weights around ``center``: 0 for Gemma 2 (stored w, applied 1 + w), 1 for Gemma 4 (plain w)."""
    return (center + rng.standard_normal(n) * 0.1).astype(dtype)


#: Standard deviation of tiny Gemma embeddings: Gemma scales them by sqrt(hidden) and ties the
#: output head, so with larger ones the residual stream is the input token and the model only
#: repeats it (useless for tests).
EMBED_SCALE = 0.02


def layer_types(num_layers: int) -> list[str]:
    """Sliding and full attention alternating, sliding first (Gemma 2's default)."""
    return [("sliding_attention", "full_attention")[i % 2] for i in range(num_layers)]


def tunix_attention_types(get) -> tuple[Any, ...]:
    """``layer_types`` as Tunix ``AttentionType`` values (sliding or global)."""
    from tunix.models.gemma.model import AttentionType

    types = get("layer_types") or layer_types(get("num_hidden_layers"))
    return tuple(AttentionType.LOCAL_SLIDING if t == "sliding_attention" else AttentionType.GLOBAL for t in types)
