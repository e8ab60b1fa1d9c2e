"""The sampler/trainer mismatch measured inside Tunix: every rollout an ``RLCluster``
generates is scored by the trainer too (one forward pass, the weights last synced, the
rollout temperature) and the statistics (``sampler.mismatch``) go to Tunix's metrics logger."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import numpy as np
from tunix.rl import rl_cluster as rl_cluster_lib

from sampler.mismatch import DEFAULT_CLIP, LogprobMismatch, logprob_mismatch, right_padded


@dataclasses.dataclass(frozen=True)
class StepMismatch:
    """One rollout's mismatch and the trainer step it was measured at."""

    step: int
    mismatch: LogprobMismatch


class MismatchMonitor:
    """Measures the mismatch of every rollout a Tunix ``RLCluster`` generates (see
    ``measure_mismatch``); ``history`` holds one ``StepMismatch`` per rollout call."""

    def __init__(self, rl_cluster: Any, clip: float = DEFAULT_CLIP):
        logprob_mismatch(np.zeros((1, 1)), np.zeros((1, 1)), clip=clip)  # validates clip
        self.rl_cluster = rl_cluster
        self.clip = clip
        self.history: list[StepMismatch] = []
        self._lock = threading.Lock()
        self._generate = rl_cluster.generate
        rl_cluster.generate = self._generate_and_measure

    def _generate_and_measure(self, prompts, *args, mode: Any = rl_cluster_lib.Mode.TRAIN, **kwargs):
        out = self._generate(prompts, *args, mode=mode, **kwargs)
        mismatch = self.measure(out, mode)
        if mismatch is not None:
            metrics = mismatch.metrics()
            self.rl_cluster.buffer_metrics(
                {k: (v, np.max if k.endswith("_max") else np.mean) for k, v in metrics.items()}, mode=mode
            )
        return out

    def measure(self, out: Any, mode: Any = rl_cluster_lib.Mode.TRAIN) -> LogprobMismatch | None:
        """The mismatch of one ``RolloutOutput``: the actor's logprobs of its tokens (Tunix's
        ``get_actor_per_token_logps``: the weights last synced, at the rollout temperature)
        against the engine's. None when the rollout returned no logprobs."""
        if out.logprobs is None or not len(out.tokens):
            return None
        cluster = self.rl_cluster
        rollout_config = cluster.get_rollout_config(mode)
        pad, eos = cluster.rollout.pad_id(), cluster.rollout.eos_id()
        width = max(rollout_config.max_tokens_to_generate, max(len(t) for t in out.tokens))
        tokens = right_padded(out.tokens, width, pad).astype(np.int32)
        sampler = right_padded(out.logprobs, width, 0.0)
        trainer = np.asarray(
            cluster.get_actor_per_token_logps(
                prompt_tokens=np.asarray(out.left_padded_prompt_tokens),
                completion_tokens=tokens,
                pad_id=pad,
                eos_id=eos,
                temperature=rollout_config.temperature,
            )
        )
        # the tokens Tunix's learners train on (their completion mask: ids other than the pad id)
        mismatch = logprob_mismatch(sampler, trainer, tokens != pad, clip=self.clip)
        with self._lock:
            self.history.append(StepMismatch(int(cluster.global_steps), mismatch))
        return mismatch

    def close(self) -> None:
        """Stop measuring (the cluster's own ``generate`` again)."""
        self.rl_cluster.generate = self._generate


def measure_mismatch(rl_cluster: Any, *, clip: float = DEFAULT_CLIP) -> MismatchMonitor:
    """Measure the sampler/trainer mismatch of every rollout ``rl_cluster`` generates from now
    on, and log it through Tunix's metrics logger (``sampler_trainer/logp_diff_mean``,
    ``logp_diff_max``, ``k3_kl``, ``ratio_outside_clip``, ``tokens``).

    Costs one trainer forward pass over the rollout per step. The cluster's rollout must
    return per-token logprobs (``SglangJaxRollout`` does). Works with Tunix's synchronous
    ``GRPOLearner`` (its agentic learner logs a comparison of its own)."""
    return MismatchMonitor(rl_cluster, clip)


__all__ = ["MismatchMonitor", "StepMismatch", "measure_mismatch"]
