"""Moved to ``sampler.engine.progress`` (this path works for one more release)."""

from sampler.engine.progress import *  # noqa: F403
from sampler.moved import warn

warn("sampler.progress", "sampler.engine.progress")
