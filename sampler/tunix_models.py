"""Build the trainer side with Tunix's own model classes and HF loader.

Tunix's model configs are dataclasses with their own field names; these helpers
fill them from an HF ``config.json`` so that a Tunix model of any supported
architecture can be created from the same directory the engine serves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from sampler.engine import read_hf_config

_MODULES = {
    "LlamaForCausalLM": "tunix.models.llama3",
    "Qwen2ForCausalLM": "tunix.models.qwen2",
    "Qwen3ForCausalLM": "tunix.models.qwen3",
}


def _modules(architecture: str):
    import importlib

    try:
        base = _MODULES[architecture]
    except KeyError:
        raise ValueError(f"no Tunix model for {architecture!r}; known: {sorted(_MODULES)}") from None
    return importlib.import_module(base + ".model"), importlib.import_module(base + ".params")


def tunix_model_config(model_path: str | Path, **overrides: Any):
    """Tunix ``ModelConfig`` for the HF model in ``model_path``."""
    hf = read_hf_config(model_path)
    arch = hf["architectures"][0]
    model_lib, _ = _modules(arch)
    heads = hf["num_attention_heads"]
    fields: dict[str, Any] = dict(
        num_layers=hf["num_hidden_layers"],
        vocab_size=hf["vocab_size"],
        embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"],
        num_heads=heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        rope_theta=int(hf.get("rope_theta", 10000)),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
    )
    tied = bool(hf.get("tie_word_embeddings", False))
    if arch == "LlamaForCausalLM":
        fields["weight_tying"] = tied
    else:
        fields["use_tied_embedding"] = tied
    fields.update(overrides)
    return model_lib.ModelConfig(**fields)


def load_tunix_model(
    model_path: str | Path,
    *,
    dtype: Any = jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
    **config_overrides: Any,
):
    """A Tunix model with the weights of ``model_path``, via Tunix's own safetensors loader."""
    hf = read_hf_config(model_path)
    from sampler import compat

    compat.warn_tunix_rope_theta(hf["architectures"][0], hf.get("rope_theta", 10000))
    _, params_lib = _modules(hf["architectures"][0])
    config = tunix_model_config(model_path, **config_overrides)
    return params_lib.create_model_from_safe_tensors(str(model_path), config, mesh=mesh, dtype=dtype)


def random_tunix_model(model_path: str | Path, *, seed: int = 0, dtype: Any = jnp.float32, mesh=None, scale: float = 0.05):
    """A Tunix model of ``model_path``'s shape with random weights (Tunix's dummy creator)."""
    from tunix.models.dummy_model_creator import create_dummy_model

    hf = read_hf_config(model_path)
    model_lib, _ = _modules(hf["architectures"][0])
    config = tunix_model_config(model_path)
    cls = {"LlamaForCausalLM": "Llama3", "Qwen2ForCausalLM": "Qwen2", "Qwen3ForCausalLM": "Qwen3"}[hf["architectures"][0]]
    return create_dummy_model(getattr(model_lib, cls), config, mesh=mesh, dtype=dtype, random_seed=seed, scale=scale)
