"""Test helpers: model cases, oracles from upstream code, and a pool of samplers."""

from __future__ import annotations

import contextlib
import threading
import time
import types
from pathlib import Path

import numpy as np

from sampler.testing import write_tiny_model

# case -> (architecture, config overrides)
CASES = {
    "llama-tied": ("LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "llama-untied": ("LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "qwen2.5": ("Qwen2ForCausalLM", dict(tie_word_embeddings=True, hidden_size=256, num_heads=2)),
    "qwen3-tied": ("Qwen3ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3-untied": ("Qwen3ForCausalLM", dict(tie_word_embeddings=False)),
}

# Cases for tensor-parallel engines. sglang-jax's own loader (the oracle) pads KV heads on
# the wrong axis when hidden_size == num_kv_heads * head_dim, so these avoid that equality.
TP_CASES = {
    "llama-tp": ("LlamaForCausalLM", dict(tie_word_embeddings=False, hidden_size=256)),
    "qwen2.5-tp": ("Qwen2ForCausalLM", dict(tie_word_embeddings=True, hidden_size=256, num_heads=2)),
    "qwen3-tp": ("Qwen3ForCausalLM", dict(tie_word_embeddings=True, hidden_size=256)),
    "qwen3-4h": ("Qwen3ForCausalLM", dict(tie_word_embeddings=False, hidden_size=384, num_heads=4, num_kv_heads=2)),
}

PROMPTS = ["1+1=", "hello world the quick", "Q: what is 3+4? A:"]


def write_case(path: Path, case: str, *, seed: int = 0, **extra) -> Path:
    arch, overrides = {**CASES, **TP_CASES}[case]
    return write_tiny_model(path, arch, seed=seed, **{**overrides, **extra})


def bits(x) -> np.ndarray:
    """Raw bits of an array (so bf16 compares exactly, NaNs included)."""
    a = np.asarray(x)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_same_bits(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected), sorted(set(actual) ^ set(expected))
    bad = []
    for k in expected:
        a, e = np.asarray(actual[k]), np.asarray(expected[k])
        if a.shape != e.shape or a.dtype != e.dtype or not np.array_equal(bits(a), bits(e)):
            bad.append(f"{k}: {a.shape} {a.dtype} vs {e.shape} {e.dtype}")
    assert not bad, "leaves differ:\n" + "\n".join(bad)


def upstream_mappings(model_path) -> dict:
    """sglang-jax's own HF-key -> WeightMapping table for the model in ``model_path``.

    Calls the model class's top ``_create_*weight_mappings`` method with only the HF config
    bound (the dense decoders' read nothing else), so no engine is needed.
    """
    from sgl_jax.srt.models.registry import ModelRegistry
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(model_path))
    cls, _ = ModelRegistry.resolve_model_cls(cfg.architectures)
    (top,) = [n for n in dir(cls) if n.startswith("_create") and n.endswith("weight_mappings") and "layer" not in n]
    ns = types.SimpleNamespace(config=cfg)
    for name in dir(cls):
        if name.startswith("_create"):
            setattr(ns, name, types.MethodType(getattr(cls, name), ns))
    return getattr(ns, top)()


def upstream_engine_leaves(model_path, hf_weights: dict | None = None, *, tp: int = 1) -> dict[str, np.ndarray]:
    """What sglang-jax's loader puts in every engine leaf, computed in numpy from its
    own WeightMapping records (transpose, KV-head replication) and the HF tensors."""
    from safetensors.numpy import load_file
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(model_path))
    if hf_weights is None:
        hf_weights = {}
        for f in sorted(Path(model_path).glob("*.safetensors")):
            hf_weights.update(load_file(str(f)))
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    out = {}
    for key, m in upstream_mappings(model_path).items():
        if key not in hf_weights:
            continue
        w = hf_weights[key]
        if m.transpose and not key.endswith(".bias"):
            w = w.T
        if m.kv_head_padding and tp > kv:
            reps = -(-tp // kv)
            axis = 0 if w.ndim == 1 else 1
            parts = np.split(w, kv, axis=axis)
            if heads > kv:  # GQA: replicate h0,h0,h1,h1,...
                w = np.concatenate([p for p in parts for _ in range(reps)], axis=axis)
            else:  # MHA: zero-pad
                pad = [(0, 0)] * w.ndim
                pad[axis] = (0, w.shape[axis] * (reps - 1))
                w = np.pad(w, pad)
        out[m.target_path] = np.ascontiguousarray(w)
    return out


class SamplerPool:
    """Samplers shared across tests, created on first use."""

    def __init__(self):
        self._samplers = {}

    @staticmethod
    def _key(model_path, load_format, config):
        return (str(model_path), load_format, repr(sorted(config.items())))

    def get(self, model_path, *, load_format: str = "dummy", **config):
        from sampler import SamplerConfig, SglangJaxSampler

        key = self._key(model_path, load_format, config)
        if key not in self._samplers:
            cfg = SamplerConfig(
                model_path=str(model_path),
                context_length=128,
                max_running_requests=4,
                load_format=load_format,
                **config,
            )
            self._samplers[key] = SglangJaxSampler(config=cfg)
        return self._samplers[key]

    def drop(self, model_path, *, load_format: str = "dummy", **config):
        s = self._samplers.pop(self._key(model_path, load_format, config), None)
        if s is not None:
            s.shutdown()

    def close(self):
        for s in self._samplers.values():
            s.shutdown()
        self._samplers.clear()


def greedy(sampler, prompts=PROMPTS, steps: int = 8):
    out = sampler(prompts, max_generation_steps=steps, temperature=0.0)
    return [t.tolist() for t in out.tokens], out


def hf_tensors(model_path) -> dict[str, np.ndarray]:
    """The HF checkpoint's tensors, torch layout, as numpy arrays."""
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(Path(model_path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def flax_params(hf: dict[str, np.ndarray], *, linen_layers: bool = False, wrap: bool = True) -> dict:
    """A Flax (linen) params tree from HF tensors, as a torch->flax port makes it: linear
    weights become (in, out) ``kernel``, norms keep ``weight``, the embedding is
    ``embedding``; ``linen_layers`` names blocks ``layers_<i>`` instead of ``layers/<i>``."""
    tree: dict = {}
    for name, w in hf.items():
        parts = name.split(".")
        leaf = parts[-1]
        if leaf == "weight" and w.ndim == 2 and "embed_tokens" not in name:
            parts[-1], w = "kernel", w.T
        elif "embed_tokens" in name:
            parts[-1] = "embedding"
        if linen_layers and "layers" in parts:
            i = parts.index("layers")
            parts[i : i + 2] = [f"layers_{parts[i + 1]}"]
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = np.ascontiguousarray(w)
    return {"params": tree} if wrap else tree


def raw_generate(sampler, ids, n=8):
    """Greedy output ids of a request straight to the engine's tokenizer manager, as the
    HTTP server or any other client sends it: not through the sampler's generate gate."""
    out = sampler._handle.run(
        sampler.engine.async_generate(
            input_ids=list(ids), sampling_params={"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True}
        ),
        timeout=120,
    )
    return out["output_ids"]


@contextlib.contextmanager
def held_in_flight(sampler, ids, n=8):
    """A raw request that is in flight and cannot finish until the block ends, whatever the
    machine's speed: the scheduler thread is parked between iterations before the request
    is sent, so the request sits in the engine, sent and unanswered. Yields a dict that
    holds the request's output ids once the block has ended."""
    handle = sampler._handle
    assert handle._park.park(60), "the scheduler did not park"
    result = {}
    request = threading.Thread(target=lambda: result.setdefault("ids", raw_generate(sampler, ids, n)))
    try:
        request.start()
        deadline = time.monotonic() + 60
        while not sampler.engine.tokenizer_manager.rid_to_state:
            assert time.monotonic() < deadline, "the request never reached the engine"
            time.sleep(0.005)
        yield result
    finally:
        handle._park.release()
        request.join(120)
    assert "ids" in result, "the held request never finished"


#: Weight scale of checkpoints whose greedy text varies (the default 0.05 repeats one token).
VARIED_WEIGHT_SCALE = 0.2


def write_varied_case(path: Path, *, seed: int = 0, architecture: str = "Qwen3ForCausalLM") -> Path:
    """A tiny checkpoint with larger random weights: greedy continuations differ from token
    to token and between seeds, so a test can tell which weights produced which tokens."""
    from transformers import AutoConfig

    from sampler.testing import random_hf_weights, write_weights

    path = write_tiny_model(path, architecture, seed=seed, weights=False)
    config = AutoConfig.from_pretrained(str(path))
    write_weights(path, random_hf_weights(config, seed=seed, scale=VARIED_WEIGHT_SCALE))
    return path


def tokens_of(result: dict) -> list[int]:
    """Every generated token id of an engine result (the logprob records hold them all)."""
    return [tid for _, tid, *_ in result["meta_info"]["output_token_logprobs"]]


@contextlib.contextmanager
def parked_at_tokens(sampler, n: int, *, timeout: float = 120):
    """Park the scheduler once any request it holds has produced ``n`` tokens.

    Deterministic whatever the machine's speed: the condition is registered while the
    scheduler is parked, and is checked by the scheduler thread itself at every iteration
    boundary (each decode iteration adds one token). Send the request inside the block, then
    call the yielded ``wait()``; the scheduler resumes when the block ends."""
    from sampler.compat.inflight import held_requests, tokens_generated

    handle = sampler._handle
    scheduler = handle.scheduler
    assert handle.park.park(timeout), "the scheduler did not park"
    hold = handle.park.park_when(lambda: any(tokens_generated(r) >= n for r in held_requests(scheduler)))
    released = [False]

    def wait():
        if not released[0]:
            released[0] = True
            handle.park.release()  # the request may run now, up to n tokens
        assert hold.wait(timeout), f"no request reached {n} tokens"
        return [tokens_generated(r) for r in held_requests(scheduler)]

    try:
        yield wait
    finally:
        if not released[0]:
            handle.park.release()
        hold.release()


def send_async(sampler, ids, n, **params):
    """Send one greedy request straight to the engine's tokenizer manager; returns a
    concurrent future of its result (the sampler's generate gate is not involved)."""
    import asyncio

    handle = sampler._handle
    return asyncio.run_coroutine_threadsafe(
        sampler.engine.async_generate(
            input_ids=list(ids),
            sampling_params={"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True, **params},
            return_logprob=True,
        ),
        handle.loop,
    )
