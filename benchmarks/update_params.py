"""update_params: this library against Tunix's SglangJaxSampler.update_params.

Same engine, same weights, alternating runs in one process, on a Qwen3-0.6B-shaped
model (28 layers, hidden 1024, 16/8 heads, head_dim 128, vocab 151936, tied; random
weights, config made locally). Prints medians and peak extra memory as a Markdown table.

    python benchmarks/update_params.py [--runs 7] [--layers 28] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import converters  # noqa: E402
from sampler import SamplerConfig, SglangJaxSampler  # noqa: E402
from sampler.tiny_model import write_tiny_model  # noqa: E402
from sampler.tunix_models import random_tunix_model  # noqa: E402
from sampler.weights import live_device_bytes  # noqa: E402

MiB = 1 << 20


def tunix_peer(sampler: SglangJaxSampler, model):
    """Tunix 0.1.7's own SglangJaxSampler, driving the same engine (no second engine)."""
    from tunix.generate import mappings
    from tunix.generate import sglang_jax_sampler as tsj

    peer = object.__new__(tsj.SglangJaxSampler)
    peer.engine = sampler.engine
    mc = mappings.MappingConfig.build(model=model, backend="sglang_jax")
    peer.args = {"enable_static_lora": False, "lora_target_modules": None}
    peer.to_hf_key_mappings = mc.to_hf_mappings
    peer.to_hf_transpose_keys = mc.to_hf_transpose_keys
    peer.to_hf_hook_fns = mc.to_hf_hook_fns
    return peer


def tunix_update(peer, state) -> float:
    t0 = time.perf_counter()
    peer.update_params(state)
    jax.block_until_ready(peer._model_runner.model_state_leaves)
    return time.perf_counter() - t0


def tunix_peak_extra(peer, state) -> int:
    """Live bytes at Tunix's peak (its converted state built, old weights still alive)."""
    from tunix.generate import sglang_jax_sampler as tsj

    original = tsj.utils.transfer_state_with_mappings
    seen = []

    def wrapped(*args, **kwargs):
        out = original(*args, **kwargs)
        jax.block_until_ready(out)
        seen.append(live_device_bytes())
        return out

    before = live_device_bytes()
    tsj.utils.transfer_state_with_mappings = wrapped
    try:
        peer.update_params(state)
    finally:
        tsj.utils.transfer_state_with_mappings = original
    return max(seen) - before


def ours(sampler, tree, *, views=True) -> tuple[float, object]:
    sampler.config.reshape_views = views
    t0 = time.perf_counter()
    report = sampler.update_params(tree)
    return time.perf_counter() - t0, report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-qwen3-0.6b-"))
    write_tiny_model(
        tmp, "Qwen3ForCausalLM", weights=False, vocab_size=151936, hidden_size=1024, intermediate_size=3072,
        num_layers=args.layers, num_heads=16, num_kv_heads=8, head_dim=128, tie_word_embeddings=True,
    )
    sampler = SglangJaxSampler(config=SamplerConfig(model_path=str(tmp), context_length=256, max_running_requests=2, track_memory=False))
    model = random_tunix_model(tmp, seed=args.seed, dtype=jnp.bfloat16)
    tunix_bf16 = nnx.state(model, nnx.Param)
    model32 = random_tunix_model(tmp, seed=args.seed + 1, dtype=jnp.float32)
    tunix_fp32 = nnx.state(model32, nnx.Param)
    shardings = sampler.engine_shardings()
    engine_layout = {k: jax.device_put(v, shardings[k]) for k, v in converters.to_engine_layout(tunix_bf16, sampler.spec).items()}
    jax.block_until_ready((tunix_bf16, tunix_fp32, engine_layout))
    peer = tunix_peer(sampler, model)
    model_bytes = sum(x.nbytes for x in engine_layout.values())

    cases = {
        "ours, Tunix layout bf16": lambda: ours(sampler, tunix_bf16),
        "ours, Tunix layout bf16, no views (as on TPU)": lambda: ours(sampler, tunix_bf16, views=False),
        "ours, Tunix layout fp32": lambda: ours(sampler, tunix_fp32),
        "ours, engine layout bf16": lambda: ours(sampler, engine_layout),
        "Tunix SglangJaxSampler.update_params, Tunix layout bf16": lambda: (tunix_update(peer, tunix_bf16), None),
    }
    for fn in cases.values():  # warm-up: compile transforms, build plans
        fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    reports = {}
    names = list(cases)
    for r in range(args.runs):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate the order
            seconds, report = cases[name]()
            times[name].append(seconds)
            if report is not None:
                reports[name] = report

    # peak extra memory, measured in separate runs (the measurement itself costs time)
    peaks = {}
    for name, tree, views in (
        ("ours, Tunix layout bf16", tunix_bf16, True),
        ("ours, Tunix layout bf16, no views (as on TPU)", tunix_bf16, False),
        ("ours, Tunix layout fp32", tunix_fp32, True),
        ("ours, engine layout bf16", engine_layout, True),
    ):
        sampler.config.reshape_views = views
        peaks[name] = sampler.update_params(tree, track_peak_memory=True).peak_extra_bytes
    sampler.config.reshape_views = True
    peaks["Tunix SglangJaxSampler.update_params, Tunix layout bf16"] = tunix_peak_extra(peer, tunix_bf16)

    tunix_median = statistics.median(times["Tunix SglangJaxSampler.update_params, Tunix layout bf16"])
    print(f"\nQwen3-0.6B-shaped ({args.layers} layers, {model_bytes / MiB:.0f} MiB bf16), JAX {jax.__version__} "
          f"on {jax.devices()[0].platform} ({os.cpu_count()} cores), {args.runs} alternating runs, seed {args.seed}\n")
    print("| update | median ms | vs Tunix | bytes copied | peak extra memory |")
    print("|---|---:|---:|---:|---:|")
    for name in names:
        med = statistics.median(times[name])
        rep = reports.get(name)
        copied = f"{rep.copied_bytes / MiB:.0f} MiB" if rep is not None else f"{model_bytes / MiB:.0f} MiB (all)"
        print(f"| {name} | {med * 1e3:.1f} | {tunix_median / med:.1f}x | {copied} | {peaks[name] / MiB:.0f} MiB |")
    largest = max((r.largest_copied_leaf_bytes for r in reports.values()), default=0)
    print(f"\nlargest single engine leaf copied by ours: {largest / MiB:.0f} MiB; one model: {model_bytes / MiB:.0f} MiB")
    sampler.shutdown()


if __name__ == "__main__":
    main()
