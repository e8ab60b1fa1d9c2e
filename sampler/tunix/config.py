"""Tunix's own configuration objects as SamplerConfigs.

A Tunix user swaps the sampler class and nothing else: ``SglangJaxSampler(tokenizer=tok,
config=tunix.generate.sglang_jax_sampler.SglangJaxConfig(...), **engine_kwargs)`` and
``RolloutConfig(rollout_sglang_jax_*=...)`` in RLCluster both become a ``SamplerConfig``
here, field by field. Tunix's ``mapping_config`` is honoured where it renames keys (a
converter table is derived from it, keeping our verified layout ops per engine leaf) and
ignored, with a logged reason, where our converters already know every key it names.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from converters import LeafRule, get_converter, register_converter
from converters.errors import UnknownFormatError
from converters.registry import canonical_key
from sampler import compat
from sampler.config import SamplerConfig

logger = logging.getLogger(__name__)

#: Tunix's ``lora_target_modules=["all"]``: sglang-jax's list of supported modules.
ALL_LORA_MODULES = "all"
#: A SamplerConfig field Tunix leaves unset (None) gets this many running requests.
DEFAULT_MAX_RUNNING_REQUESTS = 64


def is_tunix_config(config: Any) -> bool:
    """Whether ``config`` is Tunix's ``SglangJaxConfig`` (duck-typed: no Tunix import needed)."""
    return not isinstance(config, SamplerConfig) and hasattr(config, "model_version") and hasattr(config, "mesh")


def _lora_modules(modules: list[str] | None) -> list[str] | None:
    if modules == [ALL_LORA_MODULES]:
        from sgl_jax.srt.utils.common_utils import SUPPORTED_LORA_TARGET_MODULES

        return list(SUPPORTED_LORA_TARGET_MODULES)
    return modules


def engine_options(
    *,
    use_sort_for_toppk_minp: bool,
    enable_static_lora: bool,
    lora_target_modules: list[str] | None,
    max_lora_rank: int | None,
    lora_scaling: float | None,
    page_size: int | None,
    chunked_prefill_size: int | None,
    precompile_bs_paddings: list[int] | None,
    precompile_token_paddings: list[int] | None,
) -> dict[str, Any]:
    """Engine kwargs from Tunix's sglang-jax fields (shared by SglangJaxConfig and RolloutConfig).

    The paging and precompile fields apply on accelerators only; on JAX's CPU backend the
    sampler's own working defaults stay.
    """
    kwargs: dict[str, Any] = {"use_sort_for_toppk_minp": use_sort_for_toppk_minp}
    if jax.default_backend() != "cpu":
        kwargs.update(
            page_size=page_size,
            chunked_prefill_size=chunked_prefill_size,
            precompile_bs_paddings=precompile_bs_paddings,
            precompile_token_paddings=precompile_token_paddings,
        )
    if enable_static_lora:
        if lora_target_modules is None or max_lora_rank is None or lora_scaling is None:
            raise ValueError(
                "enable_static_lora needs lora_target_modules, max_lora_rank and lora_scaling "
                f"(got {lora_target_modules}, {max_lora_rank}, {lora_scaling})"
            )
        kwargs.update(
            enable_static_lora=True,
            lora_target_modules=_lora_modules(lora_target_modules),
            max_lora_rank=max_lora_rank,
            lora_scaling=lora_scaling,
            max_loras_per_batch=1,
        )
    return kwargs


def load_format(init_with_random_weights: bool, load_format: str) -> str:
    """Tunix's weight-loading fields as one load_format: random (dummy) init wins, "auto"
    means the directory's safetensors."""
    if init_with_random_weights:
        return "dummy"
    return "safetensors" if load_format == "auto" else load_format


def from_tunix_config(config: Any, **engine_kwargs: Any) -> SamplerConfig:
    """A SamplerConfig from Tunix's ``SglangJaxConfig`` (every field mapped); extra keyword
    arguments go to the engine, as Tunix's sampler forwards them."""
    mesh = config.mesh
    devices = [int(i) for i in np.asarray(mesh.device_ids).flatten()]
    if not getattr(config, "enable_single_process", True):
        logger.info(
            "SglangJaxConfig.enable_single_process=False ignored: the engine runs in this process, "
            "which is what lets update_params alias the trainer's buffers"
        )
    options = engine_options(
        use_sort_for_toppk_minp=config.use_sort_for_toppk_minp,
        enable_static_lora=config.enable_static_lora,
        lora_target_modules=config.lora_target_modules,
        max_lora_rank=config.max_lora_rank,
        lora_scaling=config.lora_scaling,
        page_size=config.page_size,
        chunked_prefill_size=config.chunked_prefill_size,
        precompile_bs_paddings=config.precompile_bs_paddings,
        precompile_token_paddings=config.precompile_token_paddings,
    )
    options.update(engine_kwargs)
    options = compat.sort_free_sampling(options, config.enable_deterministic_sampling)
    return SamplerConfig(
        model_path=config.model_version,
        context_length=config.context_length,
        max_running_requests=config.max_running_requests or DEFAULT_MAX_RUNNING_REQUESTS,
        load_format=load_format(config.init_with_random_weights, config.load_format),
        # sglang-jax has no data parallelism: Tunix makes one engine as wide as its mesh
        tp_size=math.prod(mesh.shape.values()),
        device_indexes=devices,
        mem_fraction_static=config.mem_fraction_static if jax.default_backend() != "cpu" else None,
        deterministic_sampling=config.enable_deterministic_sampling,
        disable_radix_cache=config.disable_radix_cache,
        log_level=config.log_level,
        engine_kwargs=options,
    )


def as_sampler_config(config: Any, **engine_kwargs: Any) -> SamplerConfig:
    """``config`` as a SamplerConfig: a SamplerConfig (plus extra engine kwargs), or Tunix's
    SglangJaxConfig."""
    if config is None:
        raise TypeError("the sampler needs config=SamplerConfig(model_path=...) or Tunix's SglangJaxConfig")
    if isinstance(config, SamplerConfig):
        if engine_kwargs:
            config = SamplerConfig(**{**vars(config), "engine_kwargs": {**config.engine_kwargs, **engine_kwargs}})
        return config
    if is_tunix_config(config):
        return from_tunix_config(config, **engine_kwargs)
    raise TypeError(f"config must be a SamplerConfig or Tunix's SglangJaxConfig, not {type(config).__name__}")


# ---------------------------------------------------------------------------- mapping_config
def _patterns(key_mapping: Mapping[str, Any]) -> dict[str, str]:
    """Tunix key mapping (``layers.*.x`` -> (``model.layers.*.y``, sharding)) as our patterns."""
    out = {}
    for source, target in key_mapping.items():
        target = target[0] if isinstance(target, (tuple, list)) else target
        out[source.replace("*", "{}")] = str(target).replace("*", "{}")
    return out


def mapping_format(architecture: str, mapping_config: Any) -> str | None:
    """Register a converter for a Tunix ``mapping_config`` whose keys differ from our Tunix
    table, and return its format name; None (logged) when it adds nothing.

    Each mapped key keeps the layout ops our table has for its engine leaf, so only the
    names come from the mapping (its sharding entries and hook functions are not used: the
    engine's own shardings are the target, and our ops are checked against sglang-jax's
    loader). A mapping to an engine leaf we do not know is an error naming it.
    """
    mappings = {}
    for field in ("to_hf_mappings", "lora_to_hf_mappings"):
        mappings.update(getattr(mapping_config, field, None) or {})
    if not mappings:
        return None
    ours = get_converter(architecture, "tunix")
    patterns = _patterns(mappings)
    same = {rule.lookup_pattern: rule.target for rule in ours.rules}
    if all(same.get(src) == canonical_key(tgt) for src, tgt in patterns.items()):
        logger.info(
            "Tunix mapping_config ignored: the %s converters already map every key it names the same way (%d keys)",
            architecture,
            len(patterns),
        )
        return None
    rules, unknown = [], []
    for source, target in patterns.items():
        rule = ours.rule_for(target)
        if rule is None:
            unknown.append(f"{source} -> {target}")
        else:
            rules.append(LeafRule(source, rule.target, rule.ops, rule.stack, rule.optional))
    if unknown:
        raise UnknownFormatError(f"Tunix mapping_config maps to engine leaves {architecture} does not have: {unknown}")
    digest = hashlib.sha256(repr(sorted(patterns.items())).encode()).hexdigest()[:8]
    name = f"tunix-mapping-{digest}"
    register_converter(architecture, name, rules, replace=True)
    changed = sum(same.get(src) != canonical_key(tgt) for src, tgt in patterns.items())
    logger.info("Tunix mapping_config: %d keys mapped differently, converter format %r", changed, name)
    return name


def from_rollout_config(rollout_config: Any, mesh: jax.sharding.Mesh | None) -> SamplerConfig:
    """A SamplerConfig from Tunix's ``RolloutConfig`` (its ``rollout_sglang_jax_*`` fields) and
    the rollout mesh RLCluster passes: the mesh's devices host ``data_parallel_size`` engines of
    ``tensor_parallel_size`` devices each (tp defaults to the whole mesh)."""
    rc = rollout_config
    if not rc.rollout_sglang_jax_model_version:
        raise ValueError("RolloutConfig.rollout_sglang_jax_model_version must name the model directory")
    devices = [] if mesh is None else [int(d.id) for d in np.asarray(mesh.devices).flat]
    dp = rc.data_parallel_size if rc.data_parallel_size and rc.data_parallel_size > 0 else 1
    tp = rc.tensor_parallel_size if rc.tensor_parallel_size and rc.tensor_parallel_size > 0 else 0
    tp = tp or max(1, len(devices) // dp)
    options = engine_options(
        use_sort_for_toppk_minp=rc.rollout_sglang_jax_use_sort_for_toppk_minp,
        enable_static_lora=rc.rollout_sglang_jax_enable_static_lora,
        lora_target_modules=rc.rollout_sglang_jax_lora_target_modules,
        max_lora_rank=rc.rollout_sglang_jax_max_lora_rank,
        lora_scaling=rc.rollout_sglang_jax_lora_scaling,
        page_size=rc.rollout_sglang_jax_page_size,
        chunked_prefill_size=rc.rollout_sglang_jax_chunked_prefill_size,
        precompile_bs_paddings=rc.rollout_sglang_jax_precompile_bs_paddings,
        precompile_token_paddings=rc.rollout_sglang_jax_precompile_token_paddings,
    )
    options.update(getattr(rc, "rollout_sglang_jax_kwargs", None) or {})
    options = compat.sort_free_sampling(options, rc.rollout_sglang_jax_enable_deterministic_sampling)
    return SamplerConfig(
        model_path=rc.rollout_sglang_jax_model_version,
        context_length=rc.rollout_sglang_jax_context_length or (rc.max_prompt_length + rc.max_tokens_to_generate),
        max_running_requests=rc.rollout_sglang_jax_max_running_requests or DEFAULT_MAX_RUNNING_REQUESTS,
        load_format=load_format(rc.rollout_sglang_jax_init_with_random_weights, rc.rollout_sglang_jax_load_format),
        tp_size=tp,
        data_parallel_size=dp,
        device_indexes=devices[: dp * tp] if devices else None,
        mem_fraction_static=rc.rollout_sglang_jax_mem_fraction_static if jax.default_backend() != "cpu" else None,
        deterministic_sampling=rc.rollout_sglang_jax_enable_deterministic_sampling,
        disable_radix_cache=rc.rollout_sglang_jax_disable_radix_cache,
        log_level=getattr(rc, "rollout_sglang_jax_log_level", None) or "error",
        engine_kwargs=options,
    )
