"""The quirk registry: what each architecture's engine and Tunix trainer need (named in its
``Architecture.quirks``), every patch all engines get, and the two entry points that apply
them before an engine starts (``prepare_engine``) or a Tunix trainer is built
(``prepare_tunix_trainer``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from converters import get_architecture
from sampler.compat.lifecycle import patch_contain_engine_faults, patch_contain_tokenizer_loop_faults
from sampler.compat.models import (
    HYBRID_SWA_OFF,
    check_expert_parallel,
    check_gemma4,
    check_moe_sparse_layers,
    gemma4_engine_dtype,
    native_attention,
)
from sampler.compat.outputs import (
    patch_detokenizer_output,
    patch_filtered_logprob_lists,
    patch_logprob_token_decoding,
    patch_mixed_logprob_batches,
    patch_non_stream_chunks,
    patch_output_logprob_rows,
)
from sampler.compat.patches import (
    patch_greedy_rows_in_mixed_batches,
    patch_invalid_grammar_copy,
    patch_merge_kv_sharding,
    patch_zmq_linger,
)
from sampler.compat.tunix import (
    check_trainer_config,
    patch_tunix_rope_theta,
    tunix_gemma_rope_theta,
    tunix_moe_routing,
    tunix_query_scale,
    tunix_rope_scaling,
)

HfConfig = Mapping[str, Any]


def _always(kwargs: Mapping[str, Any]) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class EngineQuirk:
    """What one architecture's engine needs before it starts, when ``applies(engine kwargs)``:
    a ``check`` that refuses (UnsupportedModelError) or warns, engine arguments to set (a
    mapping, or a function of the HF config and the kwargs), an idempotent upstream ``patch``."""

    applies: Callable[[Mapping[str, Any]], bool] = _always
    check: Callable[[HfConfig, Mapping[str, Any]], None] | None = None
    engine_kwargs: Mapping[str, Any] | Callable[[HfConfig, Mapping[str, Any]], Mapping[str, Any]] = dataclasses.field(
        default_factory=dict
    )
    patch: Callable[[], Any] | None = None

    def kwargs_for(self, hf_config: HfConfig, kwargs: Mapping[str, Any]) -> Mapping[str, Any]:
        return self.engine_kwargs(hf_config, kwargs) if callable(self.engine_kwargs) else self.engine_kwargs


#: Patches every engine gets, whatever its architecture (each idempotent).
ENGINE_PATCHES: tuple[Callable[[], Any], ...] = (
    patch_zmq_linger,
    patch_non_stream_chunks,
    patch_contain_engine_faults,
    patch_contain_tokenizer_loop_faults,
    patch_mixed_logprob_batches,
    patch_output_logprob_rows,
    patch_filtered_logprob_lists,
    patch_invalid_grammar_copy,
    patch_logprob_token_decoding,
    patch_greedy_rows_in_mixed_batches,
    patch_detokenizer_output,
)

#: Workarounds and limits an architecture module may name in ``Architecture.quirks``.
ENGINE_QUIRKS: dict[str, EngineQuirk] = {
    "merge_kv_sharding": EngineQuirk(applies=native_attention, patch=patch_merge_kv_sharding),
    "hybrid_swa_memory_on_cpu": EngineQuirk(applies=native_attention, engine_kwargs=HYBRID_SWA_OFF),
    "gemma4_text_dtype": EngineQuirk(engine_kwargs=gemma4_engine_dtype),
    "gemma4_limits": EngineQuirk(check=check_gemma4),
    "moe_sparse_layers": EngineQuirk(check=check_moe_sparse_layers),
    "moe_expert_parallel": EngineQuirk(check=check_expert_parallel),
}


@dataclasses.dataclass(frozen=True)
class TunixQuirk:
    """What a Tunix trainer of one architecture needs to compute the engine's model: an
    idempotent ``patch`` of Tunix, and a ``check`` of the HF config returning what Tunix cannot
    follow (each problem naming its field)."""

    patch: Callable[[], Any] | None = None
    check: Callable[[HfConfig], list[str]] | None = None


#: Trainer-side quirks an architecture module may name in ``Architecture.quirks``.
TUNIX_QUIRKS: dict[str, TunixQuirk] = {
    "tunix_rope_theta_ignored": TunixQuirk(patch=patch_tunix_rope_theta),
    "tunix_no_rope_scaling": TunixQuirk(check=tunix_rope_scaling),
    "tunix_gemma_rope_theta": TunixQuirk(check=tunix_gemma_rope_theta),
    "tunix_query_pre_attn_scalar": TunixQuirk(check=tunix_query_scale),
    "tunix_moe_routing": TunixQuirk(check=tunix_moe_routing),
}


def _quirks(architecture: str) -> tuple[str, ...]:
    quirks = get_architecture(architecture).quirks
    unknown = [q for q in quirks if q not in ENGINE_QUIRKS and q not in TUNIX_QUIRKS]
    if unknown:
        raise ValueError(
            f"{architecture} names unknown quirks {unknown}; known: {sorted({**ENGINE_QUIRKS, **TUNIX_QUIRKS})}"
        )
    return quirks


def prepare_engine(architecture: str, kwargs: Mapping[str, Any], hf_config: HfConfig | None = None) -> dict[str, Any]:
    """Before an Engine starts: refuse what upstream cannot serve (UnsupportedModelError),
    apply every patch it needs (the generic ones and the architecture's own quirks); returns
    the engine kwargs with the arguments the quirks set."""
    hf_config = hf_config or {}
    quirks = [ENGINE_QUIRKS[name] for name in _quirks(architecture) if name in ENGINE_QUIRKS]
    quirks = [q for q in quirks if q.applies(kwargs)]
    for quirk in quirks:
        if quirk.check is not None:
            quirk.check(hf_config, kwargs)
    out = dict(kwargs)
    for quirk in quirks:
        out.update(quirk.kwargs_for(hf_config, kwargs))
        if quirk.patch is not None:
            quirk.patch()
    for patch in ENGINE_PATCHES:
        patch()
    return out


def prepare_tunix_trainer(hf_config: HfConfig, *, allow_mismatch: bool = False) -> list[str]:
    """Before a Tunix model of this HF config trains against the engine: patch Tunix where it
    can follow the config, refuse (``TrainerMismatchError`` naming each field) where it cannot,
    unless ``allow_mismatch`` (then logged). Returns the problems allowed."""
    architecture = hf_config["architectures"][0]
    quirks = [TUNIX_QUIRKS[name] for name in _quirks(architecture) if name in TUNIX_QUIRKS]
    for quirk in quirks:
        if quirk.patch is not None:
            quirk.patch()
    checks = [quirk.check for quirk in quirks if quirk.check is not None]
    return check_trainer_config(architecture, hf_config, checks, allow_mismatch=allow_mismatch)
