"""The sampler/trainer mismatch: the engine's logprobs of the tokens it sampled against the
trainer's logprobs of the same tokens under the same weights.

The two always differ a little (bf16 engine weights and kernels against the trainer's own
forward) and a lot when something is wrong: stale weights, a wrong converter, a trainer that
computes another model than the engine (e.g. a RoPE setting it ignores), ids out of step with
their logprobs, a quantized engine. RL practitioners watch it every step (verl logs the
rollout/actor probability difference; slime and others correct it with truncated importance
sampling).

``logprob_mismatch`` computes the usual statistics from masked per-token logprobs (any
trainer); ``sampler.tunix.mismatch.measure_mismatch(rl_cluster)`` adds one trainer forward pass per
rollout to a Tunix ``RLCluster`` (Tunix 0.1.7's synchronous ``GRPOLearner`` never compares the
two) and logs them as ``sampler_trainer/*`` metrics, the names Tunix's agentic learner uses.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

#: Importance ratios outside [1/C, C] count as outliers (truncated importance sampling's usual C).
DEFAULT_CLIP = 2.0
#: Metric-name prefix (Tunix's agentic learner logs its own comparison under it).
METRIC_PREFIX = "sampler_trainer/"


@dataclasses.dataclass(frozen=True)
class LogprobMismatch:
    """Statistics over the masked tokens of one batch; ``delta = trainer - sampler`` logprob.

    ``k3_kl`` estimates KL(sampler || trainer) from the sampled tokens (Schulman's k3:
    the mean of ``exp(delta) - 1 - delta``, never negative); ``outside_clip`` is the fraction of
    tokens whose ratio ``exp(delta)`` leaves ``[1/clip, clip]``."""

    tokens: int
    mean_abs: float
    max_abs: float
    k3_kl: float
    outside_clip: float
    clip: float = DEFAULT_CLIP

    def metrics(self, prefix: str = METRIC_PREFIX) -> dict[str, float]:
        """Named values for a metrics logger."""
        return {
            f"{prefix}logp_diff_mean": self.mean_abs,
            f"{prefix}logp_diff_max": self.max_abs,
            f"{prefix}k3_kl": self.k3_kl,
            f"{prefix}ratio_outside_clip": self.outside_clip,
            f"{prefix}tokens": float(self.tokens),
        }

    def summary(self) -> str:
        return (
            f"sampler/trainer |dlogp| mean {self.mean_abs:.4f} max {self.max_abs:.4f}, k3 KL {self.k3_kl:.2e}, "
            f"{self.outside_clip:.1%} of {self.tokens} tokens outside ratio [1/{self.clip:g}, {self.clip:g}]"
        )


def logprob_mismatch(
    sampler_logprobs: Any, trainer_logprobs: Any, mask: Any = None, *, clip: float = DEFAULT_CLIP
) -> LogprobMismatch:
    """The mismatch of two (B, T) arrays of per-token logprobs of the same sampled tokens.

    ``mask`` (B, T): 1 where a token counts (default: every position). Raises ValueError for
    arrays of different shapes, a mask of another shape, a ``clip`` not above 1, or a logprob
    above 0 or NaN at a counted position."""
    sampler = np.asarray(sampler_logprobs, np.float64)
    trainer = np.asarray(trainer_logprobs, np.float64)
    if sampler.shape != trainer.shape:
        raise ValueError(f"sampler_logprobs has shape {sampler.shape}, trainer_logprobs {trainer.shape}")
    keep = np.ones(sampler.shape, bool) if mask is None else np.asarray(mask) != 0
    if keep.shape != sampler.shape:
        raise ValueError(f"mask has shape {keep.shape}, the logprobs {sampler.shape}")
    if not (isinstance(clip, (int, float)) and clip > 1 and math.isfinite(clip)):
        raise ValueError(f"clip={clip!r}: must be a finite number above 1")
    for name, x in (("sampler_logprobs", sampler), ("trainer_logprobs", trainer)):
        bad = keep & ~(x <= 0)  # NaN and positive logprobs
        if bad.any():
            raise ValueError(f"{name} holds {int(bad.sum())} values that are not logprobs (NaN or > 0)")
    delta = (trainer - sampler)[keep]
    if delta.size == 0:
        return LogprobMismatch(0, 0.0, 0.0, 0.0, 0.0, float(clip))
    with np.errstate(over="ignore"):
        k3 = np.expm1(delta) - delta
    return LogprobMismatch(
        tokens=int(delta.size),
        mean_abs=float(np.abs(delta).mean()),
        max_abs=float(np.abs(delta).max()),
        k3_kl=float(k3.mean()),
        outside_clip=float((np.abs(delta) > math.log(clip)).mean()),
        clip=float(clip),
    )


def right_padded(rows: Sequence[Any], width: int, fill: float | int) -> np.ndarray:
    """Per-completion rows (real lengths) as one (B, width) array."""
    rows = [np.asarray(r) for r in rows]
    if any(len(r) > width for r in rows):
        raise ValueError(f"a completion of {max(len(r) for r in rows)} tokens is longer than {width}")
    dtype = np.result_type(*(r.dtype for r in rows)) if rows else np.float32
    out = np.full((len(rows), width), fill, dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


__all__ = [
    "DEFAULT_CLIP",
    "LogprobMismatch",
    "METRIC_PREFIX",
    "logprob_mismatch",
    "right_padded",
]
