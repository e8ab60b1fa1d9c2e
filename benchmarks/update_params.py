"""update_params: this library against Tunix's SglangJaxSampler.update_params.

Same engine, same weights, alternating runs in one process, on a Qwen3-0.6B-shaped
model (28 layers, hidden 1024, 16/8 heads, head_dim 128, vocab 151936, tied; random
weights, config made locally). Everything runs on the default SamplerConfig (only the
model path and the KV-cache sizing are given); one row shows what memory accounting
(``track_memory=True``) adds. Prints Markdown tables: medians, bytes copied measured by
buffer pointers for both libraries, transient memory two ways (see benchmarks/common.py),
and the machine's memcpy time for one model's bytes in the same run; writes them to
docs/benchmarks/results/update_params.json (``--json PATH`` elsewhere, ``--no-json`` not at all).

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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from common import (  # noqa: E402
    MiB,
    Results,
    add_output_args,
    copied_bytes,
    memcpy_seconds,
    num,
    rss_high_water,
    tunix_live_peak,
    tunix_peer,
    tunix_update,
    write_qwen3_0_6b,
)
from flax import nnx  # noqa: E402

import converters  # noqa: E402
from sampler import SamplerConfig, SglangJaxSampler  # noqa: E402
from sampler.sync.leaves import live_device_bytes  # noqa: E402
from sampler.tunix.models import random_tunix_model  # noqa: E402


def ours(sampler, tree, *, views=True, track_memory=False, **update_kwargs) -> tuple[float, object]:
    sampler.config.reshape_views = views
    sampler.config.track_memory = track_memory
    try:
        t0 = time.perf_counter()
        report = sampler.update_params(tree, **update_kwargs)
        return time.perf_counter() - t0, report
    finally:
        sampler.config.reshape_views, sampler.config.track_memory = True, False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--seed", type=int, default=0)
    add_output_args(ap)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-qwen3-0.6b-"))
    write_qwen3_0_6b(tmp, args.layers)
    sampler = SglangJaxSampler(config=SamplerConfig(model_path=str(tmp), context_length=256, max_running_requests=2))
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

    def push_ours(**settings):
        return lambda t, **kw: ours(sampler, t, **settings, **kw)

    def push_tunix(t, **kw):
        return tunix_update(peer, t), None

    # (who, source, tree, push): ours on the default SamplerConfig unless "who" says otherwise
    cases = [
        ("ours", "Tunix layout bf16", tunix_bf16, push_ours()),
        ("ours, no views (as on TPU)", "Tunix layout bf16", tunix_bf16, push_ours(views=False)),
        ("Tunix", "Tunix layout bf16", tunix_bf16, push_tunix),
        ("ours", "Tunix layout fp32", tunix_fp32, push_ours()),
        ("Tunix", "Tunix layout fp32", tunix_fp32, push_tunix),
        ("ours", "engine layout bf16", engine_layout, push_ours()),
        ("ours, track_memory=True", "Tunix layout bf16", tunix_bf16, push_ours(track_memory=True)),
        ("ours, track_memory=True", "engine layout bf16", engine_layout, push_ours(track_memory=True)),
    ]

    # Each timed push follows an untimed push of the same kind, so every case is timed in
    # its steady state (what a training loop repeats), not paying for freeing what the
    # previous case left in the engine.
    times: list[list[float]] = [[] for _ in cases]
    order = list(range(len(cases)))
    for r in range(args.runs):
        for k in order[r % len(order) :] + order[: r % len(order)]:  # rotate the order
            _, _, tree, push = cases[k]
            push(tree)
            times[k].append(push(tree)[0])
    limit = memcpy_seconds(model_bytes)

    # bytes and memory, in separate runs (measuring costs time), each after a steady-state push
    copied, live_peak, rss_peak = [], [], []
    for who, _, tree, push in cases:
        push(tree)
        copied.append(copied_bytes(sampler._handle.model_runner.model_state_leaves, tree))
        push(tree)
        before = live_device_bytes()
        if who == "Tunix":
            peak = tunix_live_peak(peer, tree)
        else:
            _, rep = push(tree, track_peak_memory=True)  # the case's own settings
            peak = before + rep.peak_extra_bytes + max(0, rep.live_bytes_after - rep.live_bytes_before)
        live_peak.append(max(0, peak - max(before, live_device_bytes())))
        push(tree)
        rss_peak.append(rss_high_water(lambda push=push, tree=tree: push(tree))[1])

    med = [statistics.median(t) for t in times]
    peer_ms = {source: m for (who, source, _, _), m in zip(cases, med) if who == "Tunix"}
    res = Results(
        "update_params",
        args,
        context={
            "model_bytes": model_bytes,
            "memcpy_one_model_ms": limit * 1e3,
            "engine_layout_vs_tunix_bf16": peer_ms["Tunix layout bf16"] / med[5],
            "track_memory_added_ms": {
                "Tunix layout bf16": 1e3 * (med[6] - med[0]),
                "engine layout bf16": 1e3 * (med[7] - med[5]),
            },
        },
    )
    table = res.table(
        [
            "update",
            "source",
            "median ms",
            "vs Tunix, same source",
            "vs memcpy of one model",
            "bytes copied (buffer pointers)",
            "extra memory: live arrays",
            "extra memory: RSS high-water",
        ],
        align=[None, None] + ["right"] * 6,
        key="updates",
        caption=(
            f"Qwen3-0.6B-shaped ({args.layers} layers, {model_bytes / MiB:.0f} MiB bf16), JAX {jax.__version__} "
            f"on {jax.devices()[0].platform} ({os.cpu_count()} cores), default SamplerConfig, {args.runs} alternating "
            f"rounds, seed {args.seed}; memcpy of {model_bytes / MiB:.0f} MiB on this machine: {limit * 1e3:.1f} ms"
        ),
    )
    for k, (who, source, _, _) in enumerate(cases):
        vs = num(peer_ms[source] / med[k], "{:.1f}x", "x") if source in peer_ms else "n/a (Tunix has no such path)"
        table.add(
            who,
            source,
            num(med[k] * 1e3, "{:.1f}", "ms"),
            vs,
            num(med[k] / limit, "{:.2f}x", "x"),
            num(copied[k] / MiB, "{:.0f} MiB", "MiB"),
            num(live_peak[k] / MiB, "{:.0f} MiB", "MiB"),
            num(rss_peak[k] / MiB, "{:.0f} MiB", "MiB"),
        )
    table.note(
        "ours on the engine layout vs Tunix on the Tunix layout bf16 (different sources: Tunix cannot take "
        f"the engine's layout): {peer_ms['Tunix layout bf16'] / med[5]:.0f}x"
    )
    table.note(
        f"memory accounting (track_memory=True) adds {1e3 * (med[6] - med[0]):.1f} ms (Tunix layout bf16) and "
        f"{1e3 * (med[7] - med[5]):.1f} ms (engine layout) per update here; it grows with the live arrays "
        "in the process"
    )
    res.emit()
    sampler.shutdown()


if __name__ == "__main__":
    main()
