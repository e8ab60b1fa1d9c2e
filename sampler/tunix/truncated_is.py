"""Truncated importance sampling for Tunix's synchronous ``GRPOLearner``: each completion token's
policy-gradient loss is weighted by ``min(pi_trainer / pi_sampler, C)``, correcting for rollouts
drawn from a policy the trainer does not compute exactly (a quantized engine, kernels that
differ). Tunix's agentic learner does the same with ``sampler_is="token"``; its synchronous
learner has no such option, but its loss already applies ``TrainExample.sampler_is_weights``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tunix.rl import rl_cluster as rl_cluster_lib
from tunix.rl.grpo import grpo_learner

from sampler.mismatch import DEFAULT_CLIP, right_padded

#: Log-ratios are clipped to this before ``exp`` (as Tunix's agentic learner does).
MAX_LOG_RATIO = 20.0


def truncated_is_weights(trainer_logps: Any, sampler_logps: Any, mask: Any, threshold: float) -> jax.Array:
    """Per-token weights ``min(exp(trainer - sampler), threshold)`` on the masked tokens (0
    elsewhere), detached: the factor each token's loss is multiplied by."""
    log_ratio = jnp.clip(
        jnp.asarray(trainer_logps, jnp.float32) - jnp.asarray(sampler_logps, jnp.float32), -MAX_LOG_RATIO, MAX_LOG_RATIO
    )
    return jax.lax.stop_gradient(jnp.minimum(jnp.exp(log_ratio), threshold) * jnp.asarray(mask, jnp.float32))


class TruncatedISGRPOLearner(grpo_learner.GRPOLearner):
    """Tunix's ``GRPOLearner`` with truncated importance sampling against the rollout engine's
    own logprobs (one extra trainer forward pass per step: the actor's logprobs of the sampled
    tokens, at the rollout temperature). ``sampler_is_threshold`` is C (default 2). Logs
    ``sampler_is/weight_mean``, ``weight_min`` and ``frac_clipped_at_threshold``; ``last_example``
    is the last step's ``TrainExample`` (its ``sampler_is_weights`` included) and ``last_logps``
    the per-token logprobs they came from."""

    def __init__(self, *args: Any, sampler_is_threshold: float = DEFAULT_CLIP, **kwargs: Any):
        if (
            isinstance(sampler_is_threshold, bool)
            or not isinstance(sampler_is_threshold, (int, float))
            or not math.isfinite(sampler_is_threshold)
            or sampler_is_threshold <= 0
        ):
            raise ValueError(f"sampler_is_threshold must be a finite number > 0, got {sampler_is_threshold!r}")
        super().__init__(*args, **kwargs)
        self.sampler_is_threshold = float(sampler_is_threshold)
        self.last_example: Any = None
        #: The last step's (trainer, sampler) per-token logprobs the weights came from.
        self.last_logps: tuple[Any, Any] | None = None

    def _generate_and_compute_advantage(self, training_input: Any, mode: Any = rl_cluster_lib.Mode.TRAIN) -> Any:
        cluster = self.rl_cluster
        generate = cluster.generate  # perhaps a wrapper (sampler.measure_mismatch): keep it
        outputs: list[Any] = []

        def generate_and_keep(*args: Any, **kwargs: Any) -> Any:
            out = generate(*args, **kwargs)
            outputs.append(out)
            return out

        cluster.generate = generate_and_keep
        try:
            example = super()._generate_and_compute_advantage(training_input, mode)
        finally:
            cluster.generate = generate
        (out,) = outputs
        if out.logprobs is None:
            raise ValueError("truncated importance sampling needs the rollout's per-token logprobs")
        width = int(example.completion_ids.shape[1])
        rollout_config = cluster.get_rollout_config(mode)
        trainer = cluster.get_actor_per_token_logps(
            prompt_tokens=example.prompt_ids,
            completion_tokens=example.completion_ids,
            pad_id=cluster.rollout.pad_id(),
            eos_id=cluster.rollout.eos_id(),
            temperature=rollout_config.temperature,
        )
        sampler = right_padded(out.logprobs, width, 0.0)
        mask = example.completion_mask
        weights = truncated_is_weights(trainer, sampler, mask, self.sampler_is_threshold)
        tokens = max(1.0, float(np.asarray(mask).sum()))
        masked = np.asarray(mask, bool)
        w = np.asarray(weights)
        cluster.buffer_metrics(
            {
                "sampler_is/weight_mean": (float(w[masked].sum() / tokens), np.mean),
                "sampler_is/weight_min": (float(w[masked].min()) if masked.any() else 1.0, np.min),
                "sampler_is/frac_clipped_at_threshold": (
                    float((w[masked] >= self.sampler_is_threshold).sum() / tokens),
                    np.mean,
                ),
            },
            mode=mode,
        )
        example = example.replace(sampler_is_weights=weights)
        self.last_example, self.last_logps = example, (trainer, sampler)
        return example


__all__ = ["TruncatedISGRPOLearner", "truncated_is_weights"]
