"""Shared by the benchmarks: Tunix's sampler as the peer on the same engine, the machine's
memory-bandwidth limit, and independent memory measures.

Memory columns say what they measure:
- "live arrays": bytes of live jax arrays (each device buffer once), the library's own
  accounting (``jax.live_arrays``), at the update's peak;
- "RSS high-water": the process's resident-set high-water mark during the call minus its
  resident set before (Linux ``VmHWM`` after resetting it through ``/proc/self/clear_refs``),
  measured by the kernel, independent of JAX. On the CPU backend device buffers are host
  memory, so this sees them; on an accelerator use ``device.memory_stats()`` instead.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

MiB = 1 << 20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_high_water(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn``; return (its result, bytes the resident set rose above where it started)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    out = fn()
    return out, max(0, _status_kib("VmHWM") - before) * 1024


def memcpy_seconds(nbytes: int, runs: int = 5) -> float:
    """Median time of one host memcpy of ``nbytes`` (the bandwidth limit of any copy of them)."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def tunix_peer(sampler, model):
    """Tunix 0.1.7's own SglangJaxSampler, driving the same engine (no second engine)."""
    from tunix.generate import mappings
    from tunix.generate import sglang_jax_sampler as tsj

    peer = object.__new__(tsj.SglangJaxSampler)
    peer.engine = sampler.engine
    mc = mappings.MappingConfig.build(model=model, backend="sglang_jax")
    peer.args = {"enable_static_lora": False, "lora_target_modules": None}
    peer.to_hf_key_mappings = mc.to_hf_mappings
    peer.to_hf_transpose_keys = mc.to_hf_transpose_keys
    peer.to_hf_hook_fns = mc.to_hf_hook_fns
    return peer


def tunix_update(peer, state) -> float:
    t0 = time.perf_counter()
    peer.update_params(state)
    jax.block_until_ready(peer._model_runner.model_state_leaves)
    return time.perf_counter() - t0


def tunix_live_peak(peer, state) -> int:
    """Live-array bytes at Tunix's peak: its converted state built, old weights still alive."""
    from tunix.generate import sglang_jax_sampler as tsj

    from sampler.weights import live_device_bytes

    original = tsj.utils.transfer_state_with_mappings
    seen = []

    def wrapped(*args, **kwargs):
        out = original(*args, **kwargs)
        jax.block_until_ready(out)
        seen.append(live_device_bytes())
        return out

    tsj.utils.transfer_state_with_mappings = wrapped
    try:
        peer.update_params(state)
    finally:
        tsj.utils.transfer_state_with_mappings = original
    return max(seen)


def copied_bytes(engine_leaves, source_tree) -> int:
    """Bytes of engine leaves that share no buffer with the source (measured, not declared)."""
    from sampler.weights import buffer_pointers

    src = {p for x in jax.tree_util.tree_leaves(source_tree) for p in buffer_pointers(x)}
    return sum(a.nbytes for a in engine_leaves if not set(buffer_pointers(a)) & src)
