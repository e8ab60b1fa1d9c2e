"""Moved to ``sampler.restart`` (this path works for one more release)."""

from sampler.errors import WeightsLostError  # noqa: F401
from sampler.moved import warn
from sampler.restart import *  # noqa: F403

warn("sampler.recovery", "sampler.restart")
