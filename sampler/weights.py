"""The engine's parameter leaves: read them, and swap new ones in leaf by leaf.

The model runner's forward reads ``model_runner.model_state_leaves`` (the flattened
``nnx.split(model)`` state). Rebinding only that list would keep the old arrays alive
through the module's nnx Variables (twice the parameter memory), so a swap writes
each new array into its Variable as well, and drops every reference to the old
array as soon as its replacement lands: extra memory stays near one leaf.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
from flax import nnx

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
    ) -> list[jax.Array]:
        """Put the plan's engine leaves in place, one at a time; returns the arrays written.

        The caller guarantees that no forward pass runs meanwhile. A converted leaf is
        written into the buffer of the leaf it replaces when the engine owns that
        buffer (donation: no extra memory); otherwise the old buffer is dropped as
        soon as its replacement lands. The runner gets a new list object at the end
        (identity-keyed dispatch caches see the change). ``alias=False`` copies the
        zero-copy leaves too, so the engine shares no buffer with the source.
        """
        work = list(self._runner.model_state_leaves)
        # From here on the old list no longer pins the old arrays.
        self._runner.model_state_leaves = work
        written = []
        aliases = plan.materialize_aliases(leaves, copy=not alias)
        was_broken, self.broken = self.broken, True  # until every leaf is in place
        for entry in plan.entries:
            i = entry.engine_index
            copies = not entry.aliased
            if copies:
                reuse = work[i] if self.owned[i] and not work[i].is_deleted() else None
                new = plan.materialize_from(entry, leaves, reuse=reuse)
            else:
                new = aliases.pop(i)
            if "reshard" in entry.reasons and len(new.sharding.device_set) > 1:
                # One resharding computation at a time: bounded memory, and XLA's CPU
                # collectives can deadlock when several run at once.
                new.block_until_ready()
            if on_leaf is not None:
                on_leaf(i, new)  # new and (unless donated) old both alive: the peak for this leaf
            self._setters[i](new)
            work[i] = new
            self.owned[i] = copies or not alias
            written.append(new)
        self._runner.model_state_leaves = list(work)
        # A partial update cannot repair what an earlier failed swap left half-replaced.
        self.broken = was_broken and bool(plan.missing)
        return written
