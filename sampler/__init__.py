"""sglang-jax as the in-process rollout engine of JAX trainers (Tunix and others).

Where things happen: a weight swap in ``sampler.core.WeightSync`` (leaf writes in
``sampler.weights``); generation in ``sampler.base.RolloutEngine`` (the Tunix front end)
over ``SglangJaxSampler.generate_ids``; every upstream patch in ``sampler.compat``.
"""

from sampler.base import RolloutEngine, SglangSamplerOutput
from sampler.compat import UnsupportedModelError
from sampler.config import SamplerConfig
from sampler.data_parallel import DataParallelSampler, create_sampler
from sampler.engine import EngineFaultError, UpdateTimeoutError
from sampler.mismatch import LogprobMismatch, logprob_mismatch
from sampler.recovery import RestartReport, WeightsLostError
from sampler.reports import SharingReport, UpdateReport
from sampler.sampler import SglangJaxSampler
from sampler.validation import InvalidRequestError


def __getattr__(name):  # sampler.rollout pulls in tunix.rl; import it on first use
    if name in ("SglangJaxRollout", "measure_mismatch"):
        from sampler import rollout

        return getattr(rollout, name)
    raise AttributeError(name)


__all__ = [
    "DataParallelSampler",
    "EngineFaultError",
    "InvalidRequestError",
    "LogprobMismatch",
    "RestartReport",
    "RolloutEngine",
    "SamplerConfig",
    "SharingReport",
    "SglangJaxRollout",
    "SglangJaxSampler",
    "SglangSamplerOutput",
    "UnsupportedModelError",
    "UpdateReport",
    "UpdateTimeoutError",
    "WeightsLostError",
    "create_sampler",
    "logprob_mismatch",
    "measure_mismatch",
]
