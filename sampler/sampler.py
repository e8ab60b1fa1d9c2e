"""SglangJaxSampler: a Tunix sampler backed by one in-process sglang-jax Engine whose
weights the trainer replaces in place after every step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from converters import ConversionPlan, ModelSpec
from sampler.base import RolloutEngine, SglangSamplerOutput, as_tokenizer_adapter
from sampler.config import SamplerConfig
from sampler.core import WeightSync, is_path
from sampler.engine import EngineFaultError, EngineHandle, UpdateTimeoutError
from sampler.reports import SharingReport, UpdateReport


class SglangJaxSampler(RolloutEngine):
    """A Tunix ``BaseSampler`` whose sglang-jax Engine runs in this process.

    ``update_params`` replaces the engine's weights with a trainer's live parameters:
    leaves that already have the engine's shape, dtype and sharding are aliased (the
    engine uses the trainer's buffers), the rest are converted leaf by leaf. Generation
    (``__call__``, ``generate_ids``, ``score_completions``) never sees a mix of weights.
    """

    def __init__(self, tokenizer: Any = None, config: SamplerConfig | None = None):
        if config is None:
            raise TypeError("SglangJaxSampler needs config=SamplerConfig(model_path=...)")
        if config.data_parallel_size != 1:
            raise ValueError(
                f"data_parallel_size={config.data_parallel_size}: build it with sampler.create_sampler(config) "
                "or DataParallelSampler (one SglangJaxSampler is one engine)"
            )
        self.config = config
        self.tokenizer = as_tokenizer_adapter(tokenizer, config.model_path)
        self._handle = EngineHandle(config)
        try:
            self.sync = WeightSync(self._handle, config)
        except BaseException:
            self._handle.shutdown()
            raise
        self.engine = self._handle.engine

    # ------------------------------------------------------------------ properties
    @property
    def spec(self) -> ModelSpec:
        return self.sync.spec

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
        """False once an engine thread has failed (then every call raises EngineFaultError)."""
        return not self._handle.closed and self._handle.fault() is None

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

        ``in_flight``: what happens to requests running at the swap (``sampler.inflight``):
        ``"drain"`` (they finish on the old weights first; new ones wait), ``"continue"``
        (they go on with their KV cache under the new weights) or ``"recompute"`` (their KV
        is recomputed under the new weights first). Every answer's
        ``meta_info["weight_versions"]`` says which version produced which tokens.
        ``max_staleness=k`` (with "continue"/"recompute"): the swap first waits until no
        request in flight holds tokens more than k versions older than the new version.
        """
        return self.sync.update_params(
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
        options = dict(strict=strict, track_peak_memory=track_peak_memory, in_flight=in_flight)
        if not is_path(path_or_weights):
            return self.update_params(path_or_weights, max_staleness=max_staleness, **options)
        return self.sync.load_checkpoint(path_or_weights, max_staleness=max_staleness, **options)

    def check_checkpoint(self, path: Any, *, strict: bool = True) -> None:
        self.sync.check_checkpoint(path, strict=strict)

    def verify_sharing(
        self, updated_weights: Any, filter_types: Any = None, *, source_format: str | None = None
    ) -> SharingReport:
        """Whether each engine leaf holds the very same device buffers as its source."""
        return self.sync.verify_sharing(updated_weights, filter_types, source_format=source_format)

    # ------------------------------------------------------------------ generation
    def check_servable(self) -> None:
        self.sync.check_servable()

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
        that produced its tokens."""
        with self.sync.gate.generating(check=self.check_servable):
            out = self._handle.run(
                self.engine.async_generate(
                    input_ids=[list(map(int, p)) for p in prompts],
                    sampling_params=sampling_params if isinstance(sampling_params, dict) else list(sampling_params),
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


__all__ = ["EngineFaultError", "SglangJaxSampler", "SglangSamplerOutput", "UpdateTimeoutError"]
