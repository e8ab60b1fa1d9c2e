"""The engine's parameter leaves: read them, and swap new ones in leaf by leaf.

The model runner's forward reads ``model_runner.model_state_leaves`` (the flattened
``nnx.split(model)`` state). Rebinding only that list would keep the old arrays alive
through the module's nnx Variables (twice the parameter memory), so a swap writes
each new array into its Variable as well, and drops every reference to the old
array as soon as its replacement lands: extra memory stays near one leaf.
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Any, Callable, Sequence

import jax
from flax import nnx

from converters import reshard as reshard_lib
from converters.plan import EngineLeaf
from converters.source import key_paths
from sampler import compat


def buffer_pointers(x: jax.Array) -> tuple[int, ...]:
    """Device buffer address of every addressable shard (equal tuples = same buffers)."""
    return tuple(s.data.unsafe_buffer_pointer() for s in x.addressable_shards)


def live_device_bytes() -> int:
    """Bytes held by live jax arrays in this process, each device buffer counted once.

    (``device.memory_stats()`` is None on CPU, so count buffers instead.)
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for arr in jax.live_arrays():
        if arr.is_deleted():
            continue
        for shard in arr.addressable_shards:
            data = shard.data
            key = (data.unsafe_buffer_pointer(), shard.device.id)
            if key not in seen:
                seen.add(key)
                total += data.nbytes
    return total


#: ``SamplerConfig.reshard`` values: host placement on CPU where it applies, else XLA buckets.
RESHARD_AUTO, RESHARD_BUCKET, RESHARD_LEAF = "auto", "bucket", "leaf"
#: Bytes of resharded leaves in flight at once (a single larger leaf goes alone).
DEFAULT_BUCKET_BYTES = 256 << 20
#: Plan entry kinds whose result is written into the donated buffers of the leaves it replaces.
IN_PLACE_KINDS = ("convert", "quantize")
#: Threads that copy host shards at once (numpy releases the GIL while copying).
HOST_COPY_THREADS = max(1, min(8, os.cpu_count() or 1))
_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _host_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(HOST_COPY_THREADS, thread_name_prefix="sampler-reshard")
    return _pool


class EngineWeights:
    """Paths, nnx Variables and current arrays of one engine's model."""

    def __init__(self, model_runner):
        self._runner = model_runner
        _, state = nnx.split(model_runner.model)
        variables = jax.tree_util.tree_leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable))
        self.paths: list[str] = key_paths(state)
        leaves = model_runner.model_state_leaves
        if len(variables) != len(leaves) or len(self.paths) != len(leaves):
            raise RuntimeError(
                f"engine state has {len(leaves)} leaves but the model has {len(variables)} variables; "
                "this sglang-jax version lays out model_state_leaves differently"
            )
        for path, var, leaf in zip(self.paths, variables, leaves):
            if var.get_value() is not leaf:
                raise RuntimeError(f"engine leaf {path} is not the model's own Variable value")
        self.variables: list[nnx.Variable] = variables
        self._setters = [compat.fast_value_setter(v) for v in variables]
        #: Whether the engine alone holds each leaf's buffer (loaded, or converted by a
        #: swap) and may donate it; False for leaves aliasing a trainer's buffers.
        self.owned: list[bool] = [True] * len(leaves)
        #: True while a swap is under way, and after one failed midway until a full update.
        self.broken = False

    @property
    def arrays(self) -> list[jax.Array]:
        return self._runner.model_state_leaves

    def leaves(self) -> list[EngineLeaf]:
        return [EngineLeaf(p, tuple(x.shape), x.dtype, x.sharding) for p, x in zip(self.paths, self.arrays)]

    def as_dict(self) -> dict[str, jax.Array]:
        return dict(zip(self.paths, self.arrays))

    def swap(
        self,
        plan,
        leaves: Sequence[Any],
        on_leaf: Callable[[int, jax.Array], None] | None = None,
        *,
        alias: bool = True,
        reshard: str = RESHARD_AUTO,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ) -> tuple[list[jax.Array], dict[str, str]]:
        """Put the plan's engine leaves in place; returns the arrays written and, per engine
        path, how each got there (``UpdateReport.paths``).

        The caller guarantees that no forward pass runs meanwhile. A converted leaf is
        written into the buffer of the leaf it replaces when the engine owns that buffer
        (donation: no extra memory). Resharded leaves go in buckets of at most
        ``bucket_bytes`` (or one leaf, if larger): on the CPU backend placed from host views
        on a few threads (``reshard="auto"``), else one XLA program per bucket
        (``"bucket"``) or per leaf (``"leaf"``); each bucket's old buffers are dropped as it
        lands, so the extra memory stays within one bucket. The runner gets a new list object
        at the end (identity-keyed dispatch caches see the change). ``alias=False`` copies the
        zero-copy leaves too, so the engine shares no buffer with the source.
        """
        work = list(self._runner.model_state_leaves)
        # From here on the old list no longer pins the old arrays.
        self._runner.model_state_leaves = work
        written: list[jax.Array] = []
        paths: dict[str, str] = {}
        aliases = plan.materialize_aliases(leaves, copy=not alias)
        was_broken, self.broken = self.broken, True  # until every leaf is in place

        def put(entry, new, kind):
            if entry.quantized is not None:  # the (values, scale) pair, both the engine's own
                leaves = zip(
                    (entry.engine_index, entry.scale_index), new, (entry.engine_path, entry.quantized.scale_path)
                )
                owned = True
            else:
                leaves = [(entry.engine_index, new, entry.engine_path)]
                owned = not entry.aliased or not alias
            for i, x, path in leaves:
                self._setters[i](x)
                work[i] = x
                self.owned[i] = owned
                written.append(x)
                paths[path] = kind

        for bucket in _buckets(plan, reshard, bucket_bytes):
            if len(bucket) > 1 or _bucketed(plan, bucket[0], reshard):
                news, kind = self._reshard_bucket(plan, bucket, leaves, reshard)
                for entry, new in zip(bucket, news):  # all of the bucket alive: its peak
                    if on_leaf is not None:
                        on_leaf(entry.engine_index, new)
                for entry, new in zip(bucket, news):
                    put(entry, new, kind)
                continue
            (entry,) = bucket
            i = entry.engine_index
            if entry.aliased:
                new, kind = aliases.pop(i), entry.kind if alias else "copy"
            else:
                reuse = self._reusable(work, entry)
                new = plan.materialize_from(entry, leaves, reuse=reuse)
                kind = f"{entry.kind} in place" if reuse is not None and entry.kind in IN_PLACE_KINDS else entry.kind
                if "reshard" in entry.reasons and len(new.sharding.device_set) > 1:
                    # One resharding computation at a time: bounded memory, and XLA's CPU
                    # collectives can deadlock when several run at once.
                    new.block_until_ready()
            if on_leaf is not None:
                on_leaf(i, new)  # new and (unless donated) old both alive: the peak for this leaf
            put(entry, new, kind)
        self._runner.model_state_leaves = list(work)
        # A partial update cannot repair what an earlier failed swap left half-replaced.
        self.broken = was_broken and not plan.complete
        return written, paths

    def _reusable(self, work: list, entry) -> Any:
        """The engine's current leaf (or quantized pair) for ``entry`` when it owns it: donated
        to the conversion, which writes into its buffers. None when it cannot be."""
        indexes = (entry.engine_index,) if entry.quantized is None else (entry.engine_index, entry.scale_index)
        if not all(self.owned[i] and not work[i].is_deleted() for i in indexes):
            return None
        return work[indexes[0]] if entry.quantized is None else tuple(work[i] for i in indexes)

    def _reshard_bucket(self, plan, bucket, leaves, reshard: str) -> tuple[list[jax.Array], str]:
        if all(e.host is not None for e in bucket):
            # every shard of every leaf in the bucket is one task: a large leaf's shards copy side by side
            views = [reshard_lib.source_views(e.host, leaves[e.source_index]) for e in bucket]
            tasks = [(k, shard) for k, e in enumerate(bucket) for shard in e.host.shards]
            hosts = list(
                _host_pool().map(lambda t: reshard_lib.fill_shard(t[1], views[t[0]], bucket[t[0]].host.dtype), tasks)
            )
            shards = reshard_lib.to_devices(hosts, [shard.device for _, shard in tasks])
            news, start = [], 0
            for e in bucket:
                count = len(e.host.shards)
                sharding = plan.engine_leaves[e.engine_index].sharding
                news.append(reshard_lib.assemble(e.host, shards[start : start + count], sharding))
                start += count
            kind = "reshard (host)"
        else:
            news = plan.materialize_bucket(bucket, leaves)
            kind = "reshard (bucket)"
        jax.block_until_ready(news)
        return news, kind


def _bucketed(plan, entry, reshard: str) -> bool:
    """Whether this entry goes through a reshard bucket rather than the one-leaf paths: host
    placements (CPU, "auto"), and XLA reshards where one program per bucket pays ("bucket", or
    "auto" off the CPU backend, where per-leaf programs measured faster)."""
    if entry.aliased or reshard == RESHARD_LEAF or entry.stacked:
        return False
    if entry.host is not None:
        return True
    if "reshard" not in entry.reasons:
        return False
    sharding = plan.engine_leaves[entry.engine_index].sharding
    on_cpu = sharding is not None and all(d.platform == "cpu" for d in sharding.device_set)
    return reshard == RESHARD_BUCKET or not on_cpu


def _buckets(plan, reshard: str, budget: int):
    """The plan's entries in order: consecutive bucketed ones grouped up to ``budget`` bytes
    (a larger leaf alone), every other entry alone. Host placements and XLA programs never
    share a bucket."""
    bucket: list = []
    size = 0
    for entry in plan.entries:
        if not _bucketed(plan, entry, reshard):
            if bucket:
                yield bucket
                bucket, size = [], 0
            yield [entry]
            continue
        host = entry.host is not None and reshard == RESHARD_AUTO
        if bucket and (
            size + entry.nbytes > budget or host != (bucket[0].host is not None and reshard == RESHARD_AUTO)
        ):
            yield bucket
            bucket, size = [], 0
        bucket.append(entry)
        size += entry.nbytes
    if bucket:
        yield bucket
