"""``create_sampler``: the one place a configuration becomes a sampler. The config (a
``SamplerConfig`` or Tunix's ``SglangJaxConfig``) and the tokenizer are converted once, here,
and handed on as they are to one engine (``SglangJaxSampler``) or several
(``DataParallelSampler``)."""

from __future__ import annotations

from typing import Any

from sampler.data_parallel import DataParallelSampler
from sampler.interface import as_tokenizer_adapter
from sampler.sampler import SglangJaxSampler
from sampler.tunix.config import as_sampler_config, is_tunix_config, mapping_format


def create_sampler(config: Any, tokenizer: Any = None, **engine_kwargs: Any) -> SglangJaxSampler | DataParallelSampler:
    """A ``SglangJaxSampler``, or a ``DataParallelSampler`` when ``data_parallel_size > 1``.

    ``config``: a SamplerConfig or Tunix's SglangJaxConfig (every field mapped; its
    ``mapping_config`` honoured, see ``sampler.tunix.config``); extra keyword arguments go to
    the engine, as in Tunix."""
    mapping = getattr(config, "mapping_config", None) if is_tunix_config(config) else None
    sampler_config = as_sampler_config(config, **engine_kwargs)
    adapter = as_tokenizer_adapter(tokenizer, sampler_config.model_path)
    cls = DataParallelSampler if sampler_config.data_parallel_size > 1 else SglangJaxSampler
    sampler = cls(tokenizer=adapter, config=sampler_config)
    if mapping is not None:
        mapping_format(sampler.architecture, mapping)
    return sampler


__all__ = ["create_sampler"]
