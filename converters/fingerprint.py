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


def _line(path: str, x, a: int, b: int) -> bytes:
    return f"{path}|{tuple(x.shape)}|{np.dtype(x.dtype).name}|{int(a)}|{int(b)}\n".encode()


def fingerprint(arrays: Mapping[str, jax.Array]) -> str:
    """Hex digest of a flat mapping ``engine path -> array``."""
    digests = {path: _digest(as_auto(x)) for path, x in arrays.items()}  # dispatch all, then read
    h = hashlib.sha256()
    for path in sorted(arrays):
        h.update(_line(path, arrays[path], *np.asarray(digests[path])))
    return h.hexdigest()


@jax.jit
def _block_digest(block, starts, strides):
    """The two sums of ``_digest`` over one block of a larger array: ``starts`` is the
    block's offset in it, ``strides`` its row-major strides (the flat index of each element
    is what it is in the whole array). Sums mod 2**32 add up across blocks."""
    itemsize = block.dtype.itemsize
    if itemsize == 8:
        bits = jax.lax.bitcast_convert_type(block, jnp.uint32)  # (..., 2)
    else:
        bits = jax.lax.bitcast_convert_type(block, _UINT[itemsize]).astype(jnp.uint32)
    idx = jnp.zeros(bits.shape, jnp.uint32)
    for k, n in enumerate(bits.shape):
        axis = (jnp.arange(n, dtype=jnp.uint32) + starts[k]) * strides[k]
        idx = idx + axis.reshape([n if j == k else 1 for j in range(bits.ndim)])
    a = jnp.sum(bits * (idx * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
    b = jnp.sum(_mix(bits ^ _mix(idx + jnp.uint32(0x9E3779B9))), dtype=jnp.uint32)
    return jnp.stack([a, b])


def partial_digests(arrays: Mapping[str, jax.Array]) -> dict[str, tuple[int, int]]:
    """This process's share of every leaf's digest: the sums over the shards it holds (one
    replica of each). Summed mod 2**32 over the processes of a multi-process program they
    give the leaf's digest, with no collective (see ``fingerprint_from_partials``)."""
    pending = {}
    for path, x in arrays.items():
        shape = tuple(x.shape) + ((2,) if np.dtype(x.dtype).itemsize == 8 else ()) or (1,)
        strides = np.cumprod((shape[1:] + (1,))[::-1])[::-1].astype(np.uint64) % (1 << 32)
        parts = []
        for shard in x.addressable_shards:
            if shard.replica_id != 0:
                continue
            data = shard.data if x.ndim else shard.data.reshape(1)
            starts = [sl.start or 0 for sl in shard.index] + [0] * (len(shape) - len(shard.index))
            parts.append(
                _block_digest(data, np.asarray(starts, np.uint32), np.asarray(strides, np.uint32)[: len(shape)])
            )
        pending[path] = parts
    out = {}
    for path, parts in pending.items():
        sums = np.sum([np.asarray(p, np.uint64) for p in parts], axis=0) if parts else np.zeros(2, np.uint64)
        out[path] = (int(sums[0]) % (1 << 32), int(sums[1]) % (1 << 32))
    return out


def fingerprint_from_partials(arrays: Mapping[str, jax.Array], partials: list[Mapping[str, tuple[int, int]]]) -> str:
    """``fingerprint(arrays)`` from every process's ``partial_digests(arrays)``."""
    h = hashlib.sha256()
    for path in sorted(arrays):
        a = sum(p[path][0] for p in partials) % (1 << 32)
        b = sum(p[path][1] for p in partials) % (1 << 32)
        h.update(_line(path, arrays[path], a, b))
    return h.hexdigest()
