"""One declarative table per architecture and source format.

A rule maps a source key pattern to an engine key pattern (``{}`` stands for the
layer number) and lists the layout ops between them. Dtype casts and resharding
are not in the table: the plan adds them by comparing each source leaf with the
engine leaf it feeds.

Engine layout (sglang-jax): linear weights (in, out); embeddings (V, H); norms (H,).
Tunix layout (tunix.models.{llama3,qwen2,qwen3}): q/k/v ``w`` (D, N, H), o ``w``
(N, H, D), mlp ``kernel`` (in, out), biases (N*H,), ``lm_head.w`` (D, V).
"""

from __future__ import annotations

import dataclasses

from converters.ops import ExpandDims, MergeAxes, Op, ReplicateKVHeads, Transpose


@dataclasses.dataclass(frozen=True)
class LeafRule:
    source: str
    target: str
    ops: tuple[Op, ...] = ()


Table = tuple[LeafRule, ...]

_L = "model.layers.{}"

# ---------------------------------------------------------------------- Tunix (nnx)
TUNIX_BASE: Table = (
    LeafRule("embedder.input_embedding", "model.embed_tokens.embedding"),
    LeafRule("final_norm.w", "model.norm.scale"),
    LeafRule("lm_head.w", "lm_head.embedding", (Transpose((1, 0)),)),
    LeafRule("layers.{}.input_layernorm.w", f"{_L}.input_layernorm.scale"),
    LeafRule("layers.{}.post_attention_layernorm.w", f"{_L}.post_attention_layernorm.scale"),
    LeafRule("layers.{}.attn.q_proj.w", f"{_L}.self_attn.q_proj.weight", (MergeAxes(1, 3),)),
    LeafRule("layers.{}.attn.k_proj.w", f"{_L}.self_attn.k_proj.weight", (ReplicateKVHeads(1), MergeAxes(1, 3))),
    LeafRule("layers.{}.attn.v_proj.w", f"{_L}.self_attn.v_proj.weight", (ReplicateKVHeads(1), MergeAxes(1, 3))),
    LeafRule("layers.{}.attn.o_proj.w", f"{_L}.self_attn.o_proj.weight", (MergeAxes(0, 2),)),
    LeafRule("layers.{}.mlp.gate_proj.kernel", f"{_L}.mlp.gate_proj.weight"),
    LeafRule("layers.{}.mlp.up_proj.kernel", f"{_L}.mlp.up_proj.weight"),
    LeafRule("layers.{}.mlp.down_proj.kernel", f"{_L}.mlp.down_proj.weight"),
)
TUNIX_QKV_BIAS: Table = (
    LeafRule("layers.{}.attn.q_bias", f"{_L}.self_attn.q_proj.bias"),
    LeafRule("layers.{}.attn.k_bias", f"{_L}.self_attn.k_proj.bias", (ReplicateKVHeads(0, merged=True),)),
    LeafRule("layers.{}.attn.v_bias", f"{_L}.self_attn.v_proj.bias", (ReplicateKVHeads(0, merged=True),)),
)
TUNIX_QK_NORM: Table = (
    LeafRule("layers.{}.attn.q_norm.w", f"{_L}.self_attn.q_norm.scale"),
    LeafRule("layers.{}.attn.k_norm.w", f"{_L}.self_attn.k_norm.scale"),
)

# LoRA adapters (qwix on Tunix models; scale alpha/rank is the engine's lora_scaling) into
# sglang-jax static LoRA buffers: A (1, r, in), B (1, out, r). Tunix: a (in, r) / b (r, out),
# attention b (r, N, H), o_proj a (N, H, r).
_T = (Transpose((1, 0)), ExpandDims(0))
TUNIX_LORA: Table = (
    LeafRule("layers.{}.attn.q_proj.w_lora_a", f"{_L}.self_attn.q_proj.A_buffer", _T),
    LeafRule("layers.{}.attn.q_proj.w_lora_b", f"{_L}.self_attn.q_proj.B_buffer", (MergeAxes(1, 3),) + _T),
    LeafRule("layers.{}.attn.k_proj.w_lora_a", f"{_L}.self_attn.k_proj.A_buffer", _T),
    LeafRule("layers.{}.attn.k_proj.w_lora_b", f"{_L}.self_attn.k_proj.B_buffer", (ReplicateKVHeads(1), MergeAxes(1, 3)) + _T),
    LeafRule("layers.{}.attn.v_proj.w_lora_a", f"{_L}.self_attn.v_proj.A_buffer", _T),
    LeafRule("layers.{}.attn.v_proj.w_lora_b", f"{_L}.self_attn.v_proj.B_buffer", (ReplicateKVHeads(1), MergeAxes(1, 3)) + _T),
    LeafRule("layers.{}.attn.o_proj.w_lora_a", f"{_L}.self_attn.o_proj.A_buffer", (MergeAxes(0, 2),) + _T),
    LeafRule("layers.{}.attn.o_proj.w_lora_b", f"{_L}.self_attn.o_proj.B_buffer", _T),
    LeafRule("layers.{}.mlp.gate_proj.kernel_lora_a", f"{_L}.mlp.gate_proj.A_buffer", _T),
    LeafRule("layers.{}.mlp.gate_proj.kernel_lora_b", f"{_L}.mlp.gate_proj.B_buffer", _T),
    LeafRule("layers.{}.mlp.up_proj.kernel_lora_a", f"{_L}.mlp.up_proj.A_buffer", _T),
    LeafRule("layers.{}.mlp.up_proj.kernel_lora_b", f"{_L}.mlp.up_proj.B_buffer", _T),
    LeafRule("layers.{}.mlp.down_proj.kernel_lora_a", f"{_L}.mlp.down_proj.A_buffer", _T),
    LeafRule("layers.{}.mlp.down_proj.kernel_lora_b", f"{_L}.mlp.down_proj.B_buffer", _T),
)

# Llama and Qwen3 take q/k/v biases when their HF config sets attention_bias.
LLAMA_TUNIX: Table = TUNIX_BASE + TUNIX_QKV_BIAS
QWEN2_TUNIX: Table = TUNIX_BASE + TUNIX_QKV_BIAS
QWEN3_TUNIX: Table = TUNIX_BASE + TUNIX_QKV_BIAS + TUNIX_QK_NORM


# ---------------------------------------------------------------------- HF (torch layout)
# Flat HF names as read from safetensors; linear weights (out, in).
_TK = (Transpose((1, 0)), ReplicateKVHeads(1, merged=True))
HF_BASE: Table = (
    LeafRule("model.embed_tokens.weight", "model.embed_tokens.embedding"),
    LeafRule("model.norm.weight", "model.norm.scale"),
    LeafRule("lm_head.weight", "lm_head.embedding"),
    LeafRule("model.layers.{}.input_layernorm.weight", f"{_L}.input_layernorm.scale"),
    LeafRule("model.layers.{}.post_attention_layernorm.weight", f"{_L}.post_attention_layernorm.scale"),
    LeafRule("model.layers.{}.self_attn.q_proj.weight", f"{_L}.self_attn.q_proj.weight", (Transpose((1, 0)),)),
    LeafRule("model.layers.{}.self_attn.k_proj.weight", f"{_L}.self_attn.k_proj.weight", _TK),
    LeafRule("model.layers.{}.self_attn.v_proj.weight", f"{_L}.self_attn.v_proj.weight", _TK),
    LeafRule("model.layers.{}.self_attn.o_proj.weight", f"{_L}.self_attn.o_proj.weight", (Transpose((1, 0)),)),
    LeafRule("model.layers.{}.mlp.gate_proj.weight", f"{_L}.mlp.gate_proj.weight", (Transpose((1, 0)),)),
    LeafRule("model.layers.{}.mlp.up_proj.weight", f"{_L}.mlp.up_proj.weight", (Transpose((1, 0)),)),
    LeafRule("model.layers.{}.mlp.down_proj.weight", f"{_L}.mlp.down_proj.weight", (Transpose((1, 0)),)),
)
HF_QKV_BIAS: Table = (
    LeafRule("model.layers.{}.self_attn.q_proj.bias", f"{_L}.self_attn.q_proj.bias"),
    LeafRule("model.layers.{}.self_attn.k_proj.bias", f"{_L}.self_attn.k_proj.bias", (ReplicateKVHeads(0, merged=True),)),
    LeafRule("model.layers.{}.self_attn.v_proj.bias", f"{_L}.self_attn.v_proj.bias", (ReplicateKVHeads(0, merged=True),)),
)
HF_QK_NORM: Table = (
    LeafRule("model.layers.{}.self_attn.q_norm.weight", f"{_L}.self_attn.q_norm.scale"),
    LeafRule("model.layers.{}.self_attn.k_norm.weight", f"{_L}.self_attn.k_norm.scale"),
)

# ---------------------------------------------------------------------- Flax (linen)
# Nested params of HF-Flax / linen ports: kernels (in, out) like the engine; RMSNorm
# "weight"; embeddings "embedding". ``layers_<i>`` and a leading "params" are normalised
# away by the registry before lookup.
_K = (ReplicateKVHeads(1, merged=True),)
FLAX_BASE: Table = (
    LeafRule("model.embed_tokens.embedding", "model.embed_tokens.embedding"),
    LeafRule("model.norm.weight", "model.norm.scale"),
    LeafRule("lm_head.kernel", "lm_head.embedding", (Transpose((1, 0)),)),
    LeafRule("model.layers.{}.input_layernorm.weight", f"{_L}.input_layernorm.scale"),
    LeafRule("model.layers.{}.post_attention_layernorm.weight", f"{_L}.post_attention_layernorm.scale"),
    LeafRule("model.layers.{}.self_attn.q_proj.kernel", f"{_L}.self_attn.q_proj.weight"),
    LeafRule("model.layers.{}.self_attn.k_proj.kernel", f"{_L}.self_attn.k_proj.weight", _K),
    LeafRule("model.layers.{}.self_attn.v_proj.kernel", f"{_L}.self_attn.v_proj.weight", _K),
    LeafRule("model.layers.{}.self_attn.o_proj.kernel", f"{_L}.self_attn.o_proj.weight"),
    LeafRule("model.layers.{}.mlp.gate_proj.kernel", f"{_L}.mlp.gate_proj.weight"),
    LeafRule("model.layers.{}.mlp.up_proj.kernel", f"{_L}.mlp.up_proj.weight"),
    LeafRule("model.layers.{}.mlp.down_proj.kernel", f"{_L}.mlp.down_proj.weight"),
)
FLAX_QKV_BIAS: Table = (
    LeafRule("model.layers.{}.self_attn.q_proj.bias", f"{_L}.self_attn.q_proj.bias"),
    LeafRule("model.layers.{}.self_attn.k_proj.bias", f"{_L}.self_attn.k_proj.bias", (ReplicateKVHeads(0, merged=True),)),
    LeafRule("model.layers.{}.self_attn.v_proj.bias", f"{_L}.self_attn.v_proj.bias", (ReplicateKVHeads(0, merged=True),)),
)
FLAX_QK_NORM: Table = (
    LeafRule("model.layers.{}.self_attn.q_norm.weight", f"{_L}.self_attn.q_norm.scale"),
    LeafRule("model.layers.{}.self_attn.k_norm.weight", f"{_L}.self_attn.k_norm.scale"),
)


def engine_layout(table: Table) -> Table:
    """The ``"sglang"`` format of an architecture: engine paths mapped to themselves."""
    return tuple(LeafRule(rule.target, rule.target) for rule in table)
