"""Pieces shared by the Llama-style dense decoders (Llama, Qwen2/2.5, Qwen3): their
converter tables, Tunix config fields and tiny random weights.

Engine layout (sglang-jax): linear weights (in, out); embeddings (V, H); norms (H,).
Tunix layout (tunix.models.{llama3,qwen2,qwen3}): q/k/v ``w`` (D, N, H), o ``w``
(N, H, D), mlp ``kernel`` (in, out), biases (N*H,), ``lm_head.w`` (D, V).
HF layout: flat names, linear weights (out, in).
Flax (linen) layout: HF-Flax / linen ports, kernels (in, out) like the engine; RMSNorm
"weight"; embeddings "embedding" (``layers_<i>`` and a leading "params" are normalised
by the registry before lookup).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from converters.ops import ExpandDims, MergeAxes, ReplicateKVHeads, Transpose
from converters.rules import LeafRule, Table
from converters.spec import ConfigGetter, head_dim_of

L = "model.layers.{}"
_T2 = (Transpose((1, 0)),)

# ---------------------------------------------------------------------- Tunix (nnx)
TUNIX_BASE: Table = (
    LeafRule("embedder.input_embedding", "model.embed_tokens.embedding"),
    LeafRule("final_norm.w", "model.norm.scale"),
    LeafRule("lm_head.w", "lm_head.embedding", _T2),
    LeafRule("layers.{}.input_layernorm.w", f"{L}.input_layernorm.scale"),
    LeafRule("layers.{}.post_attention_layernorm.w", f"{L}.post_attention_layernorm.scale"),
    LeafRule("layers.{}.attn.q_proj.w", f"{L}.self_attn.q_proj.weight", (MergeAxes(1, 3),)),
    LeafRule("layers.{}.attn.k_proj.w", f"{L}.self_attn.k_proj.weight", (ReplicateKVHeads(1), MergeAxes(1, 3))),
    LeafRule("layers.{}.attn.v_proj.w", f"{L}.self_attn.v_proj.weight", (ReplicateKVHeads(1), MergeAxes(1, 3))),
    LeafRule("layers.{}.attn.o_proj.w", f"{L}.self_attn.o_proj.weight", (MergeAxes(0, 2),)),
    LeafRule("layers.{}.mlp.gate_proj.kernel", f"{L}.mlp.gate_proj.weight"),
    LeafRule("layers.{}.mlp.up_proj.kernel", f"{L}.mlp.up_proj.weight"),
    LeafRule("layers.{}.mlp.down_proj.kernel", f"{L}.mlp.down_proj.weight"),
)
TUNIX_QKV_BIAS: Table = (
    LeafRule("layers.{}.attn.q_bias", f"{L}.self_attn.q_proj.bias"),
    LeafRule("layers.{}.attn.k_bias", f"{L}.self_attn.k_proj.bias", (ReplicateKVHeads(0, merged=True),)),
    LeafRule("layers.{}.attn.v_bias", f"{L}.self_attn.v_proj.bias", (ReplicateKVHeads(0, merged=True),)),
)
TUNIX_QK_NORM: Table = (
    LeafRule("layers.{}.attn.q_norm.w", f"{L}.self_attn.q_norm.scale"),
    LeafRule("layers.{}.attn.k_norm.w", f"{L}.self_attn.k_norm.scale"),
)

# LoRA adapters (qwix on Tunix models; scale alpha/rank is the engine's lora_scaling) into
# sglang-jax static LoRA buffers: A (1, r, in), B (1, out, r). Tunix: a (in, r) / b (r, out),
# attention b (r, N, H), o_proj a (N, H, r). Optional: an engine built with LoRA on more
# modules than the trainer adapts keeps zeros in the others.
_TE = (Transpose((1, 0)), ExpandDims(0))
_KV = (ReplicateKVHeads(1), MergeAxes(1, 3))
TUNIX_LORA: Table = (
    LeafRule("layers.{}.attn.q_proj.w_lora_a", f"{L}.self_attn.q_proj.A_buffer", _TE, optional=True),
    LeafRule(
        "layers.{}.attn.q_proj.w_lora_b", f"{L}.self_attn.q_proj.B_buffer", (MergeAxes(1, 3),) + _TE, optional=True
    ),
    LeafRule("layers.{}.attn.k_proj.w_lora_a", f"{L}.self_attn.k_proj.A_buffer", _TE, optional=True),
    LeafRule("layers.{}.attn.k_proj.w_lora_b", f"{L}.self_attn.k_proj.B_buffer", _KV + _TE, optional=True),
    LeafRule("layers.{}.attn.v_proj.w_lora_a", f"{L}.self_attn.v_proj.A_buffer", _TE, optional=True),
    LeafRule("layers.{}.attn.v_proj.w_lora_b", f"{L}.self_attn.v_proj.B_buffer", _KV + _TE, optional=True),
    LeafRule(
        "layers.{}.attn.o_proj.w_lora_a", f"{L}.self_attn.o_proj.A_buffer", (MergeAxes(0, 2),) + _TE, optional=True
    ),
    LeafRule("layers.{}.attn.o_proj.w_lora_b", f"{L}.self_attn.o_proj.B_buffer", _TE, optional=True),
    LeafRule("layers.{}.mlp.gate_proj.kernel_lora_a", f"{L}.mlp.gate_proj.A_buffer", _TE, optional=True),
    LeafRule("layers.{}.mlp.gate_proj.kernel_lora_b", f"{L}.mlp.gate_proj.B_buffer", _TE, optional=True),
    LeafRule("layers.{}.mlp.up_proj.kernel_lora_a", f"{L}.mlp.up_proj.A_buffer", _TE, optional=True),
    LeafRule("layers.{}.mlp.up_proj.kernel_lora_b", f"{L}.mlp.up_proj.B_buffer", _TE, optional=True),
    LeafRule("layers.{}.mlp.down_proj.kernel_lora_a", f"{L}.mlp.down_proj.A_buffer", _TE, optional=True),
    LeafRule("layers.{}.mlp.down_proj.kernel_lora_b", f"{L}.mlp.down_proj.B_buffer", _TE, optional=True),
)

# ---------------------------------------------------------------------- HF (torch layout)
_TK = (Transpose((1, 0)), ReplicateKVHeads(1, merged=True))
HF_BASE: Table = (
    LeafRule("model.embed_tokens.weight", "model.embed_tokens.embedding"),
    LeafRule("model.norm.weight", "model.norm.scale"),
    LeafRule("lm_head.weight", "lm_head.embedding"),
    LeafRule("model.layers.{}.input_layernorm.weight", f"{L}.input_layernorm.scale"),
    LeafRule("model.layers.{}.post_attention_layernorm.weight", f"{L}.post_attention_layernorm.scale"),
    LeafRule("model.layers.{}.self_attn.q_proj.weight", f"{L}.self_attn.q_proj.weight", _T2),
    LeafRule("model.layers.{}.self_attn.k_proj.weight", f"{L}.self_attn.k_proj.weight", _TK),
    LeafRule("model.layers.{}.self_attn.v_proj.weight", f"{L}.self_attn.v_proj.weight", _TK),
    LeafRule("model.layers.{}.self_attn.o_proj.weight", f"{L}.self_attn.o_proj.weight", _T2),
    LeafRule("model.layers.{}.mlp.gate_proj.weight", f"{L}.mlp.gate_proj.weight", _T2),
    LeafRule("model.layers.{}.mlp.up_proj.weight", f"{L}.mlp.up_proj.weight", _T2),
    LeafRule("model.layers.{}.mlp.down_proj.weight", f"{L}.mlp.down_proj.weight", _T2),
)
_BIAS_KV = (ReplicateKVHeads(0, merged=True),)
HF_QKV_BIAS: Table = (
    LeafRule("model.layers.{}.self_attn.q_proj.bias", f"{L}.self_attn.q_proj.bias"),
    LeafRule("model.layers.{}.self_attn.k_proj.bias", f"{L}.self_attn.k_proj.bias", _BIAS_KV),
    LeafRule("model.layers.{}.self_attn.v_proj.bias", f"{L}.self_attn.v_proj.bias", _BIAS_KV),
)
HF_QK_NORM: Table = (
    LeafRule("model.layers.{}.self_attn.q_norm.weight", f"{L}.self_attn.q_norm.scale"),
    LeafRule("model.layers.{}.self_attn.k_norm.weight", f"{L}.self_attn.k_norm.scale"),
)

# ---------------------------------------------------------------------- Flax (linen)
_K = (ReplicateKVHeads(1, merged=True),)
FLAX_BASE: Table = (
    LeafRule("model.embed_tokens.embedding", "model.embed_tokens.embedding"),
    LeafRule("model.norm.weight", "model.norm.scale"),
    LeafRule("lm_head.kernel", "lm_head.embedding", _T2),
    LeafRule("model.layers.{}.input_layernorm.weight", f"{L}.input_layernorm.scale"),
    LeafRule("model.layers.{}.post_attention_layernorm.weight", f"{L}.post_attention_layernorm.scale"),
    LeafRule("model.layers.{}.self_attn.q_proj.kernel", f"{L}.self_attn.q_proj.weight"),
    LeafRule("model.layers.{}.self_attn.k_proj.kernel", f"{L}.self_attn.k_proj.weight", _K),
    LeafRule("model.layers.{}.self_attn.v_proj.kernel", f"{L}.self_attn.v_proj.weight", _K),
    LeafRule("model.layers.{}.self_attn.o_proj.kernel", f"{L}.self_attn.o_proj.weight"),
    LeafRule("model.layers.{}.mlp.gate_proj.kernel", f"{L}.mlp.gate_proj.weight"),
    LeafRule("model.layers.{}.mlp.up_proj.kernel", f"{L}.mlp.up_proj.weight"),
    LeafRule("model.layers.{}.mlp.down_proj.kernel", f"{L}.mlp.down_proj.weight"),
)
FLAX_QKV_BIAS: Table = (
    LeafRule("model.layers.{}.self_attn.q_proj.bias", f"{L}.self_attn.q_proj.bias"),
    LeafRule("model.layers.{}.self_attn.k_proj.bias", f"{L}.self_attn.k_proj.bias", _BIAS_KV),
    LeafRule("model.layers.{}.self_attn.v_proj.bias", f"{L}.self_attn.v_proj.bias", _BIAS_KV),
)
FLAX_QK_NORM: Table = (
    LeafRule("model.layers.{}.self_attn.q_norm.weight", f"{L}.self_attn.q_norm.scale"),
    LeafRule("model.layers.{}.self_attn.k_norm.weight", f"{L}.self_attn.k_norm.scale"),
)


def decoder_tables(*, qk_norm: bool) -> dict[str, Table]:
    """The tunix, hf and flax tables of a dense decoder (q/k/v biases are optional leaves:
    Qwen2 always has them, Llama and Qwen3 when the HF config sets ``attention_bias``)."""
    return {
        "tunix": TUNIX_BASE + TUNIX_QKV_BIAS + (TUNIX_QK_NORM if qk_norm else ()) + TUNIX_LORA,
        "hf": HF_BASE + HF_QKV_BIAS + (HF_QK_NORM if qk_norm else ()),
        "flax": FLAX_BASE + FLAX_QKV_BIAS + (FLAX_QK_NORM if qk_norm else ()),
    }


def tunix_config(get: ConfigGetter) -> dict[str, Any]:
    """Fields of a Tunix Llama3 / Qwen2 / Qwen3 ``ModelConfig`` from the HF config."""
    heads = get("num_attention_heads")
    return dict(
        num_layers=get("num_hidden_layers"),
        vocab_size=get("vocab_size"),
        embed_dim=get("hidden_size"),
        hidden_dim=get("intermediate_size"),
        num_heads=heads,
        head_dim=head_dim_of(get),
        num_kv_heads=get("num_key_value_heads") or heads,
        rope_theta=int(get("rope_theta", 10000)),
        norm_eps=get("rms_norm_eps", 1e-6),
    )


def tiny_config_fields(
    *,
    vocab_size: int = 384,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    tie_word_embeddings: bool = True,
    dtype: str = "bfloat16",
    eos_token_id: int = 1,
    pad_token_id: int = 0,
    max_position_embeddings: int = 1024,
    # Qwen3's own value (Tunix's presets use it; tests that need another set it explicitly)
    rope_theta: float = 1_000_000.0,
    **extra: Any,
) -> dict[str, Any]:
    """transformers config keyword arguments shared by the tiny dense decoders."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        torch_dtype=dtype,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=None,
        rms_norm_eps=1e-6,
        rope_theta=rope_theta,
        **extra,
    )


def numpy_dtype(config: Any):
    import ml_dtypes

    name = str(getattr(config, "torch_dtype", None) or config.dtype).replace("torch.", "")
    return np.dtype({"bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float16": np.float16}[name])


def tiny_weights(
    config: Any, rng: np.random.Generator, scale: float, *, qkv_bias: bool, qk_norm: bool
) -> dict[str, np.ndarray]:
    """Random weights of a dense decoder under HF names, torch layout, the config's dtype."""
    dtype = numpy_dtype(config)
    hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    inter = config.intermediate_size

    def mat(*shape, s=scale):
        return (rng.standard_normal(shape) * s).astype(dtype)

    def norm(n):
        return (1.0 + rng.standard_normal(n) * 0.1).astype(dtype)

    w = {"model.embed_tokens.weight": mat(config.vocab_size, hidden, s=0.1), "model.norm.weight": norm(hidden)}
    if not config.tie_word_embeddings:
        w["lm_head.weight"] = mat(config.vocab_size, hidden, s=0.1)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = mat(heads * head_dim, hidden)
        w[p + "self_attn.k_proj.weight"] = mat(kv_heads * head_dim, hidden)
        w[p + "self_attn.v_proj.weight"] = mat(kv_heads * head_dim, hidden)
        w[p + "self_attn.o_proj.weight"] = mat(hidden, heads * head_dim)
        if qkv_bias:
            w[p + "self_attn.q_proj.bias"] = mat(heads * head_dim, s=0.2)
            w[p + "self_attn.k_proj.bias"] = mat(kv_heads * head_dim, s=0.2)
            w[p + "self_attn.v_proj.bias"] = mat(kv_heads * head_dim, s=0.2)
        if qk_norm:
            w[p + "self_attn.q_norm.weight"] = norm(head_dim)
            w[p + "self_attn.k_norm.weight"] = norm(head_dim)
        w[p + "mlp.gate_proj.weight"] = mat(inter, hidden)
        w[p + "mlp.up_proj.weight"] = mat(inter, hidden)
        w[p + "mlp.down_proj.weight"] = mat(hidden, inter)
        w[p + "input_layernorm.weight"] = norm(hidden)
        w[p + "post_attention_layernorm.weight"] = norm(hidden)
    return w
