"""Sharded updates: a tp=4 engine fed by an FSDP trainer, and load_checkpoint throughput.

On 4 simulated CPU devices, Qwen3-0.6B-shaped model (random weights, config made locally):
- our update_params vs Tunix's SglangJaxSampler.update_params, same tp=4 engine, Tunix-layout
  bf16 params FSDP-sharded over the same 4 devices (every leaf needs a reshard);
- load_checkpoint of an HF safetensors directory (sharded, with an index): time, MB/s and the
  growth of host memory (RSS) while it streams. Tunix 0.1.7 has no checkpoint path
  (SglangJaxSampler.load_checkpoint raises NotImplementedError for a path), so there is no peer.

    python benchmarks/sharded.py [--runs 5] [--layers 28]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import psutil  # noqa: E402
from common import tunix_live_peak, tunix_peer, tunix_update  # noqa: E402
from flax import nnx  # noqa: E402

from sampler import SamplerConfig, SglangJaxSampler  # noqa: E402
from sampler.testing import random_hf_weights, write_tiny_model, write_weights  # noqa: E402
from sampler.tunix_models import random_tunix_model  # noqa: E402
from sampler.weights import live_device_bytes  # noqa: E402

MiB = 1 << 20


def _anon_rss() -> int:
    """Anonymous resident memory (file-backed pages of the mmapped checkpoint excluded)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return psutil.Process().memory_info().rss


def rss_peak_during(fn):
    """Run fn; return (result, peak growth of anonymous RSS in bytes) sampled every 2 ms."""
    base = _anon_rss()
    peak = [base]
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _anon_rss())
            time.sleep(0.002)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        out = fn()
    finally:
        done.set()
        t.join()
    return out, peak[0] - base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-sharded-"))
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
    import transformers

    write_weights(
        tmp, random_hf_weights(transformers.AutoConfig.from_pretrained(tmp), seed=args.seed), max_shard_bytes=400 * MiB
    )
    ckpt_bytes = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))

    sampler = SglangJaxSampler(
        config=SamplerConfig(model_path=str(tmp), context_length=256, max_running_requests=2, tp_size=4)
    )
    mesh = jax.make_mesh((4, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with mesh:
        model = random_tunix_model(tmp, seed=args.seed, dtype=jnp.bfloat16, mesh=mesh)
    state = nnx.state(model, nnx.Param)
    jax.block_until_ready(state)
    peer = tunix_peer(sampler, model)

    def ours():
        t0 = time.perf_counter()
        report = sampler.update_params(state)
        return time.perf_counter() - t0, report

    cases = {"ours": ours, "Tunix": lambda: (tunix_update(peer, state), None)}
    for fn in cases.values():
        fn()
        fn()
    times = {k: [] for k in cases}
    report = None
    for r in range(args.runs):
        for name in list(cases) if r % 2 == 0 else list(cases)[::-1]:
            cases[name]()  # untimed push of the same kind first: steady state
            seconds, rep = cases[name]()
            times[name].append(seconds)
            report = rep or report
    # transient memory
    ours()
    before = live_device_bytes()
    rep = sampler.update_params(state, track_peak_memory=True)
    ours_peak = rep.peak_extra_bytes
    tunix_update(peer, state)
    before = live_device_bytes()
    peak = tunix_live_peak(peer, state)
    tunix_extra = max(0, peak - max(before, live_device_bytes()))

    ckpt_times, rss = [], []
    for _ in range(args.runs):
        (rep, grow) = rss_peak_during(lambda: sampler.load_checkpoint(str(tmp)))
        ckpt_times.append(rep.seconds)
        rss.append(grow)
    largest_tensor = max(int(x.nbytes) for x in sampler.engine_params().values())

    t_ours, t_tunix = statistics.median(times["ours"]), statistics.median(times["Tunix"])
    print(
        f"\nQwen3-0.6B-shaped ({args.layers} layers), engine tp=4 on 4 simulated CPU devices, trainer FSDP over the "
        f"same devices, bf16 Tunix layout; JAX {jax.__version__}, {os.cpu_count()} cores, {args.runs} rounds, "
        f"seed {args.seed}\n"
    )
    print(
        "| update (FSDP trainer -> tp=4 engine) | median ms | speed-up vs Tunix | bytes copied "
        "| transient extra memory |"
    )
    print("|---|---:|---:|---:|---:|")
    print(
        f"| ours | {t_ours * 1e3:.1f} | {t_tunix / t_ours:.1f}x | {report.copied_bytes / MiB:.0f} MiB "
        f"| {ours_peak / MiB:.0f} MiB |"
    )
    print(f"| Tunix SglangJaxSampler.update_params | {t_tunix * 1e3:.1f} | 1.0x | - | {tunix_extra / MiB:.0f} MiB |")
    med = statistics.median(ckpt_times)
    print(
        f"\n| load_checkpoint (HF safetensors, {len(list(tmp.glob('*.safetensors')))} shards, "
        f"{ckpt_bytes / MiB:.0f} MiB) "
        f"| median s | MB/s | peak host memory growth (anonymous RSS) | largest tensor |"
    )
    print("|---|---:|---:|---:|---:|")
    print(
        f"| ours, tp=4 | {med:.2f} | {ckpt_bytes / 1e6 / med:.0f} | {statistics.median(rss) / MiB:.0f} MiB "
        f"| {largest_tensor / MiB:.0f} MiB |"
    )
    print("| Tunix 0.1.7 | n/a (no checkpoint path) | | | |")
    sampler.shutdown()


if __name__ == "__main__":
    main()
