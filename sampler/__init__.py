"""sglang-jax as the in-process rollout engine of JAX trainers (Tunix and others)."""

from sampler.compat import UnsupportedModelError
from sampler.config import SamplerConfig
from sampler.data_parallel import DataParallelSampler, create_sampler
from sampler.reports import SharingReport, UpdateReport
from sampler.engine import EngineFaultError
from sampler.sampler import SglangJaxSampler, SglangSamplerOutput, UpdateTimeoutError


def __getattr__(name):  # SglangJaxRollout pulls in tunix.rl; import it on first use
    if name == "SglangJaxRollout":
        from sampler.rollout import SglangJaxRollout

        return SglangJaxRollout
    raise AttributeError(name)


__all__ = [
    "DataParallelSampler",
    "EngineFaultError",
    "create_sampler",
    "SamplerConfig",
    "SharingReport",
    "SglangJaxRollout",
    "SglangJaxSampler",
    "SglangSamplerOutput",
    "UnsupportedModelError",
    "UpdateReport",
    "UpdateTimeoutError",
]
