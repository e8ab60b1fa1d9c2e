"""Tiny Hugging Face-style checkpoints built locally (no model hub).

Tests, benchmarks and the demo need real checkpoints: a ``config.json`` made with
transformers' own config classes, a tokenizer trained with the ``tokenizers``
library, and random weights saved under HF names in torch layout ``(out, in)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")

# Text the tokenizer is trained on: digits and arithmetic for the GRPO demo task,
# plus a few words so that generated text is readable.
_CORPUS = [
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "1+1=2 2+3=5 4+4=8 7+2=9 3+6=9 9+9=18 12+7=19",
    "Q: what is 3+4? A: 7",
    "hello world the quick brown fox jumps over the lazy dog",
    "answer question number sum count letters words yes no",
]


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 8, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def hf_config(
    architecture: str = "Qwen3ForCausalLM",
    *,
    vocab_size: int = 384,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    head_dim: int = 128,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    tie_word_embeddings: bool = True,
    dtype: str = "bfloat16",
    eos_token_id: int = 1,
    pad_token_id: int = 0,
):
    """A transformers config object for a small model of ``architecture``."""
    import transformers

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=tie_word_embeddings,
        torch_dtype=dtype,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=None,
        rms_norm_eps=1e-6,
        # Tunix 0.1.7's Qwen3 and Llama3 attention ignore config.rope_theta and use 1e6; the
        # tiny models use that value so trainer and engine compute the same function.
        rope_theta=1_000_000.0,
    )
    if architecture == "LlamaForCausalLM":
        cfg = transformers.LlamaConfig(head_dim=head_dim, **common)
    elif architecture == "Qwen2ForCausalLM":
        if hidden_size != num_heads * head_dim:
            raise ValueError(
                "Qwen2 derives head_dim from hidden_size / num_heads: "
                f"{hidden_size} / {num_heads} != {head_dim}"
            )
        cfg = transformers.Qwen2Config(**common)
    elif architecture == "Qwen3ForCausalLM":
        cfg = transformers.Qwen3Config(head_dim=head_dim, **common)
    else:
        raise ValueError(f"unknown architecture {architecture!r}; known: {ARCHITECTURES}")
    cfg.architectures = [architecture]
    return cfg


def random_hf_weights(config, *, seed: int = 0, scale: float = 0.05) -> dict[str, np.ndarray]:
    """Random weights under HF names in torch layout, in the config's dtype."""
    import ml_dtypes

    dtype = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float16": np.float16}[
        str(getattr(config, "torch_dtype", None) or config.dtype).replace("torch.", "")
    ]
    rng = np.random.default_rng(seed)
    arch = config.architectures[0]
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    inter = config.intermediate_size

    def mat(*shape, s=scale):
        return (rng.standard_normal(shape) * s).astype(dtype)

    def norm(n):
        return (1.0 + rng.standard_normal(n) * 0.1).astype(dtype)

    w = {"model.embed_tokens.weight": mat(config.vocab_size, hidden, s=0.1), "model.norm.weight": norm(hidden)}
    if not config.tie_word_embeddings:
        w["lm_head.weight"] = mat(config.vocab_size, hidden, s=0.1)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = mat(heads * head_dim, hidden)
        w[p + "self_attn.k_proj.weight"] = mat(kv_heads * head_dim, hidden)
        w[p + "self_attn.v_proj.weight"] = mat(kv_heads * head_dim, hidden)
        w[p + "self_attn.o_proj.weight"] = mat(hidden, heads * head_dim)
        if arch == "Qwen2ForCausalLM":
            w[p + "self_attn.q_proj.bias"] = mat(heads * head_dim, s=0.2)
            w[p + "self_attn.k_proj.bias"] = mat(kv_heads * head_dim, s=0.2)
            w[p + "self_attn.v_proj.bias"] = mat(kv_heads * head_dim, s=0.2)
        if arch == "Qwen3ForCausalLM":
            w[p + "self_attn.q_norm.weight"] = norm(head_dim)
            w[p + "self_attn.k_norm.weight"] = norm(head_dim)
        w[p + "mlp.gate_proj.weight"] = mat(inter, hidden)
        w[p + "mlp.up_proj.weight"] = mat(inter, hidden)
        w[p + "mlp.down_proj.weight"] = mat(hidden, inter)
        w[p + "input_layernorm.weight"] = norm(hidden)
        w[p + "post_attention_layernorm.weight"] = norm(hidden)
    return w


def write_weights(path: str | Path, weights: dict[str, np.ndarray], *, max_shard_bytes: int | None = None) -> None:
    """Save ``weights`` as HF safetensors in ``path`` (sharded with an index if asked)."""
    from safetensors.numpy import save_file

    path = Path(path)
    for old in list(path.glob("*.safetensors")) + list(path.glob("*.safetensors.index.json")):
        old.unlink()
    if max_shard_bytes is None:
        save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in weights.items():
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    index = {"metadata": {"total_size": sum(a.nbytes for a in weights.values())}, "weight_map": {}}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        index["weight_map"].update({name: fname for name in shard})
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_tiny_model(
    path: str | Path,
    architecture: str = "Qwen3ForCausalLM",
    *,
    seed: int = 0,
    weights: bool = True,
    **config_kwargs: Any,
) -> Path:
    """Write config, tokenizer and (optionally) random weights of a tiny model to ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(vocab_size=320)
    tokenizer.save_pretrained(str(path))
    config_kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    config_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    vocab = config_kwargs.setdefault("vocab_size", 384)
    if vocab < len(tokenizer):
        raise ValueError(f"vocab_size {vocab} < tokenizer size {len(tokenizer)}")
    config = hf_config(architecture, **config_kwargs)
    config.save_pretrained(str(path))
    (path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id})
    )
    if weights:
        write_weights(path, random_hf_weights(config, seed=seed))
    return path
