"""SglangJaxSampler: a Tunix sampler backed by one in-process sglang-jax Engine whose
weights the trainer replaces in place after every step."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from flax import nnx

from converters import ConversionPlan, ModelSpec, Quantization
from sampler import restart as restart_lib
from sampler.config import SamplerConfig
from sampler.engine.handle import EngineHandle
from sampler.engine.validation import RequestLimits, per_prompt, prompt_ids
from sampler.errors import EngineFaultError, UpdateTimeoutError, WeightsLostError
from sampler.interface import RolloutEngine, SglangSamplerOutput, as_tokenizer_adapter
from sampler.multiprocess import CollectiveGeneration, MultiNodeEngineHandle, MultiProcessSync, topology
from sampler.reports import SharingReport, UpdateReport
from sampler.restart import RestartReport, WeightSource
from sampler.sync.weight_sync import WeightSync, is_path
from sampler.tunix.config import as_sampler_config, is_tunix_config, mapping_format


class SglangJaxSampler(RolloutEngine):
    """A Tunix ``BaseSampler`` whose sglang-jax Engine runs in this process.

    ``update_params`` replaces the engine's weights with a trainer's live parameters:
    leaves that already have the engine's shape, dtype and sharding are aliased (the
    engine uses the trainer's buffers), the rest are converted leaf by leaf. Generation
    (``__call__``, ``generate_ids``, ``score_completions``) never sees a mix of weights.
    """

    def __init__(self, tokenizer: Any = None, config: Any = None, **engine_kwargs: Any):
        """``config``: a SamplerConfig, or Tunix's ``SglangJaxConfig`` (every field mapped, see
        ``sampler.tunix.config``); extra keyword arguments go to the engine, as in Tunix."""
        tunix_mapping = getattr(config, "mapping_config", None) if is_tunix_config(config) else None
        config = as_sampler_config(config, **engine_kwargs)
        if config.data_parallel_size != 1:
            raise ValueError(
                f"data_parallel_size={config.data_parallel_size}: build it with sampler.create_sampler(config) "
                "or DataParallelSampler (one SglangJaxSampler is one engine)"
            )
        self.config = config
        self.tokenizer = as_tokenizer_adapter(tokenizer, config.model_path)
        #: Where the served weights came from last (what ``restart`` can reload).
        self.weight_source = WeightSource()
        self._weights_lost: str | None = None  # set by a restart that could not restore them
        self._unrestored: restart_lib.ServedWeights | None = None
        self._auto_restarts = 0
        self._start(config)
        if tunix_mapping is not None:
            mapping_format(self.architecture, tunix_mapping)

    def _start(self, config: SamplerConfig) -> None:
        # one engine in this process, or this process's part of one spanning several
        self._handle, self.sync, self._collective = engine_parts(config)
        self.engine = self._handle.engine

    # ------------------------------------------------------------------ properties
    @property
    def spec(self) -> ModelSpec:
        return self.sync.spec

    @property
    def quantization(self) -> Quantization | None:
        """How the engine serves its weights quantized (``quantization_config_path``), or None."""
        return self.sync.quantization

    @property
    def version(self) -> int:
        return self.sync.version

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self._handle.mesh

    @property
    def event_loop(self):
        """The engine's asyncio loop (runs in its own thread; the tokenizer manager lives there)."""
        return self._handle.loop

    @property
    def transformer(self) -> nnx.Module:
        """The engine's own nnx model (its Variables hold the served weights)."""
        return self._handle.model_runner.model

    @property
    def transformer_state(self) -> nnx.State:
        return nnx.state(self._handle.model_runner.model)

    @property
    def healthy(self) -> bool:
        """False once an engine thread has failed (then every call raises EngineFaultError
        until ``restart()``)."""
        return not self._handle.closed and self._handle.fault() is None

    @property
    def handle(self) -> EngineHandle:
        """The running engine and its threads (replaced by ``restart``)."""
        return self._handle

    @property
    def fault(self) -> str | None:
        """What ended one of the engine's threads ("the engine's <thread> thread failed
        (<error>)"), if anything did."""
        return self._handle.fault_message()

    # ------------------------------------------------------------------ recovery
    def restart(self) -> RestartReport:
        """Replace the engine (after a fault, or any time) with a new one serving the same
        weights: the served arrays themselves while they are alive, else the checkpoint
        loaded last, else the configuration's (see ``sampler.restart``); if none applies the
        new engine refuses to generate until weights are pushed (``WeightsLostError``).

        Must run on the main thread (sglang-jax installs signal handlers while an engine
        starts). Calls waiting on the old engine get an exception; the version is kept.
        """
        if self._collective is not None:
            raise RuntimeError(
                "restart() replaces one process's engine; an engine spanning several processes is "
                "restarted by restarting every process"
            )
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("restart() must run on the main thread: sglang-jax installs signal handlers at start")
        t0 = time.perf_counter()
        fault = self.fault
        # A restart that failed after its new engine started left that engine's (empty)
        # weights in place: what to restore is still what was captured then.
        served = self._unrestored or restart_lib.capture(self)
        self._unrestored = served
        self.sync.close()
        self._start(restart_lib.restart_config(self.config, served))
        self._weights_lost = "the restart is restoring them"
        restored = restart_lib.restore(self, served)
        self._unrestored = None
        self._weights_lost = (
            f"the engine was restarted after {fault or 'a restart request'} and the weights it served "
            "(pushed from memory, no longer alive) could not be restored"
            if restored == "none"
            else None
        )
        report = RestartReport(restored, served.fingerprint, time.perf_counter() - t0, fault)
        logger.warning("%s (fault: %s)", report.summary(), fault)
        return report

    def _recover_if_faulted(self) -> None:
        """Opt-in automatic restart (``SamplerConfig.auto_restart``) before a call."""
        if self._handle.fault() is None or self._auto_restarts >= self.config.auto_restart:
            return
        if self._collective is not None:
            return  # every process would have to restart together
        if threading.current_thread() is not threading.main_thread():
            logger.warning("the engine faulted; an automatic restart needs the main thread, this call fails instead")
            return
        self._auto_restarts += 1
        self.restart()

    # ------------------------------------------------------------------ weights
    def engine_params(self) -> dict[str, jax.Array]:
        """The arrays the engine serves now, keyed by engine path.

        Valid until the next update: a converted leaf is written into the buffer of the
        leaf it replaces, which deletes the old array object.
        """
        return self.sync.engine_params()

    def engine_shardings(self) -> dict[str, jax.sharding.Sharding]:
        """Engine path -> sharding: place trainer params like this for zero-copy updates."""
        return {p: x.sharding for p, x in self.engine_params().items()}

    def fingerprint(self) -> str:
        return self.sync.fingerprint()

    def weight_paths(self) -> list[str]:
        return self.sync.weight_paths()

    def plan_for(
        self, updated_weights: Any, filter_types: Any = None, *, source_format: str | None = None, strict: bool = True
    ) -> ConversionPlan:
        """The (cached) conversion plan for this source structure; validates everything."""
        return self.sync.plan_for(updated_weights, filter_types, source_format=source_format, strict=strict)

    def update_params(
        self,
        updated_weights: Any,
        filter_types: Sequence[type] | type | None = None,
        *,
        source_format: str | None = None,
        strict: bool = True,
        track_peak_memory: bool = False,
        alias: bool = True,
        check_finite: bool = False,
        in_flight: str = "drain",
        max_staleness: int | None = None,
    ) -> UpdateReport:
        """Serve ``updated_weights`` from the next request on.

        ``updated_weights``: an nnx.State, an nnx.Module, a Flax params tree or TrainState,
        or a mapping of arrays in a registered source format (detected from the paths
        unless ``source_format``). Everything is validated before the engine is touched; a
        bad tree raises a ValueError naming the offending paths and the engine keeps its
        weights. ``strict=False`` allows updating a subset of the engine's weight leaves.
        ``alias=False`` copies every leaf (for train steps that donate their parameters).
        ``check_finite=True`` refuses params holding NaN or Inf (ValueError naming the
        paths; costs one reduction over every leaf).

        ``in_flight``: what happens to requests running at the swap (``sampler.sync.inflight``):
        ``"drain"`` (they finish on the old weights first; new ones wait), ``"continue"``
        (they go on with their KV cache under the new weights) or ``"recompute"`` (their KV
        is recomputed under the new weights first). Every answer's
        ``meta_info["weight_versions"]`` says which version produced which tokens.
        ``max_staleness=k`` (with "continue"/"recompute"): the swap first waits until no
        request in flight holds tokens more than k versions older than the new version.
        """
        self._recover_if_faulted()
        report = self.sync.update_params(
            updated_weights,
            filter_types,
            source_format=source_format,
            strict=strict,
            track_peak_memory=track_peak_memory,
            alias=alias,
            check_finite=check_finite,
            in_flight=in_flight,
            max_staleness=max_staleness,
        )
        self.weight_source = WeightSource("pushed")
        if strict:
            self._weights_lost = None
        return report

    def load_checkpoint(
        self,
        path_or_weights: Any,
        *,
        strict: bool = True,
        track_peak_memory: bool = False,
        in_flight: str = "drain",
        max_staleness: int | None = None,
    ) -> UpdateReport:
        """Load an HF safetensors directory (one file, or shards with an index), or an
        in-memory tree (as ``update_params``).

        Tensors are read from disk one at a time, converted and put on the engine's
        shardings, so host memory stays near one tensor. A checkpoint of another
        architecture, or with a missing or misshapen tensor, raises a ValueError before
        the engine is touched (``converters.CheckpointError`` if the files are unreadable).
        ``in_flight`` / ``max_staleness`` as in ``update_params`` (with "continue" or
        "recompute" the scheduler stays parked while the tensors are read).
        """
        options: dict[str, Any] = dict(strict=strict, track_peak_memory=track_peak_memory, in_flight=in_flight)
        if not is_path(path_or_weights):
            return self.update_params(path_or_weights, max_staleness=max_staleness, **options)
        self._recover_if_faulted()
        report = self.sync.load_checkpoint(path_or_weights, max_staleness=max_staleness, **options)
        self.weight_source = WeightSource("pushed")  # a partial load: only the arrays tell what is served
        if strict:
            self.weight_source = WeightSource("checkpoint", os.fsdecode(path_or_weights))
            self._weights_lost = None
        return report

    def check_checkpoint(self, path: Any, *, strict: bool = True) -> None:
        self.sync.check_checkpoint(path, strict=strict)

    def verify_sharing(
        self, updated_weights: Any, filter_types: Any = None, *, source_format: str | None = None
    ) -> SharingReport:
        """Whether each engine leaf holds the very same device buffers as its source."""
        return self.sync.verify_sharing(updated_weights, filter_types, source_format=source_format)

    # ------------------------------------------------------------------ generation
    @property
    def request_limits(self) -> RequestLimits:
        return self._handle.limits

    def check_servable(self) -> None:
        self.sync.check_servable()
        if self._weights_lost is not None:
            raise WeightsLostError(f"{self._weights_lost}; push them with update_params (or load a checkpoint)")

    def check_request(
        self,
        prompts: list[list[int]],
        sampling_params: Sequence[dict] | dict,
        *,
        return_logprob: bool | list[bool] = True,
        logprob_start_len: int | list[int] | None = None,
    ) -> None:
        """Raise ``InvalidRequestError`` as ``generate_ids`` would, sending nothing."""
        from sgl_jax.srt.managers.io_struct import GenerateReqInput

        request = GenerateReqInput(
            input_ids=prompts,
            sampling_params=sampling_params if isinstance(sampling_params, Mapping) else list(sampling_params),
            return_logprob=return_logprob,
            logprob_start_len=logprob_start_len,
        )
        self._handle.validator.check(request)

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        sampling_params: Sequence[dict] | dict,
        *,
        return_logprob: bool = True,
        logprob_start_len: int | list[int] | None = None,
        timeout: float | None = None,
    ) -> list[dict]:
        """Raw engine results for token-id prompts (one dict per prompt); each result's
        ``meta_info["weight_versions"]`` lists (version, first token index) per weight version
        that produced its tokens.

        On a multi-process engine: on process 0 only, or on every process inside
        ``collective_generation()`` (each gets the results of its own prompts).

        The whole call is validated before any prompt is sent (``sampler.engine.validation``): a
        bad prompt or option raises ``InvalidRequestError`` (a ValueError) naming it.
        """
        prompts = prompt_ids(prompts)
        if not isinstance(sampling_params, Mapping):
            sampling_params = per_prompt(sampling_params, len(prompts), "sampling_params")
        self._recover_if_faulted()
        if self._collective is not None:
            if self._collective.active:
                return self._collective.generate(
                    self._generate_local,
                    prompts,
                    sampling_params,
                    return_logprob=return_logprob,
                    logprob_start_len=logprob_start_len,
                    timeout=timeout,
                )
            self._collective.check_direct()
        return self._generate_local(
            prompts,
            sampling_params,
            return_logprob=return_logprob,
            logprob_start_len=logprob_start_len,
            timeout=timeout,
        )

    def collective_generation(self) -> contextlib.AbstractContextManager:
        """On a multi-process engine, generation calls in this block are collective: every
        process calls them (in the same order), process 0 runs every process's prompts in one
        batch, each process gets its own results. A no-op on a single-process engine."""
        return contextlib.nullcontext() if self._collective is None else self._collective.collective()

    def barrier(self, tag: str = "barrier") -> None:
        """Wait until every process of a multi-process engine got here (a no-op on a single
        process). Call it on every process after process 0 generated on its own: the others
        must not run computations on the engine's devices while its forward passes run (the
        collectives of the two would interleave differently in each process)."""
        if self._collective is not None:
            self._collective.group.barrier(tag)

    @property
    def process_index(self) -> int:
        """This process's rank in a multi-process engine (0 on a single-process one)."""
        return 0 if self._collective is None else self._collective.handle.topology.node_rank

    def _generate_local(
        self,
        prompts: Sequence[Sequence[int]],
        sampling_params: Sequence[dict] | dict,
        *,
        return_logprob: bool = True,
        logprob_start_len: int | list[int] | None = None,
        timeout: float | None = None,
    ) -> list[dict]:
        with self.sync.gate.generating(check=self.check_servable):
            out = self._handle.run(
                self.engine.async_generate(
                    input_ids=prompts,
                    sampling_params=sampling_params,
                    return_logprob=return_logprob,
                    logprob_start_len=logprob_start_len,
                ),
                timeout=timeout,
            )
        self._handle.raise_if_faulted()  # a fault during the call ended it with "abort" answers
        return out if isinstance(out, list) else [out]

    # ------------------------------------------------------------------ lifecycle
    def shutdown(self) -> None:
        """Stop the engine and every thread it started (idempotent)."""
        self.sync.close()


def engine_parts(config: SamplerConfig) -> tuple[EngineHandle, WeightSync, CollectiveGeneration | None]:
    """The engine handle and weight sync for ``config``: single-process, or this process's
    part of a multi-process engine (then also its generation front)."""
    topo = topology(config)
    if topo is None:
        handle = EngineHandle(config)
        return handle, _sync_or_shutdown(WeightSync, handle, config), None
    handle = MultiNodeEngineHandle(config, topo)
    sync = _sync_or_shutdown(MultiProcessSync, handle, config)
    return handle, sync, CollectiveGeneration(handle, sync.group)


def _sync_or_shutdown(cls, handle, config):
    try:
        return cls(handle, config)
    except BaseException:
        handle.shutdown()
        raise


logger = logging.getLogger(__name__)

__all__ = [
    "EngineFaultError",
    "RestartReport",
    "SglangJaxSampler",
    "SglangSamplerOutput",
    "UpdateTimeoutError",
    "WeightsLostError",
]
