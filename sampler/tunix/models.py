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
    allow_mismatch: bool = False,
    **config_overrides: Any,
):
    """A Tunix model with the weights of ``model_path``, via Tunix's own safetensors loader.

    The model computes what the engine serving ``model_path`` computes: Tunix is patched where
    it ignores a config field it can follow (``rope_theta``), and a config it cannot follow
    (``rope_scaling``, Gemma's ``query_pre_attn_scalar``, ...) raises
    ``compat.TrainerMismatchError`` naming the field, unless ``allow_mismatch``."""
    hf = read_hf_config(model_path)
    compat.prepare_tunix_trainer(hf, allow_mismatch=allow_mismatch)
    _, _, params_lib = _tunix(hf["architectures"][0])
    config = tunix_model_config(model_path, **config_overrides)
    return params_lib.create_model_from_safe_tensors(str(model_path), config, mesh=mesh, dtype=dtype)


def random_tunix_model(
    model_path: str | Path,
    *,
    seed: int = 0,
    dtype: Any = jnp.float32,
    mesh=None,
    scale: float = RANDOM_WEIGHT_SCALE,
    allow_mismatch: bool = False,
):
    """A Tunix model of ``model_path``'s shape with random weights (Tunix's dummy creator);
    checked and patched as ``load_tunix_model``."""
    from tunix.models.dummy_model_creator import create_dummy_model

    hf = read_hf_config(model_path)
    compat.prepare_tunix_trainer(hf, allow_mismatch=allow_mismatch)
    binding, model_lib, _ = _tunix(hf["architectures"][0])
    config = tunix_model_config(model_path)
    return create_dummy_model(
        getattr(model_lib, binding.model_class), config, mesh=mesh, dtype=dtype, random_seed=seed, scale=scale
    )


def check_trainer(model: Any, hf_config: dict, *, allow_mismatch: bool = False) -> list[str]:
    """Refuse a Tunix ``model`` that computes another model than the engine serving
    ``hf_config``: Tunix patched and the config checked as in ``load_tunix_model``, and the
    model's own ``ModelConfig`` compared with the HF config where Tunix reads it (a model built
    from a preset with another ``rope_theta`` than the checkpoint's). Raises
    ``compat.TrainerMismatchError`` naming the field, unless ``allow_mismatch``; returns the
    problems allowed."""
    problems = compat.prepare_tunix_trainer(hf_config, allow_mismatch=allow_mismatch)
    config = getattr(model, "config", None)
    theta = getattr(config, "rope_theta", None)
    wanted = float(hf_config.get("rope_theta", compat.HF_DEFAULT_ROPE_THETA))
    if theta is not None and float(theta) != wanted:
        mismatch = [f"rope_theta={wanted:g} in the checkpoint, {float(theta):g} in the trainer's ModelConfig"]
        problems += compat.check_trainer_config(
            hf_config["architectures"][0], hf_config, [lambda _: mismatch], allow_mismatch=allow_mismatch
        )
    return problems
