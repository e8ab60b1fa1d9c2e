"""Build the trainer side with Tunix's own model classes and HF loader.

Each architecture's module (``converters/models/<name>.py``) names the Tunix model class
it pairs with and how to fill its ``ModelConfig`` from an HF ``config.json``, so that a
Tunix model of any supported architecture can be created from the directory the engine
serves.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from converters import get_architecture, read_hf_config
from converters.spec import config_getter
from sampler import compat

#: Standard deviation of Tunix's dummy-model random weights.
RANDOM_WEIGHT_SCALE = 0.05


def _tunix(architecture: str):
    binding = get_architecture(architecture).tunix
    if binding is None:
        raise ValueError(f"no Tunix model is known for {architecture!r}")
    return (
        binding,
        importlib.import_module(binding.package + ".model"),
        importlib.import_module(f"{binding.package}.{binding.loader}"),
    )


def tunix_model_config(model_path: str | Path, **overrides: Any):
    """Tunix ``ModelConfig`` for the HF model in ``model_path``."""
    hf = read_hf_config(model_path)
    binding, model_lib, _ = _tunix(hf["architectures"][0])
    return model_lib.ModelConfig(**{**binding.config(config_getter(hf)), **overrides})


def load_tunix_model(
    model_path: str | Path,
    *,
    dtype: Any = jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
    **config_overrides: Any,
):
    """A Tunix model with the weights of ``model_path``, via Tunix's own safetensors loader."""
    hf = read_hf_config(model_path)
    compat.warn_tunix_quirks(hf)
    _, _, params_lib = _tunix(hf["architectures"][0])
    config = tunix_model_config(model_path, **config_overrides)
    return params_lib.create_model_from_safe_tensors(str(model_path), config, mesh=mesh, dtype=dtype)


def random_tunix_model(
    model_path: str | Path, *, seed: int = 0, dtype: Any = jnp.float32, mesh=None, scale: float = RANDOM_WEIGHT_SCALE
):
    """A Tunix model of ``model_path``'s shape with random weights (Tunix's dummy creator)."""
    from tunix.models.dummy_model_creator import create_dummy_model

    hf = read_hf_config(model_path)
    binding, model_lib, _ = _tunix(hf["architectures"][0])
    config = tunix_model_config(model_path)
    return create_dummy_model(
        getattr(model_lib, binding.model_class), config, mesh=mesh, dtype=dtype, random_seed=seed, scale=scale
    )
