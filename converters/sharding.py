"""Views of engine placements on Auto-axes meshes.

sglang-jax builds its mesh with Explicit axis types, under which reshapes and
in-place updates inside jit need explicit output shardings. The same devices and
partition spec on an Auto-axes mesh describe the very same placement: moving an
array between the two is a relabel (no bytes move), and jitted code on the Auto
view lets XLA propagate shardings itself.
"""

from __future__ import annotations

import functools

import jax


@functools.lru_cache(maxsize=None)
def _auto_mesh(mesh: jax.sharding.Mesh) -> jax.sharding.Mesh:
    return jax.sharding.Mesh(
        mesh.devices, mesh.axis_names, axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
    )


def auto_sharding(sharding):
    """``sharding`` on an Auto-axes mesh (unchanged if it already is, or is not a NamedSharding)."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        mesh = sharding.mesh
        if any(t != jax.sharding.AxisType.Auto for t in mesh.axis_types):
            return jax.sharding.NamedSharding(_auto_mesh(mesh), sharding.spec, memory_kind=sharding.memory_kind)
    return sharding


def relabel(x: jax.Array, sharding) -> jax.Array | None:
    """``x``'s very buffers under ``sharding``, an equivalent placement; None if not equivalent.

    ``jax.device_put`` does this for arrays held by one process; for an array spanning
    several processes (multi-controller JAX) it runs a resharding computation and copies,
    even between equivalent shardings (jax 0.10 dispatch.py ``_device_put_sharding_impl``).
    Here the array is rebuilt from this process's own shard buffers: no copy, no collective.
    """
    if x.sharding == sharding:
        return x
    try:
        if not x.sharding.is_equivalent_to(sharding, x.ndim):
            return None
    except Exception:  # noqa: BLE001 - different device counts or kinds
        return None
    if x.is_fully_addressable:
        return jax.device_put(x, sharding)
    by_device = {s.device: s.data for s in x.addressable_shards}
    return jax.make_array_from_single_device_arrays(
        x.shape, sharding, [by_device[d] for d in sharding.addressable_devices_indices_map(x.shape)]
    )


def as_auto(x: jax.Array) -> jax.Array:
    """The same buffers under the Auto-axes view of their sharding."""
    target = auto_sharding(getattr(x, "sharding", None))
    return x if target is None or target is x.sharding else relabel(x, target)
