"""An independent float64 numpy forward of the HF dense decoders (Llama, Qwen2/2.5, Qwen3),
written from the HF modeling code's definitions, to check what an engine computes.

RMSNorm, rotary embeddings (rotate-half form, the config's rope_theta), grouped-query
causal attention, SwiGLU MLP, q/k/v biases (Qwen2, or ``attention_bias``), per-head q/k
RMSNorm (Qwen3), tied or separate output embeddings. Inputs are the HF tensors in torch
layout ``(out, in)``, as read from safetensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).astype(np.float64)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """HF ``apply_rotary_pos_emb`` for x (T, N, D): rotate-half with cos/sin of pos * inv_freq."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    freqs = positions[:, None].astype(np.float64) * inv_freq[None]
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos, sin = np.cos(emb)[:, None, :], np.sin(emb)[:, None, :]
    half = d // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def logits(config: Mapping[str, Any], tensors: Mapping[str, Any], ids: Sequence[int]) -> np.ndarray:
    """Next-token logits (T, V) of the model for one sequence of token ids."""
    get = config.get
    arch = get("architectures")[0]
    hidden, heads = get("hidden_size"), get("num_attention_heads")
    kv_heads = get("num_key_value_heads") or heads
    head_dim = get("head_dim") or hidden // heads
    eps = get("rms_norm_eps", 1e-6)
    theta = float(get("rope_theta", 10000.0))
    qkv_bias = arch == "Qwen2ForCausalLM" or bool(get("attention_bias", False))
    qk_norm = arch == "Qwen3ForCausalLM"
    w = {k: _f64(v) for k, v in tensors.items()}
    ids = np.asarray(ids)
    t = len(ids)
    pos = np.arange(t)
    x = w["model.embed_tokens.weight"][ids]
    causal = np.tril(np.ones((t, t), bool))
    for i in range(get("num_hidden_layers")):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = h @ w[p + "self_attn.q_proj.weight"].T
        k = h @ w[p + "self_attn.k_proj.weight"].T
        v = h @ w[p + "self_attn.v_proj.weight"].T
        if qkv_bias:
            q = q + w[p + "self_attn.q_proj.bias"]
            k = k + w[p + "self_attn.k_proj.bias"]
            v = v + w[p + "self_attn.v_proj.bias"]
        q, k, v = q.reshape(t, heads, head_dim), k.reshape(t, kv_heads, head_dim), v.reshape(t, kv_heads, head_dim)
        if qk_norm:
            q = rms_norm(q, w[p + "self_attn.q_norm.weight"], eps)
            k = rms_norm(k, w[p + "self_attn.k_norm.weight"], eps)
        q, k = rope(q, pos, theta), rope(k, pos, theta)
        group = heads // kv_heads
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        scores = np.einsum("qnd,knd->nqk", q, k) / np.sqrt(head_dim)
        scores = np.where(causal[None], scores, -np.inf)
        scores -= scores.max(-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(-1, keepdims=True)
        attn = np.einsum("nqk,knd->qnd", probs, v).reshape(t, heads * head_dim)
        x = x + attn @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if get("tie_word_embeddings", False) else w["lm_head.weight"]
    return x @ head.T


def prompt_logprobs(config: Mapping[str, Any], tensors: Mapping[str, Any], ids: Sequence[int]) -> np.ndarray:
    """log p(ids[i] | ids[:i]) for i = 1 .. T-1 (what an engine reports as prompt logprobs)."""
    out = logits(config, tensors, ids)[:-1]
    out = out - out.max(-1, keepdims=True)
    logp = out - np.log(np.exp(out).sum(-1, keepdims=True))
    return logp[np.arange(len(ids) - 1), np.asarray(ids)[1:]]
