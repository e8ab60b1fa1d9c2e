"""Moved to ``sampler.interface`` (this path works for one more release)."""

from sampler.interface import *  # noqa: F403
from sampler.moved import warn

warn("sampler.base", "sampler.interface")
