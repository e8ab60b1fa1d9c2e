"""sglang-jax as the in-process rollout engine of JAX trainers (Tunix and others).

Where things happen (one answer each; the docs' architecture page has the layer picture):

- the public front: ``SglangJaxSampler`` (one engine, ``sampler.sampler``),
  ``DataParallelSampler`` (several, ``sampler.data_parallel``), ``create_sampler``
  (``sampler.factory``), all on the ``RolloutEngine`` interface (``sampler.interface``: the
  Tunix ``BaseSampler`` front end over ``generate_ids``, where generation is shaped);
- a weight swap: ``sampler.sync`` (``WeightSync.update_params``; leaf writes in
  ``sampler.sync.leaves``; requests in flight in ``sampler.sync.inflight``);
- one engine's lifecycle and request validation: ``sampler.engine``;
- one engine over several JAX processes: ``sampler.multiprocess``;
- Tunix (``SglangJaxRollout``, the sampler/trainer mismatch, config mapping, trainers):
  ``sampler.tunix``; the HTTP server: ``sampler.serve``;
- every upstream patch: ``sampler.compat``; what maps where: the ``converters`` package.
"""

from importlib.metadata import PackageNotFoundError, version

from sampler.config import SamplerConfig
from sampler.data_parallel import DataParallelSampler
from sampler.errors import (
    EngineFaultError,
    InvalidRequestError,
    TrainerMismatchError,
    UnsupportedModelError,
    UpdateTimeoutError,
    WeightsLostError,
)
from sampler.factory import create_sampler
from sampler.interface import RolloutEngine, SglangSamplerOutput
from sampler.mismatch import LogprobMismatch, logprob_mismatch
from sampler.reports import SharingReport, UpdateReport
from sampler.restart import RestartReport
from sampler.sampler import SglangJaxSampler

try:
    __version__ = version("sglang-jax-sampler")
except PackageNotFoundError:  # a source tree that was not installed
    __version__ = "0+unknown"

#: Names that import ``tunix.rl`` (slow): loaded from ``sampler.tunix`` on first use.
_TUNIX = ("SglangJaxRollout", "TruncatedISGRPOLearner", "measure_mismatch")


def __getattr__(name: str):
    if name in _TUNIX:
        import sampler.tunix

        return getattr(sampler.tunix, name)
    raise AttributeError(f"module 'sampler' has no attribute {name!r}")


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
    "TrainerMismatchError",
    "TruncatedISGRPOLearner",
    "UnsupportedModelError",
    "UpdateReport",
    "UpdateTimeoutError",
    "WeightsLostError",
    "__version__",
    "create_sampler",
    "logprob_mismatch",
    "measure_mismatch",
]
