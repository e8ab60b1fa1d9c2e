"""Moved to ``sampler.tunix.config`` (this path works for one more release)."""

from sampler.moved import warn
from sampler.tunix.config import *  # noqa: F403

warn("sampler.tunix_config", "sampler.tunix.config")
