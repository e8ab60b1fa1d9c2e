"""Quantized engine weights: which leaves an engine serves as int8 / fp8 values plus scales,
and the quantization itself, bit for bit what sglang-jax computes when it quantizes at load.

sglang-jax (0.1.0rc0) quantizes after loading: every linear layer's weight, cast to the model
dtype, becomes ``weight_q`` (its transpose, (out, in)) and a float32 ``weight_scale`` (out,)
per output channel (``QuantizedLinear.from_linear``); MoE expert stacks stay at their paths
in the quantized dtype with a scale leaf beside them (``EPMoE.quantize_weights``). Both reduce
one axis with ``quantization_utils.quantize_tensor``. The conversion rules keep targeting the
unquantized leaf; a plan entry whose target is served quantized writes the (values, scale)
pair that :data:`QUANTIZED_LAYOUTS` describes, in the same pass.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from converters import ops as ops_lib
from converters.errors import ParamsMismatchError
from converters.spec import ModelSpec

#: Names sglang-jax's quantization configs use for the value dtypes it can serve.
QUANTIZED_DTYPES: dict[str, Any] = {"int8": jnp.int8, "float8_e4m3fn": jnp.float8_e4m3fn}
#: What ``Quantization.uniform`` takes: those, short names, and ``SamplerConfig.quantization``
#: names (a ``_w8a8`` config quantizes activations too; its weights are the same).
DTYPE_ALIASES = {
    "int8": "int8",
    "int8_w8a8": "int8",
    "fp8": "float8_e4m3fn",
    "fp8_w8a8": "float8_e4m3fn",
    "float8_e4m3fn": "float8_e4m3fn",
}


@dataclasses.dataclass(frozen=True)
class QuantizedLayout:
    """How one kind of sglang-jax layer stores a quantized weight."""

    #: "linear" (``QuantizedLinear``) or "moe" (``EPMoE`` expert stacks).
    kind: str
    #: Last name of the unquantized engine leaf (what the conversion rules target).
    weight: str
    #: Last names of the quantized values and their scale.
    values: str
    scale: str
    #: Rank of the unquantized leaf.
    ndim: int
    #: The values are the unquantized leaf transposed ((in, out) -> (out, in)).
    transpose: bool
    #: The axis of the values each scale reduces (per output channel: the contracting axis).
    axis: int

    def scale_shape(self, values_shape: tuple[int, ...]) -> tuple[int, ...]:
        kept = tuple(n for k, n in enumerate(values_shape) if k != self.axis)
        # EPMoE keeps its scales as [E, k_blocks=1, 1, n] for the grouped matmul
        return kept if self.kind == "linear" else (kept[0], 1, 1) + kept[1:]


#: sglang-jax's layouts: ``QuantizedLinear.from_linear`` and ``EPMoE.quantize_weights``.
QUANTIZED_LAYOUTS = (
    QuantizedLayout("linear", "weight", "weight_q", "weight_scale", ndim=2, transpose=True, axis=1),
    QuantizedLayout("moe", "wi_0", "wi_0", "wi_0_scale", ndim=3, transpose=False, axis=1),
    QuantizedLayout("moe", "wi_1", "wi_1", "wi_1_scale", ndim=3, transpose=False, axis=1),
    QuantizedLayout("moe", "wo", "wo", "wo_scale", ndim=3, transpose=False, axis=1),
)


@dataclasses.dataclass(frozen=True)
class QuantizedLeaf:
    """One engine weight served quantized: the pair of leaves that replace it."""

    #: The unquantized engine path (the conversion rules' target).
    path: str
    values_path: str
    scale_path: str
    layout: QuantizedLayout
    #: Values dtype name ("int8", "float8_e4m3fn").
    dtype: str
    #: Shape of the unquantized leaf (what the rules produce) and of the two served leaves.
    shape: tuple[int, ...]
    values_shape: tuple[int, ...]
    scale_shape: tuple[int, ...]

    @functools.cached_property
    def recipe(self) -> "QuantizedLeaf":
        """The same quantization without the paths: one compiled transform serves every layer."""
        return dataclasses.replace(self, path="", values_path="", scale_path="")

    @property
    def reason(self) -> str:
        return f"quantize {self.dtype}"

    @property
    def nbytes(self) -> int:
        values = int(np.prod(self.values_shape, dtype=np.int64)) * np.dtype(QUANTIZED_DTYPES[self.dtype]).itemsize
        return values + int(np.prod(self.scale_shape, dtype=np.int64)) * np.dtype(np.float32).itemsize


def _layouts_for(last: str, ndim: int) -> list[QuantizedLayout]:
    return [lay for lay in QUANTIZED_LAYOUTS if lay.weight == last and lay.ndim == ndim]


def _leaf(path: str, layout: QuantizedLayout, dtype: str, shape: tuple[int, ...]) -> QuantizedLeaf:
    head = path[: -len(layout.weight)]
    values_shape = tuple(reversed(shape)) if layout.transpose else tuple(shape)
    return QuantizedLeaf(
        path=path,
        values_path=head + layout.values,
        scale_path=head + layout.scale,
        layout=layout,
        dtype=dtype,
        shape=tuple(shape),
        values_shape=values_shape,
        scale_shape=layout.scale_shape(values_shape),
    )


@dataclasses.dataclass(frozen=True)
class Quantization:
    """Which engine weights are served quantized, and to what.

    ``Quantization.uniform("int8")`` is what sglang-jax's ``int8.yaml`` does (every linear
    layer and every expert stack); ``Quantization.of_engine(leaves)`` reads it off a running
    engine's leaves, so regex rules and ``ignored_layers`` of any config are followed exactly.
    """

    #: Values dtype of linear layers and of MoE expert stacks (None: left in the model dtype).
    linear: str | None = None
    moe: str | None = None
    #: Unquantized engine paths a layout matches but the engine left in the model dtype.
    skipped: frozenset[str] = frozenset()

    @classmethod
    def uniform(cls, dtype: str) -> "Quantization":
        name = normalize_dtype(dtype)
        return cls(linear=name, moe=name)

    @classmethod
    def of_engine(cls, leaves: Iterable[Any]) -> "Quantization | None":
        """The quantization of an engine with these leaves (``.path``, ``.shape``, ``.dtype``),
        or None when it serves nothing quantized. Raises ParamsMismatchError for a quantized
        layout this library cannot write (block-wise scales)."""
        by_path = {leaf.path: leaf for leaf in leaves}
        found = quantized_leaves(by_path.values())
        if not found:
            return None
        dtypes: dict[str, set[str]] = {"linear": set(), "moe": set()}
        for q in found.values():
            dtypes[q.layout.kind].add(q.dtype)
        problems = [
            f"{kind} layers are quantized to several dtypes: {sorted(d)}" for kind, d in dtypes.items() if len(d) > 1
        ]
        if problems:
            raise ParamsMismatchError(problems, header="this engine's quantization is not supported")
        linear = next(iter(dtypes["linear"]), None)
        moe = next(iter(dtypes["moe"]), None)
        skipped = frozenset(
            path
            for path, leaf in by_path.items()
            if path not in found
            and any(
                {"linear": linear, "moe": moe}[lay.kind] is not None
                for lay in _layouts_for(path.rpartition(".")[2], len(leaf.shape))
            )
            and np.dtype(leaf.dtype).name not in QUANTIZED_DTYPES
        )
        return cls(linear=linear, moe=moe, skipped=skipped)

    def leaf(self, path: str, shape: tuple[int, ...]) -> QuantizedLeaf | None:
        """How the engine serves the unquantized leaf ``path`` of ``shape``: None if as it is."""
        if path in self.skipped:
            return None
        for layout in _layouts_for(path.rpartition(".")[2], len(shape)):
            dtype = {"linear": self.linear, "moe": self.moe}[layout.kind]
            if dtype is not None:
                return _leaf(path, layout, dtype, tuple(shape))
        return None


def normalize_dtype(dtype: Any) -> str:
    """A name in ``DTYPE_ALIASES`` (or a numpy dtype) -> the values dtype name."""
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name not in DTYPE_ALIASES:
        raise ValueError(f"quantization dtype must be one of {sorted(DTYPE_ALIASES)}, got {dtype!r}")
    return DTYPE_ALIASES[name]


def quantized_leaves(leaves: Iterable[Any]) -> dict[str, QuantizedLeaf]:
    """Unquantized path -> QuantizedLeaf for every quantized (values, scale) pair among an
    engine's leaves (``.path``, ``.shape``, ``.dtype``)."""
    by_path = {leaf.path: leaf for leaf in leaves}
    out: dict[str, QuantizedLeaf] = {}
    problems = []
    for path, leaf in by_path.items():
        dtype = np.dtype(leaf.dtype).name
        if dtype not in QUANTIZED_DTYPES:
            continue
        head, _, last = path.rpartition(".")
        for layout in QUANTIZED_LAYOUTS:
            scale_path = f"{head}.{layout.scale}"
            if layout.values != last or scale_path not in by_path or len(leaf.shape) != layout.ndim:
                continue
            values_shape = tuple(leaf.shape)
            shape = tuple(reversed(values_shape)) if layout.transpose else values_shape
            q = _leaf(f"{head}.{layout.weight}", layout, dtype, shape)
            served = tuple(by_path[scale_path].shape)
            if served != q.scale_shape:
                problems.append(
                    f"engine leaf {scale_path} {served}: only per-channel scales {q.scale_shape} can be "
                    "written (block-wise quantization, weight_block_size, is not supported)"
                )
                continue
            out[q.path] = q
    if problems:
        raise ParamsMismatchError(problems, header="this engine's quantization is not supported")
    return out


def _limits(leaf: QuantizedLeaf) -> tuple[Any, float, float]:
    dtype = QUANTIZED_DTYPES[leaf.dtype]
    info = jnp.iinfo(dtype) if jnp.issubdtype(dtype, jnp.integer) else jnp.finfo(dtype)
    return dtype, float(info.min), float(info.max)


def _reduced_axis(leaf: QuantizedLeaf) -> int:
    """The scale's reduced axis in the unquantized layout (the values' axis, before a transpose)."""
    axis = leaf.layout.axis
    return len(leaf.shape) - 1 - axis if leaf.layout.transpose else axis


def quantization_scale(y: jax.Array, leaf: QuantizedLeaf) -> jax.Array:
    """The scale of the unquantized leaf ``y`` (already in the model dtype), keeping the reduced
    axis (``quantize_tensor``: absolute maximum in float32 over it / the dtype's maximum)."""
    _, _, dtype_max = _limits(leaf)
    return jnp.max(jnp.abs(y.astype(jnp.float32)), axis=_reduced_axis(leaf), keepdims=True) / dtype_max


def quantized_values(y: jax.Array, scale: jax.Array, leaf: QuantizedLeaf) -> jax.Array:
    """The values of ``y`` (model dtype) for ``scale`` (from :func:`quantization_scale`), in the
    unquantized layout (transpose them for a linear layer's ``weight_q``): all-zero rows keep
    scale 0, values are clipped to the dtype's range, then converted."""
    dtype, dtype_min, dtype_max = _limits(leaf)
    safe = scale + (scale == 0).astype(scale.dtype)
    return jnp.clip(y.astype(jnp.float32) / safe, dtype_min, dtype_max).astype(dtype)


def served_scale(scale: jax.Array, leaf: QuantizedLeaf) -> jax.Array:
    """A scale from :func:`quantization_scale` in the engine's scale layout."""
    return jnp.squeeze(scale, _reduced_axis(leaf)).astype(jnp.float32).reshape(leaf.scale_shape)


def quantize(x: jax.Array, leaf: QuantizedLeaf, model_dtype: Any) -> tuple[jax.Array, jax.Array]:
    """(values, scale) of the unquantized engine leaf ``x``, as sglang-jax computes them at load:
    cast to the model dtype, transpose for linear layers, then ``quantize_tensor`` on one axis.
    Computed in the unquantized layout and transposed last (the same numbers: each element is
    divided by its channel's scale either way); plans run the same steps as separate programs."""
    y = x.astype(model_dtype)
    scale = quantization_scale(y, leaf)
    values = quantized_values(y, scale, leaf)
    return (values.T if leaf.layout.transpose else values), served_scale(scale, leaf)


@dataclasses.dataclass(frozen=True)
class QuantizeSteps:
    """The programs a plan runs to quantize one kind of leaf, shared by every layer of that shape: the
    cast to the model dtype (its own program, when the source has another dtype: within one
    program XLA may skip the rounding), the scale, the values in the unquantized layout, and
    their placement (transposed, for linear layers) into the engine's donated old buffer.
    Separate programs, because XLA's CPU backend runs the fused transposing quantization
    several times slower than these."""

    cast: Any
    scale: Any
    values: Any
    served: Any
    transpose: bool

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def of(
        ops: tuple[ops_lib.Op, ...],
        spec: ModelSpec,
        dtype: Any,
        stacked: bool,
        leaf: QuantizedLeaf,
        source_dtype: Any,
    ) -> "QuantizeSteps":
        def prepare(xs):
            x = jnp.stack(xs) if stacked else xs[0]
            return ops_lib.apply(ops, x, spec).astype(dtype)

        cast = jax.jit(lambda *xs: prepare(xs)) if np.dtype(source_dtype) != np.dtype(dtype) else None
        inline = (lambda xs: xs[0]) if cast is not None else prepare  # scale/values take the cast leaf
        return QuantizeSteps(
            cast=cast,
            scale=jax.jit(lambda *xs: quantization_scale(inline(xs), leaf)),
            values=jax.jit(lambda scale, *xs: quantized_values(inline(xs), scale, leaf)),
            served=jax.jit(lambda scale: served_scale(scale, leaf)),
            transpose=leaf.layout.transpose,
        )

    def inputs(self, xs: tuple) -> tuple:
        return (self.cast(*xs),) if self.cast is not None else xs

    def place(self, old: jax.Array | None, values: jax.Array, out_sharding: Any) -> jax.Array:
        """``values`` in the engine's layout, written into ``old`` (donated) when given."""
        return _placer(self.transpose, old is not None, out_sharding)(
            *((old, values) if old is not None else (values,))
        )


@functools.lru_cache(maxsize=None)
def _placer(transpose: bool, into: bool, out_sharding: Any):
    def layout(v):
        return v.T if transpose else v

    if into:
        return jax.jit(
            lambda old, v: jax.lax.dynamic_update_slice(old, layout(v), (0,) * old.ndim),
            out_shardings=out_sharding,
            donate_argnums=0,
        )
    return jax.jit(layout, out_shardings=out_sharding)
