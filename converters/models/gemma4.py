"""Gemma 4 (``Gemma4ForCausalLM``), dense and MoE: sliding and full attention layers with
their own head dims and KV-head counts, q/k norms, a ``layer_scalar`` per layer, plain-w
norms (no 1 + w anywhere), optionally a routed-experts block beside the dense MLP
(``enable_moe_block``). The config keeps the language model in ``text_config``;
sglang-jax remaps it (``head_dim`` := ``global_head_dim``, ``num_key_value_heads`` :=
``num_global_key_value_heads``, the sliding values as ``swa_*``), and so does this
module's ``config_view``.

KV heads: the engine replicates (tp > heads) only the k of full layers that share k and v
(``attention_k_eq_v``); other layers' k/v are taken as they are, and the sampler refuses
tp > their KV heads (upstream cannot serve it).
Tunix (``tunix.models.gemma4.Gemma4``): einsum attention (``k_einsum`` on k_eq_v layers),
``skip_scale`` = ``layer_scalar``; MoE ``moe.gating_einsum`` (E, 2, I, H) holds gate and up
(1 -> 2 engine leaves), ``moe.linear`` (E, I, H) is the engine's ``experts.wo`` as is.
HF: names under ``model.language_model.`` (multimodal checkpoints; format "hf", the one
Tunix's loader reads) or ``model.`` (text-only; format "hf-text"); experts fused:
``experts.gate_up_proj`` (E, 2*I, H), gate rows first. No Flax layout exists.
"""

from __future__ import annotations

from typing import Any

from converters.architecture import Architecture, TinyModel, TunixModel, register_architecture
from converters.models import decoder, gemma
from converters.ops import SplitAxis, Take, Transpose
from converters.rules import LeafRule, Table
from converters.spec import TEXT_CONFIG, ConfigGetter

NAME = "Gemma4ForCausalLM"
L = gemma.L
#: sglang-jax's router projection (GateLogit) is float32.
ROUTER_DTYPE = "float32"
#: HF prefixes of the language model: multimodal checkpoints, text-only ones.
HF_PREFIXES = {"hf": "model.language_model.", "hf-text": "model."}
#: ModelSpec facts naming the layers whose k the engine treats differently.
K_EQ_V_LAYERS, KV_LAYERS = "k_eq_v_layers", "kv_layers"

_T2 = (Transpose((1, 0)),)
_T3 = (Transpose((0, 2, 1)),)
_MOE_NORMS = (
    ("dense_post_ffw_norm", "post_feedforward_layernorm_1"),
    ("moe_post_ffw_norm", "post_feedforward_layernorm_2"),
    ("moe_pre_ffw_norm", "pre_feedforward_layernorm_2"),
)

TUNIX: Table = (
    (
        LeafRule("embedder.input_embedding", "model.embed_tokens.embedding"),
        gemma.norm("final_norm.scale", "model.norm.weight"),
        LeafRule("layers.{}.skip_scale", f"{L}.layer_scalar"),
        gemma.norm("layers.{}.attn._query_norm.scale", f"{L}.self_attn.q_norm.weight"),
        gemma.norm("layers.{}.attn._key_norm.scale", f"{L}.self_attn.k_norm.weight"),
        # k_eq_v full layers: k only, KV heads replicated like the engine's loader does
        LeafRule("layers.{}.attn.k_einsum.w", f"{L}.self_attn.k_proj.weight", gemma.KV_HEADS_TO_LINEAR),
    )
    + tuple(gemma.norm(f"layers.{{}}.{tunix}.scale", f"{L}.{hf}.weight") for _, tunix, hf in gemma.LAYER_NORMS)
    + gemma.tunix_attention(replicate_kv=False, fused_qkv=False)
    + gemma.TUNIX_MLP
    + (
        LeafRule("layers.{}.moe.router_logits", f"{L}.router.proj.kernel", dtype=ROUTER_DTYPE),
        LeafRule("layers.{}.moe.router_scale", f"{L}.router.scale"),
        LeafRule("layers.{}.moe.per_expert_scale", f"{L}.router.per_expert_scale"),
        LeafRule("layers.{}.moe.gating_einsum", f"{L}.experts.wi_0", (Take(1, 0),) + _T3),
        LeafRule("layers.{}.moe.gating_einsum", f"{L}.experts.wi_1", (Take(1, 1),) + _T3),
        LeafRule("layers.{}.moe.linear", f"{L}.experts.wo"),
    )
    + tuple(gemma.norm(f"layers.{{}}.{tunix}.scale", f"{L}.{hf}.weight") for tunix, hf in _MOE_NORMS)
)


def hf_table(prefix: str) -> Table:
    p = f"{prefix}layers.{{}}"
    return (
        (
            LeafRule(f"{prefix}embed_tokens.weight", "model.embed_tokens.embedding"),
            gemma.norm(f"{prefix}norm.weight", "model.norm.weight"),
            LeafRule("lm_head.weight", "lm_head.embedding"),
            LeafRule(f"{p}.layer_scalar", f"{L}.layer_scalar"),
            gemma.norm(f"{p}.self_attn.q_norm.weight", f"{L}.self_attn.q_norm.weight"),
            gemma.norm(f"{p}.self_attn.k_norm.weight", f"{L}.self_attn.k_norm.weight"),
        )
        + gemma.hf_layer(prefix, kv_layers=KV_LAYERS, k_eq_v_layers=K_EQ_V_LAYERS)
        + (
            LeafRule(f"{p}.router.proj.weight", f"{L}.router.proj.kernel", _T2, dtype=ROUTER_DTYPE),
            LeafRule(f"{p}.router.scale", f"{L}.router.scale"),
            LeafRule(f"{p}.router.per_expert_scale", f"{L}.router.per_expert_scale"),
            LeafRule(f"{p}.experts.gate_up_proj", f"{L}.experts.wi_0", (SplitAxis(1, 2), Take(1, 0)) + _T3),
            LeafRule(f"{p}.experts.gate_up_proj", f"{L}.experts.wi_1", (SplitAxis(1, 2), Take(1, 1)) + _T3),
            LeafRule(f"{p}.experts.down_proj", f"{L}.experts.wo", _T3),
        )
        + tuple(gemma.norm(f"{p}.{hf}.weight", f"{L}.{hf}.weight") for _, hf in _MOE_NORMS)
    )


TABLES = {"tunix": TUNIX, **{fmt: hf_table(prefix) for fmt, prefix in HF_PREFIXES.items()}}

#: Fields sglang-jax reads from the top-level config rather than text_config.
_TOP_LEVEL = ("architectures", "torch_dtype", "dtype")


def config_view(get: ConfigGetter) -> ConfigGetter:
    """The config as sglang-jax's Gemma4Config presents it to the model (text_config first,
    full-attention head dim and KV heads as ``head_dim`` / ``num_key_value_heads``, the
    sliding ones as ``swa_head_dim`` / ``swa_num_key_value_heads``)."""
    text = get(TEXT_CONFIG)

    def raw(key: str, default: Any = None) -> Any:
        if text is None or key in _TOP_LEVEL:
            return get(key, default)
        value = text.get(key, default) if isinstance(text, dict) else getattr(text, key, default)
        return get(key, default) if value is None else value

    def view(key: str, default: Any = None) -> Any:
        swa_head_dim = raw("swa_head_dim") or raw("head_dim")
        swa_kv_heads = raw("swa_num_key_value_heads") or raw("num_key_value_heads")
        if key == "swa_head_dim":
            return swa_head_dim
        if key == "swa_num_key_value_heads":
            return swa_kv_heads
        if key == "head_dim":
            return raw("global_head_dim") or swa_head_dim
        if key == "num_key_value_heads":
            return raw("num_global_key_value_heads") or swa_kv_heads
        return raw(key, default)

    return view


def _layer_types(get: ConfigGetter) -> list[str]:
    return list(get("layer_types") or gemma.layer_types(get("num_hidden_layers")))


def spec_fields(get: ConfigGetter) -> dict[str, Any]:
    """Per-layer facts: which layers share k and v (full attention with attention_k_eq_v)."""
    types = _layer_types(get)
    k_eq_v = bool(get("attention_k_eq_v", False))
    shared = tuple(i for i, t in enumerate(types) if k_eq_v and t == "full_attention")
    return {
        K_EQ_V_LAYERS: shared,
        KV_LAYERS: tuple(i for i in range(len(types)) if i not in shared),
        "layer_types": tuple(types),
        "swa_head_dim": get("swa_head_dim"),
        "swa_num_key_value_heads": get("swa_num_key_value_heads"),
        "num_experts": int(get("num_experts") or 0) if get("enable_moe_block", False) else 0,
        "moe_intermediate_size": get("moe_intermediate_size"),
    }


def _tunix_config(get: ConfigGetter) -> dict[str, Any]:
    """Tunix Gemma4 ModelConfig fields (``get`` reads raw text_config fields: no remapping)."""
    from tunix.models.gemma4.model import AttentionType

    types = _layer_types(get)
    rope = get("rope_parameters") or {}
    sliding, full = rope.get("sliding_attention", {}), rope.get("full_attention", {})
    fields = dict(
        num_layers=get("num_hidden_layers"),
        num_embed=get("vocab_size"),
        embed_dim=get("hidden_size"),
        hidden_dim=get("intermediate_size"),
        num_heads=get("num_attention_heads"),
        head_dim=get("head_dim"),
        num_kv_heads=get("num_key_value_heads"),
        final_logit_softcap=get("final_logit_softcapping"),
        sliding_window_size=get("sliding_window"),
        global_key_size=get("global_head_dim") or get("head_dim"),
        num_global_kv_heads=get("num_global_key_value_heads"),
        k_eq_v_global=bool(get("attention_k_eq_v", False)),
        attention_pattern=tuple(
            AttentionType.LOCAL_SLIDING if t == "sliding_attention" else AttentionType.GLOBAL for t in types
        ),
        local_base_frequency=int(sliding.get("rope_theta", 10_000)),
        global_base_frequency=int(full.get("rope_theta", 1_000_000)),
        global_rope_proportion=float(full.get("partial_rotary_factor", 0.25)),
        local_rope_proportion=float(sliding.get("partial_rotary_factor", 1.0)),
    )
    if get("enable_moe_block", False):
        fields.update(
            enable_moe=True,
            num_experts=get("num_experts"),
            num_experts_per_tok=get("top_k_experts") or get("num_experts_per_tok"),
            expert_dim=get("moe_intermediate_size"),
            moe_dense_hidden_dim=get("intermediate_size"),
        )
    return fields


def _config_class():
    import transformers

    class Gemma4TinyConfig(transformers.PretrainedConfig):
        """A Gemma 4 config.json in transformers>=5's layout (transformers 4.57 has no Gemma 4),
        the one sglang-jax's own Gemma4Config reads."""

        model_type = "gemma4"

    return Gemma4TinyConfig


def tiny_config(
    *,
    vocab_size: int = 384,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    hidden_size: int = 256,
    intermediate_size: int = 256,
    head_dim: int = 128,
    global_head_dim: int | None = None,
    num_global_kv_heads: int | None = None,
    attention_k_eq_v: bool = False,
    sliding_window: int = 8,
    moe: bool = False,
    num_experts: int = 4,
    top_k_experts: int = 2,
    moe_intermediate_size: int = 64,
    tie_word_embeddings: bool = True,
    dtype: str = "bfloat16",
    eos_token_id: int = 1,
    pad_token_id: int = 0,
    max_position_embeddings: int = 1024,
):
    """A small Gemma 4 config (text-only fields; no per-layer embeddings, which sglang-jax
    does not implement). ``global_head_dim`` defaults to ``head_dim``: the CPU engine needs
    them equal."""
    text: dict[str, Any] = dict(
        model_type="gemma4_text",
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        global_head_dim=global_head_dim or head_dim,
        attention_k_eq_v=attention_k_eq_v,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        sliding_window=sliding_window,
        layer_types=gemma.layer_types(num_layers),
        final_logit_softcapping=30.0,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
        },
        hidden_size_per_layer_input=0,
        num_kv_shared_layers=0,
        use_double_wide_mlp=False,
        attention_bias=False,
        enable_moe_block=moe,
        tie_word_embeddings=tie_word_embeddings,
        torch_dtype=dtype,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    if num_global_kv_heads is not None:  # absent, not null: sglang-jax's remap reads null as 0 heads
        text["num_global_key_value_heads"] = num_global_kv_heads
    if moe:
        text.update(num_experts=num_experts, top_k_experts=top_k_experts, moe_intermediate_size=moe_intermediate_size)
    return _config_class()(
        architectures=[NAME],
        text_config=text,
        tie_word_embeddings=tie_word_embeddings,
        torch_dtype=dtype,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=None,
    )


def tiny_weights(config, rng, scale, *, prefix: str = HF_PREFIXES["hf"]):
    """Random Gemma 4 weights under HF names (norms around 1: plain w)."""
    t = config.text_config
    dtype = decoder.numpy_dtype(config)
    hidden, heads, inter = t["hidden_size"], t["num_attention_heads"], t["intermediate_size"]
    mat = lambda *shape: gemma.random_matrix(rng, dtype, scale, *shape)  # noqa: E731
    w = {
        prefix + "embed_tokens.weight": gemma.random_matrix(rng, dtype, gemma.EMBED_SCALE, t["vocab_size"], hidden),
        prefix + "norm.weight": gemma.random_norm(rng, dtype, hidden, 1.0),
    }
    if not t["tie_word_embeddings"]:
        w["lm_head.weight"] = gemma.random_matrix(rng, dtype, gemma.EMBED_SCALE, t["vocab_size"], hidden)
    for i, kind in enumerate(t["layer_types"]):
        full = kind == "full_attention"
        head_dim = t["global_head_dim"] if full else t["head_dim"]
        k_eq_v = full and t["attention_k_eq_v"]
        kv = t.get("num_global_key_value_heads") or t["num_key_value_heads"] if k_eq_v else t["num_key_value_heads"]
        p = f"{prefix}layers.{i}."
        w[p + "layer_scalar"] = (1.0 + rng.standard_normal(1) * 0.1).astype(dtype)
        for _, _, name in gemma.LAYER_NORMS:
            w[p + name + ".weight"] = gemma.random_norm(rng, dtype, hidden, 1.0)
        w[p + "self_attn.q_proj.weight"] = mat(heads * head_dim, hidden)
        w[p + "self_attn.k_proj.weight"] = mat(kv * head_dim, hidden)
        if not k_eq_v:
            w[p + "self_attn.v_proj.weight"] = mat(kv * head_dim, hidden)
        w[p + "self_attn.o_proj.weight"] = mat(hidden, heads * head_dim)
        w[p + "self_attn.q_norm.weight"] = gemma.random_norm(rng, dtype, head_dim, 1.0)
        w[p + "self_attn.k_norm.weight"] = gemma.random_norm(rng, dtype, head_dim, 1.0)
        w[p + "mlp.gate_proj.weight"] = mat(inter, hidden)
        w[p + "mlp.up_proj.weight"] = mat(inter, hidden)
        w[p + "mlp.down_proj.weight"] = mat(hidden, inter)
        if t["enable_moe_block"]:
            experts, expert_inter = t["num_experts"], t["moe_intermediate_size"]
            w[p + "router.proj.weight"] = gemma.random_matrix(rng, dtype, 0.2, experts, hidden)
            w[p + "router.scale"] = gemma.random_norm(rng, dtype, hidden, 1.0)
            w[p + "router.per_expert_scale"] = gemma.random_norm(rng, dtype, experts, 1.0)
            w[p + "experts.gate_up_proj"] = mat(experts, 2 * expert_inter, hidden)
            w[p + "experts.down_proj"] = mat(experts, hidden, expert_inter)
            for _, name in _MOE_NORMS:
                w[p + name + ".weight"] = gemma.random_norm(rng, dtype, hidden, 1.0)
    return w


ARCHITECTURE = register_architecture(
    Architecture(
        name=NAME,
        tables=TABLES,
        spec_fields=spec_fields,
        config_view=config_view,
        tunix=TunixModel("tunix.models.gemma4", "Gemma4", _tunix_config, loader="params_safetensors"),
        tiny=TinyModel(tiny_config, tiny_weights),
        quirks=("hybrid_swa_memory_on_cpu", "gemma4_text_dtype", "gemma4_limits"),
    )
)
