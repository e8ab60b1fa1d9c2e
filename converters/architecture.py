"""Everything one model architecture brings, registered from its own module
(``converters/models/<name>.py``), the way sglang-jax registers its model classes.

An ``Architecture`` holds its converter tables for every source format, the extra spec
facts it needs, the Tunix model class it pairs with, a recipe for tiny random
checkpoints (tests and demos), and the names of the upstream workarounds it needs
(implemented in ``sampler.compat``, each with a still-needed test).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from converters import catalog
from converters.registry import register_converter
from converters.rules import Table, engine_layout
from converters.spec import ConfigGetter

#: The source format whose paths are the engine's own (derived for every architecture).
ENGINE_FORMAT = "sglang"


@dataclasses.dataclass(frozen=True)
class TunixModel:
    """The Tunix model class an architecture pairs with."""

    #: e.g. "tunix.models.qwen3" (holds ``model.py`` and the HF loader module)
    package: str
    #: the nnx.Module class in ``<package>.model``, e.g. "Qwen3"
    model_class: str
    #: HF config -> keyword arguments of ``<package>.model.ModelConfig``
    config: Callable[[ConfigGetter], dict[str, Any]]
    #: the module of ``<package>`` with Tunix's ``create_model_from_safe_tensors``
    loader: str = "params"


@dataclasses.dataclass(frozen=True)
class TinyModel:
    """How to build a tiny random checkpoint of the architecture (no model hub)."""

    #: (**overrides) -> a transformers config object with ``architectures`` set
    config: Callable[..., Any]
    #: (config, rng, scale) -> HF tensor name -> numpy array, torch layout (out, in)
    weights: Callable[[Any, np.random.Generator, float], dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Architecture:
    #: The HF ``architectures`` name, e.g. "Qwen3ForCausalLM".
    name: str
    #: Source format -> table; the engine-layout format ("sglang") is derived from them.
    tables: Mapping[str, Table]
    #: HF config -> extra ModelSpec facts (``num_experts`` or entries of ``ModelSpec.extra``).
    spec_fields: Callable[[ConfigGetter], dict[str, Any]] | None = None
    #: The HF config as the engine reads it, when that differs from its top-level fields
    #: (Gemma 4: ``text_config`` with sglang-jax's head-dim and KV-head remapping).
    config_view: Callable[[ConfigGetter], ConfigGetter] | None = None
    tunix: TunixModel | None = None
    tiny: TinyModel | None = None
    #: Names of ``sampler.compat`` workarounds this architecture needs (``sampler.compat.quirks``).
    quirks: tuple[str, ...] = ()


def register_architecture(arch: Architecture) -> Architecture:
    """Register an architecture and a converter for each of its source formats."""
    if catalog.find_architecture(arch.name) is not None:
        raise ValueError(f"architecture {arch.name!r} is already registered")
    if ENGINE_FORMAT in arch.tables:
        raise ValueError(f"{arch.name}: the {ENGINE_FORMAT!r} table is derived, do not give it")
    for fmt, table in arch.tables.items():
        register_converter(arch.name, fmt, table)
    register_converter(arch.name, ENGINE_FORMAT, engine_layout(tuple(r for t in arch.tables.values() for r in t)))
    catalog.add(arch.name, arch)
    return arch


find_architecture = catalog.find_architecture
get_architecture = catalog.get_architecture
architectures = catalog.architectures
