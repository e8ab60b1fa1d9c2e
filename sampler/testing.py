"""Moved to ``sampler.tiny`` (this path works for one more release)."""

from sampler.moved import warn
from sampler.serve.faults import *  # noqa: F403
from sampler.tiny import *  # noqa: F403

warn("sampler.testing", "sampler.tiny")
