"""sglang-jax as the in-process rollout engine of JAX trainers (Tunix and others)."""

from sampler.compat import UnsupportedModelError
from sampler.config import SamplerConfig
from sampler.reports import SharingReport, UpdateReport
from sampler.sampler import SglangJaxSampler, SglangSamplerOutput, UpdateTimeoutError

__all__ = [
    "SamplerConfig",
    "SharingReport",
    "SglangJaxSampler",
    "SglangSamplerOutput",
    "UnsupportedModelError",
    "UpdateReport",
    "UpdateTimeoutError",
]
