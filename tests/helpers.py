"""Test helpers: model cases, oracles from upstream code, and a pool of samplers."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import numpy as np

from sampler.tiny import write_tiny_model

# case -> (architecture, config overrides). The one list of models the tests cover: every
# case is checked in every source format its architecture has against sglang-jax's own loader
# (test_oracle, test_converters) and, where tests/reference_forward.py knows the architecture,
# against the float64 reference forward (test_reference).
CASES = {
    "llama-tied": ("LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "llama-untied": ("LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "qwen2.5": ("Qwen2ForCausalLM", dict(tie_word_embeddings=True, hidden_size=256, num_heads=2)),
    "qwen3-tied": ("Qwen3ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3-untied": ("Qwen3ForCausalLM", dict(tie_word_embeddings=False)),
    "qwen3-moe": ("Qwen3MoeForCausalLM", dict(tie_word_embeddings=False)),
    "gemma2": ("Gemma2ForCausalLM", dict()),
    "gemma2-mha": ("Gemma2ForCausalLM", dict(num_kv_heads=2)),  # Tunix: one fused qkv_einsum
    "gemma4-moe": ("Gemma4ForCausalLM", dict(moe=True)),
    "gemma4-keqv": ("Gemma4ForCausalLM", dict(attention_k_eq_v=True)),  # dense; full layers: k only
}

# Cases for tensor-parallel engines. sglang-jax's own loader (the oracle) pads KV heads on
# the wrong axis when hidden_size == num_kv_heads * head_dim, so these avoid that equality.
TP_CASES = {
    "llama-tp": ("LlamaForCausalLM", dict(tie_word_embeddings=False, hidden_size=256)),
    "qwen2.5-tp": ("Qwen2ForCausalLM", dict(tie_word_embeddings=True, hidden_size=256, num_heads=2)),
    "qwen3-tp": ("Qwen3ForCausalLM", dict(tie_word_embeddings=True, hidden_size=256)),
    "qwen3-4h": ("Qwen3ForCausalLM", dict(tie_word_embeddings=False, hidden_size=384, num_heads=4, num_kv_heads=2)),
    "qwen3-moe-tp": ("Qwen3MoeForCausalLM", dict(tie_word_embeddings=True)),  # 1 KV head: replicated at tp 2
    # 2 KV heads: a Tunix trainer can shard them over tp 2 (it cannot shard one)
    "qwen3-moe-2kv": ("Qwen3MoeForCausalLM", dict(tie_word_embeddings=True, num_kv_heads=2)),
    # 32 experts: one stacked expert leaf (1 MiB) outweighs every other tensor (load_checkpoint memory)
    "qwen3-moe-32e": ("Qwen3MoeForCausalLM", dict(tie_word_embeddings=True, num_experts=32)),
    "gemma4-moe-tp": ("Gemma4ForCausalLM", dict(moe=True, num_kv_heads=2)),  # upstream needs KV heads >= tp
    # k_eq_v full layers with 1 KV head (replicated at tp 2) beside sliding layers with 2
    "gemma4-keqv-tp": ("Gemma4ForCausalLM", dict(attention_k_eq_v=True, num_kv_heads=2, num_global_kv_heads=1)),
}

# (case, tp_size, ep_size) of the tensor-parallel engines the sharded tests start, each checked
# in every source format against an engine that loaded the same checkpoint with sglang-jax's
# own loader (test_sharded). Gemma 2 at tp 2 replicates its one KV head.
TP_ENGINES = [
    ("llama-tp", 2, 1),
    ("qwen2.5-tp", 2, 1),
    ("qwen3-tp", 2, 1),
    ("qwen3-4h", 4, 1),
    ("qwen3-moe-tp", 2, 1),  # experts on an (expert 1, tensor 2) mesh
    ("qwen3-moe-tp", 2, 2),  # experts on an (expert 2, tensor 1) mesh
    ("gemma2", 2, 1),
    ("gemma4-moe-tp", 2, 1),
    ("gemma4-keqv-tp", 2, 1),
]


def engine_config(tp: int = 1, ep: int = 1) -> dict:
    """SamplerPool / SamplerConfig keyword arguments of an engine with this tp and ep."""
    return dict(tp_size=tp, **({"engine_kwargs": {"ep_size": ep}} if ep > 1 else {}))


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


def upstream_model(model_path):
    """sglang-jax's own model class for the checkpoint in ``model_path``, built abstractly
    (``nnx.eval_shape``: no weights, no engine): its weight-mapping tables and the dtype of
    every parameter (float32 norms and routers) come from upstream code."""
    import jax
    import jax.numpy as jnp
    import sgl_jax.srt.hf_transformers_utils  # noqa: F401  (registers sglang-jax's own configs, Gemma 4's)
    from flax import nnx
    from sgl_jax.srt.models.registry import ModelRegistry
    from transformers import AutoConfig

    import converters

    cfg = AutoConfig.from_pretrained(str(model_path))
    cfg.ep_size, cfg.moe_backend = 1, "epmoe"
    cls, _ = ModelRegistry.resolve_model_cls(cfg.architectures)
    mesh = jax.make_mesh(
        (1, 1), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Explicit,) * 2, devices=jax.devices()[:1]
    )
    dtype = jnp.dtype(converters.ModelSpec.from_hf_config(model_path).dtype)
    with jax.set_mesh(mesh):
        return nnx.eval_shape(lambda: cls(cfg, mesh, dtype=dtype))


def upstream_mappings(model) -> dict:
    """sglang-jax's own HF-key -> WeightMapping table of an :func:`upstream_model`."""
    (top,) = [n for n in dir(model) if n.startswith("_create") and n.endswith("weight_mappings") and "layer" not in n]
    return getattr(model, top)()


def _kv_replicated(w: np.ndarray, heads: int, kv: int, tp: int) -> np.ndarray:
    """sglang-jax's KV-head replication for tp > kv heads (utils/weight_utils.py
    ``_apply_kv_head_padding``): GQA repeats h0,h0,h1,h1,...; MHA zero-pads."""
    reps = -(-tp // kv)
    axis = 0 if w.ndim == 1 else 1
    parts = np.split(w, kv, axis=axis)
    if heads > kv:
        return np.concatenate([p for p in parts for _ in range(reps)], axis=axis)
    pad = [(0, 0)] * w.ndim
    pad[axis] = (0, w.shape[axis] * (reps - 1))
    return np.pad(w, pad)


def upstream_engine_leaves(model_path, hf_weights: dict | None = None, *, tp: int = 1) -> dict[str, np.ndarray]:
    """What sglang-jax's loader puts in every engine leaf, computed in numpy from its own
    WeightMapping records (transpose, KV-head replication, per-expert stacks) and the HF
    tensors, in each parameter's own dtype; plus Gemma 4's experts, which its model loads
    outside the mappings (models/gemma4.py ``load_weights``: gate_up_proj split in halves)."""
    if hf_weights is None:
        hf_weights = hf_tensors(model_path)
    import jax
    from flax import nnx

    from converters.source import key_paths

    model = upstream_model(model_path)
    state = nnx.state(model, nnx.Param)
    dtypes = dict(zip(key_paths(state), (np.dtype(x.dtype) for x in jax.tree_util.tree_leaves(state))))
    text = getattr(model.config, "text_config", None) or model.config
    heads, kv = text.num_attention_heads, text.num_key_value_heads
    out = {}
    for key, m in upstream_mappings(model).items():
        if key.startswith("__MOE_EXPERTS__"):  # target_path = [engine leaf, expert 0 key, expert 1 key, ...]
            target, *keys = m.target_path
            if m.physical_to_logical_map is not None:
                keys = [keys[int(i)] for i in m.physical_to_logical_map]
            if any(k not in hf_weights for k in keys):
                continue
            assert m.concat_axis is None and m.transpose
            w = np.stack([hf_weights[k].T for k in keys])
        else:
            if key not in hf_weights:
                continue
            target, w = m.target_path, hf_weights[key]
            if m.transpose and not key.endswith(".bias"):
                w = w.T
            if m.kv_head_padding and tp > kv:
                w = _kv_replicated(w, heads, kv, tp)
        out[target] = w
    for i, layer in enumerate(getattr(getattr(model, "model", None), "layers", ())):
        if not getattr(layer, "enable_moe_block", False):
            continue
        prefixes = [f"model.language_model.layers.{i}.experts.", f"model.layers.{i}.experts."]
        prefix = next((p for p in prefixes if p + "gate_up_proj" in hf_weights), None)
        if prefix is not None:
            gate_up = hf_weights[prefix + "gate_up_proj"]
            half = gate_up.shape[1] // 2
            out[f"model.layers.{i}.experts.wi_0"] = np.transpose(gate_up[:, :half], (0, 2, 1))
            out[f"model.layers.{i}.experts.wi_1"] = np.transpose(gate_up[:, half:], (0, 2, 1))
            out[f"model.layers.{i}.experts.wo"] = np.transpose(hf_weights[prefix + "down_proj"], (0, 2, 1))
    return {k: np.ascontiguousarray(w.astype(dtypes[k])) for k, w in out.items()}


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
                **{"context_length": 128, "max_running_requests": 4, **config},
                model_path=str(model_path),
                load_format=load_format,
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


#: JAX's event for a program found in the persistent compilation cache (jax._src.compiler).
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


@contextlib.contextmanager
def counting_compiles():
    """Yields a list that collects every XLA compilation in this process while open, the
    engine's scheduler thread included (jax.monitoring listeners are process-wide). A program
    loaded from the persistent compilation cache (conftest turns it on) counts too: JAX times
    the load under the same event."""
    import jax
    from jax._src.dispatch import BACKEND_COMPILE_EVENT  # a rename fails here, not silently

    compiles: list[float] = []

    def on_event(event: str, duration: float, **_) -> None:
        if event == BACKEND_COMPILE_EVENT:
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)


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


def write_varied_case(path: Path, *, seed: int = 0, architecture: str = "Qwen3ForCausalLM", **overrides) -> Path:
    """A tiny checkpoint with larger random weights: greedy continuations differ from token
    to token and between seeds, so a test can tell which weights produced which tokens (and
    attention, so RoPE, matters to its logprobs). ``overrides``: config fields."""
    from transformers import AutoConfig

    from sampler.tiny import random_hf_weights, write_weights

    path = write_tiny_model(path, architecture, seed=seed, weights=False, **overrides)
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
    from sampler.compat.scheduler import held_requests, tokens_generated

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


#: lm_head row scales of ``write_special_prone_case``: <pad> (0), <eos> (1), <unk> (2) of the
#: tiny tokenizer. About a fifth of its greedy tokens are then special ids, mid-answer too.
SPECIAL_ROW_SCALES = {0: 2.0, 1: 1.5, 2: 2.5}


def write_special_prone_case(path: Path, *, seed: int = 0) -> Path:
    """A tiny Llama (untied, varied weights) whose answers hold special ids mid-sequence:
    the lm_head rows of the special tokens are scaled up, so their logits lead often."""
    from transformers import AutoConfig

    from sampler.tiny import random_hf_weights, write_weights

    path = write_tiny_model(path, "LlamaForCausalLM", seed=seed, weights=False, tie_word_embeddings=False)
    weights = random_hf_weights(AutoConfig.from_pretrained(str(path)), seed=seed, scale=VARIED_WEIGHT_SCALE)
    head = weights["lm_head.weight"]
    rows = head.astype(np.float32)
    for token, scale in SPECIAL_ROW_SCALES.items():
        rows[token] *= scale
    weights["lm_head.weight"] = rows.astype(head.dtype)
    write_weights(path, weights)
    return path
