"""Content hashes of parameter sets, computed on device.

The engine's served weights and a trainer state converted to engine layout give the
same fingerprint exactly when every leaf has the same path, shape, dtype and bits.
Each leaf is reduced on its own devices to two 32-bit sums (position-weighted and
mixed), which are exact integer sums and so do not depend on sharding; only those
eight bytes per leaf reach the host.
"""

from __future__ import annotations

import hashlib
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from converters.sharding import as_auto

_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _mix(h):
    # murmur3 finalizer, in uint32 arithmetic (wraps mod 2**32)
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


@jax.jit
def _digest(x):
    itemsize = x.dtype.itemsize
    if itemsize == 8:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)  # (..., 2) -> flat
    else:
        bits = jax.lax.bitcast_convert_type(x, _UINT[itemsize]).astype(jnp.uint32).reshape(-1)
    idx = jnp.arange(bits.shape[0], dtype=jnp.uint32)
    a = jnp.sum(bits * (idx * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
    b = jnp.sum(_mix(bits ^ _mix(idx + jnp.uint32(0x9E3779B9))), dtype=jnp.uint32)
    return jnp.stack([a, b])


def _host(digest: jax.Array) -> np.ndarray:
    """A digest on the host. Of a leaf spanning several processes it is replicated on every
    device; this process reads its own copy."""
    if digest.is_fully_addressable:
        return np.asarray(digest)
    if not digest.is_fully_replicated:
        raise ValueError(f"a digest spanning processes is not replicated: {digest.sharding}")
    return np.asarray(digest.addressable_data(0))


def fingerprint(arrays: Mapping[str, jax.Array]) -> str:
    """Hex digest of a flat mapping ``engine path -> array``."""
    digests = {path: _digest(as_auto(x)) for path, x in arrays.items()}  # dispatch all, then read
    h = hashlib.sha256()
    for path in sorted(arrays):
        x = arrays[path]
        a, b = _host(digests[path])
        h.update(f"{path}|{tuple(x.shape)}|{np.dtype(x.dtype).name}|{int(a)}|{int(b)}\n".encode())
    return h.hexdigest()
