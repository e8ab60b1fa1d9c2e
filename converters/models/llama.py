"""Llama (``LlamaForCausalLM``, Llama 2/3): dense decoder; q/k/v biases when the HF
config sets ``attention_bias``. Tunix pairs it with ``tunix.models.llama3.Llama3``."""

from __future__ import annotations

from typing import Any

from converters.architecture import Architecture, TinyModel, TunixModel, register_architecture
from converters.models import decoder

NAME = "LlamaForCausalLM"


def _tunix_config(get) -> dict[str, Any]:
    return {**decoder.tunix_config(get), "weight_tying": bool(get("tie_word_embeddings", False))}


def tiny_config(*, head_dim: int = 128, **overrides: Any):
    import transformers

    cfg = transformers.LlamaConfig(head_dim=head_dim, **decoder.tiny_config_fields(**overrides))
    cfg.architectures = [NAME]
    return cfg


def tiny_weights(config, rng, scale):
    return decoder.tiny_weights(
        config, rng, scale, qkv_bias=bool(getattr(config, "attention_bias", False)), qk_norm=False
    )


ARCHITECTURE = register_architecture(
    Architecture(
        name=NAME,
        tables=decoder.decoder_tables(qk_norm=False),
        tunix=TunixModel("tunix.models.llama3", "Llama3", _tunix_config),
        tiny=TinyModel(tiny_config, tiny_weights),
        # CPU native attention: k and v reach merge_kv with different shardings.
        quirks=("merge_kv_sharding", "tunix_rope_theta_ignored", "tunix_no_rope_scaling"),
    )
)
