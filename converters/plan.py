"""Conversion plans: computed once per source structure, applied cheaply per step.

A plan holds one entry per engine leaf: which source leaf feeds it and what has to
happen on the way (nothing -> the engine aliases the source buffers; otherwise a
copy with the reasons: reshape, transpose, kv-head replication, cast, reshard).
Building a plan validates everything; applying it does no key matching.

Over 500 lines because building, checking and applying a plan are one algorithm over one data
structure (``PlanEntry``): the entry kinds (alias, view, convert, reshard, host, quantize), the checks
that name every offending path, and the apply paths that write each kind share their
invariants; split apart, each half would have to re-derive the other's.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from converters import ops as ops_lib
from converters.errors import DeletedArrayError, ParamsMismatchError
from converters.quantization import Quantization, QuantizedLeaf, QuantizeSteps, quantize, quantized_leaves
from converters.registry import Converter, abstract_key
from converters.reshard import HostLayout, host_layout, place
from converters.rules import LeafRule
from converters.sharding import auto_sharding, relabel
from converters.spec import ModelSpec


@dataclasses.dataclass(frozen=True)
class EngineLeaf:
    path: str
    shape: tuple[int, ...]
    dtype: Any
    sharding: jax.sharding.Sharding | None = None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class PlanEntry:
    engine_index: int
    engine_path: str
    #: The source leaf feeding this engine leaf, or (N -> 1 rules) the stacked ones in order.
    source_indexes: tuple[int, ...]
    #: Its path (for a stack, the pattern with the stacked index as ``{*}``).
    source_path: str
    ops: tuple[ops_lib.Op, ...]
    #: Why this leaf is copied; empty when the engine can alias the source buffers.
    reasons: tuple[str, ...]
    nbytes: int
    #: Aliased through a reshaped host view of the same memory (CPU only: there a
    #: row-major reshape moves no bytes; on TPU a reshape is a relayout and copies).
    view: bool = False
    #: The sources are stacked on a new leading axis before the ops.
    stacked: bool = False
    #: CPU backend: placed shard by shard from host views of the source's shards (views
    #: where a target shard is a source shard's memory, copies of the rest), no XLA program.
    host: HostLayout | None = None
    #: The engine serves this weight quantized: ``engine_index`` / ``engine_path`` are its
    #: values leaf, ``scale_index`` its scale; both are written from the source in one pass.
    quantized: QuantizedLeaf | None = None
    scale_index: int | None = None

    @property
    def kind(self) -> str:
        """How this leaf reaches the engine (``UpdateReport.paths``)."""
        if self.quantized is not None:
            return "quantize"
        if self.aliased:
            return "view" if self.view else "alias"
        if self.host is not None:
            return "reshard (host)"
        if "reshard" in self.reasons:
            return "reshard"
        if "host array" in self.reasons and not self.ops and not self.stacked:
            return "load"
        return "convert"

    @property
    def aliased(self) -> bool:
        return not self.reasons

    @property
    def source_index(self) -> int:
        """The (first) source leaf's index."""
        return self.source_indexes[0]

    def inputs(self, leaves: Sequence[Any]) -> Any:
        """This entry's source leaf, or the tuple of stacked ones."""
        if self.stacked:
            return tuple(leaves[i] for i in self.source_indexes)
        return leaves[self.source_indexes[0]]


def _is_floating(dtype: Any) -> bool:
    return jnp.issubdtype(np.dtype(dtype), jnp.floating)


def _equivalent(src: jax.sharding.Sharding, dst: jax.sharding.Sharding, ndim: int) -> bool:
    if src == dst:
        return True
    try:
        return src.is_equivalent_to(dst, ndim)
    except Exception:  # different device counts or kinds
        return False


@functools.lru_cache(maxsize=None)
def _transform(
    ops: tuple[ops_lib.Op, ...],
    spec: ModelSpec,
    dtype: Any,
    out_sharding: Any,
    into: bool = False,
    stacked: bool = False,
    quantized: QuantizedLeaf | None = None,
):
    """One jitted function per (ops, spec, dtype, output sharding): layers share it.

    ``into=True`` takes the engine's old leaf as a donated first argument, so the
    result is written into its buffer: no new allocation, no extra memory.
    ``stacked=True`` takes the sources as separate arguments and stacks them first.
    ``quantized`` (not with ``into``): the result is the (values, scale) pair of that
    quantized leaf, ``dtype`` the model dtype it is cast to first (``convert_params``; plans
    run the same steps as separate programs, ``QuantizeSteps``).
    """

    def fn(*xs):
        x = jnp.stack(xs) if stacked else xs[0]
        if quantized is not None:
            return quantize(ops_lib.apply(ops, x, spec), quantized, dtype)
        return ops_lib.apply(ops, x, spec).astype(dtype)

    if into:
        # The result must depend on ``old`` or jit drops (and never donates) it; a full
        # dynamic_update_slice of the donated buffer is done in place.
        def fn_into(old, *xs):
            return jax.lax.dynamic_update_slice(old, fn(*xs), (0,) * old.ndim)

        return jax.jit(fn_into, out_shardings=out_sharding, donate_argnums=0)
    return jax.jit(fn, out_shardings=out_sharding)


@functools.lru_cache(maxsize=None)
def _bucket_transform(steps: tuple[tuple[tuple[ops_lib.Op, ...], ModelSpec, Any, Any], ...]):
    """One XLA program converting and placing a bucket of leaves: (ops, spec, dtype, sharding) each."""

    def fn(*xs):
        return tuple(ops_lib.apply(ops, x, spec).astype(dtype) for (ops, spec, dtype, _), x in zip(steps, xs))

    return jax.jit(fn, out_shardings=tuple(auto_sharding(sharding) for *_, sharding in steps))


def _host_target(sharding: Any):
    """Where a host array goes before its transform: the engine's first device, or (when the
    engine spans several processes, whose devices are not all addressable here) replicated
    over the engine's mesh: each process then puts only its own devices' copies."""
    if sharding is None:
        return None
    if not sharding.is_fully_addressable and isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return min(sharding.device_set, key=lambda d: d.id)


def _stack_writer(ops: tuple[ops_lib.Op, ...], spec: ModelSpec, dtype: Any, out_sharding: Any):
    """jit(old, x, i): ``old`` (donated) with stack entry ``i`` set to ``x`` after the ops."""

    def write(old, x, i):
        y = ops_lib.apply(ops, x[None], spec).astype(dtype)
        return jax.lax.dynamic_update_slice(old, y, (i,) + (0,) * (old.ndim - 1))

    return jax.jit(write, out_shardings=out_sharding, donate_argnums=0)


def _keeps_stack_axis(ops: tuple[ops_lib.Op, ...], shape: tuple[int, ...], spec: ModelSpec) -> bool:
    """The ops act on each entry of the leading (stack) axis on its own, keeping it leading."""
    try:
        one, two = (ops_lib.out_shape(ops, (n,) + tuple(shape[1:]), spec) for n in (1, 2))
    except ValueError:
        return False
    return one[0] == 1 and two[0] == 2 and one[1:] == two[1:]


def _single_cpu_device(sharding: Any):
    if sharding is None or len(sharding.device_set) != 1:
        return None
    (device,) = sharding.device_set
    return device if device.platform == "cpu" else None


def _can_view(eff, dtype, sharding, leaf: "EngineLeaf") -> bool:
    """Reshape-only, same dtype, source and engine leaf on the same single CPU device."""
    if not eff or not all(isinstance(op, ops_lib.RESHAPES) for op in eff) or np.dtype(dtype) != np.dtype(leaf.dtype):
        return False
    device = _single_cpu_device(sharding)
    return device is not None and device == _single_cpu_device(leaf.sharding)


class ConversionPlan:
    """Per engine leaf: source leaf index and transform. Built by :func:`build_plan`."""

    def __init__(
        self,
        converter: Converter,
        spec: ModelSpec,
        entries: Sequence[PlanEntry],
        engine_leaves: Sequence[EngineLeaf],
        missing: Sequence[str],
        num_source_leaves: int,
    ):
        self.converter = converter
        self.spec = spec
        self.entries = tuple(sorted(entries, key=lambda e: e.engine_index))
        self.engine_leaves = tuple(engine_leaves)
        self.missing = tuple(missing)
        self.num_source_leaves = num_source_leaves

    @property
    def source_format(self) -> str:
        return self.converter.source_format

    @property
    def aliased(self) -> list[PlanEntry]:
        return [e for e in self.entries if e.aliased]

    @property
    def copied(self) -> list[PlanEntry]:
        return [e for e in self.entries if not e.aliased]

    @property
    def complete(self) -> bool:
        """Whether the plan writes every engine weight leaf a push must provide."""
        return all(self.converter.rule_for(p).optional for p in self.missing)

    def check_live(self, leaves: Sequence[Any]) -> None:
        """Refuse deleted (donated) source arrays before anything changes."""
        dead = [
            e.source_path
            for e in self.entries
            if any(isinstance(leaves[i], jax.Array) and leaves[i].is_deleted() for i in e.source_indexes)
        ]
        if dead:
            raise DeletedArrayError(
                f"{len(dead)} source arrays were deleted (donated by a train step?), e.g. {dead[:5]}; "
                "push parameters that are still alive"
            )

    def materialize(self, entry: PlanEntry, x: Any, reuse: jax.Array | None = None) -> jax.Array:
        """The engine leaf for ``entry`` from its input ``x`` (``entry.inputs(leaves)``).

        ``reuse``: the engine's current leaf, when the engine owns it exclusively; a
        converted result is then written into its buffer (it is donated).
        """
        target = self.engine_leaves[entry.engine_index]
        sharding = target.sharding
        if entry.quantized is not None:
            return self._quantize(entry, x, reuse)
        if entry.host is not None:
            return place(entry.host, x, sharding)
        if entry.view:
            return jax.device_put(np.asarray(x).reshape(target.shape), sharding)
        if entry.aliased:
            return relabel(x, sharding)
        if not entry.stacked and not entry.ops and np.dtype(x.dtype) == np.dtype(target.dtype):
            # Reshard or host -> device: one copy. (Not written into the donated old leaf: on
            # CPU that turns into an in-process all-to-all that can deadlock.)
            return jax.device_put(x, sharding)
        xs = tuple(
            a if isinstance(a, jax.Array) else jax.device_put(np.asarray(a), _host_target(sharding))
            for a in (x if entry.stacked else (x,))
        )
        dtype = np.dtype(target.dtype)
        if sharding is None or xs[0].sharding.device_set == sharding.device_set:
            out = auto_sharding(sharding)  # same placement; lets XLA propagate shardings
            if reuse is not None:
                y = _transform(entry.ops, self.spec, dtype, out, True, entry.stacked)(relabel(reuse, out), *xs)
            else:
                y = _transform(entry.ops, self.spec, dtype, out, False, entry.stacked)(*xs)
            return y if out is sharding else relabel(y, sharding)
        # Source on other devices: transform where it lives, then move the result.
        y = _transform(entry.ops, self.spec, dtype, None, False, entry.stacked)(*xs)
        return jax.device_put(y, sharding)

    def _quantize(self, entry: PlanEntry, x: Any, reuse: Any) -> tuple[jax.Array, jax.Array]:
        """The (values, scale) pair of a quantized entry; ``reuse``: the engine's current pair,
        whose values buffer is donated. The source is read twice (scale, then values), and no
        full-precision copy of it outlives this leaf."""
        values_leaf = self.engine_leaves[entry.engine_index]
        scale_leaf = self.engine_leaves[entry.scale_index]
        xs = tuple(
            a if isinstance(a, jax.Array) else jax.device_put(np.asarray(a), _host_target(values_leaf.sharding))
            for a in (x if entry.stacked else (x,))
        )
        steps = QuantizeSteps.of(
            entry.ops,
            self.spec,
            np.dtype(self.spec.dtype),
            entry.stacked,
            entry.quantized.recipe,
            np.dtype(xs[0].dtype),
        )
        same_devices = values_leaf.sharding is None or xs[0].sharding.device_set == values_leaf.sharding.device_set
        xs = steps.inputs(xs)
        if not same_devices:  # quantize where the source lives, then move the (smaller) result
            scale = steps.scale(*xs)
            values = steps.place(None, steps.values(scale, *xs), None)
            return jax.device_put(values, values_leaf.sharding), jax.device_put(
                steps.served(scale), scale_leaf.sharding
            )
        out = auto_sharding(values_leaf.sharding)
        old = relabel(reuse[0], out) if reuse is not None else None
        scale = steps.scale(*xs)
        values = steps.place(old, steps.values(scale, *xs), out)
        served = jax.device_put(steps.served(scale), scale_leaf.sharding)
        return (values if out is values_leaf.sharding else relabel(values, values_leaf.sharding)), served

    def materialize_bucket(self, entries: Sequence[PlanEntry], leaves: Sequence[Any]) -> list[jax.Array]:
        """Several converted or resharded leaves from one XLA program (the accelerator path:
        one dispatch and one collective schedule for the bucket instead of one per leaf).
        Leaves whose source lives on other devices than their engine leaf go one by one."""
        out: dict[int, jax.Array] = {}
        steps, xs, together = [], [], []
        for k, e in enumerate(entries):
            target = self.engine_leaves[e.engine_index]
            x = leaves[e.source_index]
            if not isinstance(x, jax.Array):
                x = jax.device_put(np.asarray(x), target.sharding)
            if x.sharding.device_set != target.sharding.device_set:
                out[k] = self.materialize(dataclasses.replace(e, host=None), x)
                continue
            xs.append(x)
            steps.append((e.ops, self.spec, np.dtype(target.dtype), target.sharding))
            together.append(k)
        if together:
            ys = _bucket_transform(tuple(steps))(*xs)
            for k, y, step in zip(together, ys, steps):
                out[k] = y if y.sharding == step[3] else jax.device_put(y, step[3])
        return [out[k] for k in range(len(entries))]

    def materialize_from(self, entry: PlanEntry, leaves: Sequence[Any], reuse: jax.Array | None = None) -> jax.Array:
        """The engine leaf for ``entry`` from the source ``leaves``. A stack read from a lazy
        source (``leaves.lazy``: a checkpoint read tensor by tensor) is written into the engine
        buffer one source at a time, so host memory holds one expert, not the whole stack."""
        target = self.engine_leaves[entry.engine_index]
        lazy = (
            entry.stacked
            and entry.quantized is None  # scales need the whole stack's values: written at once
            and getattr(leaves, "lazy", False)
            and target.sharding is not None
        )
        if not lazy or not _keeps_stack_axis(entry.ops, _stack_input_shape(entry, leaves), self.spec):
            return self.materialize(entry, entry.inputs(leaves), reuse=reuse)
        out = auto_sharding(target.sharding)
        dtype = np.dtype(target.dtype)
        if reuse is None:
            buffer = jax.jit(lambda: jax.numpy.zeros(target.shape, dtype), out_shardings=out)()
        else:
            buffer = jax.device_put(reuse, out)  # a relabel: same buffers
        replicated = jax.sharding.NamedSharding(out.mesh, jax.sharding.PartitionSpec())
        write = _stack_writer(entry.ops, self.spec, dtype, out)
        for k, si in enumerate(entry.source_indexes):
            buffer = write(buffer, jax.device_put(np.asarray(leaves[si]), replicated), np.int32(k))
        return jax.device_put(buffer, target.sharding)

    def materialize_aliases(self, leaves: Sequence[Any], *, copy: bool = False) -> dict[int, jax.Array]:
        """Every zero-copy entry at once (one batched device_put): engine index -> array.

        Nothing is copied here, so doing them together costs no memory and saves the
        per-call overhead of hundreds of device_puts. ``copy=True`` gives the same arrays
        in new buffers (for trainers that donate their parameters).
        """
        out = {}
        entries = []
        for e in self.entries:
            if e.aliased and e.host is not None:  # a view of each device's shard
                new = place(e.host, leaves[e.source_index], self.engine_leaves[e.engine_index].sharding)
                out[e.engine_index] = jax.device_put(new, new.sharding, may_alias=False) if copy else new
            elif copy and e.aliased:
                entries.append(e)
            elif (
                e.aliased
                and not e.view
                and leaves[e.source_index].sharding == self.engine_leaves[e.engine_index].sharding
            ):
                out[e.engine_index] = leaves[e.source_index]  # already the engine's placement
            elif e.aliased:
                entries.append(e)
        if not entries:
            return out
        spanning = [e for e in entries if not e.view and not copy and not leaves[e.source_index].is_fully_addressable]
        for e in spanning:  # arrays of several processes: device_put would copy them
            out[e.engine_index] = relabel(leaves[e.source_index], self.engine_leaves[e.engine_index].sharding)
        entries = [e for e in entries if e not in spanning]
        if not entries:
            return out
        xs = [
            np.asarray(leaves[e.source_index]).reshape(self.engine_leaves[e.engine_index].shape)
            if e.view
            else leaves[e.source_index]
            for e in entries
        ]
        shardings = [self.engine_leaves[e.engine_index].sharding for e in entries]
        out.update(
            zip((e.engine_index for e in entries), jax.device_put(xs, shardings, may_alias=False if copy else None))
        )
        return out


@dataclasses.dataclass
class _Target:
    """Sources matched to one engine leaf while a plan is built."""

    rule: LeafRule
    #: stack index (None for a plain rule) -> source index
    sources: dict[int | None, int] = dataclasses.field(default_factory=dict)


def _match_sources(
    converter: Converter, spec: ModelSpec, paths: Sequence[str], shapes: Sequence[tuple], known: Any = None
) -> tuple[dict[str, _Target], list[str]]:
    """Group source leaves by the engine leaf they feed; ``known(target)`` may rename a
    target the engine holds under another path (or return None when it has none)."""
    problems: list[str] = []
    targets: dict[str, _Target] = {}
    table = f"{converter.architecture}/{converter.source_format}"
    for si, path in enumerate(paths):
        matches = converter.lookup(path)
        if not matches:
            problems.append(f"unknown parameter {path} {tuple(shapes[si])}: no rule for it in the {table} table")
        layer_matches = [m for m in matches if m.rule.applies_to(_layer_of(m.target), spec)]
        if matches and not layer_matches:
            problems.append(
                f"parameter {path} {tuple(shapes[si])} has no rule for its layer in the {table} table "
                f"(rules for the layers in {sorted({m.rule.layers for m in matches})})"
            )
        for rule, target, stack_index in layer_matches:
            if known is not None:
                engine_path = known(target)
                if engine_path is None:
                    problems.append(
                        f"parameter {path} {tuple(shapes[si])} maps to engine leaf {target}, "
                        f"which this engine does not have{_absent_hint(target, spec)}"
                    )
                    continue
                target = engine_path
            group = targets.setdefault(target, _Target(rule))
            if stack_index in group.sources:
                other = paths[group.sources[stack_index]]
                problems.append(f"parameters {other} and {path} both map to engine leaf {target}")
                continue
            group.sources[stack_index] = si
    for target, group in targets.items():
        if group.rule.stack is None:
            continue
        count = int(spec.get(group.rule.stack) or 0)
        have = sorted(group.sources)
        if have != list(range(count)):
            pattern = group.rule.source_path(abstract_key(target)[1])
            problems.append(
                f"engine leaf {target} stacks {count} ({group.rule.stack}) sources {pattern}; got indexes "
                f"{_ranges(have)}" + (f", missing {_ranges(sorted(set(range(count)) - set(have)))}" if count else "")
            )
            continue
        first = tuple(shapes[group.sources[0]])
        odd = [paths[i] for i in group.sources.values() if tuple(shapes[i]) != first]
        if odd:
            problems.append(f"the sources stacked into {target} differ in shape: {odd[:3]} vs {first}")
    return targets, problems


def _stack_input_shape(entry: PlanEntry, leaves: Any) -> tuple[int, ...]:
    """A lazy source's stacked input shape (n, *source shape), from its header."""
    return (len(entry.source_indexes),) + tuple(leaves.shape_of(entry.source_indexes[0]))


def _layer_of(path: str) -> int | None:
    numbers = abstract_key(path)[1]
    return int(numbers[0]) if numbers else None


def _ranges(numbers: list[int]) -> str:
    if not numbers:
        return "none"
    if numbers == list(range(numbers[0], numbers[-1] + 1)):
        return f"{numbers[0]}..{numbers[-1]}" if len(numbers) > 1 else str(numbers[0])
    return ", ".join(map(str, numbers[:8])) + (" ..." if len(numbers) > 8 else "")


def _entry_inputs(group: _Target, paths, signatures, target: str):
    """(source indexes, source path, input shape, dtypes, shardings, stacked) of one engine leaf."""
    if group.rule.stack is None:
        (si,) = group.sources.values()
        shape, dtype, sharding = signatures[si]
        return (si,), paths[si], tuple(shape), [dtype], [sharding], False
    order = tuple(group.sources[i] for i in range(len(group.sources)))
    shape, _, _ = signatures[order[0]]
    path = group.rule.source_path(abstract_key(target)[1])
    return (
        order,
        path,
        (len(order),) + tuple(shape),
        [signatures[i][1] for i in order],
        [signatures[i][2] for i in order],
        True,
    )


def build_plan(
    converter: Converter,
    spec: ModelSpec,
    paths: Sequence[str],
    signatures: Sequence[tuple],
    engine_leaves: Sequence[EngineLeaf],
    *,
    strict: bool = True,
    allow_views: bool = True,
    host_reshard: bool = True,
) -> ConversionPlan:
    """Match every source path to its engine leaves and check shapes and dtypes.

    ``signatures`` are ``(shape, dtype, sharding)`` per source leaf. ``allow_views``
    lets reshape-only leaves on the CPU backend alias the source memory (per device);
    ``host_reshard`` places other reshape-only CPU leaves from host views. Raises
    ParamsMismatchError naming every unknown, duplicate, misshapen, non-floating or
    (when ``strict``) missing parameter.
    """
    index = {leaf.path: i for i, leaf in enumerate(engine_leaves)}
    quantized = quantized_leaves(engine_leaves)

    def known(target: str) -> str | None:
        if target in index or target in quantized:
            return target
        wrapped = lora_wrapped(target)  # the engine serves this linear with a LoRA wrapper
        return wrapped if wrapped in index else None

    targets, problems = _match_sources(converter, spec, paths, [s[0] for s in signatures], known)
    entries: list[PlanEntry] = []
    for target, group in targets.items():
        if group.rule.stack is not None and sorted(group.sources) != list(range(int(spec.get(group.rule.stack) or 0))):
            continue  # reported by _match_sources
        q = quantized.get(target)
        ei = index[q.values_path if q else target]
        # a quantized leaf: the rules produce the unquantized leaf, in the model dtype
        leaf = EngineLeaf(target, q.shape, spec.dtype) if q else engine_leaves[ei]
        sis, source_path, shape, dtypes, shardings, stacked = _entry_inputs(group, paths, signatures, target)
        rule = group.rule
        try:
            out = ops_lib.out_shape(rule.ops, shape, spec)
        except ValueError as e:
            problems.append(f"parameter {source_path} {shape} cannot be laid out for {target}: {e}")
            continue
        if out != tuple(leaf.shape):
            how = " after " + ", ".join(op.reason for op in rule.ops) if rule.ops else ""
            problems.append(
                f"shape mismatch: parameter {source_path} {shape} gives {out}{how}, "
                f"engine leaf {target} is {tuple(leaf.shape)}"
            )
            continue
        bad = sorted({np.dtype(d).name for d in dtypes if not _is_floating(d)})
        if bad:
            problems.append(
                f"parameter {source_path} {shape} has dtype {bad[0]}; engine leaf {target} is "
                f"{np.dtype(leaf.dtype).name} and only floating-point sources are accepted"
            )
            continue
        eff = ops_lib.effective_ops(rule.ops, shape, spec)
        if q is not None:
            reasons = (["stack"] if stacked else []) + [op.reason for op in eff] + _casts(dtypes, leaf.dtype)
            reasons += ["host array"] if any(sh is None for sh in shardings) else []
            reasons.append(q.reason)  # never aliased: the engine serves values and scales
            entries.append(
                PlanEntry(
                    ei,
                    q.values_path,
                    sis,
                    source_path,
                    eff,
                    tuple(reasons),
                    q.nbytes,
                    stacked=stacked,
                    quantized=q,
                    scale_index=index[q.scale_path],
                )
            )
            continue
        if not stacked and allow_views and _can_view(eff, dtypes[0], shardings[0], leaf):
            entries.append(PlanEntry(ei, target, sis, source_path, eff, (), leaf.nbytes, view=True))
            continue
        layout = None
        if not stacked and (allow_views or host_reshard) and shardings[0] is not None and leaf.sharding is not None:
            if np.dtype(dtypes[0]) == np.dtype(leaf.dtype):
                layout = host_layout(eff, spec, leaf.dtype, shape, shardings[0], leaf.shape, leaf.sharding)
        if (
            layout is not None
            and layout.all_views
            and allow_views
            and (eff or not _equivalent(shardings[0], leaf.sharding, len(shape)))
        ):
            entries.append(PlanEntry(ei, target, sis, source_path, eff, (), leaf.nbytes, view=True, host=layout))
            continue
        reasons = (["stack"] if stacked else []) + [op.reason for op in eff]
        reasons += _casts(dtypes, leaf.dtype)
        if any(sh is None for sh in shardings):
            reasons.append("host array")
        elif leaf.sharding is not None and not stacked and not _equivalent(shardings[0], leaf.sharding, len(shape)):
            reasons.append("reshard")
        host = layout if layout is not None and host_reshard and reasons and not layout.all_views else None
        entries.append(
            PlanEntry(ei, target, sis, source_path, eff, tuple(reasons), leaf.nbytes, stacked=stacked, host=host)
        )

    fed = [leaf.path for leaf in engine_leaves if leaf.path not in quantized] + list(quantized)
    missing = [p for p in fed if converter.feeds(p) and p not in targets]
    if missing and strict:
        for path in (p for p in missing if not converter.rule_for(p).optional):
            src = converter.source_for(path)
            shape = quantized[path].shape if path in quantized else tuple(engine_leaves[index[path]].shape)
            problems.append(
                f"missing parameter for engine leaf {path} {shape}"
                + (" (served quantized)" if path in quantized else "")
                + (f" (expected source {src})" if src else "")
            )
    if problems:
        raise ParamsMismatchError(
            problems,
            header=f"cannot push these parameters into the {converter.architecture} engine "
            f"({converter.architecture}/{converter.source_format})",
        )
    return ConversionPlan(converter, spec, entries, engine_leaves, missing, len(paths))


def _casts(dtypes: Sequence[Any], target: Any) -> list[str]:
    return sorted(
        {f"cast {np.dtype(d).name}->{np.dtype(target).name}" for d in dtypes if np.dtype(d) != np.dtype(target)}
    )


def lora_wrapped(path: str) -> str:
    """``...q_proj.weight`` -> ``...q_proj.base_layer.weight`` (sglang-jax static LoRA layout)."""
    head, _, leaf = path.rpartition(".")
    return f"{head}.base_layer.{leaf}"


def _absent_hint(target: str, spec: ModelSpec) -> str:
    if target.startswith("lm_head") and spec.tie_word_embeddings:
        return " (the engine's model ties lm_head to the input embedding)"
    _, numbers = abstract_key(target)
    if numbers and int(numbers[0]) >= spec.num_layers:
        return f" (the engine's model has {spec.num_layers} layers)"
    if target.endswith(".bias"):
        return " (the engine's model has no attention biases: another architecture?)"
    if target.endswith(("A_buffer", "B_buffer")):
        return (
            " (LoRA adapters need an engine started with static LoRA: enable_static_lora, "
            "lora_target_modules, max_lora_rank, lora_scaling)"
        )
    if "_norm" in target and "self_attn" in target:
        return " (the engine's model has no q/k norms: another architecture?)"
    return ""


def convert_params(
    converter: Converter,
    spec: ModelSpec,
    paths: Sequence[str],
    leaves: Sequence[Any],
    dtype: Any,
    quantization: Quantization | None = None,
) -> dict[str, jax.Array]:
    """Convert a whole source tree to engine paths without an engine (on the source's devices).

    Used to compute what an engine would serve, e.g. for :func:`converters.fingerprint_params`.
    Leaves take ``dtype`` unless their rule names the engine's fixed dtype for them; with
    ``quantization``, the leaves it quantizes become their (values, scale) pairs.
    """
    signatures = [(tuple(np.shape(x)), getattr(x, "dtype", None), None) for x in leaves]
    targets, problems = _match_sources(converter, spec, paths, [s[0] for s in signatures])
    if problems:
        raise ParamsMismatchError(
            problems, header=f"cannot convert with the {converter.architecture}/{converter.source_format} table"
        )
    out: dict[str, jax.Array] = {}
    for target, group in targets.items():
        sis, _, shape, _, _, stacked = _entry_inputs(group, paths, signatures, target)
        eff = ops_lib.effective_ops(group.rule.ops, shape, spec)
        leaf_dtype = np.dtype(group.rule.dtype or dtype)
        q = quantization.leaf(target, ops_lib.out_shape(eff, shape, spec)) if quantization else None
        if q is not None:
            values, scale = _transform(eff, spec, np.dtype(dtype), None, False, stacked, q.recipe)(
                *(leaves[i] for i in sis)
            )
            out[q.values_path], out[q.scale_path] = values, scale
            continue
        out[target] = _transform(eff, spec, leaf_dtype, None, False, stacked)(*(leaves[i] for i in sis))
    return out
