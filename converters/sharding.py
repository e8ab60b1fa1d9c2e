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


def as_auto(x: jax.Array) -> jax.Array:
    """The same buffers under the Auto-axes view of their sharding."""
    target = auto_sharding(getattr(x, "sharding", None))
    return x if target is None or target is x.sharding else jax.device_put(x, target)
