"""Qwen2 and Qwen2.5 (``Qwen2ForCausalLM``): dense decoder with q/k/v biases; head_dim
is hidden / heads. Tunix pairs it with ``tunix.models.qwen2.Qwen2``."""

from __future__ import annotations

from typing import Any

from converters.architecture import Architecture, TinyModel, TunixModel, register_architecture
from converters.models import decoder

NAME = "Qwen2ForCausalLM"


def _tunix_config(get) -> dict[str, Any]:
    return {**decoder.tunix_config(get), "use_tied_embedding": bool(get("tie_word_embeddings", False))}


def tiny_config(*, head_dim: int = 128, **overrides: Any):
    import transformers

    fields = decoder.tiny_config_fields(**overrides)
    if fields["hidden_size"] != fields["num_attention_heads"] * head_dim:
        raise ValueError(
            "Qwen2 derives head_dim from hidden_size / num_heads: "
            f"{fields['hidden_size']} / {fields['num_attention_heads']} != {head_dim}"
        )
    cfg = transformers.Qwen2Config(**fields)
    cfg.architectures = [NAME]
    return cfg


def tiny_weights(config, rng, scale):
    return decoder.tiny_weights(config, rng, scale, qkv_bias=True, qk_norm=False)


ARCHITECTURE = register_architecture(
    Architecture(
        name=NAME,
        tables=decoder.decoder_tables(qk_norm=False),
        tunix=TunixModel("tunix.models.qwen2", "Qwen2", _tunix_config),
        tiny=TinyModel(tiny_config, tiny_weights),
        # CPU native attention: k and v reach merge_kv with different shardings.
        quirks=("merge_kv_sharding", "tunix_no_rope_scaling"),
    )
)
