"""Placing each device's shard from host views of the source's shards (JAX's CPU backend).

On the CPU backend every device's buffer is host memory. A leaf whose only changes are
row-major reshapes and a new placement needs no XLA program: each target device's shard is
either the very memory of a source shard on that device (a view: zero copy) or assembled by
numpy from the overlapping parts of the source shards (one copy of its bytes) and handed to
its device without a further copy. The layout (which bytes go where) is computed once per
plan entry; placing is then plain memory copies, which release the GIL and run side by side.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from converters import ops as ops_lib
from converters.spec import ModelSpec

Shape = tuple[int, ...]
#: Per axis [start, stop) of a block of an array.
Box = tuple[tuple[int, int], ...]
#: Host buffers handed to a device are aligned like XLA's own, so the device can use them as is.
HOST_ALIGNMENT = 64
_BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _box(index: tuple[slice, ...], shape: Shape) -> Box:
    return tuple(sl.indices(n)[:2] for sl, n in zip(index, shape))


def _map_box(box: Box, shape: Shape, ops: Sequence[Any]) -> Box | None:
    """``box`` of an array of ``shape`` in the coordinates after the reshape ``ops``; None when
    it is no longer one block there (a merge over a partitioned inner axis)."""
    for op in ops:
        if isinstance(op, ops_lib.MergeAxes):
            a, b = op.start, op.stop
            inner = box[a + 1 : b]
            if any(lo != 0 or hi != n for (lo, hi), n in zip(inner, shape[a + 1 : b])):
                return None
            size = math.prod(shape[a + 1 : b])
            box = box[:a] + ((box[a][0] * size, box[a][1] * size),) + box[b:]
            shape = shape[:a] + (math.prod(shape[a:b]),) + shape[b:]
        elif isinstance(op, ops_lib.ExpandDims):
            box = box[: op.axis] + ((0, 1),) + box[op.axis :]
            shape = shape[: op.axis] + (1,) + shape[op.axis :]
        else:
            return None
    return box


def _intersect(a: Box, b: Box) -> Box | None:
    out = tuple((max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(a, b))
    return None if any(lo >= hi for lo, hi in out) else out


def _local(box: Box, within: Box) -> tuple[slice, ...]:
    return tuple(slice(lo - base, hi - base) for (lo, hi), (base, _) in zip(box, within))


@dataclasses.dataclass(frozen=True)
class ShardSource:
    """Where one target shard's bytes come from."""

    device: Any
    shape: Shape
    #: The source shard on this very device holds exactly these bytes (zero copy).
    view_of: Any = None
    #: Otherwise: (source device, slices in the source shard, slices in this shard) per piece.
    pieces: tuple[tuple[Any, tuple[slice, ...], tuple[slice, ...]], ...] = ()


@dataclasses.dataclass(frozen=True)
class HostLayout:
    """How to place one leaf from host views: one ShardSource per target device."""

    shape: Shape
    dtype: np.dtype
    #: Source shard shape per source device, in the target's coordinates (after the reshapes).
    source_shapes: tuple[tuple[Any, Shape], ...]
    shards: tuple[ShardSource, ...]

    @property
    def all_views(self) -> bool:
        return all(s.view_of is not None for s in self.shards)

    @property
    def copied_bytes(self) -> int:
        return sum(math.prod(s.shape) for s in self.shards if s.view_of is None) * self.dtype.itemsize


def _all_cpu(sharding: Any) -> bool:
    return sharding is not None and all(d.platform == "cpu" for d in sharding.device_set)


def host_layout(
    ops: Sequence[Any], spec: ModelSpec, dtype: Any, source_shape: Shape, source: Any, target_shape: Shape, target: Any
) -> HostLayout | None:
    """The host placement of a reshape-only leaf between two CPU shardings, or None when one
    does not apply (other ops, another backend, or blocks that a reshape does not keep)."""
    if not (_all_cpu(source) and _all_cpu(target)) or not all(isinstance(op, ops_lib.RESHAPES) for op in ops):
        return None
    if any(d.process_index != jax.process_index() for d in source.device_set | target.device_set):
        return None
    sources: dict[Box, list[Any]] = {}
    for device, index in source.devices_indices_map(tuple(source_shape)).items():
        box = _map_box(_box(index, source_shape), tuple(source_shape), ops)
        if box is None:
            return None
        sources.setdefault(box, []).append(device)
    shards = []
    for device, index in target.devices_indices_map(tuple(target_shape)).items():
        want = _box(index, target_shape)
        shape = tuple(hi - lo for lo, hi in want)
        if device in sources.get(want, ()):
            shards.append(ShardSource(device, shape, view_of=device))
            continue
        pieces, covered = [], 0
        for box, devices in sources.items():  # replicas hold the same box: read one, on this device if it can
            overlap = _intersect(want, box)
            if overlap is not None:
                owner = device if device in devices else devices[0]
                pieces.append((owner, _local(overlap, box), _local(overlap, want)))
                covered += math.prod(hi - lo for lo, hi in overlap)
        if covered != math.prod(shape):  # the source's blocks do not tile the array once each
            return None
        shards.append(ShardSource(device, shape, pieces=tuple(pieces)))
    source_shapes = tuple((devs[0], tuple(hi - lo for lo, hi in box)) for box, devs in sources.items())
    source_shapes += tuple((d, tuple(hi - lo for lo, hi in box)) for box, devs in sources.items() for d in devs[1:])
    return HostLayout(tuple(target_shape), np.dtype(dtype), source_shapes, tuple(shards))


def _aligned_empty(shape: Shape, dtype: np.dtype) -> np.ndarray:
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + HOST_ALIGNMENT, np.uint8)
    offset = (-raw.ctypes.data) % HOST_ALIGNMENT
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def source_views(layout: HostLayout, x: Any) -> dict[Any, np.ndarray]:
    """The source's shards as host arrays in the target's coordinates (no copies)."""
    shapes = dict(layout.source_shapes)
    return {s.device: np.asarray(s.data).reshape(shapes[s.device]) for s in x.addressable_shards if s.device in shapes}


def fill_shard(shard: ShardSource, views: dict[Any, np.ndarray], dtype: np.dtype) -> np.ndarray:
    """One target shard's bytes in host memory: the source view itself, or a new aligned
    host buffer filled piece by piece (numpy copies release the GIL: run these side by side)."""
    if shard.view_of is not None:
        return views[shard.view_of].reshape(shard.shape)
    host = _aligned_empty(shard.shape, dtype)
    bits = host.view(_BITS[dtype.itemsize])  # numpy copies custom dtypes (bf16) element by element
    for owner, src, dst in shard.pieces:
        bits[dst] = views[owner][src].view(bits.dtype)
    return host


def to_devices(hosts: Sequence[np.ndarray], devices: Sequence[Any]) -> list[jax.Array]:
    """Hand each host buffer to its device without a copy, in one batched call (one call per
    shard costs more in dispatch than the copies themselves)."""
    return list(jax.device_put(list(hosts), list(devices), may_alias=True))


def assemble(layout: HostLayout, shards: Sequence[jax.Array], sharding: Any) -> jax.Array:
    return jax.make_array_from_single_device_arrays(layout.shape, sharding, list(shards))


def place(layout: HostLayout, x: Any, sharding: Any) -> jax.Array:
    """The target leaf for ``x`` under ``sharding`` (one leaf; buckets of leaves fill their
    shards side by side and hand them over in one call: ``sampler.sync.leaves``)."""
    views = source_views(layout, x)
    hosts = [fill_shard(s, views, layout.dtype) for s in layout.shards]
    return assemble(layout, to_devices(hosts, [s.device for s in layout.shards]), sharding)
