"""An independent float64 numpy forward of HF decoders (Llama, Qwen2/2.5, Qwen3, Qwen3-MoE,
Gemma 2), written from the HF modeling code's definitions, to check what an engine computes.

RMSNorm, rotary embeddings (rotate-half form, the config's rope_theta), grouped-query
causal attention, SwiGLU MLP, q/k/v biases (Qwen2, or ``attention_bias``), per-head q/k
RMSNorm (Qwen3), tied or separate output embeddings; Qwen3-MoE's routed experts (softmax
router, top-k, renormalised when ``norm_topk_prob``, dense ``mlp_only_layers``); Gemma 2's
(1 + w) norms around attention and MLP, sqrt(hidden)-scaled embeddings,
``query_pre_attn_scalar``, attention and final logit soft-capping, sliding-window layers
and the tanh-GELU MLP. Inputs are the HF tensors in torch layout ``(out, in)``, as read from
safetensors.
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


#: Architectures this reference computes.
ARCHITECTURES = (
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "Gemma2ForCausalLM",
)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def softcap(x: np.ndarray, cap: float | None) -> np.ndarray:
    return x if not cap else np.tanh(x / cap) * cap


def mlp(h: np.ndarray, w: Mapping[str, np.ndarray], prefix: str, act) -> np.ndarray:
    gate, up = h @ w[prefix + "gate_proj.weight"].T, h @ w[prefix + "up_proj.weight"].T
    return (act(gate) * up) @ w[prefix + "down_proj.weight"].T


def moe(h: np.ndarray, w: Mapping[str, np.ndarray], prefix: str, top_k: int, renormalize: bool) -> np.ndarray:
    """HF Qwen3MoeSparseMoeBlock: softmax router, top-k experts, weights renormalised if asked."""
    probs = h @ w[prefix + "gate.weight"].T
    probs = np.exp(probs - probs.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    chosen = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
    weights = np.take_along_axis(probs, chosen, axis=-1)
    if renormalize:
        weights /= weights.sum(-1, keepdims=True)
    out = np.zeros_like(h)
    for token in range(h.shape[0]):
        for e, g in zip(chosen[token], weights[token]):
            out[token] += g * mlp(h[token : token + 1], w, f"{prefix}experts.{e}.", silu)[0]
    return out


def logits(config: Mapping[str, Any], tensors: Mapping[str, Any], ids: Sequence[int]) -> np.ndarray:
    """Next-token logits (T, V) of the model for one sequence of token ids."""
    get = config.get
    arch = get("architectures")[0]
    if arch not in ARCHITECTURES:
        raise ValueError(f"the reference forward does not know {arch}; it knows {ARCHITECTURES}")
    gemma = arch == "Gemma2ForCausalLM"
    hidden, heads = get("hidden_size"), get("num_attention_heads")
    kv_heads = get("num_key_value_heads") or heads
    head_dim = get("head_dim") or hidden // heads
    eps = get("rms_norm_eps", 1e-6)
    theta = float(get("rope_theta", 10000.0))
    qkv_bias = arch == "Qwen2ForCausalLM" or bool(get("attention_bias", False))
    qk_norm = arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
    scale = (get("query_pre_attn_scalar") if gemma else head_dim) ** -0.5
    w = {k: _f64(v) for k, v in tensors.items()}

    def norm(x, name):  # Gemma stores w and applies (1 + w)
        return rms_norm(x, w[name] + 1 if gemma else w[name], eps)

    ids = np.asarray(ids)
    t = len(ids)
    pos = np.arange(t)
    x = w["model.embed_tokens.weight"][ids]
    if gemma:
        x = x * np.sqrt(hidden)
    causal = np.tril(np.ones((t, t), bool))
    for i in range(get("num_hidden_layers")):
        p = f"model.layers.{i}."
        h = norm(x, p + "input_layernorm.weight")
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
        scores = softcap(np.einsum("qnd,knd->nqk", q, k) * scale, get("attn_logit_softcapping") if gemma else None)
        visible = causal
        if gemma and (get("layer_types") or [])[i] == "sliding_attention":  # HF: kv_idx > q_idx - window
            visible = causal & (pos[None, :] > pos[:, None] - get("sliding_window"))
        scores = np.where(visible[None], scores, -np.inf)
        scores -= scores.max(-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(-1, keepdims=True)
        attn = np.einsum("nqk,knd->qnd", probs, v).reshape(t, heads * head_dim) @ w[p + "self_attn.o_proj.weight"].T
        if gemma:
            x = x + norm(attn, p + "post_attention_layernorm.weight")
            h = norm(x, p + "pre_feedforward_layernorm.weight")
            x = x + norm(mlp(h, w, p + "mlp.", gelu_tanh), p + "post_feedforward_layernorm.weight")
            continue
        x = x + attn
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        if p + "mlp.gate.weight" in w:  # a Qwen3-MoE expert layer (the others are mlp_only_layers)
            x = x + moe(h, w, p + "mlp.", get("num_experts_per_tok"), bool(get("norm_topk_prob", False)))
        else:
            x = x + mlp(h, w, p + "mlp.", silu)
    x = norm(x, "model.norm.weight")
    # tied when the checkpoint has no output embedding (HF drops it on save; Gemma always ties)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return softcap(x @ head.T, get("final_logit_softcapping") if gemma else None)


def prompt_logprobs(config: Mapping[str, Any], tensors: Mapping[str, Any], ids: Sequence[int]) -> np.ndarray:
    """log p(ids[i] | ids[:i]) for i = 1 .. T-1 (what an engine reports as prompt logprobs)."""
    out = logits(config, tensors, ids)[:-1]
    out = out - out.max(-1, keepdims=True)
    logp = out - np.log(np.exp(out).sum(-1, keepdims=True))
    return logp[np.arange(len(ids) - 1), np.asarray(ids)[1:]]
