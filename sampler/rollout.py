"""Moved to ``sampler.tunix.rollout`` (this path works for one more release)."""

from sampler.moved import warn
from sampler.tunix.mismatch import MismatchMonitor, StepMismatch, measure_mismatch  # noqa: F401
from sampler.tunix.rollout import *  # noqa: F403

warn("sampler.rollout", "sampler.tunix.rollout")
