"""Map trainer parameters to sglang-jax engine leaves.

A converter is a declarative table per (HF architecture, source format); from a
source tree and the engine's leaves it builds a plan once (``build_plan``) that is
applied cheaply at every step.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from converters.architecture import (
    Architecture,
    TinyModel,
    TunixModel,
    architectures,
    get_architecture,
    register_architecture,
)
from converters.checkpoint import CheckpointError, SafetensorsCheckpoint
from converters.errors import (
    ConversionError,
    DeletedArrayError,
    ParamsMismatchError,
    UnknownFormatError,
)
from converters.fingerprint import fingerprint
from converters.ops import ExpandDims, MergeAxes, ReplicateKVHeads, SplitAxis, Take, Transpose
from converters.plan import ConversionPlan, EngineLeaf, PlanEntry, build_plan, convert_params
from converters.quantization import Quantization, QuantizedLeaf, quantize
from converters.registry import (
    Converter,
    available_converters,
    detect_format,
    formats_for,
    get_converter,
    register_converter,
)
from converters.rules import LeafRule
from converters.source import as_param_tree, key_paths
from converters.spec import ModelSpec, read_hf_config

__all__ = [
    "Architecture",
    "CheckpointError",
    "ExpandDims",
    "Take",
    "TinyModel",
    "TunixModel",
    "architectures",
    "get_architecture",
    "read_hf_config",
    "register_architecture",
    "SafetensorsCheckpoint",
    "ConversionError",
    "ConversionPlan",
    "Converter",
    "DeletedArrayError",
    "EngineLeaf",
    "LeafRule",
    "MergeAxes",
    "ModelSpec",
    "ParamsMismatchError",
    "PlanEntry",
    "Quantization",
    "QuantizedLeaf",
    "ReplicateKVHeads",
    "SplitAxis",
    "Transpose",
    "UnknownFormatError",
    "available_converters",
    "build_plan",
    "detect_format",
    "fingerprint",
    "fingerprint_params",
    "formats_for",
    "get_converter",
    "quantize",
    "register_converter",
    "to_engine_layout",
]


import converters.models  # noqa: E402,F401  (registers every architecture)


def _spec(spec: Any) -> ModelSpec:
    return spec if isinstance(spec, ModelSpec) else ModelSpec.from_hf_config(spec)


def to_engine_layout(
    params: Any,
    spec: Any,
    *,
    source_format: str | None = None,
    filter_types: Sequence[type] | type | None = None,
    dtype: Any = None,
    quantization: Quantization | str | None = None,
) -> dict[str, jax.Array]:
    """Convert a trainer tree to ``{engine path: array}`` without an engine.

    ``spec`` is a ModelSpec, an HF config, or a model directory; arrays stay on the
    source's devices and take the engine dtype (``spec.dtype`` unless ``dtype``).
    ``quantization`` (a :class:`Quantization`, e.g. a sampler's ``quantization``, or "int8" /
    "fp8" for sglang-jax's own configs): the leaves a quantized engine serves as values and
    scales become those pairs, bit for bit.
    """
    spec = _spec(spec)
    tree = as_param_tree(params, filter_types)
    paths = key_paths(tree)
    leaves = jax.tree_util.tree_leaves(tree)
    fmt = source_format or detect_format(spec.architecture, paths)
    conv = get_converter(spec.architecture, fmt)
    if isinstance(quantization, str):
        quantization = Quantization.uniform(quantization)
    return convert_params(conv, spec, paths, leaves, jnp.dtype(dtype or spec.dtype), quantization)


def fingerprint_params(
    params: Any,
    spec: Any,
    *,
    source_format: str | None = None,
    filter_types: Sequence[type] | type | None = None,
    dtype: Any = None,
    quantization: Quantization | str | None = None,
) -> str:
    """The fingerprint an engine serving ``params`` reports (see SglangJaxSampler.fingerprint);
    for a quantized engine pass its ``quantization``."""
    return fingerprint(
        to_engine_layout(
            params, spec, source_format=source_format, filter_types=filter_types, dtype=dtype, quantization=quantization
        )
    )
