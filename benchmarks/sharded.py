"""Resharded and multi-engine updates, and load_checkpoint throughput.

On 4 simulated CPU devices, Qwen3-0.6B-shaped model (random weights, config made locally),
default SamplerConfig unless a row names a setting:
- a tp=4 engine fed by Tunix-layout bf16 params of an FSDP trainer over the same 4 devices,
  and of a tp=2 trainer on devices 0-1 (every leaf needs a reshard): ours with each reshard
  strategy ("auto": host placement on CPU; "bucket": one XLA program per bucket; "leaf": one
  per leaf) vs Tunix's SglangJaxSampler.update_params on the same engine, vs the memcpy time
  of the bytes ours moves (the machine's limit for them, measured in the same run); extra
  memory by live arrays and by RSS high-water, vs the bucket budget;
- data-parallel pushes: engine-layout params on device 0 into four tp=1 engines (engine 0
  aliases, 1-3 copy, overlapped) vs into one engine, vs the memcpy of three model copies;
- load_checkpoint of an HF safetensors directory (sharded, with an index): time, MB/s and
  the growth of anonymous RSS while it streams. Tunix 0.1.7 has no checkpoint path
  (SglangJaxSampler.load_checkpoint raises NotImplementedError for a path): no peer.

Prints the three tables and writes them to docs/benchmarks/results/sharded.json (``--json PATH``
elsewhere, ``--no-json`` not at all).

    python benchmarks/sharded.py [--runs 5] [--layers 28]
"""

from __future__ import annotations

import argparse
import functools
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
from common import (  # noqa: E402
    Results,
    add_output_args,
    memcpy_seconds,
    num,
    rss_high_water,
    tunix_live_peak,
    tunix_peer,
    tunix_update,
    write_qwen3_0_6b,
)
from flax import nnx  # noqa: E402

from sampler import SamplerConfig, SglangJaxSampler  # noqa: E402
from sampler.sync.leaves import live_device_bytes  # noqa: E402
from sampler.tiny import random_hf_weights, write_weights  # noqa: E402
from sampler.tunix.models import random_tunix_model  # noqa: E402

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


def _median_push(push, runs: int) -> float:
    times = []
    for _ in range(runs):
        push()  # untimed push of the same kind first: steady state
        t0 = time.perf_counter()
        push()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _trainer(tmp, seed, mesh):
    with mesh:
        model = random_tunix_model(tmp, seed=seed, dtype=jnp.bfloat16, mesh=mesh)
    state = nnx.state(model, nnx.Param)
    jax.block_until_ready(state)
    return model, state


def _bench_trainer(sampler, tmp, seed: int, mesh, trainer_name: str, runs: int) -> list[tuple]:
    """Rows for one trainer placement: ours with each reshard strategy, then Tunix."""
    model, state = _trainer(tmp, seed, mesh)
    peer = tunix_peer(sampler, model)
    push = functools.partial(sampler.update_params, state)
    rows = []
    for strategy in ("auto", "bucket", "leaf"):
        sampler.config.reshard = strategy
        moved = push().copied_bytes
        seconds = _median_push(push, runs)
        live = sampler.update_params(state, track_peak_memory=True).peak_extra_bytes
        _, rss = rss_high_water(push)
        limit = memcpy_seconds(moved) if moved else 0.0
        rows.append((trainer_name, f"ours, reshard={strategy!r}", seconds, moved, limit, live, rss))
    sampler.config.reshard = "auto"
    tunix = functools.partial(tunix_update, peer, state)
    seconds = _median_push(tunix, runs)
    tunix()
    before = live_device_bytes()
    live = max(0, tunix_live_peak(peer, state) - max(before, live_device_bytes()))
    _, rss = rss_high_water(tunix)
    rows.append((trainer_name, "Tunix SglangJaxSampler.update_params", seconds, None, None, live, rss))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--seed", type=int, default=0)
    add_output_args(ap)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-sharded-"))
    write_qwen3_0_6b(tmp, args.layers)
    import transformers

    write_weights(
        tmp, random_hf_weights(transformers.AutoConfig.from_pretrained(tmp), seed=args.seed), max_shard_bytes=400 * MiB
    )
    ckpt_bytes = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
    auto = jax.sharding.AxisType.Auto
    trainers = {
        "FSDP over devices 0-3": jax.make_mesh((4, 1), ("fsdp", "tp"), axis_types=(auto,) * 2),
        "tp=2 on devices 0-1": jax.make_mesh((1, 2), ("fsdp", "tp"), axis_types=(auto,) * 2, devices=jax.devices()[:2]),
    }

    sampler = SglangJaxSampler(
        config=SamplerConfig(model_path=str(tmp), context_length=256, max_running_requests=2, tp_size=4)
    )
    budget = sampler.config.reshard_bucket_bytes
    rows = []
    for trainer_name, mesh in trainers.items():
        rows += _bench_trainer(sampler, tmp, args.seed, mesh, trainer_name, args.runs)
    ckpt_times, rss_growth = [], []
    for _ in range(args.runs):
        (rep, grow) = rss_peak_during(lambda: sampler.load_checkpoint(str(tmp)))
        ckpt_times.append(rep.seconds)
        rss_growth.append(grow)
    largest_tensor = max(int(x.nbytes) for x in sampler.engine_params().values())
    sampler.shutdown()

    # data-parallel pushes: one engine vs four, the source in engine 0's layout on device 0
    from sampler import DataParallelSampler

    single = SglangJaxSampler(config=SamplerConfig(model_path=str(tmp), context_length=256, max_running_requests=2))
    shardings = single.engine_shardings()
    _, state = _trainer(
        tmp, args.seed, jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(auto,) * 2, devices=jax.devices()[:1])
    )
    import converters

    layout = {k: jax.device_put(v, shardings[k]) for k, v in converters.to_engine_layout(state, single.spec).items()}
    del state
    one = _median_push(functools.partial(single.update_params, layout), args.runs)
    single.shutdown()
    dp = DataParallelSampler(
        config=SamplerConfig(model_path=str(tmp), context_length=256, max_running_requests=2, data_parallel_size=4)
    )
    report = dp.update_params(layout)
    four = _median_push(functools.partial(dp.update_params, layout), args.runs)
    _, dp_rss = rss_high_water(functools.partial(dp.update_params, layout))
    copies = report.copied_bytes
    dp_limit = memcpy_seconds(copies)
    dp.shutdown()

    med = statistics.median(ckpt_times)
    n_shards = len(list(tmp.glob("*.safetensors")))
    res = Results(
        "sharded",
        args,
        context={
            "reshard_bucket_bytes": budget,
            "checkpoint_bytes": ckpt_bytes,
            "checkpoint_shards": n_shards,
            "largest_tensor_bytes": largest_tensor,
        },
    )
    table = res.table(
        [
            "trainer",
            "update",
            "median ms",
            "vs Tunix",
            "bytes moved",
            "memcpy of those bytes (limit)",
            "vs limit",
            "extra memory: live arrays",
            "extra memory: RSS high-water",
        ],
        align=[None, None] + ["right"] * 7,
        key="resharded",
        caption=(
            f"Qwen3-0.6B-shaped ({args.layers} layers), bf16 Tunix layout into a tp=4 engine on 4 simulated CPU "
            f"devices; JAX {jax.__version__}, {os.cpu_count()} cores, default SamplerConfig, {args.runs} rounds, "
            f"seed {args.seed}; bucket budget {budget / MiB:.0f} MiB"
        ),
    )
    for trainer_name, who, seconds, moved, limit, live, rss in rows:
        tunix = next(r[2] for r in rows if r[0] == trainer_name and r[1].startswith("Tunix"))
        table.add(
            trainer_name,
            who,
            num(seconds * 1e3, "{:.1f}", "ms"),
            num(tunix / seconds, "{:.1f}x", "x"),
            num(moved / MiB, "{:.0f} MiB", "MiB") if moved is not None else "-",
            num(limit * 1e3, "{:.1f} ms", "ms") if limit else "-",
            num(seconds / limit, "{:.1f}x", "x") if limit else "-",
            num(live / MiB, "{:.0f} MiB", "MiB"),
            num(rss / MiB, "{:.0f} MiB", "MiB"),
        )
    table = res.table(
        [
            "data-parallel push (engine-layout bf16 on device 0)",
            "median ms",
            "bytes copied",
            "memcpy of those bytes",
            "vs limit",
            "RSS high-water",
        ],
        align=[None] + ["right"] * 5,
        key="data_parallel_push",
    )
    table.add("one tp=1 engine (aliased)", num(one * 1e3, "{:.1f}", "ms"), num(0, "{} MiB", "MiB"), "-", "-", "-")
    table.add(
        "4 tp=1 engines (DataParallelSampler: engine 0 aliases, 1-3 copy, overlapped)",
        num(four * 1e3, "{:.1f}", "ms"),
        num(copies / MiB, "{:.0f} MiB", "MiB"),
        num(dp_limit * 1e3, "{:.1f} ms", "ms"),
        num(four / dp_limit, "{:.1f}x", "x"),
        num(dp_rss / MiB, "{:.0f} MiB", "MiB"),
    )
    table = res.table(
        [
            f"load_checkpoint (HF safetensors, {n_shards} shards, {ckpt_bytes / MiB:.0f} MiB)",
            "median s",
            "MB/s",
            "peak host memory growth (anonymous RSS)",
            "largest tensor",
        ],
        align=[None] + ["right"] * 4,
        key="load_checkpoint",
    )
    table.add(
        "ours, tp=4",
        num(med, "{:.2f}", "s"),
        num(ckpt_bytes / 1e6 / med, "{:.0f}", "MB/s"),
        num(statistics.median(rss_growth) / MiB, "{:.0f} MiB", "MiB"),
        num(largest_tensor / MiB, "{:.0f} MiB", "MiB"),
    )
    table.add("Tunix 0.1.7", "n/a (no checkpoint path)", None, None, None)
    res.emit()


if __name__ == "__main__":
    main()
