"""Moved to ``sampler.sync.weight_sync`` (this path works for one more release)."""

from sampler.moved import warn
from sampler.sync.weight_sync import *  # noqa: F403

warn("sampler.core", "sampler.sync.weight_sync")
