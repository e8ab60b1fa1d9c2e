"""Per-leaf layout operations, as data.

A table rule lists the ops that turn a source leaf into its engine leaf. Each op
knows its output shape (so a plan can check shapes without touching data) and
applies itself with jax.numpy inside one jitted transform per leaf kind.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol

import jax.numpy as jnp

from converters.spec import ModelSpec

Shape = tuple[int, ...]


class Op(Protocol):
    reason: str

    def out_shape(self, shape: Shape, spec: ModelSpec) -> Shape: ...

    def is_identity(self, shape: Shape, spec: ModelSpec) -> bool: ...

    def __call__(self, x, spec: ModelSpec): ...


@dataclasses.dataclass(frozen=True)
class Transpose:
    axes: tuple[int, ...]
    reason = "transpose"

    def out_shape(self, shape: Shape, spec: ModelSpec) -> Shape:
        if len(shape) != len(self.axes):
            raise ValueError(f"transpose {self.axes} needs a rank-{len(self.axes)} array, got shape {shape}")
        return tuple(shape[a] for a in self.axes)

    def is_identity(self, shape: Shape, spec: ModelSpec) -> bool:
        return tuple(self.axes) == tuple(range(len(self.axes)))

    def __call__(self, x, spec: ModelSpec):
        return jnp.transpose(x, self.axes)


@dataclasses.dataclass(frozen=True)
class MergeAxes:
    """Reshape: merge axes ``start..stop-1`` into one (e.g. (D, N, H) -> (D, N*H))."""

    start: int
    stop: int
    reason = "reshape"

    def out_shape(self, shape: Shape, spec: ModelSpec) -> Shape:
        if not 0 <= self.start < self.stop <= len(shape):
            raise ValueError(f"cannot merge axes {self.start}:{self.stop} of shape {shape}")
        return shape[: self.start] + (math.prod(shape[self.start : self.stop]),) + shape[self.stop :]

    def is_identity(self, shape: Shape, spec: ModelSpec) -> bool:
        return self.stop - self.start == 1

    def __call__(self, x, spec: ModelSpec):
        return jnp.reshape(x, self.out_shape(x.shape, spec))


@dataclasses.dataclass(frozen=True)
class SplitAxis:
    """Reshape: split axis ``axis`` into ``(parts, size // parts)``, e.g. HF Gemma 4's fused
    experts ``gate_up_proj`` (E, 2*I, H) -> (E, 2, I, H), gate rows first."""

    axis: int
    parts: int
    reason = "reshape"

    def out_shape(self, shape: Shape, spec: ModelSpec) -> Shape:
        if not -len(shape) <= self.axis < len(shape) or self.parts < 1 or shape[self.axis] % self.parts:
            raise ValueError(f"cannot split axis {self.axis} of shape {shape} into {self.parts} equal parts")
        axis = self.axis % len(shape)
        return shape[:axis] + (self.parts, shape[axis] // self.parts) + shape[axis + 1 :]

    def is_identity(self, shape: Shape, spec: ModelSpec) -> bool:
        return False

    def __call__(self, x, spec: ModelSpec):
        return jnp.reshape(x, self.out_shape(x.shape, spec))


@dataclasses.dataclass(frozen=True)
class Take:
    """Select entry ``index`` of ``axis`` (the axis disappears): one part of a fused leaf,
    e.g. k or v out of Gemma's ``kv_einsum`` (2, K, D, H)."""

    axis: int
    index: int
    reason = "slice"

    def out_shape(self, shape: Shape, spec: ModelSpec) -> Shape:
        if not -len(shape) <= self.axis < len(shape) or not 0 <= self.index < shape[self.axis]:
            raise ValueError(f"cannot take entry {self.index} of axis {self.axis} of shape {shape}")
        axis = self.axis % len(shape)
        return shape[:axis] + shape[axis + 1 :]

    def is_identity(self, shape: Shape, spec: ModelSpec) -> bool:
        return False

    def __call__(self, x, spec: ModelSpec):
        return jnp.take(x, self.index, axis=self.axis)


@dataclasses.dataclass(frozen=True)
class ExpandDims:
    """Insert a size-1 axis (sglang-jax LoRA buffers carry a leading adapter-slot axis)."""

    axis: int
    reason = "reshape"

    def out_shape(self, shape: Shape, spec: ModelSpec) -> Shape:
        return shape[: self.axis] + (1,) + shape[self.axis :]

    def is_identity(self, shape: Shape, spec: ModelSpec) -> bool:
        return False

    def __call__(self, x, spec: ModelSpec):
        return jnp.expand_dims(x, self.axis)


@dataclasses.dataclass(frozen=True)
class ReplicateKVHeads:
    """Grow the KV-head axis the way sglang-jax does when tp > num_kv_heads.

    ``merged=True`` when the axis holds heads*head_dim (HF layout, biases); otherwise
    the axis holds heads only (Tunix (D, K, H) layout).
    """

    axis: int
    merged: bool = False
    reason = "kv-head replication"

    def _heads(self, shape: Shape, spec: ModelSpec) -> int:
        n = shape[self.axis]
        return n // spec.head_dim if self.merged else n

    def out_shape(self, shape: Shape, spec: ModelSpec) -> Shape:
        heads = self._heads(shape, spec)
        if heads != spec.num_kv_heads:
            raise ValueError(
                f"axis {self.axis} of shape {shape} holds {heads} KV heads, the model has {spec.num_kv_heads}"
            )
        total = heads * spec.kv_replicas
        size = total * spec.head_dim if self.merged else total
        return shape[: self.axis] + (size,) + shape[self.axis + 1 :]

    def is_identity(self, shape: Shape, spec: ModelSpec) -> bool:
        return spec.kv_replicas == 1

    def __call__(self, x, spec: ModelSpec):
        r = spec.kv_replicas
        if r == 1:
            return x
        axis = self.axis % x.ndim
        shape = x.shape
        if self.merged:
            x = jnp.reshape(x, shape[:axis] + (shape[axis] // spec.head_dim, spec.head_dim) + shape[axis + 1 :])
        if spec.kv_padding == "replicate":
            x = jnp.repeat(x, r, axis=axis)
        else:
            pad = [(0, 0)] * x.ndim
            pad[axis] = (0, x.shape[axis] * (r - 1))
            x = jnp.pad(x, pad)
        if self.merged:
            x = jnp.reshape(x, x.shape[:axis] + (x.shape[axis] * spec.head_dim,) + x.shape[axis + 2 :])
        return x


def out_shape(ops: tuple[Op, ...], shape: Shape, spec: ModelSpec) -> Shape:
    for op in ops:
        shape = op.out_shape(shape, spec)
    return shape


def effective_ops(ops: tuple[Op, ...], shape: Shape, spec: ModelSpec) -> tuple[Op, ...]:
    """The ops that change something for this shape and spec (no-ops dropped)."""
    kept = []
    for op in ops:
        if not op.is_identity(shape, spec):
            kept.append(op)
        shape = op.out_shape(shape, spec)
    return tuple(kept)


def apply(ops: tuple[Op, ...], x, spec: ModelSpec):
    for op in ops:
        x = op(x, spec)
    return x


#: Ops that only reinterpret a row-major array's shape (no element moves).
RESHAPES = (MergeAxes, SplitAxis, ExpandDims)
