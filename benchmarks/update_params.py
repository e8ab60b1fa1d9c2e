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
from sampler.testing import write_tiny_model  # noqa: E402
from sampler.tunix_models import random_tunix_model  # noqa: E402
from sampler.weights import buffer_pointers, live_device_bytes  # noqa: E402

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


def tunix_peak(peer, state) -> int:
    """Live bytes at Tunix's peak: its converted state built, old weights still alive."""
    from tunix.generate import sglang_jax_sampler as tsj

    original = tsj.utils.transfer_state_with_mappings
    seen = []

    def wrapped(*args, **kwargs):
        out = original(*args, **kwargs)
        jax.block_until_ready(out)
        seen.append(live_device_bytes())
        return out

    tsj.utils.transfer_state_with_mappings = wrapped
    try:
        peer.update_params(state)
    finally:
        tsj.utils.transfer_state_with_mappings = original
    return max(seen)


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
        tmp,
        "Qwen3ForCausalLM",
        weights=False,
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_layers=args.layers,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
    )
    sampler = SglangJaxSampler(
        config=SamplerConfig(model_path=str(tmp), context_length=256, max_running_requests=2, track_memory=False)
    )
    model = random_tunix_model(tmp, seed=args.seed, dtype=jnp.bfloat16)
    tunix_bf16 = nnx.state(model, nnx.Param)
    model32 = random_tunix_model(tmp, seed=args.seed + 1, dtype=jnp.float32)
    tunix_fp32 = nnx.state(model32, nnx.Param)
    shardings = sampler.engine_shardings()
    engine_layout = {
        k: jax.device_put(v, shardings[k]) for k, v in converters.to_engine_layout(tunix_bf16, sampler.spec).items()
    }
    jax.block_until_ready((tunix_bf16, tunix_fp32, engine_layout))
    peer = tunix_peer(sampler, model)
    for tree in (tunix_bf16, tunix_fp32, engine_layout):  # warm-up: compile transforms, build plans
        ours(sampler, tree)
        ours(sampler, tree, views=False)
    tunix_update(peer, tunix_bf16)
    tunix_update(peer, tunix_fp32)
    model_bytes = sum(x.nbytes for x in engine_layout.values())

    cases = {
        "ours, Tunix layout bf16": (tunix_bf16, True),
        "ours, Tunix layout bf16, no views (as on TPU)": (tunix_bf16, False),
        "ours, engine layout bf16": (engine_layout, True),
        "ours, Tunix layout fp32": (tunix_fp32, True),
        "Tunix, Tunix layout bf16": (tunix_bf16, None),
        "Tunix, Tunix layout fp32": (tunix_fp32, None),
    }

    def run(name):
        tree, views = cases[name]
        if views is None:
            return tunix_update(peer, tree), None
        return ours(sampler, tree, views=views)

    # Each timed push follows an untimed push of the same kind, so every case is timed in
    # its steady state (what a training loop repeats), not paying for freeing what the
    # previous case left in the engine.
    names = list(cases)
    times: dict[str, list[float]] = {k: [] for k in cases}
    reports = {}
    for r in range(args.runs):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order
            run(name)
            seconds, report = run(name)
            times[name].append(seconds)
            if report is not None:
                reports[name] = report

    # memory, in separate runs (measuring costs time): steady state, then one tracked push
    peaks = {}
    for name, (tree, views) in cases.items():
        run(name)
        before = live_device_bytes()
        if views is None:
            peak = tunix_peak(peer, tree)
        else:
            sampler.config.reshape_views = views
            rep = sampler.update_params(tree, track_peak_memory=True)
            peak = before + rep.peak_extra_bytes + max(0, rep.live_bytes_after - rep.live_bytes_before)
        after = live_device_bytes()
        peaks[name] = max(0, peak - max(before, after))
    sampler.config.reshape_views = True

    print(
        f"\nQwen3-0.6B-shaped ({args.layers} layers, {model_bytes / MiB:.0f} MiB bf16), JAX {jax.__version__} "
        f"on {jax.devices()[0].platform} ({os.cpu_count()} cores), {args.runs} alternating rounds, seed {args.seed}\n"
    )
    print("| update | median ms | speed-up vs Tunix (same source) | bytes copied | transient extra memory |")
    print("|---|---:|---:|---:|---:|")
    tunix_ref = {
        "bf16": statistics.median(times["Tunix, Tunix layout bf16"]),
        "fp32": statistics.median(times["Tunix, Tunix layout fp32"]),
    }
    for name in names:
        med = statistics.median(times[name])
        ref = tunix_ref["fp32" if "fp32" in name else "bf16"]
        rep = reports.get(name)
        copied = rep.copied_bytes if rep is not None else _copied_by_leaves(sampler, cases[name][0], peer=peer)
        print(f"| {name} | {med * 1e3:.1f} | {ref / med:.1f}x | {copied / MiB:.0f} MiB | {peaks[name] / MiB:.0f} MiB |")
    largest = max((r.largest_copied_leaf_bytes for r in reports.values()), default=0)
    print(
        f"\nlargest single engine leaf copied by ours: {largest / MiB:.0f} MiB; one model: {model_bytes / MiB:.0f} MiB"
    )
    sampler.shutdown()


def _copied_by_leaves(sampler, tree, peer=None) -> int:
    """Bytes of engine leaves that do not share the source's buffers (after a Tunix push)."""
    if peer is not None:
        tunix_update(peer, tree)
    src = {p for x in jax.tree_util.tree_leaves(tree) for p in buffer_pointers(x)}
    return sum(a.nbytes for a in sampler._handle.model_runner.model_state_leaves if not set(buffer_pointers(a)) & src)


if __name__ == "__main__":
    main()
