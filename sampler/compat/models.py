"""Upstream limits and quirks of the model families (sglang-jax 0.1.0rc0), handled before an
engine starts: engine arguments a family needs, and configurations upstream cannot serve,
refused with an ``UnsupportedModelError`` naming the config field (an engine that meets
them fails inside its scheduler thread, which ends the process) or warned about.

Each has a test in ``tests/test_compat.py`` that runs unpatched upstream and fails once it is
no longer needed, and a test that the handling works. ``file:line`` references are into
``site-packages/sgl_jax/srt``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from converters.spec import TEXT_CONFIG
from sampler.compat.patches import SGLANG_JAX_VERSION
from sampler.errors import UnsupportedModelError

logger = logging.getLogger(__name__)

FULL, SLIDING = "full_attention", "sliding_attention"


def native_attention(kwargs: Mapping[str, Any]) -> bool:
    """The engine runs sglang-jax's native attention (the CPU backend's)."""
    return kwargs.get("attention_backend") == "native"


def _text(hf_config: Mapping[str, Any]) -> Mapping[str, Any]:
    text = hf_config.get(TEXT_CONFIG)
    return text if isinstance(text, Mapping) else hf_config


# -------------------------------------------------------------------------------- sliding-window KV
#: Engine arguments for models with sliding-window layers on native attention: upstream's hybrid
#: SWA KV pool (``SWAKVPool``) lacks the ``set_kv_buffer_legacy`` the native backend calls
#: (layers/attention/native_backend.py:144): AttributeError at the first forward.
HYBRID_SWA_OFF = {"disable_hybrid_swa_memory": True}


# -------------------------------------------------------------------------------- Qwen3-MoE
def check_moe_sparse_layers(hf_config: Mapping[str, Any], kwargs: Mapping[str, Any]) -> None:
    """sglang-jax's Qwen3-MoE makes every layer not in ``mlp_only_layers`` an MoE layer and
    ignores ``decoder_sparse_step`` (models/qwen3_moe.py:178-179); HF's dense layers in between
    then have no expert weights and loading fails (utils/weight_utils.py:2107)."""
    step = int(hf_config.get("decoder_sparse_step") or 1)
    if step > 1 and int(hf_config.get("num_experts") or 0) > 0:
        raise UnsupportedModelError(
            f"decoder_sparse_step={step}: sglang-jax {SGLANG_JAX_VERSION}'s Qwen3-MoE ignores it and makes "
            "every layer not in mlp_only_layers an MoE layer (sgl_jax/srt/models/qwen3_moe.py:179), so the "
            "model it would serve is not this one; only decoder_sparse_step=1 (dense layers listed in "
            "mlp_only_layers) is supported"
        )


def check_expert_parallel(hf_config: Mapping[str, Any], kwargs: Mapping[str, Any]) -> None:
    """``ep_size`` must divide the engine's devices (layers/moe.py:85 reshapes them into
    (ep_size, tp // ep_size)) and the experts (layers/moe.py:75); ``moe_backend="fused"``
    needs TPU devices (utils/jax_utils.py:30)."""
    tp, ep = int(kwargs.get("tp_size") or 1), int(kwargs.get("ep_size") or 1)
    experts = int(_text(hf_config).get("num_experts") or 0)
    if ep < 1 or tp % ep:
        raise UnsupportedModelError(
            f"ep_size={ep} must divide tp_size={tp}: sglang-jax lays the engine's {tp} devices out as "
            "(ep_size, tp_size // ep_size) for the experts (sgl_jax/srt/layers/moe.py:85)"
        )
    if experts and experts % ep:
        raise UnsupportedModelError(f"ep_size={ep} must divide num_experts={experts} (sgl_jax/srt/layers/moe.py:75)")
    if kwargs.get("moe_backend") in ("fused", "fused_v2") and kwargs.get("device") == "cpu":
        raise UnsupportedModelError(
            f"moe_backend={kwargs['moe_backend']!r} needs TPU devices (sgl_jax/srt/utils/jax_utils.py:30); "
            "use the default 'epmoe' on CPU"
        )


# -------------------------------------------------------------------------------- Gemma 4
#: Gemma 4 features sglang-jax's model does not implement (no reference to them in
#: models/gemma4.py): it would serve another model. Field -> the value it supports.
GEMMA4_UNSUPPORTED = {"hidden_size_per_layer_input": 0, "num_kv_shared_layers": 0, "use_double_wide_mlp": False}


def gemma4_engine_dtype(hf_config: Mapping[str, Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """sglang-jax takes the engine dtype from ``text_config`` (configs/model_config.py:230): a
    text_config without one gives a float32 engine although config.json says bfloat16. Pass
    the top-level dtype unless the caller chose one."""
    text = _text(hf_config)
    if kwargs.get("dtype", "auto") != "auto" or text.get("torch_dtype") or text.get("dtype"):
        return {}
    top = hf_config.get("torch_dtype") or hf_config.get("dtype")
    return {"dtype": str(top).replace("torch.", "")} if top else {}


def check_gemma4(hf_config: Mapping[str, Any], kwargs: Mapping[str, Any]) -> None:
    """What sglang-jax's Gemma 4 cannot serve, refused before it starts (and ``ep_size``,
    which it ignores, warned about)."""
    text = hf_config.get(TEXT_CONFIG)
    if not isinstance(text, Mapping):
        raise UnsupportedModelError(
            "Gemma 4 config without text_config: sglang-jax reads the language model's fields from "
            "text_config (sgl_jax/srt/hf_transformers_utils.py:94 asserts it)"
        )
    if "num_global_key_value_heads" in text and text["num_global_key_value_heads"] is None:
        raise UnsupportedModelError(
            "text_config.num_global_key_value_heads is null: sglang-jax's Gemma4Config then sets "
            "num_key_value_heads to None (sgl_jax/srt/configs/gemma4.py:23); leave the key out instead"
        )
    for field, supported in GEMMA4_UNSUPPORTED.items():
        if text.get(field, supported) not in (supported, None):
            raise UnsupportedModelError(
                f"text_config.{field}={text[field]!r}: sglang-jax {SGLANG_JAX_VERSION}'s Gemma 4 does not "
                f"implement it (only {field}={supported!r}; Gemma 4 E2B/E4B-style models are not served)"
            )
    tp, ep = int(kwargs.get("tp_size") or 1), int(kwargs.get("ep_size") or 1)
    types = text.get("layer_types") or [FULL] * int(text.get("num_hidden_layers") or 0)
    k_eq_v = bool(text.get("attention_k_eq_v")) and FULL in types
    swa_kv = int(text.get("num_key_value_heads") or text.get("num_attention_heads"))
    global_kv = int(text.get("num_global_key_value_heads") or swa_kv)
    if tp > swa_kv and (SLIDING in types or not k_eq_v):
        raise UnsupportedModelError(
            f"tp_size={tp} > text_config.num_key_value_heads={swa_kv}: sglang-jax replicates KV heads only "
            "in full-attention layers with attention_k_eq_v (sgl_jax/srt/models/gemma4.py:801, "
            "kv_head_padding=use_k_eq_v); the other layers then fail in the rotary embedding "
            f"(sgl_jax/srt/layers/embeddings.py:240). Use tp_size <= {swa_kv}"
        )
    if native_attention(kwargs):
        swa_dim = int(text.get("head_dim"))
        global_dim = int(text.get("global_head_dim") or swa_dim)
        if swa_dim != global_dim:
            raise UnsupportedModelError(
                f"text_config.head_dim={swa_dim} != text_config.global_head_dim={global_dim}: on CPU "
                "(native attention, one KV pool) sglang-jax stores every layer's KV with one head dim "
                "and fails to broadcast the others (sgl_jax/srt/mem_cache/memory_pool.py:751); "
                "TPU serves mixed head dims"
            )
        full_kv = global_kv * -(-tp // global_kv) if tp > global_kv else global_kv
        if k_eq_v and SLIDING in types and full_kv != swa_kv:
            raise UnsupportedModelError(
                f"text_config.num_global_key_value_heads={global_kv} (attention_k_eq_v, {full_kv} KV heads "
                f"at tp_size={tp}) != text_config.num_key_value_heads={swa_kv}: on CPU sglang-jax stores "
                "every layer's KV with one head count (sgl_jax/srt/mem_cache/memory_pool.py:751)"
            )
    if ep > 1:
        logger.warning(
            "ep_size=%d is ignored by sglang-jax %s's Gemma 4: the model reads ep_size from text_config "
            "(sgl_jax/srt/models/gemma4.py:385) while the runner sets it on the top-level config "
            "(sgl_jax/srt/model_executor/model_runner.py:573); the experts stay tensor-parallel on an "
            "(expert=1, tensor=%d) mesh",
            ep,
            SGLANG_JAX_VERSION,
            tp,
        )


# -------------------------------------------------------------------------------- quantized engines
#: Architectures sglang-jax quantizes at load but cannot then generate with: Gemma 2's
#: attention mixes the quantized layer's output sharding with its own (ShardingTypeError in
#: the scheduler thread at the first forward).
QUANTIZATION_UNSERVABLE = ("Gemma2ForCausalLM",)


def check_quantized_engine(architecture: str, kwargs: Mapping[str, Any]) -> None:
    """Refuse a quantization config file upstream cannot read (ValueError naming it: it would
    fail in the scheduler thread and end the process), block-wise quantization on CPU, and
    quantized engines upstream starts but cannot generate with: static LoRA on a
    quantized base (quantization replaces the LoRA-wrapped linears, then the scheduler fails:
    ``'LoRAManager' object has no attribute 'lora_backend'``), and the architectures in
    :data:`QUANTIZATION_UNSERVABLE`."""
    path = kwargs.get("quantization_config_path")
    if not path:
        return
    from sgl_jax.srt.configs.quantization_config import QuantizationConfig

    try:  # upstream reads it in the scheduler thread: a missing or bad file would end the process
        config = QuantizationConfig.from_path(path)
    except Exception as e:  # noqa: BLE001 (any reason the file cannot be used: named, not raised through)
        raise ValueError(f"quantization_config_path={path!r} cannot be used: {type(e).__name__}: {e}") from None
    if config is not None and config.weight_block_size is not None and kwargs.get("device") == "cpu":
        raise UnsupportedModelError(
            f"quantization_config_path={path!r}: block-wise quantization (weight_block_size="
            f"{config.weight_block_size}) runs on TPU only in sglang-jax {SGLANG_JAX_VERSION}"
        )
    if kwargs.get("enable_static_lora"):
        raise UnsupportedModelError(
            f"quantization_config_path={path!r} with enable_static_lora: LoRA adapters on a quantized base "
            f"are not supported (sglang-jax {SGLANG_JAX_VERSION} replaces the LoRA layers when it quantizes, "
            "and its scheduler then fails); merge the adapters and push the merged weights instead"
        )
    if architecture in QUANTIZATION_UNSERVABLE:
        raise UnsupportedModelError(
            f"quantization_config_path={path!r}: sglang-jax {SGLANG_JAX_VERSION} quantizes {architecture} "
            "at load but cannot generate with it (ShardingTypeError in its scheduler); serve it unquantized"
        )
