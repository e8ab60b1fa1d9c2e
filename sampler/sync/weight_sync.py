"""The weight-sync core of one in-process engine: plan cache, update gate, swap, reports,
sharing audit and fingerprint. Front ends (``SglangJaxSampler``, ``DataParallelSampler``,
the rollout, the HTTP server) all swap weights through a ``WeightSync``.

A swap: validate the source against the engine (a cached plan); then either wait until no
generation runs ("drain": the gate for this process's callers, the engine's quiescing for
everyone else) or park the scheduler between two iterations with requests in flight
("continue", "recompute", see ``sampler.sync.inflight``); ``EngineWeights.swap`` writes the new
leaves, and nothing the old weights computed stays reusable in the prefix cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from converters import ConversionPlan, ModelSpec, build_plan, detect_format, get_converter
from converters import fingerprint as fingerprint_arrays
from converters.architecture import ENGINE_FORMAT
from converters.checkpoint import SafetensorsCheckpoint
from converters.errors import DeletedArrayError, ParamsMismatchError
from converters.quantization import Quantization, quantized_leaves
from converters.registry import canonical_key
from converters.source import as_param_tree, key_paths, leaf_signature
from converters.spec import read_hf_config
from sampler.config import SamplerConfig
from sampler.engine.handle import EngineHandle
from sampler.engine.progress import progress
from sampler.reports import SharingReport, UpdateReport
from sampler.sync.gate import UpdateGate
from sampler.sync.inflight import InFlightSwitch, check_in_flight
from sampler.sync.leaves import EngineWeights, buffer_pointers, live_device_bytes

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class SwapWindow:
    """What ``WeightSync.exclusive`` obtained: the policy for requests in flight, and how
    long the caller waited for it (requests to finish, the scheduler to park)."""

    in_flight: str = "drain"
    wait_seconds: float = 0.0


@jax.jit
def _all_finite(x: jax.Array) -> jax.Array:
    return jax.numpy.isfinite(x).all()


def check_finite_leaves(paths: Sequence[str], leaves: Sequence[Any]) -> None:
    """Raise ParamsMismatchError naming every floating-point leaf holding NaN or Inf."""
    floating = [(p, x) for p, x in zip(paths, leaves) if jax.numpy.issubdtype(x.dtype, jax.numpy.inexact)]
    if not floating:
        return
    on_device = [(p, x) for p, x in floating if isinstance(x, jax.Array)]
    on_host = [(p, x) for p, x in floating if not isinstance(x, jax.Array)]
    bad = [p for p, x in on_host if not np.isfinite(np.asarray(x, np.float32)).all()]
    if on_device:
        finite = jax.device_get([_all_finite(x) for _, x in on_device])  # dispatched together, one wait
        bad += [p for (p, _), ok in zip(on_device, finite) if not ok]
    if bad:
        raise ParamsMismatchError(
            [f"{p}: holds NaN or Inf" for p in sorted(bad)], header="refusing non-finite parameters (check_finite=True)"
        )


@dataclasses.dataclass
class Push:
    """A validated update, ready to be written into one engine (``WeightSync.apply``)."""

    plan: ConversionPlan
    leaves: Sequence[Any]
    #: When the caller asked for the update (the report's seconds count from here).
    t0: float
    plan_reused: bool = False
    track_peak_memory: bool = False
    alias: bool = True
    show_progress: bool = False


#: Paths a leaf takes that move no bytes (the engine uses the source's memory).
ZERO_COPY_PATHS = ("alias", "view")


def moved_bytes(entry: Any, kind: str) -> int:
    """Bytes written for one engine leaf that took path ``kind``."""
    if kind in ZERO_COPY_PATHS:
        return 0
    if kind == "reshard (host)":
        return entry.host.copied_bytes  # shards that coincide with a source shard are views
    return entry.nbytes


def _written_paths(entry: Any) -> tuple[str, ...]:
    """Engine paths one plan entry writes: its leaf, or a quantized leaf's values and scale."""
    if entry.quantized is not None:
        return (entry.engine_path, entry.quantized.scale_path)
    return (entry.engine_path,)


def is_path(x: Any) -> bool:
    """Whether ``x`` names a checkpoint directory (rather than being an in-memory tree)."""
    return isinstance(x, (str, bytes)) or hasattr(x, "__fspath__")


class WeightSync:
    """Swaps a trainer's parameters into one engine.

    Leaves that already have the engine's shape, dtype and sharding are aliased (the
    engine uses the trainer's buffers); the rest are converted leaf by leaf and written
    into the engine's own old buffers.
    """

    def __init__(self, handle: EngineHandle, config: SamplerConfig):
        self.handle = handle
        self.config = config
        runner = handle.model_runner
        self.weights = EngineWeights(runner)
        spec = ModelSpec.from_hf_config(handle.hf_config, tp_size=int(runner.mesh.shape.get("tensor", 1)))
        self.spec = dataclasses.replace(spec, dtype=np.dtype(runner.dtype).name)
        #: How the engine serves its weights quantized (None: in the model dtype), read off its leaves.
        self.quantization: Quantization | None = Quantization.of_engine(self.weights.leaves())
        self._quantized_paths = frozenset(
            p for q in quantized_leaves(self.weights.leaves()).values() for p in (q.values_path, q.scale_path)
        )
        self.gate = UpdateGate()
        self.version = 0
        self._plans: dict[Any, ConversionPlan] = {}
        #: True while ``apply`` writes leaves (the scheduler is parked then).
        self.writing = False
        self.switch = InFlightSwitch(
            handle.scheduler, handle.tokenizer_manager, handle.loop, lambda: self.version, lambda: self.weights.broken
        )

    @property
    def architecture(self) -> str:
        return self.spec.architecture

    # ------------------------------------------------------------------ what is served
    def engine_params(self) -> dict[str, jax.Array]:
        """The arrays the engine serves now, keyed by engine path.

        Valid until the next update: a converted leaf is written into the buffer of the
        leaf it replaces, which deletes the old array object.
        """
        return self.weights.as_dict()

    def is_weight(self, path: str) -> bool:
        return path in self._quantized_paths or get_converter(self.architecture, ENGINE_FORMAT).feeds(path)

    def weight_paths(self) -> list[str]:
        """Engine paths of the model weights (not rotary caches or other buffers), sorted."""
        return sorted(p for p in self.weights.paths if self.is_weight(p))

    def fingerprint(self) -> str:
        """Content hash of the served weights (same as ``converters.fingerprint_params``)."""
        # LoRA-wrapped linears hash under their plain path, as a converted trainer state does
        weights = {canonical_key(p): x for p, x in self.engine_params().items() if self.is_weight(p)}
        return fingerprint_arrays(weights)

    def check_servable(self) -> None:
        """Raise if generating now would crash the engine or use a mixed set of weights.

        While a swap writes the weights (only callers outside the update gate can see that,
        e.g. the HTTP server) a request is servable: it waits at the parked scheduler, and
        is aborted there if the swap fails."""
        if self.handle.closed:
            raise RuntimeError("this sampler has been shut down")
        self.handle.raise_if_faulted()
        if self.writing:
            return
        if self.weights.broken:
            raise RuntimeError(
                "a weight update failed midway, so the engine holds a mix of old and new leaves; "
                "push a complete set with update_params before generating"
            )
        dead = [p for p, x in zip(self.weights.paths, self.weights.arrays) if x.is_deleted()]
        if dead:
            raise DeletedArrayError(
                f"{len(dead)} engine weight arrays were deleted, e.g. {dead[:3]}: a train step donated "
                "buffers the engine aliases. Push the parameters again with update_params (or update "
                "with copies if your train step donates its parameters)"
            )

    # ------------------------------------------------------------------ plans
    def plan_for(
        self, updated_weights: Any, filter_types: Any = None, *, source_format: str | None = None, strict: bool = True
    ) -> ConversionPlan:
        """The (cached) conversion plan for this source structure; validates everything."""
        tree = as_param_tree(updated_weights, filter_types)
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        return self._plan(tree, leaves, treedef, source_format, strict)[0]

    def _plan(self, tree, leaves, treedef, source_format, strict) -> tuple[ConversionPlan, bool]:
        signatures = tuple(leaf_signature(x) for x in leaves)
        key = (treedef, signatures, source_format, strict, self.config.reshape_views, self.config.reshard)
        plan = self._plans.get(key)
        if plan is not None:
            return plan, True
        paths = key_paths(tree)
        fmt = source_format or detect_format(self.architecture, paths)
        plan = build_plan(
            get_converter(self.architecture, fmt),
            self.spec,
            paths,
            signatures,
            self.weights.leaves(),
            strict=strict,
            allow_views=self.config.reshape_views,
            host_reshard=self.config.reshard == "auto",
        )
        self._plans[key] = plan
        return plan, False

    def check_checkpoint(self, path: Any, *, strict: bool = True) -> tuple[SafetensorsCheckpoint, ConversionPlan]:
        """Validate a safetensors directory against the engine (reads only the headers):
        raises as ``load_checkpoint`` would, without touching the engine."""
        path = os.fsdecode(path)
        if os.path.isfile(os.path.join(path, "config.json")):  # name the architecture mismatch, not its symptoms
            archs = read_hf_config(path).get("architectures") or []
            if archs and self.architecture not in archs:
                raise ParamsMismatchError(
                    [f"checkpoint {path!r} is a {archs[0]}, but this engine serves {self.architecture}"],
                    header="the checkpoint does not fit the engine",
                )
        ckpt = SafetensorsCheckpoint(path)
        fmt = detect_format(self.architecture, ckpt.names)
        plan = build_plan(
            get_converter(self.architecture, fmt),
            self.spec,
            ckpt.names,
            ckpt.signatures(),
            self.weights.leaves(),
            strict=strict,
            allow_views=False,
        )
        return ckpt, plan

    # ------------------------------------------------------------------ updates
    def prepare(
        self,
        updated_weights: Any,
        filter_types: Sequence[type] | type | None = None,
        *,
        source_format: str | None = None,
        strict: bool = True,
        track_peak_memory: bool = False,
        alias: bool = True,
        check_finite: bool = False,
    ) -> Push:
        """Validate a trainer tree against the engine (nothing changes yet): the Push to apply."""
        t0 = time.perf_counter()
        tree = as_param_tree(updated_weights, filter_types)
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        plan, reused = self._plan(tree, leaves, treedef, source_format, strict)
        plan.check_live(leaves)
        if check_finite:
            check_finite_leaves(key_paths(tree), leaves)
        return Push(plan, leaves, t0, plan_reused=reused, track_peak_memory=track_peak_memory, alias=alias)

    def prepare_checkpoint(self, path: Any, *, strict: bool = True, track_peak_memory: bool = False) -> Push:
        """Validate a safetensors directory from its headers: the Push that streams it in."""
        t0 = time.perf_counter()
        ckpt, plan = self.check_checkpoint(path, strict=strict)
        logger.info("loading %s (%d tensors, %.1f MiB)", ckpt.path, len(ckpt.names), ckpt.nbytes / 2**20)
        return Push(plan, ckpt.leaves(), t0, track_peak_memory=track_peak_memory, show_progress=True)

    def update_params(
        self,
        updated_weights: Any,
        filter_types: Any = None,
        *,
        in_flight: str = "drain",
        max_staleness: int | None = None,
        **options: Any,
    ) -> UpdateReport:
        """Serve ``updated_weights`` from the next request on (see ``SglangJaxSampler.update_params``)."""
        self.check_policy(in_flight, max_staleness)
        push = self.prepare(updated_weights, filter_types, **options)
        return self.swap(push, in_flight=in_flight, max_staleness=max_staleness)

    def load_checkpoint(
        self,
        path: Any,
        *,
        strict: bool = True,
        track_peak_memory: bool = False,
        in_flight: str = "drain",
        max_staleness: int | None = None,
    ) -> UpdateReport:
        """Load an HF safetensors directory tensor by tensor (host memory near one tensor)."""
        self.check_policy(in_flight, max_staleness)
        push = self.prepare_checkpoint(path, strict=strict, track_peak_memory=track_peak_memory)
        return self.swap(push, in_flight=in_flight, max_staleness=max_staleness)

    def check_policy(self, in_flight: Any, max_staleness: Any = None) -> None:
        """Refuse an ``in_flight`` policy (or ``max_staleness``) this engine cannot apply,
        before any work: ValueError naming the field."""
        check_in_flight(in_flight, max_staleness)

    @contextlib.contextmanager
    def exclusive(self, timeout: float | None = None, *, in_flight: str = "drain", max_staleness: int | None = None):
        """Hold the engine where its weights may change, for anyone; yields a SwapWindow.

        "drain": no generation runs (new requests wait, running ones finish first).
        "continue" / "recompute": requests stay in flight; the scheduler thread is parked
        between two iterations and new generation calls wait at the gate until the body
        ends. With ``max_staleness`` it first waits until no request in flight holds tokens
        more than that many versions older than the next one. UpdateTimeoutError, nothing
        changed, if that takes longer than ``timeout`` (default ``update_timeout_s``).
        """
        timeout = self.config.update_timeout_s if timeout is None else timeout
        check_in_flight(in_flight, max_staleness)
        self.switch.check_supported(in_flight)
        self.handle.raise_if_faulted()
        t0 = time.perf_counter()
        if in_flight == "drain":
            with self.gate.updating(timeout), self.handle.quiesced(timeout):
                yield SwapWindow(in_flight, time.perf_counter() - t0)
            return
        deadline = time.monotonic() + timeout
        with self.gate.one_update(timeout):
            self.switch.wait_for_staleness(self.version + 1, max_staleness, deadline - time.monotonic())
            ready = lambda: self.switch.ready(in_flight)
            with self.handle.parked(deadline - time.monotonic(), ready), self.gate.holding_new_calls():
                yield SwapWindow(in_flight, time.perf_counter() - t0)

    def swap(self, push: Push, *, in_flight: str = "drain", max_staleness: int | None = None) -> UpdateReport:
        """Apply ``push`` under the ``in_flight`` policy; returns the report."""
        with self.exclusive(in_flight=in_flight, max_staleness=max_staleness) as window:
            return self.apply(push, window)

    def apply(self, push: Push, window: SwapWindow | None = None) -> UpdateReport:
        """Write ``push`` into the engine; only inside ``exclusive()`` (pass its window)."""
        window = window or SwapWindow()
        in_flight = window.in_flight
        plan, alias, track_peak = push.plan, push.alias, push.track_peak_memory
        track = self.config.track_memory or track_peak
        before = live_device_bytes() if track else None
        peak = [before or 0]
        bar = progress(len(plan.entries), "loading weights", self.config.progress) if push.show_progress else None

        def on_leaf(_index, new):
            if track_peak:
                jax.block_until_ready(new)
                peak[0] = max(peak[0], live_device_bytes())
            if bar is not None:
                bar.update(1)

        held = self.switch.before_write(in_flight)
        self.writing = True
        try:
            written, paths = self.weights.swap(
                plan,
                push.leaves,
                on_leaf if track_peak or bar else None,
                alias=alias,
                reshard=self.config.reshard,
                bucket_bytes=self.config.reshard_bucket_bytes,
            )
            jax.block_until_ready(written)
            del written
            self.version += 1
            self.switch.after_write(in_flight, self.version, held)
        except BaseException:
            if in_flight != "drain" and self.weights.broken:
                aborted = self.switch.abort_held()
                logger.error("a weight swap failed midway; %d requests in flight were aborted", aborted)
            raise
        finally:
            self.writing = False
            if bar is not None:
                bar.close()
        after = live_device_bytes() if track else None
        copied = plan.copied if alias else plan.entries
        aliased = plan.aliased if alias else []
        copied_paths = [p for e in copied for p in _written_paths(e)]
        moved: dict[str, int] = {}
        for e in plan.entries:
            kind = paths[e.engine_path]
            moved[kind] = moved.get(kind, 0) + moved_bytes(e, kind)
        return UpdateReport(
            version=self.version,
            seconds=time.perf_counter() - push.t0,
            source_format=plan.source_format,
            aliased=[e.engine_path for e in aliased],
            copied=copied_paths,
            aliased_bytes=sum(e.nbytes for e in aliased),
            copied_bytes=sum(moved.values()),
            paths=paths,
            moved_bytes=moved,
            live_bytes_before=before,
            live_bytes_after=after,
            peak_extra_bytes=max(0, peak[0] - max(before, after)) if track_peak and before is not None else None,
            largest_copied_leaf_bytes=max((e.nbytes for e in copied), default=0),
            untouched=list(plan.missing),
            plan_reused=push.plan_reused,
            in_flight=in_flight,
            requests_in_flight=len(held),
            wait_seconds=window.wait_seconds,
        )

    def verify_sharing(
        self, updated_weights: Any, filter_types: Any = None, *, source_format: str | None = None
    ) -> SharingReport:
        """Whether each engine leaf holds the very same device buffers as its source."""
        tree = as_param_tree(updated_weights, filter_types)
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        plan, _ = self._plan(tree, leaves, treedef, source_format, False)
        served = self.weights.arrays
        shared, copies = [], {}
        for entry in plan.entries:
            if entry.quantized is not None:
                why = (
                    "quantized: " + ", ".join(entry.reasons) + " (the engine serves the values and their scales, "
                    "so it never shares the source's buffers)"
                )
                for path in _written_paths(entry):
                    copies[path] = why
                continue
            if entry.reasons:
                copies[entry.engine_path] = "copied: " + ", ".join(entry.reasons)
                continue
            src = leaves[entry.source_index]
            if src.is_deleted() or served[entry.engine_index].is_deleted():
                copies[entry.engine_path] = "deleted: the source or engine array was donated or freed"
            elif buffer_pointers(src) == buffer_pointers(served[entry.engine_index]):
                shared.append(entry.engine_path)
            else:
                copies[entry.engine_path] = "different buffers: these arrays were not pushed with update_params"
        for path in plan.missing:
            copies[path] = "not in the source"
        return SharingReport(shared=shared, copies=copies)

    def close(self) -> None:
        self._plans.clear()
        self.handle.shutdown()
