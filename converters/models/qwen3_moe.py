"""Qwen3-MoE (``Qwen3MoeForCausalLM``, e.g. Qwen3-30B-A3B): Qwen3 attention with a
routed mixture of experts in every layer but ``mlp_only_layers``.

Engine (sglang-jax, ``moe_backend="epmoe"``): experts stacked per projection, expert
axis first, (in, out): ``mlp.wi_0`` / ``mlp.wi_1`` (E, H, I) and ``mlp.wo`` (E, I, H) on
the MoE mesh ("expert", "tensor") built from ``ep_size``; the router ``moe_gate.kernel``
(H, E) is float32 whatever the model dtype; the attention output is ``self_attn.c_proj``.
Tunix (``tunix.models.qwen3`` with ``num_experts``): experts already stacked in the same
axis order (``mlp.gate_proj`` (E, H, I), ...), so they alias when dtype and placement
match; ``mlp.router.kernel`` (H, E). HF: one (out, in) matrix per expert,
``mlp.experts.<e>.{gate,up,down}_proj.weight``, stacked into the engine array (N -> 1).
No Flax layout exists for this family (transformers has no Flax Qwen3-MoE).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from converters.architecture import Architecture, TinyModel, TunixModel, register_architecture
from converters.models import decoder
from converters.ops import Transpose
from converters.rules import LeafRule, Table
from converters.spec import ConfigGetter

NAME = "Qwen3MoeForCausalLM"
L = decoder.L
#: The engine keeps the router in float32 (sglang-jax GateLogit).
ROUTER_DTYPE = "float32"
_T2 = (Transpose((1, 0)),)
_T3 = (Transpose((0, 2, 1)),)


def _c_proj(table: Table) -> Table:
    """The dense decoder's rules with the attention output renamed ``c_proj`` (as the engine names it)."""
    renamed = (r.target.replace(".self_attn.o_proj.", ".self_attn.c_proj.") for r in table)
    return tuple(dataclasses.replace(r, target=t) for r, t in zip(table, renamed))


TUNIX_MOE: Table = (
    LeafRule("layers.{}.mlp.router.kernel", f"{L}.moe_gate.kernel", dtype=ROUTER_DTYPE),
    LeafRule("layers.{}.mlp.gate_proj", f"{L}.mlp.wi_0"),
    LeafRule("layers.{}.mlp.up_proj", f"{L}.mlp.wi_1"),
    LeafRule("layers.{}.mlp.down_proj", f"{L}.mlp.wo"),
)
HF_MOE: Table = (
    LeafRule("model.layers.{}.mlp.gate.weight", f"{L}.moe_gate.kernel", _T2, dtype=ROUTER_DTYPE),
    LeafRule("model.layers.{}.mlp.experts.{*}.gate_proj.weight", f"{L}.mlp.wi_0", _T3, stack="num_experts"),
    LeafRule("model.layers.{}.mlp.experts.{*}.up_proj.weight", f"{L}.mlp.wi_1", _T3, stack="num_experts"),
    LeafRule("model.layers.{}.mlp.experts.{*}.down_proj.weight", f"{L}.mlp.wo", _T3, stack="num_experts"),
)
HF_O_BIAS: Table = (LeafRule("model.layers.{}.self_attn.o_proj.bias", f"{L}.self_attn.c_proj.bias"),)

TABLES = {
    # dense MLP rules stay: they feed the engine's mlp_only_layers
    "tunix": _c_proj(decoder.TUNIX_BASE + decoder.TUNIX_QKV_BIAS + decoder.TUNIX_QK_NORM) + TUNIX_MOE,
    "hf": _c_proj(decoder.HF_BASE + decoder.HF_QKV_BIAS + decoder.HF_QK_NORM) + HF_O_BIAS + HF_MOE,
}


def spec_fields(get: ConfigGetter) -> dict[str, Any]:
    return dict(
        num_experts=int(get("num_experts") or 0),
        moe_intermediate_size=get("moe_intermediate_size"),
        num_experts_per_tok=get("num_experts_per_tok"),
        mlp_only_layers=tuple(get("mlp_only_layers") or ()),
        norm_topk_prob=bool(get("norm_topk_prob", False)),
        decoder_sparse_step=int(get("decoder_sparse_step") or 1),
    )


def _tunix_config(get: ConfigGetter) -> dict[str, Any]:
    return {
        **decoder.tunix_config(get),
        "hidden_dim": get("moe_intermediate_size"),
        "num_experts": get("num_experts"),
        "num_experts_per_tok": get("num_experts_per_tok"),
        "use_tied_embedding": bool(get("tie_word_embeddings", False)),
    }


def tiny_config(
    *,
    head_dim: int = 128,
    hidden_size: int = 256,
    num_experts: int = 4,
    num_experts_per_tok: int = 2,
    moe_intermediate_size: int = 64,
    norm_topk_prob: bool = True,
    mlp_only_layers: tuple[int, ...] = (),
    decoder_sparse_step: int = 1,
    **overrides: Any,
):
    """A small Qwen3-MoE config. ``hidden_size`` 256, not 128: with hidden == kv_heads * head_dim
    sglang-jax's loader replicates KV heads on the wrong axis at tp > kv heads."""
    import transformers

    cfg = transformers.Qwen3MoeConfig(
        head_dim=head_dim,
        num_experts=num_experts,
        num_experts_per_tok=num_experts_per_tok,
        moe_intermediate_size=moe_intermediate_size,
        norm_topk_prob=norm_topk_prob,
        mlp_only_layers=list(mlp_only_layers),
        decoder_sparse_step=decoder_sparse_step,
        **decoder.tiny_config_fields(hidden_size=hidden_size, **overrides),
    )
    cfg.architectures = [NAME]
    return cfg


#: Standard deviation of the tiny router weights: wide enough that tokens pick different experts.
ROUTER_SCALE = 0.2


def tiny_weights(config, rng, scale):
    """Random weights under HF names: the dense decoder's attention, and per layer either a
    router with per-expert MLPs or (``mlp_only_layers``, ``decoder_sparse_step``) a dense MLP."""
    w = decoder.tiny_weights(config, rng, scale, qkv_bias=bool(getattr(config, "attention_bias", False)), qk_norm=True)
    dtype = decoder.numpy_dtype(config)
    hidden, inter, experts = config.hidden_size, config.moe_intermediate_size, config.num_experts
    for i in range(config.num_hidden_layers):
        if i in config.mlp_only_layers or (i + 1) % config.decoder_sparse_step:  # HF's dense layers
            continue
        p = f"model.layers.{i}.mlp."
        for name in ("gate_proj", "up_proj", "down_proj"):
            del w[p + name + ".weight"]
        w[p + "gate.weight"] = (rng.standard_normal((experts, hidden)) * ROUTER_SCALE).astype(dtype)
        for e in range(experts):
            q = f"{p}experts.{e}."
            w[q + "gate_proj.weight"] = (rng.standard_normal((inter, hidden)) * scale).astype(dtype)
            w[q + "up_proj.weight"] = (rng.standard_normal((inter, hidden)) * scale).astype(dtype)
            w[q + "down_proj.weight"] = (rng.standard_normal((hidden, inter)) * scale).astype(dtype)
    return w


ARCHITECTURE = register_architecture(
    Architecture(
        name=NAME,
        tables=TABLES,
        spec_fields=spec_fields,
        tunix=TunixModel("tunix.models.qwen3", "Qwen3", _tunix_config),
        tiny=TinyModel(tiny_config, tiny_weights),
        quirks=(
            "moe_sparse_layers",
            "moe_expert_parallel",
            "tunix_rope_theta_ignored",
            "tunix_no_rope_scaling",
            "tunix_moe_routing",
        ),
    )
)
