"""Gemma 2 (``Gemma2ForCausalLM``): sliding and global attention layers, four norms per
layer (stored w, applied 1 + w by HF, Tunix and the engine alike: no offset op), tied
embeddings (the engine never has an ``lm_head`` leaf). Tunix pairs it with
``tunix.models.gemma.Gemma`` (fused ``kv_einsum``, or ``qkv_einsum`` when every head has
its own KV head). No Flax layout exists for this family (transformers has Flax Gemma 1
only).
"""

from __future__ import annotations

from typing import Any

from converters.architecture import Architecture, TinyModel, TunixModel, register_architecture
from converters.models import decoder, gemma
from converters.rules import LeafRule, Table
from converters.spec import ConfigGetter, head_dim_of

NAME = "Gemma2ForCausalLM"
L = gemma.L

TUNIX: Table = (
    (
        LeafRule("embedder.input_embedding", "model.embed_tokens.embedding"),
        gemma.norm("final_norm.scale", "model.norm.weight"),
    )
    + tuple(gemma.norm(f"layers.{{}}.{tunix}.scale", f"{L}.{hf}.weight") for tunix, _, hf in gemma.LAYER_NORMS)
    + gemma.tunix_attention()
    + gemma.TUNIX_MLP
)
HF: Table = (
    LeafRule("model.embed_tokens.weight", "model.embed_tokens.embedding"),
    gemma.norm("model.norm.weight", "model.norm.weight"),
) + gemma.hf_layer("model.")


def _tunix_config(get: ConfigGetter) -> dict[str, Any]:
    return dict(
        num_layers=get("num_hidden_layers"),
        num_embed=get("vocab_size"),
        embed_dim=get("hidden_size"),
        hidden_dim=get("intermediate_size"),
        num_heads=get("num_attention_heads"),
        head_dim=head_dim_of(get),
        num_kv_heads=get("num_key_value_heads"),
        final_logit_softcap=get("final_logit_softcapping"),
        use_post_attn_norm=True,
        use_post_ffw_norm=True,
        attention_types=gemma.tunix_attention_types(get),
        attn_logits_soft_cap=get("attn_logit_softcapping"),
        sliding_window_size=get("sliding_window"),
    )


#: Tiny models' sliding window: shorter than the test prompts, so the sliding layers' mask matters.
TINY_SLIDING_WINDOW = 8


def tiny_config(
    *,
    head_dim: int = 128,
    hidden_size: int = 256,
    sliding_window: int = TINY_SLIDING_WINDOW,
    tie_word_embeddings: bool = True,
    **overrides: Any,
):
    """A small Gemma 2 config. ``query_pre_attn_scalar`` = head_dim, since Tunix scales queries
    by head_dim**-0.5 whatever the config says (see sampler.compat "tunix_query_pre_attn_scalar")."""
    import transformers

    fields = decoder.tiny_config_fields(hidden_size=hidden_size, tie_word_embeddings=tie_word_embeddings, **overrides)
    fields.update(rope_theta=overrides.get("rope_theta", 10_000.0))
    fields.setdefault("query_pre_attn_scalar", head_dim)
    cfg = transformers.Gemma2Config(
        head_dim=head_dim,
        sliding_window=sliding_window,
        hidden_activation="gelu_pytorch_tanh",
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
        **fields,
    )
    cfg.architectures = [NAME]
    return cfg


def tiny_weights(config, rng, scale):
    """Random Gemma 2 weights under HF names (norms around 0: Gemma 2 applies 1 + w)."""
    dtype = decoder.numpy_dtype(config)
    hidden, heads, kv_heads, head_dim = (
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    )
    inter = config.intermediate_size
    mat = lambda *shape: gemma.random_matrix(rng, dtype, scale, *shape)  # noqa: E731
    w = {
        "model.embed_tokens.weight": gemma.random_matrix(rng, dtype, gemma.EMBED_SCALE, config.vocab_size, hidden),
        "model.norm.weight": gemma.random_norm(rng, dtype, hidden, 0.0),
    }
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        for _, _, name in gemma.LAYER_NORMS:
            w[p + name + ".weight"] = gemma.random_norm(rng, dtype, hidden, 0.0)
        w[p + "self_attn.q_proj.weight"] = mat(heads * head_dim, hidden)
        w[p + "self_attn.k_proj.weight"] = mat(kv_heads * head_dim, hidden)
        w[p + "self_attn.v_proj.weight"] = mat(kv_heads * head_dim, hidden)
        w[p + "self_attn.o_proj.weight"] = mat(hidden, heads * head_dim)
        w[p + "mlp.gate_proj.weight"] = mat(inter, hidden)
        w[p + "mlp.up_proj.weight"] = mat(inter, hidden)
        w[p + "mlp.down_proj.weight"] = mat(hidden, inter)
    return w


ARCHITECTURE = register_architecture(
    Architecture(
        name=NAME,
        tables={"tunix": TUNIX, "hf": HF},
        tunix=TunixModel("tunix.models.gemma", "Gemma", _tunix_config, loader="params_safetensors"),
        tiny=TinyModel(tiny_config, tiny_weights),
        quirks=(
            "hybrid_swa_memory_on_cpu",
            "tunix_gemma_rope_theta",
            "tunix_no_rope_scaling",
            "tunix_query_pre_attn_scalar",
        ),
    )
)
