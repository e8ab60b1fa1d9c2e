"""Moved to ``sampler.sync.inflight`` (this path works for one more release)."""

from sampler.moved import warn
from sampler.sync.inflight import *  # noqa: F403

warn("sampler.inflight", "sampler.sync.inflight")
