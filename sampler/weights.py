"""Moved to ``sampler.sync.leaves`` (this path works for one more release)."""

from sampler.moved import warn
from sampler.sync.leaves import *  # noqa: F403

warn("sampler.weights", "sampler.sync.leaves")
