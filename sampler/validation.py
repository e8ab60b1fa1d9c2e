"""Moved to ``sampler.engine.validation`` (this path works for one more release)."""

from sampler.engine.validation import *  # noqa: F403
from sampler.errors import InvalidRequestError  # noqa: F401
from sampler.moved import warn
from sampler.serve.admission import check_openai_request  # noqa: F401

warn("sampler.validation", "sampler.engine.validation")
