"""Qwen3 (``Qwen3ForCausalLM``): dense decoder with per-head q/k RMSNorms. Tunix pairs
it with ``tunix.models.qwen3.Qwen3``."""

from __future__ import annotations

from typing import Any

from converters.architecture import Architecture, TinyModel, TunixModel, register_architecture
from converters.models import decoder

NAME = "Qwen3ForCausalLM"


def _tunix_config(get) -> dict[str, Any]:
    return {**decoder.tunix_config(get), "use_tied_embedding": bool(get("tie_word_embeddings", False))}


def tiny_config(*, head_dim: int = 128, **overrides: Any):
    import transformers

    cfg = transformers.Qwen3Config(head_dim=head_dim, **decoder.tiny_config_fields(**overrides))
    cfg.architectures = [NAME]
    return cfg


def tiny_weights(config, rng, scale):
    return decoder.tiny_weights(
        config, rng, scale, qkv_bias=bool(getattr(config, "attention_bias", False)), qk_norm=True
    )


ARCHITECTURE = register_architecture(
    Architecture(
        name=NAME,
        tables=decoder.decoder_tables(qk_norm=True),
        tunix=TunixModel("tunix.models.qwen3", "Qwen3", _tunix_config),
        tiny=TinyModel(tiny_config, tiny_weights),
        quirks=("tunix_rope_theta_ignored", "tunix_no_rope_scaling"),
    )
)
