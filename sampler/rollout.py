"""SglangJaxRollout: the sampler as a Tunix RLCluster rollout engine.

``ClusterConfig(rollout_engine=SglangJaxRollout, rollout_config=RolloutConfig(
rollout_sglang_jax_model_version=MODEL_DIR, ...))`` is all a Tunix user changes:
the engine options come from Tunix's own ``rollout_sglang_jax_*`` fields.
"""

from __future__ import annotations

import collections
import threading
from typing import Any, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tunix.rl.rollout import base_rollout

from sampler import compat
from sampler.base import RolloutEngine
from sampler.config import SamplerConfig
from sampler.data_parallel import create_sampler
from sampler.inflight import WEIGHT_VERSIONS_KEY, check_in_flight
from sampler.reports import UpdateReport

#: How many weight syncs ``SglangJaxRollout.history`` remembers.
SYNC_HISTORY = 10_000


class SyncRecord(NamedTuple):
    """What one weight sync did (the full UpdateReport of the last one is ``last_report``)."""

    version: int
    seconds: float
    aliased_bytes: int
    copied_bytes: int
    #: Requests in flight that switched to the new weights (in_flight "continue"/"recompute").
    requests_in_flight: int = 0


def sampler_config_from_rollout(
    rollout_config: base_rollout.RolloutConfig, mesh: jax.sharding.Mesh | None
) -> SamplerConfig:
    """Map Tunix's ``rollout_sglang_jax_*`` fields onto a SamplerConfig."""
    rc = rollout_config
    if not rc.rollout_sglang_jax_model_version:
        raise ValueError("RolloutConfig.rollout_sglang_jax_model_version must name the model directory")
    devices = [] if mesh is None else [int(d.id) for d in np.asarray(mesh.devices).flat]
    dp = rc.data_parallel_size if rc.data_parallel_size and rc.data_parallel_size > 0 else 1
    tp = (
        rc.tensor_parallel_size
        if rc.tensor_parallel_size and rc.tensor_parallel_size > 0
        else max(1, len(devices) // dp)
    )
    context = rc.rollout_sglang_jax_context_length or (rc.max_prompt_length + rc.max_tokens_to_generate)
    engine_kwargs: dict[str, Any] = {
        "use_sort_for_toppk_minp": rc.rollout_sglang_jax_use_sort_for_toppk_minp,
    }
    if jax.default_backend() != "cpu":  # on CPU the sampler's own defaults apply
        engine_kwargs.update(
            page_size=rc.rollout_sglang_jax_page_size,
            chunked_prefill_size=rc.rollout_sglang_jax_chunked_prefill_size,
            precompile_bs_paddings=rc.rollout_sglang_jax_precompile_bs_paddings,
            precompile_token_paddings=rc.rollout_sglang_jax_precompile_token_paddings,
        )
    if rc.rollout_sglang_jax_enable_static_lora:
        engine_kwargs.update(
            enable_static_lora=True,
            lora_target_modules=rc.rollout_sglang_jax_lora_target_modules,
            max_lora_rank=rc.rollout_sglang_jax_max_lora_rank,
            lora_scaling=rc.rollout_sglang_jax_lora_scaling,
            max_loras_per_batch=1,
        )
    engine_kwargs.update(rc.rollout_sglang_jax_kwargs or {})
    engine_kwargs = compat.sort_free_sampling(engine_kwargs, rc.rollout_sglang_jax_enable_deterministic_sampling)
    load_format = "dummy" if rc.rollout_sglang_jax_init_with_random_weights else rc.rollout_sglang_jax_load_format
    if load_format == "auto":
        load_format = "safetensors"
    return SamplerConfig(
        model_path=rc.rollout_sglang_jax_model_version,
        context_length=context,
        max_running_requests=rc.rollout_sglang_jax_max_running_requests or 64,
        load_format=load_format,
        tp_size=tp,
        data_parallel_size=dp,
        device_indexes=devices[: dp * tp] if devices else None,
        mem_fraction_static=rc.rollout_sglang_jax_mem_fraction_static if jax.default_backend() != "cpu" else None,
        deterministic_sampling=rc.rollout_sglang_jax_enable_deterministic_sampling,
        disable_radix_cache=rc.rollout_sglang_jax_disable_radix_cache,
        log_level=rc.rollout_sglang_jax_log_level or "error",
        engine_kwargs=engine_kwargs,
    )


class SglangJaxRollout(base_rollout.BaseRollout):
    """A Tunix rollout worker backed by an in-process sglang-jax engine.

    Built by RLCluster as ``SglangJaxRollout(rollout_actor=..., tokenizer=..., mesh=...,
    rollout_config=...)``; does the first full weight sync from the actor at
    construction. ``update_params`` is what ``RLCluster.sync_weights()`` calls.

    ``in_flight`` / ``max_staleness`` (give them with ``functools.partial(SglangJaxRollout,
    in_flight="recompute")`` as the ``rollout_engine``): what every sync does with requests
    in flight (see ``sampler.inflight``). "drain" (default) is what synchronous learners
    need; asynchronous ones (Tunix's agentic learner with
    ``sampler.compat.tunix.enable_in_flight_sync``) sync without waiting for rollouts.
    ``last_weight_versions()`` has the weight-version stamps of this thread's last
    ``generate``.
    """

    def __init__(
        self,
        rollout_actor: nnx.Module | None = None,
        tokenizer: Any = None,
        mesh: jax.sharding.Mesh | None = None,
        rollout_config: base_rollout.RolloutConfig | None = None,
        *,
        model: nnx.Module | None = None,
        sampler_config: SamplerConfig | None = None,
        in_flight: str = "drain",
        max_staleness: int | None = None,
    ):
        actor = rollout_actor if rollout_actor is not None else model
        if rollout_config is None:
            raise TypeError("SglangJaxRollout needs rollout_config=RolloutConfig(...)")
        check_in_flight(in_flight, max_staleness)
        self.in_flight = in_flight
        self.max_staleness = max_staleness
        self._local = threading.local()
        config = sampler_config or sampler_config_from_rollout(rollout_config, mesh)
        self._sampler = create_sampler(config, tokenizer)
        self.last_report: UpdateReport | None = None
        #: The latest syncs, oldest first (bounded: a long run does not grow it without end).
        self.history: collections.deque[SyncRecord] = collections.deque(maxlen=SYNC_HISTORY)
        if actor is not None:
            self.update_params(nnx.state(actor, nnx.Param))

    # ------------------------------------------------------------------ Tunix API
    @property
    def sampler(self) -> RolloutEngine:
        return self._sampler

    @property
    def mesh(self) -> jax.sharding.Mesh:
        """The engine's mesh (may differ from the trainer's)."""
        return self._sampler.mesh

    def generate(
        self, prompts: list[str], rollout_config: base_rollout.RolloutConfig, **kwargs
    ) -> base_rollout.RolloutOutput:
        """Completions at their real length (the stop token kept, no padding) with their
        logprobs, and left-padded prompts, as Tunix's own rollouts return them: Tunix's
        learners pad completions themselves, and its agentic learner counts every returned
        token as part of the response."""
        out = self._sampler(
            input_strings=prompts,
            max_generation_steps=rollout_config.max_tokens_to_generate,
            max_prompt_length=rollout_config.max_prompt_length,
            temperature=rollout_config.temperature,
            top_p=rollout_config.top_p,
            top_k=rollout_config.top_k,
            seed=None
            if rollout_config.seed is None or not self._sampler.config.deterministic_sampling
            else int(np.asarray(rollout_config.seed).ravel()[0]),
            echo=False,
            pad_output=False,
            **kwargs,
        )
        self._local.weight_versions = [m.get(WEIGHT_VERSIONS_KEY) for m in out.meta]
        return base_rollout.RolloutOutput(
            text=out.text,
            logits=None,
            tokens=out.tokens,
            left_padded_prompt_tokens=out.padded_prompt_tokens,
            logprobs=out.logprobs,
        )

    def last_weight_versions(self) -> list[list[tuple[int, int]] | None] | None:
        """Per completion of this thread's last ``generate``: [(engine weight version, first
        token index), ...] (Tunix's RLCluster drops extra output fields, so they wait here)."""
        return getattr(self._local, "weight_versions", None)

    def get_per_token_logps(self, prompt_tokens: jax.Array, completion_tokens: jax.Array) -> jax.Array:
        """Logprob of every completion token under the served weights, computed by the engine
        (prompt logprobs of prompt + completion), shape ``completion_tokens.shape``; 0 at pads.

        The engine returns log-softmax of the raw logits (temperature 1).
        """
        return jnp.asarray(self._sampler.score_completions(np.asarray(prompt_tokens), np.asarray(completion_tokens)))

    def update_params(self, params: Any, filter_types: Optional[Tuple[Any, ...]] = None) -> UpdateReport:
        # RLCluster guards host<->device transfers on CPU; an update moves data on purpose.
        # With a LoRA actor RLCluster sends only the nnx.LoRAParam leaves: a partial update of
        # the engine's LoRA buffers (the base weights were pushed once, at construction).
        types = filter_types if isinstance(filter_types, (tuple, list)) else (filter_types,) if filter_types else ()
        lora_only = bool(types) and all(isinstance(t, type) and issubclass(t, nnx.LoRAParam) for t in types)
        with jax.transfer_guard("allow"):
            report = self._sampler.update_params(
                params,
                filter_types,
                strict=not lora_only,
                in_flight=self.in_flight,
                max_staleness=self.max_staleness,
            )
        self.last_report = report
        self.history.append(
            SyncRecord(
                report.version, report.seconds, report.aliased_bytes, report.copied_bytes, report.requests_in_flight
            )
        )
        return report

    def pad_id(self) -> int:
        return self._sampler.tokenizer.pad_id()

    def eos_id(self) -> int:
        return self._sampler.tokenizer.eos_id()

    def model(self) -> nnx.Module:
        return self._sampler.transformer

    def model_state(self) -> nnx.State:
        return self._sampler.transformer_state

    def shutdown(self) -> None:
        self._sampler.shutdown()
