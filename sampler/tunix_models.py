"""Moved to ``sampler.tunix.models`` (this path works for one more release)."""

from sampler.moved import warn
from sampler.tunix.models import *  # noqa: F403

warn("sampler.tunix_models", "sampler.tunix.models")
