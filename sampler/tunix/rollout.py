"""SglangJaxRollout: the sampler as a Tunix RLCluster rollout engine.

``ClusterConfig(rollout_engine=SglangJaxRollout, rollout_config=RolloutConfig(
rollout_sglang_jax_model_version=MODEL_DIR, ...))`` is all a Tunix user changes:
the engine options come from Tunix's own ``rollout_sglang_jax_*`` fields.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
from typing import Any, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tunix.rl.rollout import base_rollout

from converters import read_hf_config
from sampler import compat
from sampler.config import SamplerConfig
from sampler.factory import create_sampler
from sampler.interface import RolloutEngine
from sampler.reports import UpdateReport
from sampler.sync.inflight import WEIGHT_VERSIONS_KEY, check_in_flight
from sampler.tunix.config import from_rollout_config, mapping_format
from sampler.tunix.models import check_trainer

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


class SglangJaxRollout(base_rollout.BaseRollout):
    """A Tunix rollout worker backed by an in-process sglang-jax engine.

    Built by RLCluster as ``SglangJaxRollout(rollout_actor=..., tokenizer=..., mesh=...,
    rollout_config=...)``; does the first full weight sync from the actor at
    construction. ``update_params`` is what ``RLCluster.sync_weights()`` calls.

    ``in_flight`` / ``max_staleness`` (give them with ``functools.partial(SglangJaxRollout,
    in_flight="recompute")`` as the ``rollout_engine``): what every sync does with requests
    in flight (see ``sampler.sync.inflight``). "drain" (default) is what synchronous learners
    need; asynchronous ones (Tunix's agentic learner with
    ``sampler.compat.tunix.enable_in_flight_sync``) sync without waiting for rollouts.
    ``last_weight_versions()`` has the weight-version stamps of this thread's last
    ``generate``. An actor that computes another model than the engine (a config field Tunix
    ignores, or a ``ModelConfig`` that disagrees with the checkpoint) is refused with
    ``compat.TrainerMismatchError`` naming the field, unless ``allow_trainer_mismatch=True``.
    ``quantization`` ("int8", "fp8", ... or a sglang-jax config file; ``SamplerConfig.quantization``):
    roll out from a quantized engine; every sync quantizes the actor's weights as it pushes them.
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
        allow_trainer_mismatch: bool = False,
        quantization: str | None = None,
    ):
        actor = rollout_actor if rollout_actor is not None else model
        if rollout_config is None:
            raise TypeError("SglangJaxRollout needs rollout_config=RolloutConfig(...)")
        check_in_flight(in_flight, max_staleness)
        compat.patch_rollout_start_off_loop()  # Tunix's agentic learner could deadlock on its own
        self.in_flight = in_flight
        self.max_staleness = max_staleness
        self._local = threading.local()
        config = sampler_config or from_rollout_config(rollout_config, mesh)
        if quantization is not None:  # checked by SamplerConfig: a name or a config file
            config = dataclasses.replace(config, quantization=quantization)
        if actor is not None:  # before the engine starts: a trainer of another model is refused
            check_trainer(actor, read_hf_config(config.model_path), allow_mismatch=allow_trainer_mismatch)
        self._sampler = create_sampler(config, tokenizer)
        mapping = getattr(rollout_config, "rollout_mapping_config", None)
        if mapping is not None:
            mapping_format(self._sampler.architecture, mapping)
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
        token as part of the response. On a multi-process engine every process calls it
        (as Tunix code does); each gets the completions of its own prompts."""
        with self._collective():
            out = self._generate(prompts, rollout_config, **kwargs)
        self._local.weight_versions = [m.get(WEIGHT_VERSIONS_KEY) for m in out.meta]
        return base_rollout.RolloutOutput(
            text=out.text,
            logits=None,
            tokens=out.tokens,
            left_padded_prompt_tokens=out.padded_prompt_tokens,
            logprobs=out.logprobs,
        )

    def _collective(self):
        """Generation calls from every process of a multi-process engine (no-op otherwise)."""
        return getattr(self._sampler, "collective_generation", contextlib.nullcontext)()

    def _generate(self, prompts: list[str], rollout_config: base_rollout.RolloutConfig, **kwargs):
        return self._sampler(
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

    def last_weight_versions(self) -> list[list[tuple[int, int]] | None] | None:
        """Per completion of this thread's last ``generate``: [(engine weight version, first
        token index), ...] (Tunix's RLCluster drops extra output fields, so they wait here)."""
        return getattr(self._local, "weight_versions", None)

    def get_per_token_logps(
        self, prompt_tokens: jax.Array, completion_tokens: jax.Array, completion_mask: jax.Array | None = None
    ) -> jax.Array:
        """Logprob of every completion token under the served weights, computed by the engine
        (prompt logprobs of prompt + completion), shape ``completion_tokens.shape``; 0 at pads.

        ``completion_mask`` (Tunix main's signature) marks the real completion tokens; without
        it a completion ends at its last non-pad token (a sampled pad id inside it is scored,
        as Tunix's learner counts the tokens after it). The engine returns log-softmax of the
        raw logits (temperature 1).
        """
        mask = None if completion_mask is None else np.asarray(completion_mask)
        with self._collective():
            scores = self._sampler.score_completions(np.asarray(prompt_tokens), np.asarray(completion_tokens), mask)
        return jnp.asarray(scores)

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

    def model(self) -> None:
        """None, as Tunix's own sglang-jax and vLLM rollouts return: the engine's model is not a
        Tunix model. (Tunix's learner compares this model's leaves with the actor's to decide
        whether to sync at all; the engine's leaves are no such pair, and a LoRA engine has more
        of them, which made that comparison raise.) ``sampler.transformer`` is the engine's model."""
        return None

    def model_state(self) -> nnx.State:
        return self._sampler.transformer_state

    def shutdown(self) -> None:
        self._sampler.shutdown()
